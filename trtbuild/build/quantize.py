"""Post-training quantization with NVIDIA ModelOpt, exported as a TensorRT-LLM or a pre-quantized HF checkpoint.

Steps: check every option against the checkpoint's config.json and the calibration text (no weights
loaded, nothing written) -> load the model -> reference logits on held-out text -> quantize and
calibrate (ModelOpt fake-quantization) -> logits delta against the reference, checked against
TOLERANCES -> export into a staging directory -> complete config.json -> tokenizer and
`trtbuild-manifest.json` -> rename into place. A failed step leaves no output behind.

Precisions and what the exported checkpoint declares (TensorRT-LLM QuantAlgo names):

| precision | ModelOpt config                     | --format trtllm        | --format hf |
|-----------|-------------------------------------|------------------------|-------------|
| fp16/bf16 | none (cast only)                    | quant_algo null        | no hf_quant_config.json |
| fp8       | FP8_DEFAULT_CFG                     | FP8                    | FP8 |
| int8_sq   | INT8_SMOOTHQUANT_CFG                | W8A8_SQ_PER_CHANNEL    | W8A8_SQ_PER_CHANNEL |
| int8_wo   | INT8_WEIGHT_ONLY_CFG                | W8A16 (16-bit weights) | W8A16 |
| int4_wo   | per-channel int4 / INT4_BLOCKWISE_WEIGHT_ONLY_CFG | W4A16 (16-bit weights) | W4A16_AWQ (group-wise) |
| int4_awq  | INT4_AWQ_CFG                        | W4A16_AWQ              | W4A16_AWQ |

For `--format trtllm`, W8A16 and W4A16 follow TensorRT-LLM's own `quantize.py`: the checkpoint holds
16-bit weights and `trtllm-build` quantizes them per output channel while loading
(`weight_only_quantize_dict`); ModelOpt's int8 weight-only export names its scales
`weights_scaling_factor`, which TensorRT-LLM's weight-only layers (`per_channel_scale`) do not read.
The delta is still measured with ModelOpt fake-quantization that mirrors that per-channel scheme.
ModelOpt has no per-channel INT4 export, so `--format hf` int4_wo is group-wise round-to-nearest INT4
written in the W4A16_AWQ layout (no activation-aware scaling).

KV cache: fp8 appends `FP8_KV_CFG`; int8 (no ModelOpt preset) appends a `*[kv]_bmm_quantizer`
entry with 8 bits. `export_hf_checkpoint` only writes FP8 (and NVFP4) KV scales, so int8 KV needs
`--format trtllm`.

Logits delta: the checkpoint's own weights are the reference. The candidate is the fake-quantized
model whose 16-bit weights were first rounded to the export dtype. On CPU both run in float32 (CPU
float16 matmuls are several times slower); on CUDA both run in the export dtype. Metrics over every
position of the held-out samples: max and mean absolute logit difference, top-1 agreement, mean
KL(reference || quantized) in nats per token, and both perplexities.

Tolerances (TOLERANCES, plus KV_CACHE_ALLOWANCE for a quantized KV cache) bound the mean KL and the
top-1 agreement; max/mean |diff| and perplexities are recorded, not gated (raw logit scales differ
between models). They are set from measurements on the trained SmolLM2-135M (see the table's
comment) with headroom for other text: a 135M model is more sensitive to quantization than the 7B+
models TensorRT-LLM usually serves, so the limits are loose for those. Tiny random models give
meaningless numbers; pass a looser `Tolerance` (or --max-mean-kl/--min-top1) for them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import io
import itertools
import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from trtbuild.atomic import atomic_output_dir, check_output_dir
from trtbuild.checkpoint import load_model_spec
from trtbuild.errors import TrtbuildError
from trtbuild.precisions import CAST_DTYPES, KV_CACHE_DTYPES, KV_CACHE_QUANT_ALGOS, NAMES
from trtbuild.precisions import PRECISIONS as PRECISION_TABLE
from trtbuild.resources import DATA_DIR
from trtbuild.manifest import MANIFEST_NAME, sha256_file, tool_versions, write_manifest
from trtbuild.spec import ModelSpec

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from rich.progress import Progress

log = logging.getLogger(__name__)

FORMATS = ("trtllm", "hf")
DTYPES = ("auto", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
INT4_BLOCK_SIZES = (128, 64)  # TensorRT-LLM's group-wise INT4 kernels take 64 or 128
DEFAULT_CALIBRATION = DATA_DIR / "calibration.txt"
TOOLS = ("trtbuild", "torch", "transformers", "nvidia-modelopt", "safetensors")

PRECISIONS = NAMES
PRECISION_DTYPE = CAST_DTYPES
MODELOPT_CONFIGS = {name: p.modelopt_config for name, p in PRECISION_TABLE.items() if p.modelopt_config}
QUANT_ALGOS: dict[str, dict[str, str | None]] = {
    "trtllm": {name: p.quant_algo for name, p in PRECISION_TABLE.items()},
    "hf": {name: p.hf_quant_algo for name, p in PRECISION_TABLE.items()},
}
# --format trtllm precisions whose weights trtllm-build quantizes from the exported 16-bit weights.
BUILD_TIME_WEIGHT_ONLY = tuple(name for name, p in PRECISION_TABLE.items() if p.build_time_weight_only)
INT8_KV_ENTRY = {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": 8, "axis": None}}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Largest accepted mean KL(reference || quantized) in nats per token, smallest top-1 agreement."""

    max_mean_kl: float
    min_top1: float


