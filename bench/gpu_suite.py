"""The GPU suite: serve, benchmark and validate a 1B-class Llama in one run (bench/gpu_suite.sh).

Measured side by side, fixed input/output lengths (output length forced, EOS ignored):
  (a) transformers `generate` with static batches: the baseline users have today;
  (b) our runtime called directly: the continuous-batching manager the Triton model runs, exactly
      as llm_runtime.py sets it up, at N concurrent requests (closed loop);
  (c) the same through Triton: ensemble and BLS, gRPC streaming, via `trtbuild bench`;
  (d) FP8 (row-wise scaled torch._scaled_mm) against BF16 on the runtime, with the logits delta.
Writes suite.json, suite.csv and PNG plots to --out and prints a table last.
`--preset tiny --device cpu` runs every stage on a CPU in about a minute (tests/test_gpu_suite.py).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.checkpoint import load_model_spec  # noqa: E402
from builder.repository import TEMPLATE_ROOT, generate as generate_repository  # noqa: E402
from builder.server import TritonServer  # noqa: E402
from builder.spec import BuildSpec, KVCacheSpec  # noqa: E402

_spec = importlib.util.spec_from_file_location("llm_runtime", TEMPLATE_ROOT / "llm_transformers" / "1" / "llm_runtime.py")
llm_runtime = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llm_runtime)

PRESETS = {
    # ~1.07B parameters: hidden 2048, 16 layers, GQA 32/8, SmolLM2's 49,152-token vocabulary
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}


@dataclasses.dataclass
class Row:
    path: str
    concurrency: int
    output_tokens_per_s: float
    requests: int
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    latency_p50_ms: float | None = None
    note: str = ""


def build_checkpoint(out: Path, preset: str, tokenizer_dir: Path, dtype: str) -> Path:
    import transformers

    sys.path.insert(0, str(TEMPLATE_ROOT / "_common"))
    from trtbuild_tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    shutil.rmtree(out, ignore_errors=True)
    config = transformers.LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, **PRESETS[preset])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    del model
    return out


def prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab - 100, size=(count, length)).tolist()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def static_generate(model, device: str, batches: list[int], in_len: int, out_len: int) -> list[Row]:
    rows = []
    for batch in batches:
        ids = torch.tensor(prompts(model.config.vocab_size, batch, in_len, seed=batch), device=device)
        kwargs = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, **kwargs)  # warm-up
            _sync(device)
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            _sync(device)
        elapsed = time.perf_counter() - start
        generated = (out.shape[1] - in_len) * batch
        rows.append(Row("(a) HF generate, static batch", batch, generated / elapsed, batch,
                        latency_p50_ms=elapsed * 1e3))
    return rows


def direct_runtime(model, concurrencies: list[int], in_len: int, out_len: int, page_size: int, label: str,
                   requests_per_slot: int = 2) -> list[Row]:
    """Closed loop on the continuous-batching manager, as the Triton model drives it."""
    manager, per_request, _ = llm_runtime.continuous_batching(
        model, eos_token_id=-1, pad_token_id=0, max_input_len=in_len, max_output_len=out_len, page_size=page_size,
        num_blocks=max(concurrencies) * (-(-(in_len + out_len) // page_size)), free_gpu_mem_fraction=0.85)
    greedy = llm_runtime.sampling_kwargs(per_request, model.config.vocab_size)
    rows = []
    try:
        for concurrency in [1, *concurrencies]:  # the first pass at 1 warms up kernels and graphs
            total = max(concurrency * requests_per_slot, 4)
            queue = prompts(model.config.vocab_size, total, in_len, seed=concurrency)
            sent, first, done, counts = {}, {}, {}, {}
            start = time.perf_counter()

            def submit(i):
                rid = f"{label}-{concurrency}-{i}"
                sent[rid] = time.perf_counter()
                manager.add_request(queue[i], request_id=rid, max_new_tokens=out_len, streaming=True, eos_token_id=-1, **greedy)

            for i in range(min(concurrency, total)):
                submit(i)
            next_index = min(concurrency, total)
            while len(done) < total:
                result = manager.get_result(timeout=60)
                if result is None:
                    raise RuntimeError(f"the runtime stalled at concurrency {concurrency}")
                now = time.perf_counter()
                first.setdefault(result.request_id, now)
                if result.is_finished():
                    if result.error:
                        raise RuntimeError(result.error)
                    done[result.request_id] = now
                    counts[result.request_id] = len(result.generated_tokens)
                    if next_index < total:
                        submit(next_index)
                        next_index += 1
            elapsed = time.perf_counter() - start
            if concurrency == 1 and not rows and concurrencies[0] != 1:
                rows.append(None)  # the warm-up pass is not reported
                continue
            ttft = [(first[r] - sent[r]) * 1e3 for r in done]
            latency = [(done[r] - sent[r]) * 1e3 for r in done]
            itl = [(done[r] - first[r]) * 1e3 / max(counts[r] - 1, 1) for r in done]
            rows.append(Row(label, concurrency, sum(counts.values()) / elapsed, total,
                            *_p(ttft), statistics.median(itl), statistics.median(latency)))
    finally:
        manager.stop(block=True, timeout=30)
        model.destroy_cached_continuous_batching_manager()
    return [r for r in rows if r is not None][-len(concurrencies):]


def _p(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def through_triton(checkpoint: Path, device: str, dtype: str, quantization: str, concurrencies: list[int], in_len: int,
                   out_len: int, models: list[str], out: Path) -> list[Row]:
    from clients.bench import BenchConfig, run_benchmark
    from clients.loadgen import LoadPoint
    from clients.prompts import LengthDistribution

    text_env = os.environ.get("TRTBUILD_TEXT_ENV")
    spec = BuildSpec(checkpoint=checkpoint, model=load_model_spec(checkpoint), device=device, dtype=dtype,
                     quantization=quantization, max_batch_size=max(concurrencies), max_input_len=in_len + 8,
                     max_output_len=out_len, kv_cache=KVCacheSpec(free_gpu_mem_fraction=0.85),
                     text_env=Path(text_env) if text_env else None)
    repo = generate_repository(spec, out / f"model_repo_{quantization}", force=True)
    server = TritonServer(repo, log_path=out / f"tritonserver_{quantization}.log")
    server.start(timeout=600)
    rows = []
    try:
        for model in models:
            config = BenchConfig(url=server.grpc_url, protocol="grpc", model=model, stream=True,
                                 loads=tuple(LoadPoint(concurrency=c) for c in concurrencies),
                                 requests=max(2 * max(concurrencies), 8), warmup=2, tokenizer=checkpoint,
                                 input_tokens=LengthDistribution(in_len), output_tokens=LengthDistribution(out_len))
            result = run_benchmark(config)
            (out / f"bench_{model}_{quantization}.json").write_text(json.dumps(result.to_json(), indent=1, default=str))
            for run in result.runs:
                m = run.metrics
                rows.append(Row(f"(c) Triton {model}, gRPC streaming" + (f", {quantization}" if quantization != "none" else ""),
                                run.load.concurrency, m.output_tokens_per_s, m.completed,
                                *(None if s is None else getattr(s, q) for s, q in
                                  ((m.ttft_ms, "p50"), (m.ttft_ms, "p99"), (m.itl_ms, "p50"), (m.latency_ms, "p50"))),
                                note=f"failed {m.failed}"))
    finally:
        server.stop()
    return rows


def logits_delta(reference, candidate, vocab: int, device: str, length: int = 64, count: int = 8) -> dict[str, float]:
    ids = torch.tensor(prompts(vocab, count, length, seed=123), device=device)
    with torch.no_grad():
        ref = reference(ids).logits.float()
        new = candidate(ids).logits.float()
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(new, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return {"top1_agreement": (ref.argmax(-1) == new.argmax(-1)).float().mean().item(), "mean_kl": kl,
            "max_abs_logit_diff": (ref - new).abs().max().item(),
            "relative_l2": ((ref - new).norm() / ref.norm()).item()}


def plot(rows: list[Row], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for path in dict.fromkeys(r.path for r in rows):
        points = sorted((r.concurrency, r.output_tokens_per_s, r.ttft_p50_ms) for r in rows if r.path == path)
        ax1.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=path)
        if points[0][2] is not None:
            ax2.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=path)
    for ax, title in ((ax1, "output tokens/s"), (ax2, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests (batch size for static generate)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "suite.png", dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "artifacts/gpu")))
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".gpu" / "tokenizer")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--static-batches", default="1,8,32")
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--fp8-concurrency", default="32,64")
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--skip", default="", help="comma-separated stages to skip: static,direct,triton,fp8")
    args = ap.parse_args(argv)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    concurrencies, fp8_conc = ints(args.concurrency), ints(args.fp8_concurrency)
    started = time.time()
    checkpoint = build_checkpoint(out / "checkpoint", args.preset, args.tokenizer, args.dtype)
    spec = load_model_spec(checkpoint)
    report: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
                    "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "parameters": spec.num_parameters,
                    "dtype": args.dtype, "input_len": args.input_len, "output_len": args.output_len,
                    "torch": torch.__version__, "stages": {}}
    rows: list[Row] = []

    def stage(name, fn):
        if name in skip:
            return None
        t = time.time()
        try:
            value = fn()
            report["stages"][name] = {"seconds": round(time.time() - t, 1), "ok": True}
            return value
        except Exception as e:  # noqa: BLE001 - one failed stage must not lose the others' numbers
            report["stages"][name] = {"seconds": round(time.time() - t, 1), "ok": False, "error": f"{type(e).__name__}: {e}"}
            print(f"stage {name} failed: {e}", flush=True)
            return None
        finally:
            _free(args.device)

    model = llm_runtime.load_model(str(checkpoint), args.dtype, args.device)
    rows += stage("static", lambda: static_generate(model, args.device, ints(args.static_batches), args.input_len, args.output_len)) or []
    rows += stage("direct", lambda: direct_runtime(model, concurrencies, args.input_len, args.output_len, args.page_size,
                                                    "(b) runtime direct, in-flight batching")) or []
    if "fp8" not in skip:
        fp8_model = llm_runtime.load_model(str(checkpoint), args.dtype, args.device, "fp8")
        report["fp8_logits_delta_vs_bf16"] = stage("fp8_delta", lambda: logits_delta(model, fp8_model, spec.vocab_size, args.device))
        del model
        _free(args.device)
        rows += stage("fp8", lambda: direct_runtime(fp8_model, fp8_conc, args.input_len, args.output_len, args.page_size,
                                                     "(d) runtime direct, FP8")) or []
        del fp8_model
    else:
        del model
    _free(args.device)
    rows += stage("triton", lambda: through_triton(checkpoint, args.device, args.dtype, "none", concurrencies, args.input_len,
                                                   args.output_len, ["ensemble", "llm_bls"], out)) or []
    report["rows"] = [dataclasses.asdict(r) for r in rows]
    report["goals"] = goals(rows, fp8_conc)
    report["seconds"] = round(time.time() - started, 1)
    (out / "suite.json").write_text(json.dumps(report, indent=2))
    with open(out / "suite.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(Row)])
        writer.writeheader()
        writer.writerows(report["rows"])
    if rows:
        plot(rows, out)
    print_table(report)
    return report


def goals(rows: list[Row], fp8_conc: list[int]) -> dict:
    def tps(prefix: str, concurrency: int) -> float | None:
        values = [r.output_tokens_per_s for r in rows if r.path.startswith(prefix) and r.concurrency == concurrency]
        return values[0] if values else None

    out = {}
    base, triton64, direct64 = tps("(a)", 1), tps("(c) Triton ensemble", 64), tps("(b)", 64)
    if base and triton64:
        out["triton64_vs_static_bs1"] = {"ratio": triton64 / base, "goal": 10.0, "met": triton64 / base >= 10}
    if direct64 and triton64:
        out["triton64_vs_direct64"] = {"ratio": triton64 / direct64, "goal": 0.95, "met": triton64 / direct64 >= 0.95}
    for c in fp8_conc:
        fp8, bf16 = tps("(d)", c), tps("(b)", c)
        if fp8 and bf16:
            out[f"fp8_vs_bf16_at_{c}"] = {"ratio": fp8 / bf16, "goal": 1.3, "met": fp8 / bf16 >= 1.3}
    return out


def print_table(report: dict) -> None:
    print(f"\n{report['device']}  {report['parameters'] / 1e9:.2f}B params {report['dtype']}  "
          f"{report['input_len']} in / {report['output_len']} out  ({report['seconds']} s)")
    print(f"{'path':46} {'conc':>5} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8}")
    fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    for r in report["rows"]:
        print(f"{r['path'][:46]:46} {r['concurrency']:>5} {r['output_tokens_per_s']:>9.1f} {fmt(r['ttft_p50_ms']):>9} "
              f"{fmt(r['ttft_p99_ms']):>9} {fmt(r['itl_p50_ms']):>8}")
    for name, goal in report["goals"].items():
        print(f"goal {name}: {goal['ratio']:.2f} (goal {goal['goal']}) {'met' if goal['met'] else 'MISSED'}")
    for name, s in report["stages"].items():
        if not s["ok"]:
            print(f"stage {name} FAILED: {s['error']}")
    if report.get("fp8_logits_delta_vs_bf16"):
        print("fp8 vs bf16 logits:", {k: round(v, 4) for k, v in report["fp8_logits_delta_vs_bf16"].items()})


if __name__ == "__main__":
    main()
