"""The engine at real model size: a Llama-3.1-8B-shaped checkpoint (random weights), engine direct.

`python bench/gpu_suite.py --stages engine8b` (alone: no tokenizer, no tritonserver needed) builds
the checkpoint on the GPU in bf16 (HF init with a fixed seed, written to /dev/shm when it fits,
else under /tmp, never under $OUT), checks greedy agreement with HF (teacher-forced) on a small
engine, then runs each mode (BF16, FP8, FP8 + FP8 KV, INT4 AWQ / GPTQ...) at 1 stream and at the
listed loads, 128 in / 128 out forced, closed loop. Every point prints one line and rewrites
engine8b.json: a run killed at its limit keeps what it measured.

Each row carries two bounds: the bandwidth bound (a decode step reads the mode's weights and the
live KV once, at the card's HBM bandwidth) and the compute bound (2 x matmul parameters FLOP per
token, prompt and output, at the card's dense tensor rate: ~790 TFLOP/s bf16 as measured here,
twice that for FP8 GEMMs), and the published TensorRT-LLM figure where one exists.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench.timing import graph_time_us

SHAPES = {
    # Llama-3.1-8B: hidden 4096, 32 layers, 32 / 8 heads, intermediate 14,336, vocab 128,256, llama3 rope
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512),
}
LLAMA31 = dict(rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
               bos_token_id=128000, eos_token_id=128001,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})
MODES = {"bf16": {}, "fp8": dict(quantization="fp8"), "fp8+kv-fp8": dict(quantization="fp8", kv_cache_dtype="fp8"),
         "kv-fp8": dict(kv_cache_dtype="fp8"), "fp8-tensorwise": dict(quantization="fp8", fp8_gemm="tensorwise"),
         "int4_awq": dict(quantization="int4_awq"), "int4_gptq": dict(quantization="int4_gptq")}

# TensorRT-LLM perf overview, Llama-3.1-8B FP8, one GPU, 128/128, trtllm-bench throughput at max load (output tok/s)
PUBLISHED = {"H200": {"v0.19-0.20": 28447, "v1.0": 27911}, "H100": {"v0.19-0.20": 27569, "v1.0": 28312}}
NIM_ONE_STREAM = {"tok_s": 214.6, "itl_ms": 4.63, "ttft_ms": 10.3}  # NIM, Llama-3.1-8B, one concurrent request
CARDS = {  # HBM bytes/s (datasheet), dense bf16 FLOP/s (measured on this workplace's cards, 8192^3 GEMM)
    "H200": (4.8e12, 790e12), "H100": (3.35e12, 790e12), "cpu": (50e9, 1e12)}


def card_of(device: str) -> str:
    if device != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name()
    return "H200" if "H200" in name else "H100" if "H100" in name else name


def build(shape: str, dtype: torch.dtype, device: str, seed: int = 0):
    """The HF model with random weights, made on the device in `dtype` (no float32 copy)."""
    import transformers

    extra = dict(LLAMA31)
    if SHAPES[shape]["vocab_size"] <= extra["eos_token_id"]:
        extra.update(bos_token_id=1, eos_token_id=2)
    config = transformers.LlamaConfig(**SHAPES[shape], **extra)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    # `.to(dtype)` also rounded the rotary inv_freq buffer to 16 bits; from_pretrained keeps it float32, and so must the
    # reference (in bf16 it is off by up to ~0.3 rad at position 128, which alone split greedy paths in run 1)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config).to(device)
    return model


def checkpoint_dir(nbytes: int) -> Path:
    """/dev/shm when it holds the checkpoint twice over (no disk), else /tmp; never $OUT (it would travel back)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2 * nbytes:
        return shm / "trtbuild-engine8b"
    return Path("/tmp/trtbuild-engine8b")


def matmul_params(c: dict) -> tuple[int, int]:
    """(decoder matmul parameters, output-head parameters)."""
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    head_dim = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    return layers * per_layer, h * c["vocab_size"]


