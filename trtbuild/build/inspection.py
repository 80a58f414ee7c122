"""What a checkpoint or engine weighs, what its KV cache costs, and how large a batch fits a GPU.

Nothing is loaded: shapes come from the safetensors headers (Hugging Face checkpoints) or from
config.json (TensorRT-LLM checkpoints and engines, whose packed tensors hide the logical shapes).

Weights, for each precision. "Linear" weights are the 2-D weights inside the decoder layers
(q, k, v, o, gate, up, down); everything else (embeddings, lm_head, norms) stays in 16 bits when
quantizing, as ModelOpt does. For a linear weight of shape [out, in]:

| precision | weight bytes      | scale bytes                                                    |
|-----------|-------------------|----------------------------------------------------------------|
| fp32      | 4 * out * in      | -                                                              |
| fp16/bf16 | 2 * out * in      | -                                                              |
| fp8       | 1 * out * in      | 4 + 4 (per-tensor weight and activation scale, fp32)           |
| int8_sq   | 1 * out * in      | 4 * out (per-channel weight) + 4 (activation) + 2 * in (smoothing) |
| int8_wo   | 1 * out * in      | 2 * out (per-channel, 16-bit)                                  |
| int4_wo   | 0.5 * out * in    | 2 * out (per-channel, 16-bit)                                  |
| int4_awq  | 0.5 * out * in    | 2 * out * ceil(in / 128) (group scales) + 2 * in (pre-quant scale) |

An 8-bit KV cache adds one fp32 scale per layer. Per GPU, linear weights and their scales are split
over tp * pp ranks; embeddings, norms and lm_head are counted whole on every GPU (an upper bound).

KV cache (K and V for every layer), in bytes:
    kv_per_token     = 2 * (layers / pp) * ceil(kv_heads / tp) * head_dim * kv_bytes      (per GPU)
    kv_per_sequence  = kv_per_token * ceil(seq_len / tokens_per_block) * tokens_per_block
kv_bytes is 4 (fp32), 2 (fp16/bf16) or 1 (fp8/int8); "auto" is the 16-bit activation type unless
the checkpoint or engine stores an 8-bit cache. Paged caches allocate whole blocks, hence the rounding.

Largest batch at `seq_len` tokens per sequence (prompt + output), as TensorRT-LLM sizes its cache:
    max_batch = floor(kv_fraction * (gpu_mem - weights_per_gpu - reserve) / kv_per_sequence)
kv_fraction is kv_cache_free_gpu_mem_fraction (0.9 by default): the share of the memory left after
loading the weights that the KV cache takes. `reserve` stands for the CUDA context and the engine's
activation buffers (2 GiB by default; it grows with max_num_tokens): set it from a measurement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

from trtbuild.errors import TrtbuildError
from trtbuild.precisions import PRECISIONS
from trtbuild.spec import ModelSpec

GIB = 2**30
KV_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}
KV_DTYPES = ("auto", "fp32", "fp16", "bf16", "fp8", "int8")
PRECISION_ROWS = ("fp32", *PRECISIONS)
WEIGHT_BYTES = {"fp32": 4.0, **{name: p.weight_bytes for name, p in PRECISIONS.items()}}
AWQ_GROUP = 128
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                     "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_LAYER = re.compile(r"\blayers\.\d+\.")


def linear_scale_bytes(precision: str, out: int, inp: int) -> float:
    """Scale bytes one [out, in] linear weight carries at `precision` (module docstring table)."""
    if precision == "fp8":
        return 8
    if precision == "int8_sq":
        return 4 * out + 4 + 2 * inp
    if precision in ("int8_wo", "int4_wo"):
        return 2 * out
    if precision == "int4_awq":
        return 2 * out * math.ceil(inp / AWQ_GROUP) + 2 * inp
    return 0


@dataclasses.dataclass(frozen=True)
class Weights:
    """The logical weights: the decoder's linear layers as [out, in] shapes, and the rest as a count."""

    linear_shapes: tuple[tuple[int, int], ...]
    other_params: int
    source: str  # "safetensors" (exact) or "config" (derived from the shapes in config.json)

    @property
    def linear_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes)

    @property
    def parameters(self) -> int:
        return self.linear_params + self.other_params

    @classmethod
    def from_config(cls, model: ModelSpec) -> "Weights":
        h, i, hd = model.hidden_size, model.intermediate_size, model.head_dim
        q, kv = model.num_heads * hd, model.num_kv_heads * hd
        per_layer = ((q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i))
        return cls(per_layer * model.num_layers, model.num_parameters - model.num_layers * sum(o * n for o, n in per_layer), "config")

    @classmethod
    def from_safetensors(cls, directory: Path) -> "Weights | None":
        from safetensors import safe_open

        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            return None
        shapes, other = [], 0
        for path in files:
            with safe_open(str(path), "np") as f:
                for name in f.keys():
                    shape = f.get_slice(name).get_shape()
                    if len(shape) == 2 and name.endswith(".weight") and _LAYER.search(name):
                        shapes.append((int(shape[0]), int(shape[1])))
                    else:
                        other += math.prod(shape)
        return cls(tuple(shapes), other, "safetensors")