# Measured with this module on SmolLM2-135M-Instruct (fp32 checkpoint, CPU, default options: 128
# calibration and 16 held-out lines of trtbuild/data/calibration.txt, 885 held-out tokens), as
# mean KL (nats/token) / top-1 agreement / perplexity 46.16 ->:
#   fp16 0.000002 / 1.000 / 46.16     bf16 0.00006 / 0.994 / 46.21    int8_wo 0.0035 / 0.964 / 46.17
#   fp8  0.036 / 0.883 / 46.58        int8_sq 0.082 / 0.820 / 50.92   int4_awq (group 64) 0.232 / 0.712 / 57.76
#   int4_wo: trtllm per-channel 0.849 / 0.507 / 91.11; hf group-wise 0.588 / 0.554 / 63.57
#   KV cache on top of fp16: fp8 0.0067 / 0.953, int8 0.0050 / 0.954; fp8 + fp8 KV 0.043 / 0.883
# Limits leave about 2-3x the measured KL and 8-10 points of top-1 (885 tokens carry about +-1.5
# points of sampling noise). 4-bit weights share one limit, so round-to-nearest int4_wo, which
# nearly doubles SmolLM2's perplexity, is refused for it (int4_awq passes); a larger model, or
# --max-mean-kl/--min-top1, can still use it.
TOLERANCES: dict[str, Tolerance] = {
    "fp16": Tolerance(0.002, 0.97),
    "bf16": Tolerance(0.005, 0.95),
    "int8_wo": Tolerance(0.02, 0.90),
    "fp8": Tolerance(0.10, 0.80),
    "int8_sq": Tolerance(0.20, 0.72),
    "int4_awq": Tolerance(0.50, 0.60),
    "int4_wo": Tolerance(0.50, 0.60),
}
# Added to the KL limit and taken off the top-1 limit when the KV cache is quantized too.
KV_CACHE_ALLOWANCE: dict[str, Tolerance] = {
    "auto": Tolerance(0.0, 0.0),
    "fp8": Tolerance(0.03, 0.05),
    "int8": Tolerance(0.03, 0.05),
}


def tolerance_for(precision: str, kv_cache_dtype: str = "auto") -> Tolerance:
    base, extra = TOLERANCES[precision], KV_CACHE_ALLOWANCE[kv_cache_dtype]
    return Tolerance(round(base.max_mean_kl + extra.max_mean_kl, 6), round(base.min_top1 - extra.min_top1, 6))


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """What `trtbuild quantize` was asked for; checked by `plan`."""

    precision: str
    kv_cache_dtype: str = "auto"
    calib_size: int = 128
    calib_data: Path | None = None  # None: trtbuild/data/calibration.txt
    calib_max_len: int = 256
    eval_size: int = 16  # the calibration file's last N samples, never calibrated on
    tp_size: int = 1
    pp_size: int = 1
    format: str = "trtllm"
    dtype: str = "auto"  # 16-bit dtype of what is not quantized; fp16/bf16 fix it
    block_size: int | None = None  # INT4 group size; None: 128 where every shape allows, else 64
    device: str = "auto"
    tolerance: Tolerance | None = None  # None: tolerance_for(precision, kv_cache_dtype)


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """Calibration and held-out samples: one per non-empty line of a UTF-8 text file."""

    path: Path
    sha256: str
    total_samples: int
    calib: tuple[str, ...]
    heldout: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "total_samples": self.total_samples,
                "calib_samples": len(self.calib), "eval_samples": len(self.heldout)}