class Bounds:
    def __init__(self, c: dict, card: str, in_len: int, out_len: int):
        self.hbm, self.bf16_flops = CARDS.get(card, CARDS["H100"])
        self.body, self.head = matmul_params(c)
        self.in_len, self.out_len = in_len, out_len
        head_dim = c["hidden_size"] // c["num_attention_heads"]
        self.layers, self.kv_heads, self.head_dim = c["num_hidden_layers"], c["num_key_value_heads"], head_dim

    def flops_per_request(self) -> float:
        """Matmul FLOP of one request: every prompt and output token through the decoder, the head once per output token,
        plus attention (QK and PV over the live context)."""
        tokens = self.in_len + self.out_len
        attn = sum(4 * self.layers * self.kv_heads * 4 * self.head_dim * (p + 1) for p in range(tokens))  # 32 q heads = 4 x 8
        return 2 * self.body * tokens + 2 * self.head * self.out_len + attn

    def compute(self, mode: str) -> float:
        """Output tok/s if the tensor cores ran every request's FLOP at their dense rate (FP8 GEMMs at twice bf16's)."""
        rate = self.bf16_flops * (2 if mode.startswith("fp8") else 1)  # W4A16 multiplies in bf16
        return rate / (self.flops_per_request() / self.out_len)

    def bandwidth(self, c: int, weight_bytes: int, kv_bytes_per_token: int) -> float:
        """Output tok/s if each decode step only read the weights and the live KV (mean context) at HBM speed."""
        step = (weight_bytes + c * (self.in_len + self.out_len / 2) * kv_bytes_per_token) / self.hbm
        return c / step