def on_disk_bytes(directory: Path, patterns: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for pattern in patterns for p in Path(directory).glob(pattern) if p.is_file())


@dataclasses.dataclass(frozen=True)
class PrecisionCost:
    precision: str
    linear_bytes: int
    scale_bytes: int
    other_bytes: int
    total_bytes: int
    per_gpu_bytes: int
    kv_bytes_per_token: int
    max_batch: int


@dataclasses.dataclass(frozen=True)
class Inspection:
    path: str
    kind: str  # hf, trtllm (checkpoint) or engine
    architecture: str
    model_type: str
    parameters: int
    parameters_source: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str
    precision: str
    on_disk_bytes: int
    tp_size: int
    pp_size: int
    gpu_mem_bytes: int
    seq_len: int
    kv_dtype: str
    kv_bytes: int
    tokens_per_block: int
    kv_fraction: float
    reserve_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_sequence: int
    max_batch: int
    costs: tuple[PrecisionCost, ...]
    plan: tuple[str, ...]
    plan_error: str | None

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def kv_bytes_per_token(model: ModelSpec, kv_bytes: int, tp: int = 1, pp: int = 1) -> int:
    return 2 * math.ceil(model.num_layers / pp) * math.ceil(model.num_kv_heads / tp) * model.head_dim * kv_bytes


def kv_bytes_per_sequence(per_token: int, seq_len: int, tokens_per_block: int) -> int:
    return per_token * math.ceil(seq_len / tokens_per_block) * tokens_per_block


def max_batch(gpu_mem: int, weights_per_gpu: int, reserve: int, kv_per_sequence: int, kv_fraction: float) -> int:
    free = gpu_mem - weights_per_gpu - reserve
    return max(0, math.floor(kv_fraction * free / kv_per_sequence)) if free > 0 else 0


def precision_cost(precision: str, weights: Weights, model: ModelSpec, *, kv_dtype: str, tp: int, pp: int, gpu_mem: int,
                   reserve: int, seq_len: int, tokens_per_block: int, kv_fraction: float) -> PrecisionCost:
    linear = int(weights.linear_params * WEIGHT_BYTES[precision])
    scales = int(sum(linear_scale_bytes(precision, o, i) for o, i in weights.linear_shapes))
    kv_b = _kv_bytes(kv_dtype, precision)
    if kv_b == 1:
        scales += 4 * model.num_layers
    other = weights.other_params * (4 if precision == "fp32" else 2)
    per_gpu = math.ceil((linear + scales) / (tp * pp)) + other
    per_token = kv_bytes_per_token(model, kv_b, tp, pp)
    per_seq = kv_bytes_per_sequence(per_token, seq_len, tokens_per_block)
    return PrecisionCost(precision, linear, scales, other, linear + scales + other, per_gpu, per_token,
                         max_batch(gpu_mem, per_gpu, reserve, per_seq, kv_fraction))


