"""The GPU suite: one device call, a 1.07B Llama in bf16, 128 tokens in / 128 out (EOS ignored).

Stages, each printing one line per measurement and rewriting suite.json when it ends (a run
killed at its time limit keeps what it measured):
  hf_static    transformers `generate`, static batches, eager: the baseline users already have;
  engine       trtbuild_runtime called directly, closed loop at N concurrent requests
               (requests per point: max(4 x N, 16)), TTFT / ITL / latency percentiles;
  agreement    greedy tokens of the engine vs `generate` in the same dtype, 64 prompts x 128;
  profile      torch-profiler trace of decode steps at 64 and 256 streams: GPU kernel time vs
               host time per step (profile_*.json is the Chrome trace);
  triton       the generated repository behind the real tritonserver: ensemble and llm_bls,
               gRPC streaming, `trtbuild bench` (requests per point: max(2 x N, 16));
  kernels      the FP8 producer kernels and the e4m3 decode kernel against their torch twins, on the GPU;
  quant        the engine with FP8 weights/activations, an FP8 KV cache and both, at the same loads
               as `engine` (BF16) in the same run: tok/s, KV bytes per token, weight bytes;
  prefix       prefix caching: 8 requests alone in turn sharing a 1,024-token system prompt, TTFT
               of the first (cold) vs the later ones, with the cache on and off;
  smollm2      with --smollm2 DIR (the trained model): prompt-lookup speculation at 1 stream and the
               perplexity of each quantized mode (bench/speculative.py, bench/quantized.py);
  hf_compiled  `generate` with cache_implementation="static" (torch.compile), the stronger
               baseline; last, because compiling costs minutes;
  engine8b     a Llama-3.1-8B-shaped checkpoint (random weights, built on the GPU) through the engine
               in BF16 / FP8 / FP8 + FP8 KV / INT4 at 1 stream and maximum load (bench/engine8b.py,
               engine8b.json); `--stages engine8b` alone needs nothing carried.
Every row carries its fraction of the physical bound: bytes a decode step must read (weights +
KV of the live context) over the HBM bandwidth. `--quick` runs a 3-minute subset.
`--preset tiny --device cpu` runs every stage on a CPU (tests/test_gpu_suite.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.timing import graph_time_us

ROOT = Path(__file__).resolve().parent.parent

from trtbuild.checkpoint import load_model_spec
from trtbuild_runtime import EngineConfig, LLMEngine, SamplingParams

PRESETS = {
    # ~1.07B parameters: hidden 2048, 16 layers, GQA 32/8, SmolLM2's 49,152-token vocabulary
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
HBM_BYTES_PER_S = 4.8e12  # H200 datasheet


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
    bound_fraction: float | None = None
    note: str = ""


class Suite:
    """Rows, per-stage status and the report file, rewritten after every stage."""

    def __init__(self, out: Path, report: dict, bound):
        self.out, self.report, self.bound = out, report, bound
        self.rows: list[Row] = []
        report.setdefault("stages", {})

    def add(self, row: Row) -> None:
        row.bound_fraction = row.output_tokens_per_s / self.bound(row.concurrency)
        self.rows.append(row)
        print(f"  {row.path:44} {row.concurrency:>4} {row.output_tokens_per_s:>10.1f} tok/s  "
              f"TTFT p50 {_fmt(row.ttft_p50_ms)} p99 {_fmt(row.ttft_p99_ms)}  ITL p50 {_fmt(row.itl_p50_ms)}  "
              f"{row.bound_fraction:.1%} of bound {row.note}", flush=True)

    def stage(self, name: str, fn) -> object:
        print(f"== {name}", flush=True)
        t = time.time()
        try:
            value = fn()
            self.report["stages"][name] = {"seconds": round(time.time() - t, 1), "ok": True}
            return value
        except Exception as e:  # noqa: BLE001 - one failed stage must not lose the others' numbers
            import traceback

            traceback.print_exc()
            self.report["stages"][name] = {"seconds": round(time.time() - t, 1), "ok": False, "error": f"{type(e).__name__}: {e}"}
            return None
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.save()

    def save(self) -> None:
        self.report["rows"] = [dataclasses.asdict(r) for r in self.rows]
        self.report["goals"] = goals(self.rows, self.report)
        self.report["seconds"] = round(time.time() - self.report["started"], 1)
        (self.out / "suite.json").write_text(json.dumps(self.report, indent=2))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def build_checkpoint(out: Path, preset: str, tokenizer_dir: Path, dtype: str) -> Path:
    import transformers
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    shutil.rmtree(out, ignore_errors=True)
    config = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2, **PRESETS[preset])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    del model
    return out


def prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab - 100, size=(count, length)).tolist()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


# ---------------------------------------------------------------------- HF baselines
def load_hf(checkpoint: Path, dtype: str, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device).eval()


def hf_static(suite: Suite, model, device: str, batches: list[int], in_len: int, out_len: int, compiled: bool) -> None:
    label = "HF generate, static cache + torch.compile" if compiled else "HF generate, static batch, eager"
    extra = dict(cache_implementation="static") if compiled else {}
    for batch in batches:
        ids = torch.tensor(prompts(model.config.vocab_size, batch, in_len, seed=batch), device=device)
        kwargs = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=0, **extra)
        with torch.no_grad():
            t = time.perf_counter()
            model.generate(ids, **kwargs)  # warm-up (and, compiled, the compilation)
            _sync()
            warm = time.perf_counter() - t
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            _sync()
        elapsed = time.perf_counter() - start
        suite.add(Row(label, batch, (out.shape[1] - in_len) * batch / elapsed, batch, latency_p50_ms=elapsed * 1e3,
                      note=f"warm-up {warm:.0f} s" if compiled else ""))


# ---------------------------------------------------------------------- our engine
def engine_config(checkpoint: Path, dtype: str, device: str, max_seqs: int, max_len: int, **kw) -> EngineConfig:
    return EngineConfig(str(checkpoint), dtype=dtype, device=device, max_batch_size=max_seqs, max_seq_len=max_len,
                        kv_cache_free_gpu_mem_fraction=0.85, **kw)


def closed_loop(engine: LLMEngine, concurrency: int, total: int, in_len: int, out_len: int, seed: int) -> dict:
    """Keep `concurrency` requests in flight until `total` have finished; per-request timings."""
    queue = prompts(engine.vocab_size, total, in_len, seed=seed)
    params = SamplingParams(max_tokens=out_len, top_k=1, ignore_eos=True)
    sent, first, done, counts = {}, {}, {}, {}
    next_index = 0

    def submit():
        nonlocal next_index
        rid = f"{seed}-{next_index}"
        sent[rid] = time.perf_counter()
        engine.add_request(rid, queue[next_index], params)
        next_index += 1

    start = time.perf_counter()
    while next_index < min(concurrency, total):
        submit()
    while len(done) < total:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            first.setdefault(out.request_id, now)
            if out.is_finished():
                if out.error:
                    raise RuntimeError(out.error)
                done[out.request_id] = now
                counts[out.request_id] = len(out.generated_tokens)
                if next_index < total:
                    submit()
    elapsed = time.perf_counter() - start
    return dict(elapsed=elapsed, tokens=sum(counts.values()),
                ttft=[(first[r] - sent[r]) * 1e3 for r in done], latency=[(done[r] - sent[r]) * 1e3 for r in done],
                itl=[(done[r] - first[r]) * 1e3 / max(counts[r] - 1, 1) for r in done])


def engine_direct(suite: Suite, engine: LLMEngine, concurrencies: list[int], in_len: int, out_len: int, per_point) -> None:
    closed_loop(engine, 2, 4, in_len, out_len, seed=999)  # warm-up
    for c in concurrencies:
        total = per_point(c)
        r = closed_loop(engine, c, total, in_len, out_len, seed=c)
        suite.add(Row("trtbuild_runtime direct", c, r["tokens"] / r["elapsed"], total, _p(r["ttft"], 50), _p(r["ttft"], 99),
                      statistics.median(r["itl"]), statistics.median(r["latency"]),
                      note=f"preemptions {engine.scheduler.preemptions}"))


def agreement(suite: Suite, engine: LLMEngine, hf, device: str, count: int, in_len: int, out_len: int) -> dict:
    """Free-running agreement with `generate`, and teacher-forced: is each of our tokens HF's argmax
    given our own prefix? On a random-weight model greedy paths split at near-ties (bf16 rounding
    in different kernels), so the teacher-forced rate and the logit gap of each disagreement are
    what say whether the engine computes the same function."""
    ids = prompts(engine.vocab_size, count, in_len, seed=4242)
    ours = [o.generated_tokens for o in engine.generate(ids, SamplingParams(max_tokens=out_len, top_k=1, ignore_eos=True))]
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids, device=device), max_new_tokens=out_len, min_new_tokens=out_len,
                          do_sample=False, pad_token_id=0)[:, in_len:].tolist()
        full = torch.tensor([p + o for p, o in zip(ids, ours)], device=device)
        logits = torch.cat([hf(full[i:i + 16]).logits[:, in_len - 1:-1].float() for i in range(0, count, 16)])
    chosen = torch.tensor(ours, device=device)
    best = logits.max(-1).values
    gap = best - logits.gather(-1, chosen[..., None]).squeeze(-1)  # 0 where our token is HF's argmax
    spread = (best - logits.topk(2, dim=-1).values[..., 1]).median().item()
    same = sum(a == b for x, y in zip(ours, ref) for a, b in zip(x, y))
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(y)) / len(y) for x, y in zip(ours, ref)]
    result = {"prompts": count, "tokens": out_len, "token_agreement": same / (count * out_len),
              "exact_sequences": sum(x == y for x, y in zip(ours, ref)) / count, "prefix_agreement": statistics.mean(prefix),
              "teacher_forced_agreement": (gap == 0).float().mean().item(),
              "disagreement_logit_gap_max": gap.max().item(), "top1_top2_margin_median": spread}
    print(f"  free-running token agreement {result['token_agreement']:.4f} (prefix {result['prefix_agreement']:.3f}); "
          f"teacher-forced {result['teacher_forced_agreement']:.4f}, largest logit gap of a disagreement "
          f"{result['disagreement_logit_gap_max']:.4f} (median top-1/top-2 margin {spread:.4f})", flush=True)
    suite.report["agreement"] = result
    return result


def profile_decode(suite: Suite, engine: LLMEngine, concurrencies: list[int], in_len: int, out_len: int, out: Path,
                   label: str = "") -> None:
    """Per decode step: wall time, GPU kernel time (profiler), and what is left: host time."""
    from torch.profiler import ProfilerActivity, profile

    results = {}
    for c in concurrencies:
        for i in range(c):
            engine.add_request(f"prof-{c}-{i}", prompts(engine.vocab_size, 1, in_len, seed=i)[0],
                               SamplingParams(max_tokens=out_len, top_k=1, ignore_eos=True))
        while engine.scheduler.waiting:
            engine.step()
        steps = max(1, min(16, out_len - 6))
        for _ in range(min(4, out_len - steps - 1)):
            engine.step()
        _sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                engine.step()
            _sync()
            wall = (time.perf_counter() - t) / steps
        events = prof.key_averages()
        gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in events) / steps
        top = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:8]
        trace = out / f"profile_decode{label and '_' + label}_{c}.json"
        prof.export_chrome_trace(str(trace))
        results[c] = {"step_ms": wall * 1e3, "gpu_kernel_ms": gpu_us / 1e3, "host_ms": wall * 1e3 - gpu_us / 1e3,
                      "gpu_share": gpu_us / 1e3 / (wall * 1e3), "trace": trace.name,
                      "top_kernels": [(e.key[:60], round(getattr(e, "self_device_time_total", 0) / steps / 1e3, 3)) for e in top]}
        print(f"  {c:>4} streams: step {wall * 1e3:.2f} ms, GPU kernels {gpu_us / 1e3:.2f} ms "
              f"({results[c]['gpu_share']:.0%}), host/idle {results[c]['host_ms']:.2f} ms", flush=True)
        for name, ms in results[c]["top_kernels"][:5]:
            print(f"        {ms:7.3f} ms  {name}", flush=True)
        for rid in list(engine.seqs):
            engine.abort(rid)
    suite.report["profile" + (label and "_" + label)] = results


# ---------------------------------------------------------------------- quantized modes
QUANT_MODES = {"fp8": dict(quantization="fp8"), "fp8-tensorwise": dict(quantization="fp8", fp8_gemm="tensorwise"),
               "fp8-fast-accum": dict(quantization="fp8", fp8_gemm="rowwise_fast_accum"),
               "kv-fp8": dict(kv_cache_dtype="fp8"),
               "fp8+kv-fp8": dict(quantization="fp8", kv_cache_dtype="fp8")}


def kernel_parity(suite: Suite) -> dict:
    """The Triton producers of e4m3 activations and the e4m3 decode kernel against torch, in bf16 on the GPU."""
    from trtbuild_runtime import attention, quant_kernels
    from trtbuild_runtime.kernels import paged_decode_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(256, 2048, generator=g, device="cuda") * 3).bfloat16()
    w = (torch.rand(2048, generator=g, device="cuda") + 0.5).bfloat16()
    gu = torch.randn(256, 2 * 8192, generator=g, device="cuda").bfloat16()
    h = x.float()
    normed = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)  # transformers' formula
    gate, up = gu.chunk(2, dim=-1)
    activated = torch.nn.functional.silu(gate) * up

    def e4m3(v: torch.Tensor):
        scale = v.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448.0
        return (v.float() / scale).to(torch.float8_e4m3fn), scale

    out = {"rms_norm_bf16_exact": bool(torch.equal(quant_kernels.rms_norm(x, w, 1e-5, False), normed))}
    for name, (q, scale), source in (("rms_norm_fp8", quant_kernels.rms_norm(x, w, 1e-5, True), normed),
                                     ("silu_mul_fp8", quant_kernels.silu_mul_quant(gu), activated),
                                     ("quantize_rows_fp8", quant_kernels.quantize_rows(x), x)):
        want, want_scale = e4m3(source)
        out[f"{name}_code_mismatch"] = (q.float() != want.float()).float().mean().item()
        out[f"{name}_scale_max_rel_err"] = ((scale - want_scale).abs() / want_scale).max().item()
    k_pool = (torch.randn(64, 32, 8, 64, generator=g, device="cuda") * 2).to(torch.float8_e4m3fn)
    v_pool = (torch.randn(64, 32, 8, 64, generator=g, device="cuda") * 2).to(torch.float8_e4m3fn)
    tables = torch.randint(0, 64, (16, 8), generator=g, device="cuda", dtype=torch.int32)
    lens = torch.randint(1, 256, (16,), generator=g, device="cuda", dtype=torch.int32)
    q = torch.randn(16, 32, 64, generator=g, device="cuda").bfloat16()
    kernel = paged_decode_attention(q, k_pool, v_pool, tables, lens, 0.125, 0.5, 0.25).float()
    reference = attention.paged_attention_reference(q.unsqueeze(1), k_pool, v_pool, tables, lens, (lens - 1).long(), 0.125,
                                                    0.5, 0.25).squeeze(1).float()
    out["decode_fp8_max_abs_err"] = (kernel - reference).abs().max().item()
    print("  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()), flush=True)
    suite.report["kernels"] = out
    return out


def gemm_bench(suite: Suite, hidden: int, inter: int, q_size: int, kv_size: int) -> dict:
    """The decode GEMMs of the model at each batch: BF16, FP8 row-wise scaled, FP8 unit-scale + epilogue."""
    from trtbuild_runtime.quantization import Fp8Linear, quantize_rows

    shapes = {"qkv": (hidden, q_size + 2 * kv_size), "o": (q_size, hidden), "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}
    results = {}

    def timed(fn, n=50) -> float:
        return graph_time_us(fn, n)

    for m in (1, 16, 64, 256):
        row = {}
        for name, (k, n) in shapes.items():
            linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq = quantize_rows(x)
            tactics = {g: Fp8Linear.from_linear(linear, gemm=g) for g in ("rowwise", "rowwise_fast_accum", "tensorwise")}
            with torch.no_grad():
                row[name] = {"bf16_us": timed(lambda: linear(x)),
                             **{f"fp8_{g}_us": timed(lambda layer=layer: layer(xq)) for g, layer in tactics.items()}}
        results[m] = row
        total = {k: sum(r[k] for r in row.values()) for k in next(iter(row.values()))}
        print(f"  M={m:>4}: one layer's four GEMMs (us, in a CUDA graph) " + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in total.items()), flush=True)
    suite.report["gemm"] = results
    return results


def quantized_engines(suite: Suite, checkpoint: Path, dtype: str, device: str, concurrencies: list[int], in_len: int,
                      out_len: int, per_point, modes: list[str], out: Path) -> None:
    """Each quantized mode at the BF16 `engine` stage's loads: same prompts, same requests per point."""
    from trtbuild_runtime.quantization import weight_bytes

    info = suite.report.setdefault("quant", {})
    for mode in modes:
        t = time.time()
        engine = LLMEngine(engine_config(checkpoint, dtype, device, max(concurrencies), in_len + out_len + 16, **QUANT_MODES[mode]))
        r = engine.runner
        info[mode] = {"start_s": round(time.time() - t, 1), "num_blocks": r.num_blocks, "kv_bytes_per_token": r.block_bytes // r.page,
                      "weight_bytes": weight_bytes(r.model)}
        print(f"  {mode}: ready in {info[mode]['start_s']} s, {r.num_blocks} KV blocks, KV {info[mode]['kv_bytes_per_token']} B/token, "
              f"weights {info[mode]['weight_bytes'] / 2**30:.2f} GiB", flush=True)
        closed_loop(engine, 2, 4, in_len, out_len, seed=999)
        for c in concurrencies:
            res = closed_loop(engine, c, per_point(c), in_len, out_len, seed=c)
            suite.add(Row(f"runtime {mode}", c, res["tokens"] / res["elapsed"], per_point(c), _p(res["ttft"], 50), _p(res["ttft"], 99),
                          statistics.median(res["itl"]), statistics.median(res["latency"])))
        suite.save()
        if mode == "fp8":
            profile_decode(suite, engine, [c for c in (64, 256) if c <= max(concurrencies)] or [max(concurrencies)],
                           in_len, out_len, out, label="fp8")
        del engine, r
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def prefix_cache(suite: Suite, checkpoint: Path, dtype: str, device: str, system_len: int = 1024, requests: int = 8) -> dict:
    """TTFT of requests sent one at a time that share a system prompt: the first computes it, the rest reuse it."""
    results = {}
    for reuse in (True, False):
        engine = LLMEngine(engine_config(checkpoint, dtype, device, 8, system_len + 64, enable_kv_cache_reuse=reuse))
        vocab = engine.vocab_size
        system = prompts(vocab, 1, system_len, seed=77)[0]
        # warm-up at the same length, nothing shared: the first request must not pay for kernel selection
        engine.generate([prompts(vocab, 1, system_len + 16, seed=5)[0]], SamplingParams(max_tokens=2, top_k=1))
        ttfts, tokens = [], []
        for i in range(requests):
            ids = system + prompts(vocab, 1, 16, seed=100 + i)[0]
            start = time.perf_counter()
            engine.add_request(f"p{i}", ids, SamplingParams(max_tokens=8, top_k=1, ignore_eos=True))
            first = None
            while engine.has_work():
                for out in engine.step():
                    if first is None and out.generated_tokens:
                        _sync()
                        first = time.perf_counter() - start
                    if out.is_finished():
                        tokens.append(out.generated_tokens)
            ttfts.append(first * 1e3)
        later = statistics.median(ttfts[1:])
        results["on" if reuse else "off"] = {"ttft_ms": ttfts, "first_ms": ttfts[0], "later_median_ms": later,
                                             "first_over_later": ttfts[0] / later, "hit_rate": engine.blocks.hit_rate,
                                             "tokens": tokens}
        print(f"  prefix caching {'on ' if reuse else 'off'}: TTFT first {ttfts[0]:.1f} ms, later median {later:.1f} ms "
              f"({ttfts[0] / later:.1f}x), hit rate {engine.blocks.hit_rate:.1%}", flush=True)
        del engine
        gc.collect()
    results["same_tokens_on_and_off"] = results["on"].pop("tokens") == results["off"].pop("tokens")
    print(f"  greedy tokens with the cache on == off: {results['same_tokens_on_and_off']}", flush=True)
    suite.report["prefix" if system_len == 1024 else f"prefix_{system_len}"] = results
    return results