def write_int4_checkpoint(source: Path, out: Path, method: str, group: int = 128, device: str = "cpu") -> Path:
    """`source` (16-bit) with every decoder projection rounded to nearest INT4 and stored in `method`'s layout: ModelOpt's
    W4A16_AWQ export (int4_awq; no pre_quant_scale, as when ModelOpt folds it into the norms) or HF GPTQ (int4_gptq,
    symmetric, format gptq). No calibration: what it measures is the GEMM and the bytes, not AWQ's or GPTQ's accuracy."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from trtbuild_runtime import int4

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    for i, file in enumerate(sorted(source.glob("*.safetensors"))):
        tensors = {}
        with safe_open(str(file), framework="pt", device=device) as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if ".layers." in name and name.endswith("_proj.weight"):
                    codes, scales = int4.quantize_rtn(t, group)
                    prefix = name.removesuffix(".weight")
                    if method == "int4_awq":
                        tensors[name], tensors[prefix + ".weight_scale"] = int4.to_modelopt(codes, scales.to(t.dtype))
                    else:
                        tensors.update({f"{prefix}.{leaf}": v for leaf, v in int4.to_gptq(codes, scales, group).items()})
                else:
                    tensors[name] = t
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / f"model-{i:05d}.safetensors")
        del tensors
    config = json.loads((out / "config.json").read_text())
    if method == "int4_awq":
        config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "W4A16_AWQ", "ignore": ["lm_head", "model.embed_tokens"]}
        (out / "hf_quant_config.json").write_text(json.dumps({"quantization": {
            "quant_algo": "W4A16_AWQ", "group_size": group, "has_zero_point": False, "pre_quant_scale": False,
            "exclude_modules": ["lm_head", "model.embed_tokens"]}}))
    else:
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": True,
                                         "checkpoint_format": "gptq"}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def int4_gemm_bench(report: dict, c: dict, device: str) -> None:
    """The 8B decode GEMMs of one layer, W4A16 kernel vs bf16 cuBLAS, kernel time in a CUDA graph (us)."""
    from trtbuild_runtime import int4

    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    shapes = {"qkv": (h, h + 2 * kv), "o": (h, h), "gate_up": (h, 2 * i), "down": (i, h)}

    def timed(fn, n=20) -> float:
        return graph_time_us(fn, n)

    results = {}
    for m in (1, 16, 64, 256):
        row = {}
        for name, (k, n) in shapes.items():
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
            layer = int4.Int4Linear.from_weight(w, 128)
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = x @ layer.weight_16bit().t()
            err = ((layer(x).float() - ref.float()).norm() / ref.float().norm()).item()
            row[name] = {"bf16_us": timed(lambda: torch.nn.functional.linear(x, w)), "int4_us": timed(lambda: layer(x)),
                         "rel_err": err, "int4_bytes": layer.qweight.nbytes + layer.scales.nbytes}
        total = {k: sum(r[k] for r in row.values()) for k in ("bf16_us", "int4_us", "int4_bytes")}
        row["layer"] = total
        if m == 1:  # tactics of the decode kernel: (BM, BN, BK, SPLIT_K, warps, stages)
            tactics = [(16, 64, 128, 4, 4, 4), (16, 128, 128, 2, 4, 4), (16, 128, 128, 4, 4, 4), (16, 128, 128, 8, 4, 4),
                       (16, 256, 128, 4, 8, 3), (16, 256, 128, 8, 8, 3)]
            best = {}
            for name, (k, n) in shapes.items():
                w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
                layer = int4.Int4Linear.from_weight(w, 128)
                x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
                times = {}
                for cfg in tactics:
                    if (k // 128) % cfg[3]:
                        continue
                    try:
                        times[str(cfg)] = timed(lambda cfg=cfg: int4.w4a16_matmul(x, layer.qweight, layer.scales, None, 128, cfg))
                    except Exception as e:  # noqa: BLE001
                        times[str(cfg)] = f"{type(e).__name__}"
                ok = {c: t for c, t in times.items() if isinstance(t, float)}
                best[name] = {"times_us": times, "best": min(ok, key=ok.get) if ok else None,
                              "default": str(int4._config(1, n, k, 128, torch.cuda.get_device_properties(0).multi_processor_count))}
                print(f"    M=1 {name:8} " + "  ".join(f"{c}: {t:.1f}" if isinstance(t, float) else f"{c}: {t}"
                                                      for c, t in times.items()), flush=True)
            row["tactics"] = best
        results[m] = row
        print(f"  W4A16 GEMMs of one layer, M={m:>4}: bf16 {total['bf16_us']:.1f} us, int4 {total['int4_us']:.1f} us "
              f"({total['int4_bytes'] / total['int4_us'] / 1e3:.0f} GB/s); max rel err "
              f"{max(row[k]['rel_err'] for k in shapes):.2e}", flush=True)
    report["int4_gemm"] = results


def closed_loop(engine, concurrency: int, total: int, in_len: int, out_len: int, seed: int) -> dict:
    from bench.gpu_suite import closed_loop as loop

    before = engine.scheduler.preemptions
    steps = engine.steps
    r = loop(engine, concurrency, total, in_len, out_len, seed)
    r["preemptions"] = engine.scheduler.preemptions - before
    r["steps"] = engine.steps - steps
    return r


def _p(values, q) -> float:
    return float(np.percentile(values, q))


def requests_for(c: int, in_len: int, out_len: int) -> int:
    """1 stream: 4 requests; otherwise two waves of the concurrency (the first wave's prefill burst is half the run)."""
    return 4 if c == 1 else max(2 * c, 16)


def agreement(report: dict, hf, checkpoint: Path, dtype: str, device: str, count: int, in_len: int, out_len: int) -> None:
    from bench.gpu_suite import agreement as agree
    from bench.gpu_suite import engine_config
    from trtbuild_runtime import LLMEngine

    per_seq = -(-(in_len + out_len + 16) // 32)
    engine = LLMEngine(engine_config(checkpoint, dtype, device, count, in_len + out_len + 16,
                                     kv_cache_num_blocks=count * per_seq + 8))

    class Sink:  # agreement() writes into suite.report
        pass

    sink = Sink()
    sink.report = report
    agree(sink, engine, hf, device, count, in_len, out_len)
    del engine


def host_breakdown(engine, steps: int) -> dict:
    """Where a step's wall time goes on the host (ms per step): scheduling, inputs, the graph launch, sampling, the wait
    for the device (inside runner.run, after sampling: the tokens' copy), the per-sequence outputs, finish_step."""
    import trtbuild_runtime.model_runner as mr

    times: dict[str, float] = {}
    patched = []

    def wrap(owner, name, key):
        original = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                times[key] = times.get(key, 0.0) + time.perf_counter() - t
        setattr(owner, name, timed)
        patched.append((owner, name, original))

    r = engine.runner
    wrap(engine.scheduler, "schedule", "schedule")
    wrap(engine.scheduler, "finish_step", "finish_step")
    wrap(r, "_prepare_rows", "prepare_rows")
    wrap(r, "run", "runner_run")
    wrap(mr, "sample", "sample_launch")
    for g in r.graphs.values():
        wrap(g, "replay", "graph_launch")
    try:
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    finally:
        for owner, name, original in reversed(patched):
            if owner is mr:
                setattr(owner, name, original)
            else:
                delattr(owner, name) if name in vars(owner) and not isinstance(owner, type) else setattr(owner, name, original)
    out = {k: v / steps * 1e3 for k, v in times.items()}
    out["wall"] = wall / steps * 1e3
    run = out.get("runner_run", 0.0)
    out["wait_for_device"] = max(run - out.get("prepare_rows", 0) - out.get("graph_launch", 0) - out.get("sample_launch", 0), 0.0)
    out["outputs"] = max(out["wall"] - run - out.get("schedule", 0) - out.get("finish_step", 0), 0.0)
    return {k: round(v, 3) for k, v in out.items()}


def step_profile(engine, concurrency: int, in_len: int, out_len: int, steps: int = 12) -> dict:
    """Decode steps at `concurrency` under the torch profiler: wall, GPU kernel time by kind, host = the rest."""
    from torch.profiler import ProfilerActivity, profile

    from bench.gpu_suite import prompts
    from trtbuild_runtime import SamplingParams

    for i in range(concurrency):
        engine.add_request(f"prof-{concurrency}-{i}", prompts(engine.vocab_size, 1, in_len, seed=i)[0],
                           SamplingParams(max_tokens=out_len, top_k=1, ignore_eos=True))
    while engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    # wall time without the profiler first (the profiler adds host time of its own)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / steps
    host = host_breakdown(engine, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or 0
        if us <= 0 or getattr(e.device_type, "name", "") != "CUDA":
            continue
        name = e.key
        low = name.lower()
        if any(k in low for k in ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "_w4a16", "scaled_mm", "matmul", "cublas")):
            kind = "gemm"
        elif "paged_decode" in low or "flash" in low or "attention" in low or "fmha" in low:
            kind = "attention"
        elif "memcpy" in low or "memset" in low:
            kind = "copy"
        else:
            kind = "other"
        kinds[kind] = kinds.get(kind, 0.0) + us / steps / 1e3
        kernels.append((name[:70], round(us / steps / 1e3, 4), kind))
    gpu = sum(kinds.values())
    for rid in list(engine.seqs):
        engine.abort(rid)
    kernels.sort(key=lambda k: -k[1])
    return {"step_ms": wall * 1e3, "host_breakdown_ms": host, "gpu_kernel_ms": gpu, "host_ms": max(wall * 1e3 - gpu, 0.0), "gpu_share": gpu / (wall * 1e3),
            "by_kind_ms": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}, "top_kernels": kernels[:10]}


def run(args, out: Path) -> dict:
    """The engine8b stage; returns (and keeps writing) the report."""
    from bench.gpu_suite import engine_config
    from trtbuild_runtime import LLMEngine
    from trtbuild_runtime.quantization import weight_bytes

    device = args.device
    dtype = getattr(torch, args.dtype)
    card = card_of(device)
    in_len, out_len = args.input_len, args.output_len
    loads = [int(x) for x in args.engine8b_concurrency.split(",") if x]
    # "mode" or "mode@l1+l2+...": that mode at its own loads (e.g. fp8+kv-fp8@1+64+1024+2048)
    modes, own_loads = [], {}
    for m in (m for m in args.engine8b_modes.split(",") if m):
        name, _, spec = m.partition("@")
        modes.append(name)
        if spec:
            own_loads[name] = [int(x) for x in spec.split("+")]
    report = {"stage": "engine8b", "shape": args.engine8b_shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "card": card, "date": time.strftime("%Y-%m-%d"), "dtype": args.dtype, "input_len": in_len, "output_len": out_len,
              "torch": torch.__version__, "started": time.time(), "modes": {}, "rows": [], "published_trtllm_fp8_max_load": PUBLISHED,
              "nim_one_stream": NIM_ONE_STREAM}
    try:
        import transformers
        import triton

        report.update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    path = out / "engine8b.json"

    def save():
        report["seconds"] = round(time.time() - report["started"], 1)
        report["goals"] = goals(report)
        path.write_text(json.dumps(report, indent=1, default=str))

    # ---- the checkpoint
    t = time.time()
    hf = build(args.engine8b_shape, dtype, device)
    c = hf.config.to_dict()
    nbytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    build_s = time.time() - t
    ckpt = checkpoint_dir(nbytes)
    shutil.rmtree(ckpt, ignore_errors=True)
    t = time.time()
    hf.save_pretrained(ckpt, max_shard_size="4GB")
    save_s = time.time() - t
    report["checkpoint"] = {"path": str(ckpt), "bytes": nbytes, "parameters": sum(p.numel() for p in hf.parameters()),
                            "init_s": round(build_s, 1), "write_s": round(save_s, 1), "write_gb_s": round(nbytes / max(save_s, 1e-9) / 1e9, 2)}
    print(f"engine8b on {report['device']}: {report['checkpoint']['parameters'] / 1e9:.2f}B params, init on the device "
          f"{build_s:.1f} s, written to {ckpt} in {save_s:.1f} s ({report['checkpoint']['write_gb_s']} GB/s)", flush=True)
    bounds = Bounds(c, card, in_len, out_len)
    report["flops_per_request"] = bounds.flops_per_request()
    save()

    # ---- agreement with HF (teacher-forced), on a small engine beside the HF model
    if args.engine8b_agreement > 0:
        t = time.time()
        try:
            agreement(report, hf, ckpt, args.dtype, device, args.engine8b_agreement, in_len, min(out_len, 64))
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            report["agreement_error"] = f"{type(e).__name__}: {e}"
        report["agreement_s"] = round(time.time() - t, 1)
        save()
    del hf
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    # ---- the modes
    max_len = in_len + out_len + 16
    if any(m.startswith("int4") for m in modes) and device == "cuda":
        try:
            int4_gemm_bench(report, c, device)
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            report["int4_gemm_error"] = f"{type(e).__name__}: {e}"
        save()
    for mode in modes:
        t = time.time()
        source = ckpt
        mode_loads = own_loads.get(mode) or ([int(x) for x in args.engine8b_int4_concurrency.split(",") if x]
                                             if mode.startswith("int4") else loads)
        try:
            if mode in ("int4_awq", "int4_gptq"):
                source = write_int4_checkpoint(ckpt, ckpt.with_name(ckpt.name + "-" + mode), mode, 128, device)
                report.setdefault("int4_checkpoints", {})[mode] = {"write_s": round(time.time() - t, 1), "bytes": sum(
                    f.stat().st_size for f in source.glob("*.safetensors"))}
                print(f"  {mode} checkpoint (round-to-nearest codes in its layout) written in {time.time() - t:.1f} s, "
                      f"{report['int4_checkpoints'][mode]['bytes'] / 2**30:.2f} GiB", flush=True)
                t = time.time()
            engine = LLMEngine(engine_config(source, args.dtype, device, max(mode_loads), max_len, **MODES[mode]))
        except Exception as e:  # noqa: BLE001 - a mode that cannot start must not lose the others
            import traceback

            traceback.print_exc()
            report["modes"][mode] = {"error": f"{type(e).__name__}: {e}"}
            save()
            continue
        r = engine.runner
        per_seq = -(-(in_len + out_len) // r.page)
        info = {"start_s": round(time.time() - t, 1), "num_blocks": r.num_blocks, "page": r.page,
                "kv_bytes_per_token": r.block_bytes // r.page, "kv_pool_bytes": r.kv.numel() * r.kv.element_size(),
                "weight_bytes": weight_bytes(r.model), "sequences_kv_holds": r.num_blocks // per_seq,
                "cuda_graphs": len(r.graphs), "largest_graph": max(r.graphs) if r.graphs else 0}
        if device == "cuda":
            info["memory_allocated"] = torch.cuda.memory_allocated()
            info["memory_reserved"] = torch.cuda.memory_reserved()
        report["modes"][mode] = info
        print(f"== 8B {mode}: ready in {info['start_s']} s; weights {info['weight_bytes'] / 2**30:.2f} GiB, KV pool "
              f"{info['kv_pool_bytes'] / 2**30:.2f} GiB ({r.num_blocks} blocks x {r.page}, {info['kv_bytes_per_token']} B/token, "
              f"{info['sequences_kv_holds']} sequences of {in_len + out_len}), graphs up to {info['largest_graph']}", flush=True)
        save()
        closed_loop(engine, 2, 4, in_len, out_len, seed=999)  # warm-up
        for conc in mode_loads:
            if conc > info["sequences_kv_holds"]:
                print(f"  {mode} {conc}: skipped, the KV pool holds {info['sequences_kv_holds']} sequences", flush=True)
                continue
            total = requests_for(conc, in_len, out_len)
            res = closed_loop(engine, conc, total, in_len, out_len, seed=conc)
            tps = res["tokens"] / res["elapsed"]
            bw = bounds.bandwidth(conc, info["weight_bytes"], info["kv_bytes_per_token"])
            comp = bounds.compute(mode)
            row = {"mode": mode, "concurrency": conc, "requests": total, "output_tokens_per_s": tps,
                   "ttft_p50_ms": _p(res["ttft"], 50), "ttft_p99_ms": _p(res["ttft"], 99),
                   "itl_p50_ms": _p(res["itl"], 50), "itl_p99_ms": _p(res["itl"], 99),
                   "latency_p50_ms": _p(res["latency"], 50), "preemptions": res["preemptions"], "steps": res["steps"],
                   "elapsed_s": res["elapsed"], "bandwidth_bound_tok_s": bw, "bandwidth_bound_fraction": tps / bw,
                   "compute_bound_tok_s": comp, "compute_bound_fraction": tps / comp, "card": card}
            if mode.startswith("fp8") and conc == max(mode_loads) and card in PUBLISHED:
                row["published_trtllm"] = PUBLISHED[card]
            report["rows"].append(row)
            print(f"  8B {mode:12} {conc:>5} {tps:>9.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:.1f} p99 {row['ttft_p99_ms']:.1f}  "
                  f"ITL p50 {row['itl_p50_ms']:.2f} p99 {row['itl_p99_ms']:.2f} ms  {row['bandwidth_bound_fraction']:.1%} of BW bound, "
                  f"{row['compute_bound_fraction']:.1%} of compute bound, preemptions {res['preemptions']}", flush=True)
            save()
        if mode in args.engine8b_profile.split(","):
            prof = {}
            for conc in sorted({1, max(mode_loads)}):
                if conc > info["sequences_kv_holds"]:
                    continue
                p = step_profile(engine, conc, in_len, out_len)
                prof[conc] = p
                print(f"  profile {mode} {conc:>5} streams: step {p['step_ms']:.2f} ms, GPU {p['gpu_kernel_ms']:.2f} ms "
                      f"({p['gpu_share']:.0%}), host/idle {p['host_ms']:.2f} ms; " +
                      ", ".join(f"{k} {v:.2f}" for k, v in p["by_kind_ms"].items()), flush=True)
                print("        host: " + ", ".join(f"{k} {v:.2f}" for k, v in p["host_breakdown_ms"].items()), flush=True)
                for name, ms, kind in p["top_kernels"][:6]:
                    print(f"        {ms:8.3f} ms  {kind:9} {name}", flush=True)
            info["profile"] = prof
            save()
        del engine, r
        if source != ckpt:
            shutil.rmtree(source, ignore_errors=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    save()
    shutil.rmtree(ckpt, ignore_errors=True)
    print_table(report)
    return report


def goals(report: dict) -> dict:
    rows = report["rows"]

    def tps(mode, conc=None, key="output_tokens_per_s"):
        mine = [r for r in rows if r["mode"] == mode and (conc is None or r["concurrency"] == conc)]
        if conc is None:  # maximum load measured
            mine = sorted(mine, key=lambda r: r["concurrency"])[-1:]
            mine = [r for r in mine if r["concurrency"] > 1]
        return mine[0][key] if mine else None

    out = {}
    published = PUBLISHED.get(report.get("card"), {}).get("v0.19-0.20")

    def check(name, value, goal, higher=True):
        if value is not None:
            out[name] = {"value": value, "goal": goal, "met": value >= goal if higher else value <= goal}

    if published:
        check("fp8_max_load_vs_published_trtllm", tps("fp8"), published)
    for c in (64,):
        if tps("fp8", c) and tps("bf16", c):
            check(f"fp8_vs_bf16_{c}", tps("fp8", c) / tps("bf16", c), 1.3)
    if tps("fp8") and tps("bf16"):
        check("fp8_vs_bf16_max_load", tps("fp8") / tps("bf16"), 1.3)
    check("fp8_1_stream_tok_s", tps("fp8", 1), 450)
    check("fp8_1_stream_itl_ms", tps("fp8", 1, "itl_p50_ms"), 2.2, higher=False)
    check("bf16_1_stream_tok_s", tps("bf16", 1), 250)
    for m in ("int4_awq", "int4_gptq"):
        if tps(m, 1) and tps("bf16", 1):
            check(f"{m}_1_stream_vs_bf16", tps(m, 1) / tps("bf16", 1), 1.8)
        modes = report["modes"]
        if modes.get(m, {}).get("weight_bytes") and modes.get("bf16", {}).get("weight_bytes"):
            check(f"{m}_weight_bytes_vs_bf16", modes[m]["weight_bytes"] / modes["bf16"]["weight_bytes"], 0.3, higher=False)
    for m in report["modes"]:
        pre = sum(r["preemptions"] for r in rows if r["mode"] == m)
        if any(r["mode"] == m for r in rows):
            check(f"{m}_preemptions", pre, 0, higher=False)
    if report.get("agreement"):
        check("teacher_forced_token_agreement", report["agreement"]["teacher_forced_agreement"], 0.99)
    return out


def print_table(report: dict) -> None:
    print(f"\n{report['device']} ({report['card']})  {report['checkpoint']['parameters'] / 1e9:.2f}B Llama-3.1-8B shape, random "
          f"weights, {report['input_len']} in / {report['output_len']} out  ({report['seconds']} s)")
    print(f"{'mode':12} {'conc':>5} {'tok/s':>9} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>6} {'BW bnd':>7} {'FLOP bnd':>8} {'preempt':>7}")
    for r in report["rows"]:
        print(f"{r['mode']:12} {r['concurrency']:>5} {r['output_tokens_per_s']:>9.1f} {r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>8.1f} "
              f"{r['itl_p50_ms']:>8.2f} {r['itl_p99_ms']:>6.2f} {r['bandwidth_bound_fraction']:>7.1%} {r['compute_bound_fraction']:>8.1%} "
              f"{r['preemptions']:>7}")
    for name, g in report["goals"].items():
        print(f"goal {name}: {g['value']:.3f} (goal {g['goal']}) {'met' if g['met'] else 'MISSED'}")
