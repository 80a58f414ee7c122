"""`trtbuild profile CHECKPOINT|REPO`: where the runtime's time goes, with the option that addresses it.

The trtbuild_runtime engine (what the text model runs) serves `batch` prompts of `input_tokens`
tokens for `output_tokens` tokens under torch.profiler, on CPU or GPU: the first step is the
prefill, the others decode steps (each inside a `prefill` / `decode` record_function range).
Measured:
- the top operators by self time (CPU; device time too on CUDA) with their share of all self time;
- the time of each step and of the model runner inside it: what is left is host time around and
  between the model calls (scheduling, block tables, sampling setup, Python);
- memory peaks: the process's peak resident memory, and on CUDA the allocator's peak;
- shares by kind of work: attention, GEMM, sampling (operator names), and host time;
each kind above `hotspot_share` gets a line naming the option that addresses it.
Written as profile.json, profile.md (a markdown table) and trace.json (a Chrome trace, chrome://tracing
or Perfetto).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from trtbuild.errors import TrtbuildError

PROFILE_ATTEMPTS = 3
MODULES = {  # kind -> the runtime module whose frames an operator's Python stack passes through
    "attention": ("trtbuild_runtime/attention.py", "trtbuild_runtime/kernels.py"),
    "sampling": ("trtbuild_runtime/sampler.py",),
}
KINDS = {  # kind -> substrings of operator names (lower case), where the stack does not tell
    "attention": ("attention", "sdpa", "softmax", "flash", "paged", "rotary", "rope"),
    "GEMM": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "gemm", "_scaled_mm", "cublas"),
    "sampling": ("topk", "multinomial", "argmax", "sort", "cumsum", "sampler", "log_softmax", "exponential_"),
}
ADVICE = {
    "attention": "paged attention's Triton kernels on GPU, a shorter --max-seq-len, an FP8 KV cache (--kv-cache-dtype fp8)",
    "GEMM": "quantized weights (--precision fp8 or int8_wo) and larger batches (--max-batch-size) to raise GEMM efficiency",
    "sampling": "greedy requests (top_k 1) skip the sort; fewer distinct sampling settings per batch",
    "host": "CUDA graphs (on by default on GPU for decode batches up to --max-batch-size), larger batches to amortise each step",
}


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    source: Path  # a checkpoint folder or a generated repository
    device: str = "auto"
    batch: int = 4
    input_tokens: int = 64
    output_tokens: int = 16
    top: int = 15
    hotspot_share: float = 0.10
    seed: int = 0


@dataclasses.dataclass
class ProfileResult:
    config: dict[str, Any]
    device: str
    prefill_ms: float
    decode_ms_per_step: float
    steps: int
    tokens_per_s: float
    host_share: float
    operators: list[dict[str, Any]]
    kinds: dict[str, float]
    memory: dict[str, float]
    bottlenecks: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"tool": "trtbuild profile", **dataclasses.asdict(self)}


def engine_config(source: Path, device: str, batch: int, seq_len: int):
    """EngineConfig for a checkpoint, or for the checkpoint and settings a repository's trtbuild.json records."""
    from trtbuild_runtime.config import EngineConfig

    source = Path(source)
    values: dict[str, Any] = {}
    if (source / "trtbuild.json").is_file():
        spec = json.loads((source / "trtbuild.json").read_text()).get("spec") or {}
        if not spec.get("checkpoint"):
            raise TrtbuildError(f"{source}/trtbuild.json names no checkpoint", hint="profile the checkpoint folder itself")
        checkpoint = Path(spec["checkpoint"])
        for key in ("quantization", "kv_cache_dtype", "speculative_decoding_mode", "max_draft_len", "max_matching_ngram_size"):
            if key in spec and key in {f.name for f in dataclasses.fields(EngineConfig)}:
                values[key] = spec[key]
        batch = min(batch, int(spec.get("max_batch_size") or batch))
    elif (source / "config.json").is_file():
        checkpoint = source
    else:
        raise TrtbuildError(f"{source} is neither a checkpoint (config.json) nor a repository (trtbuild.json)")
    try:
        return EngineConfig(model=str(checkpoint), device=device, max_batch_size=max(batch, 1), max_seq_len=seq_len,
                            kv_cache_num_blocks=None, **values), batch
    except ValueError as e:
        raise TrtbuildError(f"{source}: {e}") from None