@dataclasses.dataclass(frozen=True)
class QuantizePlan:
    """Everything resolved and checked before any weight is loaded."""

    checkpoint: Path
    out: Path
    options: QuantizeOptions
    model: ModelSpec
    decoder_type: str
    dtype: str
    block_size: int | None
    device: str
    calibration: CalibrationSet
    tolerance: Tolerance
    quant_algo: str | None
    kv_cache_quant_algo: str | None

    @property
    def calibrates(self) -> bool:
        return self.options.precision not in PRECISION_DTYPE or self.options.kv_cache_dtype != "auto"

    @property
    def compute_dtype(self) -> str:
        return self.dtype if self.device == "cuda" else "float32"


@dataclasses.dataclass(frozen=True)
class LogitsDelta:
    """Quantized vs reference logits over every position of the held-out samples."""

    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    mean_kl: float
    perplexity_reference: float
    perplexity_quantized: float
    samples: int
    tokens: int

    def within(self, tolerance: Tolerance) -> bool:
        return self.mean_kl <= tolerance.max_mean_kl and self.top1_agreement >= tolerance.min_top1


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    out: Path
    manifest: Path
    format: str
    precision: str
    kv_cache_dtype: str
    dtype: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    group_size: int | None
    tp_size: int
    pp_size: int
    calibration: dict[str, Any]
    delta: LogitsDelta
    tolerance: Tolerance
    timings_s: dict[str, float]
    files: dict[str, str]


