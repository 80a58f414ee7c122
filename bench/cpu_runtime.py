"""trtbuild_runtime against transformers `generate` on this CPU: SmolLM2-135M in float32.

Rows: `generate` one prompt at a time (batch 1) and as a static batch of 8; the engine with one
stream and with 8 concurrent streams (closed loop, requests joining as others finish). Prompts
from trtbuild/data/prompts.jsonl, output length forced (EOS ignored). Prints a table, writes JSON.

    .venv/bin/python -m bench.cpu_runtime --out bench/results/$(date +%F)-cpu-2core-runtime.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


from trtbuild.checkpoint import write_demo_checkpoint
from trtbuild.quality.validate import DEFAULT_PROMPTS
from trtbuild.quality.accuracy import load_prompts
from trtbuild_runtime import EngineConfig, LLMEngine, SamplingParams


def hf_rate(model, prompts: list[list[int]], batch: int, new_tokens: int) -> float:
    """Output tokens/s of `generate` over the prompts, `batch` at a time (left-padded to one length)."""
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = prompts[i:i + batch]
        width = max(map(len, group))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
        tokens += (out.shape[1] - width) * len(group)
    return tokens / (time.perf_counter() - start)


def engine_rate(engine: LLMEngine, prompts: list[list[int]], streams: int, new_tokens: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens, top_k=1, ignore_eos=True)
    pending, active, ttft, sent, tokens = list(enumerate(prompts)), set(), [], {}, 0
    start = time.perf_counter()
    while pending or active:
        while pending and len(active) < streams:
            i, ids = pending.pop(0)
            engine.add_request(str(i), ids, params)
            active.add(str(i))
            sent[str(i)] = time.perf_counter()
        for out in engine.step():
            if len(out.generated_tokens) == 1:
                ttft.append((time.perf_counter() - sent[out.request_id]) * 1e3)
            if out.is_finished():
                active.discard(out.request_id)
                tokens += len(out.generated_tokens)
    return {"tok_s": tokens / (time.perf_counter() - start), "ttft_p50_ms": statistics.median(ttft)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the embedded SmolLM2 (written to a temp dir)")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or write_demo_checkpoint(Path(tmp) / "smollm2", "smollm2")
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        texts = [p.prompt for p in load_prompts(DEFAULT_PROMPTS)][: args.prompts]
        prompts = [tokenizer(t)["input_ids"] for t in texts]
        hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        engine = LLMEngine(EngineConfig(str(checkpoint), dtype="float32", device="cpu", max_batch_size=8, max_seq_len=256))
        hf_rate(hf, prompts[:1], 1, 4)  # warm-up
        engine_rate(engine, prompts[:1], 1, 4)
        rows = {
            "HF generate, batch 1": {"tok_s": hf_rate(hf, prompts, 1, args.new_tokens)},
            "HF generate, static batch 8": {"tok_s": hf_rate(hf, prompts, 8, args.new_tokens)},
            "trtbuild_runtime, 1 stream": engine_rate(engine, prompts, 1, args.new_tokens),
            "trtbuild_runtime, 8 streams": engine_rate(engine, prompts, 8, args.new_tokens),
        }
    base = rows["HF generate, batch 1"]["tok_s"]
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "model": "SmolLM2-135M-Instruct float32", "prompts": len(prompts),
              "new_tokens": args.new_tokens, "rows": rows,
              "goals": {"1 stream >= HF batch 1": rows["trtbuild_runtime, 1 stream"]["tok_s"] / base,
                        "8 streams >= 3x HF batch 1": rows["trtbuild_runtime, 8 streams"]["tok_s"] / base}}
    print(f"{'path':32} {'tok/s':>8} {'x HF bs1':>9} {'TTFT p50 ms':>12}")
    for name, row in rows.items():
        ttft = f"{row['ttft_p50_ms']:.0f}" if "ttft_p50_ms" in row else ""
        print(f"{name:32} {row['tok_s']:>8.1f} {row['tok_s'] / base:>9.2f} {ttft:>12}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