def _is_operator(name: str) -> bool:
    """A torch operator or kernel, not a Python frame, a module or one of our ranges (with_stack records those too)."""
    return not (name.startswith(("<built-in", "nn.Module:", "ProfilerStep", "<frozen")) or ".py(" in name
                or name in ("prefill", "decode", "model_runner.run"))


def _kind(name: str, stack: list[str] | tuple[str, ...] = ()) -> str | None:
    """Attention, GEMM or sampling: by the runtime module on the operator's Python stack (a page gather is
    attention work though its name is aten::index), else by the operator's name."""
    for kind, modules in MODULES.items():
        if any(m in frame for frame in stack for m in modules):
            return kind
    low = name.lower()
    for kind, parts in KINDS.items():
        if any(p in low for p in parts):
            return kind
    return None


def profile(config: ProfileConfig) -> tuple[ProfileResult, Any]:
    """Run and profile; returns the result and the torch profiler (for its Chrome trace)."""
    import torch
    from torch.profiler import ProfilerActivity, record_function

    from trtbuild_runtime import LLMEngine, SamplingParams
    from trtbuild_runtime.config import resolve_device

    if min(config.batch, config.input_tokens, config.output_tokens) < 1:
        raise TrtbuildError("--batch, --input-tokens and --output-tokens must be >= 1")
    device = resolve_device(config.device)
    engine_cfg, batch = engine_config(config.source, device, config.batch, config.input_tokens + config.output_tokens + 1)
    engine = LLMEngine(engine_cfg)
    rng = torch.Generator().manual_seed(config.seed)
    prompts = [torch.randint(3, engine.vocab_size, (config.input_tokens,), generator=rng).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=config.output_tokens, top_k=1, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=2, top_k=1, ignore_eos=True))  # warm-up: kernels, graphs, caches

    run = engine.runner.run
    run_time = [0.0]

    def timed_run(*args, **kwargs):
        start = time.perf_counter()
        with record_function("model_runner.run"):
            out = run(*args, **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        run_time[0] += time.perf_counter() - start
        return out

    engine.runner.run = timed_run
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(PROFILE_ATTEMPTS):
            try:
                prof, steps = _profiled_steps(engine, prompts, params, activities, device, run_time)
                return _summarize(config, device, batch, prof, steps), prof
            except UnicodeDecodeError as e:  # torch's Python tracer now and then names a frame with garbage bytes
                unreadable = e
        raise TrtbuildError(f"torch's profiler recorded an unreadable frame name {PROFILE_ATTEMPTS} times ({unreadable})",
                            hint="run the command again")
    finally:
        engine.runner.run = run


def _profiled_steps(engine, prompts, params, activities, device: str, run_time: list[float]):
    """One profiled pass over the prompts: the profiler and (phase, step s, runner s) per engine step."""
    import torch
    from torch.profiler import profile as torch_profile
    from torch.profiler import record_function

    steps: list[tuple[str, float, float]] = []
    with torch_profile(activities=activities, profile_memory=True, record_shapes=False, with_stack=True) as prof:
        for k, prompt in enumerate(prompts):
            engine.add_request(f"profile-{k}", prompt, params)
        phase = "prefill"
        while engine.has_work():
            run_time[0] = 0.0
            start = time.perf_counter()
            with record_function(phase):
                engine.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            steps.append((phase, time.perf_counter() - start, run_time[0]))
            phase = "decode"
    prof.events()  # built here, where an unreadable name can still be retried
    return prof, steps


def _summarize(config: ProfileConfig, device: str, batch: int, prof, steps) -> ProfileResult:
    import torch

    cuda = device.startswith("cuda")
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    per_op: dict[str, dict[str, Any]] = {}  # operator -> calls, self time, self time by kind
    for e in prof.events():
        if not _is_operator(e.name):
            continue
        stack, parent = [], e.cpu_parent
        while parent is not None:
            stack.append(parent.name)
            parent = parent.cpu_parent
        op = per_op.setdefault(e.name, {"calls": 0, "self": 0.0, "cpu": 0.0, "kinds": {}})
        kind = _kind(e.name, stack)
        op["calls"] += 1
        op["self"] += self_time(e)
        op["cpu"] += e.self_cpu_time_total
        op["kinds"][kind] = op["kinds"].get(kind, 0.0) + self_time(e)
    total = sum(op["self"] for op in per_op.values()) or 1
    kinds = {kind: sum(op["kinds"].get(kind, 0.0) for op in per_op.values()) / total for kind in (*MODULES, *KINDS)}
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1]["self"])[:config.top]
    operators = [{"name": name, "kind": max(op["kinds"].items(), key=lambda kv: kv[1])[0], "calls": op["calls"],
                  "self_ms": op["self"] / 1e3, "share": op["self"] / total, "self_cpu_ms": op["cpu"] / 1e3}
                 for name, op in ranked]
    step_s = sum(s for _, s, _ in steps)
    host_share = (step_s - sum(r for _, _, r in steps)) / step_s if step_s else 0.0
    kinds["host"] = host_share  # of wall time, not of operator time
    prefill = [s for p, s, _ in steps if p == "prefill"]
    decode = [s for p, s, _ in steps if p == "decode"]
    memory = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)}
    if cuda:
        memory["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    bottlenecks = []
    for kind, share in sorted(kinds.items(), key=lambda kv: -kv[1]):
        if share >= config.hotspot_share:
            what = "host time around and between model calls" if kind == "host" else f"{kind} operators"
            measure = "of step time" if kind == "host" else f"of {'device' if cuda else 'CPU'} self time"
            bottlenecks.append(f"{what} {share:.0%} {measure}: {ADVICE[kind]}")
    tokens = batch * config.output_tokens
    return ProfileResult(
        config={k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()} | {"batch": batch},
        device=device, prefill_ms=sum(prefill) * 1e3, decode_ms_per_step=(sum(decode) / len(decode) * 1e3) if decode else 0.0,
        steps=len(steps), tokens_per_s=tokens / step_s if step_s else 0.0, host_share=host_share,
        operators=operators, kinds=kinds, memory=memory, bottlenecks=bottlenecks)


def markdown(result: ProfileResult) -> str:
    lines = [f"# trtbuild profile: {result.config['source']} on {result.device}", "",
             f"batch {result.config['batch']}, {result.config['input_tokens']} input + {result.config['output_tokens']} output "
             f"tokens: prefill {result.prefill_ms:.1f} ms, decode {result.decode_ms_per_step:.2f} ms/step "
             f"({result.steps} steps, {result.tokens_per_s:,.0f} tokens/s); peak RSS {result.memory['peak_rss_mib']:,.0f} MiB"
             + (f", peak CUDA allocation {result.memory['peak_allocated_mib']:,.0f} MiB" if "peak_allocated_mib" in result.memory else ""),
             "", "| operator | kind | calls | self ms | share |", "|---|---|---:|---:|---:|"]
    for op in result.operators:
        lines.append(f"| `{op['name']}` | {op['kind'] or '-'} | {op['calls']} | {op['self_ms']:.2f} | {op['share']:.1%} |")
    lines += ["", "| kind | share |", "|---|---:|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in result.kinds.items()]
    lines += ["", "Bottlenecks:", ""] + [f"- {b}" for b in result.bottlenecks or ["none above the threshold"]]
    return "\n".join(lines) + "\n"


def write(result: ProfileResult, prof, out: Path, *, force: bool = False) -> Path:
    from trtbuild.atomic import atomic_output_dir

    with atomic_output_dir(Path(out), force=force, inputs=(Path(result.config["source"]),)) as staging:
        (staging / "profile.json").write_text(json.dumps(result.to_json(), indent=2))
        (staging / "profile.md").write_text(markdown(result))
        prof.export_chrome_trace(str(staging / "trace.json"))
    return Path(out)