# ------------------------------------------------------------------------------------------ checks
def load_calibration(path: Path | None, calib_size: int, eval_size: int) -> CalibrationSet:
    """Read the samples; the last `eval_size` are held out for the logits delta."""
    path = Path(path) if path is not None else DEFAULT_CALIBRATION
    if not path.is_file():
        raise TrtbuildError(f"--calib-data {path} does not exist", hint="pass a UTF-8 text file, one sample per line")
    try:
        samples = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise TrtbuildError(f"--calib-data {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    if not samples:
        raise TrtbuildError(f"--calib-data {path} is empty", hint="put one calibration sample per line")
    if len(samples) < calib_size + eval_size:
        raise TrtbuildError(
            f"--calib-data {path} has {len(samples)} samples (non-empty lines) but --calib-size {calib_size} "
            f"+ --eval-size {eval_size} held out need {calib_size + eval_size}",
            hint="lower --calib-size or --eval-size, or add text",
        )
    return CalibrationSet(path.absolute(), sha256_file(path), len(samples),
                          tuple(samples[:calib_size]), tuple(samples[len(samples) - eval_size:]))


def _choose_block_size(model: ModelSpec, tp: int, requested: int | None) -> int:
    """The INT4 group size every quantized GEMM's per-rank input dimension divides (ModelOpt's check)."""
    dims = {"hidden_size": model.hidden_size, "num_attention_heads x head_dim": model.num_heads * model.head_dim,
            "intermediate_size": model.intermediate_size}
    for size in (requested,) if requested else INT4_BLOCK_SIZES:
        if all((d // tp) % size == 0 for d in dims.values()):
            return size
    shown = ", ".join(f"{k} {v}" for k, v in dims.items())
    if requested:
        raise TrtbuildError(f"--block-size {requested} does not divide every INT4 GEMM input per tensor-parallel rank "
                            f"({shown}, tp {tp})", hint=f"try --block-size {' or '.join(map(str, INT4_BLOCK_SIZES))}"
                            " or another --tp-size")
    raise TrtbuildError(f"no INT4 group size ({', '.join(map(str, INT4_BLOCK_SIZES))}) divides every GEMM input per "
                        f"tensor-parallel rank ({shown}, tp {tp})", hint="use int8_wo or fp8, or another --tp-size")


def _import_modelopt(fmt: str) -> None:
    try:
        with _quiet():
            import modelopt.torch.export as mte
            import modelopt.torch.quantization  # noqa: F401
    except ImportError as e:
        raise TrtbuildError(f"NVIDIA ModelOpt cannot be imported: {e}",
                            hint="pip install 'nvidia-modelopt==0.47.0' requests (not the [hf] extra)") from None
    if fmt == "trtllm" and not hasattr(mte, "export_tensorrt_llm_checkpoint"):
        raise TrtbuildError("this nvidia-modelopt has no export_tensorrt_llm_checkpoint (removed in 0.49)",
                            hint="pip install 'nvidia-modelopt>=0.47,<0.49', or use --format hf")


def plan(checkpoint: Path, out: Path, options: QuantizeOptions, *, force: bool = False) -> QuantizePlan:
    """Check every option before any work; raises TrtbuildError, writes nothing."""
    o = options
    for name, value, allowed in (("--precision", o.precision, PRECISIONS), ("--kv-cache-dtype", o.kv_cache_dtype, KV_CACHE_DTYPES),
                                 ("--format", o.format, FORMATS), ("--dtype", o.dtype, DTYPES), ("--device", o.device, DEVICES)):
        if value not in allowed:
            raise TrtbuildError(f"{name} {value} is not one of {', '.join(allowed)}")
    for name, value, least in (("--calib-size", o.calib_size, 1), ("--calib-max-len", o.calib_max_len, 2),
                               ("--eval-size", o.eval_size, 1), ("--tp-size", o.tp_size, 1), ("--pp-size", o.pp_size, 1)):
        if not isinstance(value, int) or value < least:
            raise TrtbuildError(f"{name} must be an integer >= {least}, got {value!r}")
    if o.tolerance is not None and not (o.tolerance.max_mean_kl >= 0 and 0 <= o.tolerance.min_top1 <= 1):
        raise TrtbuildError(f"tolerance {o.tolerance} is out of range", hint="max mean KL >= 0, min top-1 in [0, 1]")

    dtype = PRECISION_DTYPE.get(o.precision)
    if dtype and o.dtype not in ("auto", dtype):
        raise TrtbuildError(f"--precision {o.precision} means {dtype}; --dtype {o.dtype} contradicts it",
                            hint="drop --dtype or use the other 16-bit precision")
    if o.format == "hf":
        if (o.tp_size, o.pp_size) != (1, 1):
            raise TrtbuildError(f"--format hf writes one unsharded checkpoint; --tp-size {o.tp_size} --pp-size {o.pp_size} "
                                "does not apply", hint="set tensor_parallel_size where it is served, or use --format trtllm")
        if o.kv_cache_dtype == "int8":
            raise TrtbuildError("--kv-cache-dtype int8 cannot be exported with --format hf (ModelOpt's HF export writes "
                                "FP8 KV-cache scales only)", hint="use --kv-cache-dtype fp8, or --format trtllm")
    int4_grouped = o.precision == "int4_awq" or (o.precision == "int4_wo" and o.format == "hf")
    if o.block_size is not None and not int4_grouped:
        raise TrtbuildError(f"--block-size applies to group-wise INT4 (int4_awq; int4_wo with --format hf), not "
                            f"--precision {o.precision} --format {o.format}", hint="drop --block-size")
    if o.block_size is not None and o.block_size not in INT4_BLOCK_SIZES:
        raise TrtbuildError(f"--block-size {o.block_size} is not one of {', '.join(map(str, INT4_BLOCK_SIZES))}")

    checkpoint = Path(checkpoint).absolute()
    model = load_model_spec(checkpoint)
    decoder = model.arch.modelopt_decoder
    if decoder is None:
        raise TrtbuildError(f"{checkpoint}/config.json: model_type '{model.model_type}' has no ModelOpt decoder type")
    tp, pp = o.tp_size, o.pp_size
    for field, value in (("num_attention_heads", model.num_heads), ("num_key_value_heads", model.num_kv_heads),
                         ("intermediate_size", model.intermediate_size)):
        if value % tp:
            raise TrtbuildError(f"--tp-size {tp} does not divide {field} {value} in {checkpoint}/config.json",
                                hint="choose a --tp-size that divides it")
    if pp > model.num_layers or model.num_layers % pp:
        raise TrtbuildError(f"--pp-size {pp} does not divide num_hidden_layers {model.num_layers} in {checkpoint}/config.json",
                            hint="each pipeline stage gets the same number of layers")
    if o.calib_max_len > model.max_position_embeddings:
        raise TrtbuildError(f"--calib-max-len {o.calib_max_len} exceeds max_position_embeddings "
                            f"{model.max_position_embeddings} in {checkpoint}/config.json")
    block_size = _choose_block_size(model, tp, o.block_size) if int4_grouped else None
    calibration = load_calibration(o.calib_data, o.calib_size, o.eval_size)
    if o.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TrtbuildError("--device cuda but torch sees no CUDA device", hint="use --device cpu")
    out = Path(out).absolute()
    check_output_dir(out, force, inputs=(checkpoint, o.calib_data))
    _import_modelopt(o.format)

    if dtype is None:
        dtype = o.dtype if o.dtype != "auto" else (model.dtype if model.dtype in ("float16", "bfloat16") else "float16")
    if o.device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = o.device
    return QuantizePlan(
        checkpoint=checkpoint, out=out, options=o, model=model, decoder_type=decoder, dtype=dtype,
        block_size=block_size, device=device, calibration=calibration,
        tolerance=o.tolerance or tolerance_for(o.precision, o.kv_cache_dtype),
        quant_algo=QUANT_ALGOS[o.format][o.precision], kv_cache_quant_algo=KV_CACHE_QUANT_ALGOS[o.kv_cache_dtype],
    )


# ------------------------------------------------------------------------------------------ ModelOpt
@contextlib.contextmanager
def _quiet(stderr: bool = False) -> Iterator[None]:
    """ModelOpt prints, warns and logs a lot; keep it in the debug log so the progress bars stay readable.

    stderr is only redirected while no progress bar is live (rich draws on stderr).
    """
    buffer = io.StringIO()
    caught: list[warnings.WarningMessage] = []
    try:
        with contextlib.ExitStack() as stack:
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            stack.enter_context(contextlib.redirect_stdout(buffer))
            if stderr:
                stack.enter_context(contextlib.redirect_stderr(buffer))
            yield
    finally:
        for w in caught:
            log.debug("warning: %s", w.message)
        if buffer.getvalue().strip():
            log.debug("%s", buffer.getvalue().rstrip())


@contextlib.contextmanager
def _no_transformers_progress() -> Iterator[None]:
    import transformers

    enabled = transformers.utils.logging.is_progress_bar_enabled()
    verbosity = transformers.logging.get_verbosity()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if enabled:
            transformers.utils.logging.enable_progress_bar()


def modelopt_config(p: QuantizePlan) -> tuple[str, dict[str, Any] | None]:
    """(a readable name, the ModelOpt quantize config) used for calibration and the delta."""
    import modelopt.torch.quantization as mtq

    o = p.options
    name, cfg = "none", None
    if o.precision == "int4_wo" and o.format == "trtllm":
        # trtllm-build's W4A16: symmetric INT4, one scale per output channel.
        name, cfg = "INT8_WEIGHT_ONLY_CFG with 4-bit weights", copy.deepcopy(mtq.INT8_WEIGHT_ONLY_CFG)
        for entry in cfg["quant_cfg"]:
            if entry["quantizer_name"] == "*weight_quantizer" and "cfg" in entry:
                entry["cfg"]["num_bits"] = 4
    elif o.precision in MODELOPT_CONFIGS:
        name, cfg = MODELOPT_CONFIGS[o.precision], copy.deepcopy(getattr(mtq, MODELOPT_CONFIGS[o.precision]))
    if cfg is not None and p.block_size:
        for entry in cfg["quant_cfg"]:
            if isinstance(entry.get("cfg"), dict) and "block_sizes" in entry["cfg"]:
                entry["cfg"]["block_sizes"][-1] = p.block_size
        name += f", block {p.block_size}"
    if o.kv_cache_dtype != "auto":
        kv = mtq.FP8_KV_CFG["quant_cfg"] if o.kv_cache_dtype == "fp8" else [INT8_KV_ENTRY]
        with _quiet():
            cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg or {}, kv)
        name = ("" if name == "none" else name + " + ") + ("FP8_KV_CFG" if o.kv_cache_dtype == "fp8" else "INT8 *[kv]_bmm_quantizer")
    return name, cfg


def _progress(console: "Console") -> "Progress":
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console)


def _run(model, samples: list["torch.Tensor"], progress: "Progress", label: str) -> list["torch.Tensor"]:
    """Forward every sample; returns float32 logits on the CPU."""
    import torch

    task = progress.add_task(label, total=len(samples))
    logits = []
    with torch.no_grad():
        for ids in samples:
            logits.append(model(input_ids=ids.to(model.device), use_cache=False).logits[0].float().cpu())
            progress.advance(task)
    return logits


def _calibration_loop(samples: list["torch.Tensor"], progress: "Progress") -> Callable:
    """ModelOpt calls the loop once per calibration pass (AWQ needs two)."""
    import torch

    passes = itertools.count(1)

    def loop(model) -> None:
        task = progress.add_task(f"calibrating, pass {next(passes)}", total=len(samples))
        with torch.no_grad():
            for ids in samples:
                model(input_ids=ids.to(model.device), use_cache=False)
                progress.advance(task)

    return loop


def measure_delta(reference: list["torch.Tensor"], candidate: list["torch.Tensor"],
                  samples: list["torch.Tensor"]) -> LogitsDelta:
    """Compare per-position logits [tokens, vocab] of the same samples."""
    import torch
    import torch.nn.functional as F

    max_abs, sum_abs, elements, agree, kl, nll_ref, nll_q, positions, predicted = 0.0, 0.0, 0, 0, 0.0, 0.0, 0.0, 0, 0
    for ref, cand, ids in zip(reference, candidate, samples):
        diff = (cand - ref).abs()
        max_abs = max(max_abs, float(diff.max()))
        sum_abs += float(diff.sum(dtype=torch.float64))
        elements += diff.numel()
        agree += int((cand.argmax(-1) == ref.argmax(-1)).sum())
        log_ref, log_cand = F.log_softmax(ref, -1), F.log_softmax(cand, -1)
        kl += float(F.kl_div(log_cand, log_ref, log_target=True, reduction="sum"))
        positions += ref.shape[0]
        targets = ids[0, 1:].unsqueeze(-1)
        nll_ref -= float(log_ref[:-1].gather(-1, targets).sum())
        nll_q -= float(log_cand[:-1].gather(-1, targets).sum())
        predicted += targets.shape[0]
    return LogitsDelta(
        max_abs_diff=max_abs, mean_abs_diff=sum_abs / elements, top1_agreement=agree / positions,
        mean_kl=kl / positions, perplexity_reference=float(torch.exp(torch.tensor(nll_ref / max(predicted, 1)))),
        perplexity_quantized=float(torch.exp(torch.tensor(nll_q / max(predicted, 1)))),
        samples=len(samples), tokens=positions,
    )


# ------------------------------------------------------------------------------------------ export
def _rotary_scaling(rope_scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """TensorRT-LLM reads HF's rope_scaling dict as rotary_scaling, keyed by `type`."""
    if not rope_scaling:
        return None
    kind = rope_scaling.get("type") or rope_scaling.get("rope_type")
    if kind in (None, "default"):
        return None
    return {**rope_scaling, "type": kind, "rope_type": kind}


def complete_trtllm_config(path: Path, model: ModelSpec, quant_algo: str | None) -> dict[str, Any]:
    """Write what ModelOpt's manual config path loses with transformers 5 (rope) and the weight-only algo."""
    config = json.loads(path.read_text())
    if str(config.get("position_embedding_type", "")).startswith("rope"):
        config["rotary_base"] = model.rope_theta
        config["rotary_scaling"] = _rotary_scaling(model.rope_scaling)
    config.setdefault("quantization", {})["quant_algo"] = quant_algo
    path.write_text(json.dumps(config, indent=4) + "\n")
    return config


def complete_hf_config(path: Path, model: ModelSpec, dtype: str) -> dict[str, Any]:
    """Add the pre-transformers-5 keys (rope_theta, rope_scaling, torch_dtype) that older readers
    (TensorRT-LLM's PyTorch backend pins transformers 4.x) need; transformers 5 ignores them."""
    config = json.loads(path.read_text())
    config.setdefault("rope_theta", model.rope_theta)
    if _rotary_scaling(model.rope_scaling):
        config.setdefault("rope_scaling", model.rope_scaling)
    config.setdefault("torch_dtype", dtype)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return config


def _exported_quantization(directory: Path, fmt: str) -> dict[str, Any]:
    if fmt == "trtllm":
        return json.loads((directory / "config.json").read_text()).get("quantization") or {}
    hf_quant = directory / "hf_quant_config.json"
    return json.loads(hf_quant.read_text()).get("quantization") or {} if hf_quant.is_file() else {}


def _export(model, p: QuantizePlan, staging: Path) -> dict[str, Any]:
    import torch

    dtype = getattr(torch, p.dtype)
    with _quiet(stderr=True), torch.inference_mode():
        if p.options.format == "trtllm":
            from modelopt.torch.export import export_tensorrt_llm_checkpoint

            if p.options.precision in BUILD_TIME_WEIGHT_ONLY:
                import modelopt.torch.quantization as mtq

                mtq.disable_quantizer(model, "*weight_quantizer")
            export_tensorrt_llm_checkpoint(model, p.decoder_type, dtype, staging,
                                           inference_tensor_parallel=p.options.tp_size,
                                           inference_pipeline_parallel=p.options.pp_size)
        else:
            from modelopt.torch.export import export_hf_checkpoint

            export_hf_checkpoint(model.to(dtype), dtype=dtype, export_dir=staging)
    if p.options.format == "trtllm":
        complete_trtllm_config(staging / "config.json", p.model, p.quant_algo)
    else:
        complete_hf_config(staging / "config.json", p.model, p.dtype)
    quant = _exported_quantization(staging, p.options.format)
    got = (quant.get("quant_algo"), quant.get("kv_cache_quant_algo"))
    if got != (p.quant_algo, p.kv_cache_quant_algo):
        raise RuntimeError(f"ModelOpt exported quant_algo {got[0]}, kv_cache_quant_algo {got[1]}; expected "
                           f"{p.quant_algo}, {p.kv_cache_quant_algo} (did the nvidia-modelopt version change?)")
    return quant


def _copy_tokenizer(source: Path, target: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


# ------------------------------------------------------------------------------------------ main
def quantize(checkpoint: Path, out: Path, options: QuantizeOptions, *, force: bool = False,
             console: "Console | None" = None) -> QuantizeResult:
    """Quantize CHECKPOINT, check the logits delta, export to OUT (atomically) with a manifest."""
    p = plan(checkpoint, out, options, force=force)
    return run_plan(p, force=force, console=console)


def run_plan(p: QuantizePlan, *, force: bool = False, console: "Console | None" = None) -> QuantizeResult:
    with _no_transformers_progress():
        return _run_plan(p, force, console)


def _run_plan(p: QuantizePlan, force: bool, console: "Console | None") -> QuantizeResult:
    import torch
    import transformers
    from rich.console import Console

    console = console or Console(stderr=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    started = clock

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    with _quiet(stderr=True):
        tokenizer = transformers.AutoTokenizer.from_pretrained(p.checkpoint)
        model = transformers.AutoModelForCausalLM.from_pretrained(p.checkpoint, dtype=getattr(torch, p.compute_dtype))
    model.to(p.device).eval()

    def encode(texts: tuple[str, ...]) -> list[torch.Tensor]:
        return [tokenizer(t, return_tensors="pt", truncation=True, max_length=p.options.calib_max_len).input_ids
                for t in texts]

    calib, heldout = encode(p.calibration.calib), encode(p.calibration.heldout)
    lap("load")
    config_name, cfg = modelopt_config(p)
    with _progress(console) as progress:
        reference = _run(model, heldout, progress, "reference logits")
        lap("reference")
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(getattr(torch, p.dtype)).to(param.dtype))
        if cfg is not None:
            import modelopt.torch.quantization as mtq

            with _quiet():
                model = mtq.quantize(model, cfg, forward_loop=_calibration_loop(calib, progress))
        lap("calibrate")
        candidate = _run(model, heldout, progress, "quantized logits")
    delta = measure_delta(reference, candidate, heldout)
    del reference, candidate
    lap("evaluate")
    if not delta.within(p.tolerance):
        raise TrtbuildError(
            f"{p.options.precision} (KV cache {p.options.kv_cache_dtype}) changes {p.checkpoint.name}'s logits beyond "
            f"tolerance on {delta.samples} held-out samples of {p.calibration.path.name}: mean KL {delta.mean_kl:.4f} "
            f"(max {p.tolerance.max_mean_kl}), top-1 agreement {delta.top1_agreement:.3f} (min {p.tolerance.min_top1})",
            hint="try a higher precision or more/better --calib-data; nothing was written",
        )

    with atomic_output_dir(p.out, force=force, inputs=(p.checkpoint, p.calibration.path)) as staging:
        quant = _export(model, p, staging)
        tokenizer_files = _copy_tokenizer(p.checkpoint, staging)
        for path in staging.rglob("*"):  # safetensors writes 0600; a build container may run as another user
            if path.is_file():
                path.chmod(0o644)
        lap("export")
        calibration = {**p.calibration.describe(), "calib_samples": len(calib) if p.calibrates else 0,
                       "max_len": p.options.calib_max_len,
                       "calib_tokens": sum(t.shape[1] for t in calib) if p.calibrates else 0,
                       "eval_tokens": sum(t.shape[1] for t in heldout)}
        timings["total"] = round(time.perf_counter() - started, 3)
        manifest = write_manifest(staging, {
            "kind": "quantize",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": {"path": str(p.checkpoint), "config_sha256": sha256_file(p.checkpoint / "config.json")},
            "model": dataclasses.asdict(p.model),
            "options": json.loads(json.dumps(dataclasses.asdict(p.options), default=str)),
            "format": p.options.format,
            "precision": p.options.precision,
            "kv_cache_dtype": p.options.kv_cache_dtype,
            "dtype": p.dtype,
            "tp_size": p.options.tp_size,
            "pp_size": p.options.pp_size,
            "world_size": p.options.tp_size * p.options.pp_size,
            "quant_algo": quant.get("quant_algo"),
            "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
            "group_size": quant.get("group_size"),
            "weights_quantized_by": ("trtllm-build" if p.options.format == "trtllm" and p.options.precision in BUILD_TIME_WEIGHT_ONLY
                                     else None if p.options.precision in PRECISION_DTYPE else "modelopt"),
            "decoder_type": p.decoder_type,
            "modelopt_config": {"name": config_name, "config": json.loads(json.dumps(cfg, default=str))},
            "calibration": calibration,
            "delta": {**dataclasses.asdict(delta), "device": p.device, "compute_dtype": p.compute_dtype,
                      "weights_rounded_to": p.dtype},
            "tolerance": dataclasses.asdict(p.tolerance),
            "tokenizer_files": tokenizer_files,
            "timings_s": timings,
            "tools": tool_versions(TOOLS),
        })
        files = json.loads(manifest.read_text())["files"]
    return QuantizeResult(
        out=p.out, manifest=p.out / MANIFEST_NAME, format=p.options.format, precision=p.options.precision,
        kv_cache_dtype=p.options.kv_cache_dtype, dtype=p.dtype, quant_algo=quant.get("quant_algo"),
        kv_cache_quant_algo=quant.get("kv_cache_quant_algo"), group_size=quant.get("group_size"),
        tp_size=p.options.tp_size, pp_size=p.options.pp_size, calibration=calibration, delta=delta,
        tolerance=p.tolerance, timings_s=timings, files=files,
    )


def quantize_for_engine(step: Any, output: Path) -> QuantizeResult:
    """trtbuild.build.engine's converter: a ConvertStep (source, precision, kv_cache_dtype, dtype, tp_size, pp_size;
    optionally calib_data, calib_size, tolerance) -> TensorRT-LLM checkpoint in `output`."""
    extra = {k: getattr(step, k) for k in ("calib_data", "calib_size", "tolerance") if getattr(step, k, None) is not None}
    options = QuantizeOptions(precision=step.precision, kv_cache_dtype=step.kv_cache_dtype, dtype=step.dtype,
                              tp_size=step.tp_size, pp_size=step.pp_size, format="trtllm", **extra)
    return quantize(Path(step.source), Path(output), options)