def smollm2(suite: Suite, checkpoint: Path, device: str, dtype: str) -> None:
    from bench import quantized, speculative

    suite.report["speculative"] = speculative.run(checkpoint, device, dtype, 6, 128, [2, 4, 6], log=lambda m: print("  " + m, flush=True))
    suite.save()
    suite.report["perplexity"] = quantized.run(checkpoint, device, dtype, list(quantized.MODES), log=lambda m: print("  " + m, flush=True))


# ---------------------------------------------------------------------- through Triton
def through_triton(suite: Suite, checkpoint: Path, device: str, dtype: str, concurrencies: list[int], in_len: int,
                   out_len: int, models: list[str], out: Path, per_point, stream_interval_ms: float = 0.0,
                   build: str = "") -> None:
    """gRPC streaming through every served path; HTTP generate_stream through the ensemble at the first load.

    `build`: comma-separated `trtbuild repo` settings for the served build (quantization=fp8,
    kv_cache_dtype=fp8, enable_kv_cache_reuse=true, speculative_decoding_mode=ngram), shown in the row names."""
    from trtbuild.runtimes import generate as generate_repository  # tritonclient: only this stage needs it
    from trtbuild.deploy.server import TritonServer
    from trtbuild.spec import BuildSpec, KVCacheSpec
    from trtbuild.bench.run import BenchConfig, run_benchmark
    from trtbuild.bench.loadgen import LoadPoint
    from trtbuild.clients.prompts import LengthDistribution

    text_env = os.environ.get("TRTBUILD_TEXT_ENV")
    settings = dict(item.split("=", 1) for item in build.split(",") if item)
    kv = KVCacheSpec(free_gpu_mem_fraction=0.85, dtype=settings.pop("kv_cache_dtype", "auto"),
                     enable_reuse=settings.pop("enable_kv_cache_reuse", "false") == "true")
    spec = BuildSpec(checkpoint=checkpoint, model=load_model_spec(checkpoint), device=device, dtype=dtype,
                     max_batch_size=max(concurrencies), max_input_len=in_len + 8, max_output_len=out_len,
                     kv_cache=kv, text_env=Path(text_env) if text_env else None,
                     stream_interval_ms=stream_interval_ms, **settings)
    label = f" [{build}]" if build else ""
    repo = generate_repository(spec, out / "model_repo", force=True)
    server = TritonServer(repo, log_path=out / "tritonserver.log")
    t = time.time()
    server.start(timeout=300)
    print(f"  server ready in {time.time() - t:.0f} s (engine: {json.loads((repo / 'trtbuild.json').read_text())['llm_engine']})", flush=True)
    try:
        runs = [(m, "grpc", c) for m in models for c in concurrencies] + [("ensemble", "http", concurrencies[0])]
        for model, protocol, c in runs:
            url = server.grpc_url if protocol == "grpc" else server.http_url
            config = BenchConfig(url=url, protocol=protocol, model=model, stream=True,
                                 loads=(LoadPoint(concurrency=c),), requests=per_point(c), warmup=2, tokenizer=checkpoint,
                                 input_tokens=LengthDistribution(in_len), output_tokens=LengthDistribution(out_len))
            result = run_benchmark(config)
            (out / "bench").mkdir(exist_ok=True)
            (out / "bench" / f"{model}_{protocol}_{c}{'_' + build.replace(',', '_').replace('=', '-') if build else ''}.json").write_text(json.dumps(result.to_json(), indent=1, default=str))
            (run,) = result.runs
            m = run.metrics
            how = "gRPC streaming" if protocol == "grpc" else "HTTP generate_stream"
            suite.add(Row(f"Triton {model}, {how}{label}", c, m.output_tokens_per_s, m.completed,
                          *(None if s is None else getattr(s, q) for s, q in
                            ((m.ttft_ms, "p50"), (m.ttft_ms, "p99"), (m.itl_ms, "p50"), (m.latency_ms, "p50"))),
                          note=f"failed {m.failed} {m.errors or ''}".strip()))
            suite.save()
    finally:
        server.stop()