def _kv_bytes(kv_dtype: str, precision: str) -> int:
    if kv_dtype == "auto":
        return 4 if precision == "fp32" else 2
    return KV_BYTES[kv_dtype]


def inspect_path(path: Path, *, gpu_mem_gib: float = 80.0, seq_len: int | None = None, kv_dtype: str = "auto",
                 tp_size: int | None = None, pp_size: int | None = None, precision: str | None = None,
                 kv_fraction: float = 0.9, reserve_gib: float = 2.0, tokens_per_block: int | None = None,
                 plan: bool = True) -> Inspection:
    """Inspect a Hugging Face checkpoint, a TensorRT-LLM checkpoint or a TensorRT-LLM engine directory."""
    from trtbuild.build import engine as eng
    from trtbuild.checkpoint import read_config

    path = Path(path).absolute()
    if kv_dtype not in KV_DTYPES:
        raise TrtbuildError(f"--kv-dtype {kv_dtype} is not one of {', '.join(KV_DTYPES)}")
    if gpu_mem_gib <= 0 or not 0 < kv_fraction <= 1 or reserve_gib < 0:
        raise TrtbuildError("--gpu-mem-gib must be > 0, --kv-fraction in (0, 1] and --reserve-gib >= 0")
    config = read_config(path)
    steps: list[str] = []
    plan_error = None
    if "build_config" in config:
        engine = eng.read_engine_config(path)
        kind, model, cfg = "engine", engine.trtllm.model, engine.trtllm
        own_precision = cfg.precision
        seq_len = seq_len or engine.max_seq_len
        tokens_per_block = tokens_per_block or engine.tokens_per_block
        disk = on_disk_bytes(path, ("rank*.engine",))
        weights = Weights.from_config(model)
        manifest = eng.EngineManifest.read(path)
        if manifest:
            steps += [f"built with: {' '.join(c) if c[0] != 'trtbuild.build.quantize' else c[1]}" for c in manifest.commands]
        steps.append(f"trtbuild repo {path} --runtime tensorrtllm --out model_repo")
        steps.append("trtbuild compose model_repo --out docker-compose.yml")
    else:
        source = eng.read_source(path, need_weights=False)  # a config.json alone is enough to size a model
        kind, model, cfg = source.format, source.model, source.trtllm
        own_precision = cfg.precision if cfg else {"bfloat16": "bf16", "float16": "fp16"}.get(model.dtype, "fp32")
        seq_len = seq_len or min(2048, model.max_position_embeddings)
        tokens_per_block = tokens_per_block or 32
        disk = on_disk_bytes(path, ("*.safetensors", "pytorch_model*.bin"))
        weights = (Weights.from_safetensors(path) if kind == "hf" else None) or Weights.from_config(model)
        if plan and not disk:
            plan_error = f"{path} has no weights yet: download them to build"
        elif plan:
            build_precision = precision or (None if cfg else ("bf16" if model.dtype == "bfloat16" else "fp16"))
            try:
                options = eng.EngineOptions(
                    precision=build_precision, tp_size=tp_size, pp_size=pp_size, max_seq_len=seq_len,
                    max_input_len=max(1, seq_len // 2), tokens_per_block=tokens_per_block,
                    kv_cache_dtype=None if kv_dtype in ("auto", "fp32", "fp16", "bf16") else kv_dtype)
                name = f"{path.name}-{build_precision or own_precision}"
                steps = eng.plan_engine(path, options, Path("engines") / name).describe()
            except TrtbuildError as e:
                plan_error = str(e)
    if cfg is not None:
        tp_size = tp_size or cfg.mapping.tp_size
        pp_size = pp_size or cfg.mapping.pp_size
        if kv_dtype == "auto" and cfg.kv_cache_dtype in ("fp8", "int8"):
            kv_dtype = cfg.kv_cache_dtype
    tp_size, pp_size = tp_size or 1, pp_size or 1
    if seq_len < 1 or tokens_per_block < 1 or tp_size < 1 or pp_size < 1:
        raise TrtbuildError("--seq-len, --tokens-per-block, --tp-size and --pp-size must be >= 1")
    gpu_mem, reserve = int(gpu_mem_gib * GIB), int(reserve_gib * GIB)
    common = dict(kv_dtype=kv_dtype, tp=tp_size, pp=pp_size, gpu_mem=gpu_mem, reserve=reserve, seq_len=seq_len,
                  tokens_per_block=tokens_per_block, kv_fraction=kv_fraction)
    costs = tuple(precision_cost(p, weights, model, **common) for p in PRECISION_ROWS)
    own = next(c for c in costs if c.precision == own_precision)
    kv_b = _kv_bytes(kv_dtype, own_precision)
    return Inspection(
        path=str(path), kind=kind, architecture=model.architecture, model_type=model.model_type,
        parameters=weights.parameters, parameters_source=weights.source, layers=model.num_layers,
        hidden_size=model.hidden_size, heads=model.num_heads, kv_heads=model.num_kv_heads, head_dim=model.head_dim,
        vocab_size=model.vocab_size, dtype=model.dtype, precision=own_precision, on_disk_bytes=disk,
        tp_size=tp_size, pp_size=pp_size, gpu_mem_bytes=gpu_mem, seq_len=seq_len, kv_dtype=kv_dtype, kv_bytes=kv_b,
        tokens_per_block=tokens_per_block, kv_fraction=kv_fraction, reserve_bytes=reserve,
        kv_bytes_per_token=own.kv_bytes_per_token,
        kv_bytes_per_sequence=kv_bytes_per_sequence(own.kv_bytes_per_token, seq_len, tokens_per_block),
        max_batch=own.max_batch, costs=costs, plan=tuple(steps), plan_error=plan_error,
    )


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def render(report: Inspection, console) -> None:
    """Rich tables for the terminal."""
    from rich.table import Table

    r = report
    model = Table(title=f"{r.path} ({r.kind})", show_header=False)
    for key, value in (
        ("architecture", f"{r.architecture} ({r.model_type})"),
        ("parameters", f"{r.parameters:,} (from {r.parameters_source})"),
        ("layers / hidden / heads / kv heads / head dim", f"{r.layers} / {r.hidden_size} / {r.heads} / {r.kv_heads} / {r.head_dim}"),
        ("vocab", f"{r.vocab_size:,}"),
        ("dtype / precision", f"{r.dtype} / {r.precision}"),
        ("on disk", _size(r.on_disk_bytes)),
        ("tp x pp", f"{r.tp_size} x {r.pp_size}"),
        ("KV cache", f"{r.kv_dtype} ({r.kv_bytes} B/value), {_size(r.kv_bytes_per_token)}/token/GPU, "
                     f"{_size(r.kv_bytes_per_sequence)}/sequence of {r.seq_len} tokens (blocks of {r.tokens_per_block})"),
        (f"largest batch at {r.seq_len} tokens", f"{r.max_batch} on {_size(r.gpu_mem_bytes)} per GPU "
                                                  f"(kv fraction {r.kv_fraction}, reserve {_size(r.reserve_bytes)})"),
    ):
        model.add_row(key, value)
    console.print(model)
    costs = Table(title=f"weights by precision; largest batch at {r.seq_len} tokens on {_size(r.gpu_mem_bytes)}/GPU")
    for col in ("precision", "linear", "scales", "other", "total", "per GPU", "KV/token/GPU", "max batch"):
        costs.add_column(col, justify="right" if col != "precision" else "left")
    for c in r.costs:
        mark = " *" if c.precision == r.precision else ""
        costs.add_row(c.precision + mark, _size(c.linear_bytes), _size(c.scale_bytes), _size(c.other_bytes),
                      _size(c.total_bytes), _size(c.per_gpu_bytes), _size(c.kv_bytes_per_token), str(c.max_batch))
    console.print(costs)
    if r.plan_error:
        console.print(f"[bold red]a build would be refused:[/] {r.plan_error}", highlight=False, soft_wrap=True)
    elif r.plan:
        console.print("[bold]plan:[/]")
        for step in r.plan:
            console.print(f"  {step}", highlight=False, soft_wrap=True)