# ---------------------------------------------------------------------- goals and output
def goals(rows: list[Row], report: dict) -> dict:
    def tps(prefix: str, c: int) -> float | None:
        values = [r.output_tokens_per_s for r in rows if r.path.startswith(prefix) and r.concurrency == c]
        return values[0] if values else None

    def ttft(prefix: str, c: int) -> float | None:
        values = [r.ttft_p50_ms for r in rows if r.path.startswith(prefix) and r.concurrency == c]
        return values[0] if values else None

    out = {}
    ours = "trtbuild_runtime"
    compiled64 = tps("HF generate, static cache", 64)
    checks = [
        ("direct_256_tok_s", tps(ours, 256), 25_000),
        ("direct_1_tok_s", tps(ours, 1), 450),
        ("direct_64_vs_hf_compiled_64", (tps(ours, 64) or 0) / compiled64 if compiled64 and tps(ours, 64) else None, 1.5),
        ("direct_256_vs_hf_eager_256", (tps(ours, 256) or 0) / tps("HF generate, static batch", 256)
         if tps("HF generate, static batch", 256) and tps(ours, 256) else None, 1.0),
    ]
    for name, value, goal in checks:
        if value is not None:
            out[name] = {"value": value, "goal": goal, "met": value >= goal}
    t64 = ttft(ours, 64)
    if t64 is not None:
        out["direct_64_ttft_p50_ms"] = {"value": t64, "goal": 60, "met": t64 <= 60}
    grpc64, http64 = tps("Triton ensemble, gRPC", 64), tps("Triton ensemble, HTTP", 64)
    if grpc64 and http64:
        out["http_vs_grpc_ensemble_64"] = {"value": http64 / grpc64, "goal": 0.8, "met": http64 / grpc64 >= 0.8}
    for model in ("ensemble", "llm_bls", "llm"):
        for c in (64, 256):
            served, direct = tps(f"Triton {model}", c), tps(ours, c)
            if served and direct:
                out[f"triton_{model}_{c}_vs_direct"] = {"value": served / direct, "goal": 0.9, "met": served / direct >= 0.9}
    for mode in QUANT_MODES:
        for c in (1, 64, 256):
            quant, base = tps(f"runtime {mode}", c), tps(ours, c)
            if quant and base:
                goal = 1.3 if mode.startswith("fp8") and c > 1 else 1.0
                out[f"{mode}_{c}_vs_bf16"] = {"value": quant / base, "goal": goal, "met": quant / base >= goal}
    kv = report.get("quant", {}).get("kv-fp8")
    if kv and report.get("engine", {}).get("kv_bytes_per_token"):
        ratio = kv["kv_bytes_per_token"] / report["engine"]["kv_bytes_per_token"]
        out["kv_fp8_bytes_ratio"] = {"value": ratio, "goal": 0.5, "met": ratio <= 0.5}
    if report.get("prefix", {}).get("on"):
        value = report["prefix"]["on"]["first_over_later"]
        out["prefix_cache_ttft_first_over_later"] = {"value": value, "goal": 5.0, "met": value >= 5.0}
    rows_spec = (report.get("speculative") or {}).get("rows") or []
    best = max((r for r in rows_spec if r["mode"] == "ngram"), key=lambda r: r["speedup"], default=None)
    if best:
        out["speculative_1_stream_speedup"] = {"value": best["speedup"], "goal": 1.5, "met": best["speedup"] >= 1.5 and best["identical"]}
    if report.get("agreement"):
        value = report["agreement"]["teacher_forced_agreement"]
        out["teacher_forced_token_agreement"] = {"value": value, "goal": 0.99, "met": value >= 0.99}
    return out


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
        ax.set_yscale("log")
        ax.set_xlabel("concurrent requests (batch size for static generate)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "suite.png", dpi=110)
    plt.close(fig)


def print_table(report: dict) -> None:
    print(f"\n{report['device']}  {report['parameters'] / 1e9:.2f}B params {report['dtype']}  "
          f"{report['input_len']} in / {report['output_len']} out  ({report['seconds']} s)")
    print(f"{'path':44} {'conc':>5} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'bound':>6}")
    for r in report["rows"]:
        print(f"{r['path'][:44]:44} {r['concurrency']:>5} {r['output_tokens_per_s']:>9.1f} {_fmt(r['ttft_p50_ms']):>9} "
              f"{_fmt(r['ttft_p99_ms']):>9} {_fmt(r['itl_p50_ms']):>8} {r['bound_fraction']:>6.1%}")
    for name, g in report["goals"].items():
        print(f"goal {name}: {g['value']:.3f} (goal {g['goal']}) {'met' if g['met'] else 'MISSED'}")
    for name, s in report["stages"].items():
        print(f"stage {name}: {'ok' if s['ok'] else 'FAILED ' + s['error']} ({s['seconds']} s)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "artifacts/gpu")))
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".gpu" / "tokenizer")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--static-batches", default="1,64,256")
    ap.add_argument("--compiled-batches", default="1,64")
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--triton-concurrency", default="64,256")
    ap.add_argument("--agreement-prompts", type=int, default=64)
    ap.add_argument("--stream-interval-ms", type=float, default=0.0, help="the served repository's --stream-interval-ms")
    ap.add_argument("--triton-models", default="ensemble,llm,llm_bls",
                    help="served paths, in order (each an entry point of the repository: ensemble, llm_bls, llm)")
    ap.add_argument("--stages", default="hf_static,engine,agreement,profile,triton,hf_compiled")
    ap.add_argument("--budget-s", type=float, default=540, help="the compiled baseline is skipped when less than 150 s is left")
    ap.add_argument("--quick", action="store_true", help="a 3-minute subset: no compiled baseline, fewer points")
    ap.add_argument("--quant-modes", default=",".join(QUANT_MODES))
    ap.add_argument("--quant-concurrency", default="1,64,256")
    ap.add_argument("--triton-builds", default="",
                    help="';'-separated served builds, each comma-separated repo settings (e.g. 'quantization=fp8'); "
                         "'' is the plain build")
    ap.add_argument("--prefix-lens", default="1024", help="shared system prompt lengths for the prefix stage")
    ap.add_argument("--smollm2", type=Path, help="a SmolLM2 checkpoint directory for the smollm2 stage")
    ap.add_argument("--engine8b-shape", default="8b", help="engine8b: the Llama-3.1-8B shape (tiny: a CPU smoke run)")
    ap.add_argument("--engine8b-modes", default="bf16,fp8,int4_awq,fp8+kv-fp8,int4_gptq", help="engine8b: modes, in order (bench/engine8b.py MODES)")
    ap.add_argument("--engine8b-concurrency", default="1,64,1024", help="engine8b: loads; the last is the maximum load")
    ap.add_argument("--engine8b-int4-concurrency", default="1,64", help="engine8b: loads of the int4 modes")
    ap.add_argument("--engine8b-profile", default="bf16,fp8", help="engine8b: modes whose decode step is profiled at 1 and max load")
    ap.add_argument("--engine8b-agreement", type=int, default=16, help="engine8b: prompts for the teacher-forced agreement (0: skip)")
    args = ap.parse_args(argv)
    if args.quick:
        args.static_batches, args.concurrency, args.triton_concurrency = "1,64", "1,64,256", "64"
        args.stages = args.stages.replace(",hf_compiled", "")
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    if stages == ["engine8b"]:  # alone: no 1.07B checkpoint, no tokenizer
        from bench import engine8b

        return engine8b.run(args, out)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    concurrencies = ints(args.concurrency)
    in_len, out_len = args.input_len, args.output_len
    checkpoint = build_checkpoint(out / "checkpoint", args.preset, args.tokenizer, args.dtype)
    spec = load_model_spec(checkpoint)
    weight_bytes = spec.num_parameters * torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    kv_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()

    def bound(c: int) -> float:
        """Output tok/s if every decode step only read the weights and the live KV (mean context) at HBM speed."""
        step_s = (weight_bytes + c * (in_len + out_len / 2) * kv_per_token) / HBM_BYTES_PER_S
        return c / step_s

    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
              "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "parameters": spec.num_parameters,
              "dtype": args.dtype, "input_len": in_len, "output_len": out_len, "torch": torch.__version__,
              "started": time.time(), "physical_bound_tok_s": {c: bound(c) for c in concurrencies}}
    try:
        import transformers
        import triton

        report.update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    suite = Suite(out, report, bound)
    print(f"{report['device']}: {spec.num_parameters / 1e9:.2f}B params, bound at 1 / 256 streams "
          f"{bound(1):,.0f} / {bound(256):,.0f} tok/s", flush=True)

    hf = load_hf(checkpoint, args.dtype, args.device) if {"hf_static", "agreement", "hf_compiled"} & set(stages) else None
    if "hf_static" in stages:
        suite.stage("hf_static", lambda: hf_static(suite, hf, args.device, ints(args.static_batches), in_len, out_len, False))
    engine = None
    if {"engine", "agreement", "profile"} & set(stages):
        t = time.time()
        engine = suite.stage("engine_start", lambda: LLMEngine(engine_config(checkpoint, args.dtype, args.device,
                                                                             max(concurrencies), in_len + out_len + 16)))
        if engine is not None:
            report["engine"] = {"start_s": round(time.time() - t, 1), "num_blocks": engine.runner.num_blocks,
                                "cuda_graphs": sorted(engine.runner.graphs),
                                "kv_bytes_per_token": engine.runner.block_bytes // engine.runner.page}
            print(f"  engine ready in {time.time() - t:.1f} s: {engine.runner.num_blocks} KV blocks, graphs {sorted(engine.runner.graphs)}", flush=True)
    if engine is not None:
        if "engine" in stages:
            suite.stage("engine", lambda: engine_direct(suite, engine, concurrencies, in_len, out_len, lambda c: max(4 * c, 16)))
        if "agreement" in stages:
            suite.stage("agreement", lambda: agreement(suite, engine, hf, args.device, args.agreement_prompts, in_len, out_len))
        if "profile" in stages:
            suite.stage("profile", lambda: profile_decode(suite, engine, [c for c in (64, 256) if c <= max(concurrencies)]
                                                          or [max(concurrencies)], in_len, out_len, out))
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "kernels" in stages and args.device == "cuda":
        suite.stage("kernels", lambda: kernel_parity(suite))
    if "gemm" in stages and args.device == "cuda":
        p = PRESETS[args.preset]
        head = p["hidden_size"] // p["num_attention_heads"]
        suite.stage("gemm", lambda: gemm_bench(suite, p["hidden_size"], p["intermediate_size"], p["hidden_size"],
                                               p["num_key_value_heads"] * head))
    if "quant" in stages:
        suite.stage("quant", lambda: quantized_engines(suite, checkpoint, args.dtype, args.device, ints(args.quant_concurrency),
                                                       in_len, out_len, lambda c: max(4 * c, 16), args.quant_modes.split(","), out))
    if "prefix" in stages:
        for n in ints(args.prefix_lens):
            suite.stage(f"prefix {n}", lambda: prefix_cache(suite, checkpoint, args.dtype, args.device, system_len=n))
    if "smollm2" in stages and args.smollm2:
        suite.stage("smollm2", lambda: smollm2(suite, args.smollm2, args.device, args.dtype))
    if "triton" in stages:
        for build in args.triton_builds.split(";"):
            name = "triton" + (f" [{build}]" if build else "")
            suite.stage(name, lambda: through_triton(suite, checkpoint, args.device, args.dtype, ints(args.triton_concurrency),
                                                     in_len, out_len, args.triton_models.split(","), out, lambda c: max(2 * c, 16),
                                                     args.stream_interval_ms, build))
    left = args.budget_s - (time.time() - report["started"])
    if "hf_compiled" in stages and hf is not None and left < 150:
        print(f"== hf_compiled skipped: {left:.0f} s left of --budget-s {args.budget_s}, compiling takes minutes", flush=True)
        report["stages"]["hf_compiled"] = {"seconds": 0, "ok": False, "error": f"skipped: {left:.0f} s left"}
    elif "hf_compiled" in stages and hf is not None:
        suite.stage("hf_compiled", lambda: hf_static(suite, hf, args.device, ints(args.compiled_batches), in_len, out_len, True))
    suite.save()
    if suite.rows:
        plot(suite.rows, out)
    print_table(report)
    if "engine8b" in stages:
        from bench import engine8b

        if hf is not None:
            del hf
            gc.collect()
        report["engine8b"] = engine8b.run(args, out)
    return report


if __name__ == "__main__":
    main()
