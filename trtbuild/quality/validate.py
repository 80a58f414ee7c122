"""How far a build's outputs are from the original checkpoint, and whether that is too far.

Offline, the original Hugging Face checkpoint (the reference, always run in fp32) and each variant
score the same token windows of a text corpus. The variant is one of:
- `hf:DIR`: another Hugging Face checkpoint (e.g. cast, pre-quantized or perturbed), run with transformers;
- `onnx:PATH`: an ONNX causal LM, run with onnxruntime: a `trtbuild export onnx --task
  text-generation-with-past` directory (export.json is checked and gives the precision; the past
  key/value inputs are fed empty) or any `.onnx` taking input_ids (+ attention_mask) -> logits;
- a ModelOpt fake-quantized copy of the reference, built in memory as `trtbuild quantize` builds it
  (`--precision fp8|int8_sq|int8_wo|int4_awq|int4_wo`: same ModelOpt config, calibration samples and
  16-bit weight rounding, taken from trtbuild.build.quantize's plan).

Metrics per variant (next-token predictions at every position of every window):
- `ppl_reference`, `ppl`: perplexity exp(mean NLL) of the reference and of the variant;
- `ppl_delta` = ppl - ppl_reference, `ppl_delta_rel` = ppl_delta / ppl_reference;
- `kl_mean`: mean KL(reference || variant) of the next-token distributions, in nats;
- `top1_agreement`: fraction of positions where both models' most likely next token is the same;
- `max_logit_diff`: largest absolute difference of any raw logit.
The online metrics (served model vs transformers greedy generation) come from trtbuild/quality/accuracy.py.

Gates. Each variant is gated with the thresholds of its precision (table below), unless a threshold
is overridden on the command line (`--max-ppl-delta`, `--max-kl`, `--min-top1-agreement`,
`--max-logit-diff`, `--min-exact-match`, `--min-token-agreement`, `--max-logprob-delta`). A threshold
of None ("-") is not gated.

The KL and top-1 limits are `trtbuild quantize`'s (trtbuild.build.quantize.TOLERANCES), so both commands
agree on a build; the perplexity and greedy-answer limits are validate's own. All were set from
SmolLM2-135M-Instruct. Validate's measurements (trtbuild/data/eval_corpus.txt, 3,114 predictions in
256-token windows; greedy columns: the 20 prompts of trtbuild/data/prompts.jsonl, 32 tokens) are in
brackets; fake-quant variants built as `trtbuild quantize` builds them. Perplexity limits are about
3x the measured rise. Served (online) numbers exist only for fp32 and bf16, the precisions trtbuild's
transformers runtime serves; the other greedy numbers were measured offline by generating with the
fake-quantized model, which is what a served build of that precision would answer. fp16, int4_wo,
w4a8_awq and int4_awq's greedy columns were not measured here (extrapolated). A 135M model is far
more sensitive to quantization than the 7B+ models TensorRT-LLM usually serves (published
FP8/INT8/INT4 losses there are 1-6 %): for those, tighten the limits with the options above.

| precision | max ppl_delta_rel | max kl_mean (quantize) | min top1_agreement (quantize) | min exact_match_rate | min token_agreement |
|-----------|-------------------|------------------------|-------------------------------|----------------------|---------------------|
| fp32      | 0.1 % [0]         | 0.0005 [0]             | 0.99 [1.0]                    | 0.90 [1.0 served]    | 0.95 [1.0 served]   |
| fp16      | 0.5 %             | 0.002                  | 0.97                          | 0.50                 | 0.70                |
| bf16      | 1 % [0.17 %]      | 0.005 [0.0017]         | 0.95 [0.962]                  | 0.25 [0.55-0.60 served] | 0.60 [0.71-0.77 served] |
| int8_wo   | 1 % [0.29 %]      | 0.02 [0.0031]          | 0.90 [0.958]                  | 0.20 [0.40]          | 0.45 [0.59]         |
| fp8       | 5 % [1.8 %]       | 0.10 [0.029]           | 0.80 [0.889]                  | - [0.10]             | 0.15 [0.25]         |
| int8_sq   | 30 % [12 %]       | 0.20 [0.115]           | 0.72 [0.795]                  | - [0.05]             | 0.07 [0.14]         |
| int4_awq  | 50 % [20 %]       | 0.50 [0.196]           | 0.60 [0.725]                  | -                    | 0.05                |
| int4_wo   | 100 %             | 0.50                   | 0.60                          | -                    | 0.03                |
| w4a8_awq  | 50 %              | 0.50                   | 0.60                          | -                    | 0.05                |

(bf16 is a bf16 checkpoint run in bf16 by transformers: its top-1 clears quantize's 0.95 by only 1.2
points on this corpus, where quantize measured 0.994 for bf16 weight rounding computed in fp32.)

Negative controls on the same model (Gaussian noise of 1/2/5 % of each weight tensor's std, gated
as fp32 since they claim to be the checkpoint): ppl +1.2/+3.8/+19.7 %, KL 0.0058/0.024/0.149, top-1
0.943/0.892/0.740, greedy token agreement 0.61/0.37/0.15 (exact match 0.40/0.10/0.00): each fails
its fp32 row, and 5 % noise fails every row from fp32 to fp8.

`max_logit_diff` and the online log-prob delta are reported but not gated by default: one outlier
logit says little about quality.

Reports. `validate` writes report.json (all metrics, gates and settings), report.md (a summary
table) and deltas.png (a bar chart of the per-metric deltas of every variant side by side). One run
may evaluate several variants (each `--variant` and `--precision`), and `--compare A.json B.json`
merges the variants of earlier reports into the same table and chart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np

from trtbuild.atomic import atomic_output_dir
from trtbuild.errors import TrtbuildError
from trtbuild.precisions import QUANTIZED, precision_of_quant_algo
from trtbuild.resources import DATA_DIR
from trtbuild.build.quantize import TOLERANCES as QUANTIZE_TOLERANCES

DEFAULT_CORPUS = DATA_DIR / "eval_corpus.txt"
DEFAULT_PROMPTS = DATA_DIR / "prompts.jsonl"
REPORT_VERSION = 1

FAKE_QUANT_PRECISIONS = QUANTIZED  # what trtbuild.build.quantize builds
PRECISION_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Gate limits; None means the metric is reported but not gated."""

    max_ppl_delta: float | None = None  # relative: 0.02 means perplexity may rise by 2 %
    max_kl: float | None = None
    min_top1_agreement: float | None = None
    max_logit_diff: float | None = None
    min_exact_match: float | None = None
    min_token_agreement: float | None = None
    max_logprob_delta: float | None = None

    def merged(self, overrides: "Thresholds") -> "Thresholds":
        given = {k: v for k, v in dataclasses.asdict(overrides).items() if v is not None}
        return dataclasses.replace(self, **given)


def _row(ppl: float, kl: float, top1: float, exact: float | None, tokens: float) -> Thresholds:
    return Thresholds(max_ppl_delta=ppl, max_kl=kl, min_top1_agreement=top1, min_exact_match=exact, min_token_agreement=tokens)


def _quantize_row(precision: str, ppl: float, exact: float | None, tokens: float) -> Thresholds:
    """KL and top-1 limits are the ones `trtbuild quantize` enforces, so both commands agree on a build."""
    tolerance = QUANTIZE_TOLERANCES[precision]
    return _row(ppl, tolerance.max_mean_kl, tolerance.min_top1, exact, tokens)


DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": _row(0.001, 0.0005, 0.99, 0.90, 0.95),
    "fp16": _quantize_row("fp16", 0.005, 0.50, 0.70),
    "bf16": _quantize_row("bf16", 0.01, 0.25, 0.60),
    "int8_wo": _quantize_row("int8_wo", 0.01, 0.20, 0.45),
    "fp8": _quantize_row("fp8", 0.05, None, 0.15),
    "int8_sq": _quantize_row("int8_sq", 0.30, None, 0.07),
    "int4_awq": _quantize_row("int4_awq", 0.50, None, 0.05),
    "int4_wo": _quantize_row("int4_wo", 1.00, None, 0.03),
    "w4a8_awq": _row(0.50, 0.50, 0.60, None, 0.05),
}

# metric name in a result -> (Thresholds field, direction, CLI option)
GATED_METRICS: dict[str, tuple[str, str, str]] = {
    "ppl_delta_rel": ("max_ppl_delta", "<=", "--max-ppl-delta"),
    "kl_mean": ("max_kl", "<=", "--max-kl"),
    "top1_agreement": ("min_top1_agreement", ">=", "--min-top1-agreement"),
    "max_logit_diff": ("max_logit_diff", "<=", "--max-logit-diff"),
    "exact_match_rate": ("min_exact_match", ">=", "--min-exact-match"),
    "token_agreement": ("min_token_agreement", ">=", "--min-token-agreement"),
    "logprob_delta_max": ("max_logprob_delta", "<=", "--max-logprob-delta"),
}


def normalize_precision(precision: str) -> str:
    p = PRECISION_ALIASES.get(precision.lower(), precision.lower())
    if p not in DEFAULT_THRESHOLDS:
        raise TrtbuildError(f"unknown precision '{precision}'", hint=f"choose one of {', '.join(DEFAULT_THRESHOLDS)}")
    return p


def thresholds_for(precision: str, overrides: Thresholds | None = None) -> Thresholds:
    base = DEFAULT_THRESHOLDS[normalize_precision(precision)]
    return base.merged(overrides) if overrides else base


# --------------------------------------------------------------------------------------- gates
@dataclasses.dataclass(frozen=True)
class Gate:
    metric: str
    op: str  # "<=" or ">="
    threshold: float
    value: float | None
    source: str  # "default fp8" or the CLI option that set it

    @property
    def passed(self) -> bool:
        if self.value is None or math.isnan(self.value):
            return False
        return self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold

    @property
    def margin(self) -> float | None:
        """By how much the value misses (positive) or clears (negative) the threshold."""
        if self.value is None or math.isnan(self.value):
            return None
        return self.value - self.threshold if self.op == "<=" else self.threshold - self.value

    def describe(self) -> str:
        if self.value is None or math.isnan(self.value):
            return f"{self.metric} was not measured but {self.source} requires {self.op} {self.threshold:g}"
        verb = "within" if self.passed else ("exceeds" if self.op == "<=" else "falls short of")
        return (f"{self.metric} = {self.value:.6g} {verb} {self.op} {self.threshold:g} ({self.source}) "
                f"by {abs(self.margin):.6g}")

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed, "margin": self.margin}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Gate":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def evaluate_gates(metrics: dict[str, float | None], precision: str, overrides: Thresholds | None = None) -> list[Gate]:
    """One Gate per measured metric that has a threshold at this precision (or from an override)."""
    precision = normalize_precision(precision)
    limits = thresholds_for(precision, overrides)
    overridden = {k for k, v in dataclasses.asdict(overrides or Thresholds()).items() if v is not None}
    gates = []
    for metric, (field, op, option) in GATED_METRICS.items():
        threshold = getattr(limits, field)
        if threshold is None or metric not in metrics:
            continue
        if metrics[metric] is None and field not in overridden:
            continue  # unavailable and only gated by default: reported, not failed
        source = option if field in overridden else f"default {precision}"
        gates.append(Gate(metric, op, float(threshold), metrics[metric], source))
    return gates


# --------------------------------------------------------------------------------------- corpus
@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token windows of a text file; every window is scored independently."""

    path: Path
    sha256: str
    windows: tuple[tuple[int, ...], ...]
    seq_len: int

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    @property
    def predictions(self) -> int:
        return sum(len(w) - 1 for w in self.windows)


def load_corpus(path: Path, tokenizer, *, seq_len: int = 256, max_tokens: int | None = None) -> Corpus:
    """Tokenize without special tokens and cut into consecutive windows of `seq_len` tokens."""
    path = Path(path)
    if not path.is_file():
        raise TrtbuildError(f"corpus {path} does not exist", hint="pass --corpus FILE (plain UTF-8 text)")
    if seq_len < 2:
        raise TrtbuildError(f"--seq-len must be at least 2, got {seq_len}")
    text = path.read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = tuple(tuple(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len))
    windows = tuple(w for w in windows if len(w) >= 2)
    if not windows:
        raise TrtbuildError(f"corpus {path} has fewer than 2 tokens", hint="use a longer text or a larger --max-tokens")
    return Corpus(path.absolute(), hashlib.sha256(text.encode()).hexdigest(), windows, seq_len)


# --------------------------------------------------------------------------------------- logits
class LogitSource(Protocol):
    """Something that maps token ids [T] to next-token logits [T, vocab] (float32 torch tensor)."""

    def logits(self, ids: tuple[int, ...]): ...


class TorchSource:
    """A transformers (or ModelOpt fake-quantized) causal LM in memory."""

    def __init__(self, model):
        self.model = model.eval()

    def logits(self, ids):
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
        return out.logits[0].float()


class OnnxSource:
    """An ONNX causal LM run with onnxruntime: input_ids (+ attention_mask, position_ids, empty past) -> logits."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        self.path = find_onnx_model(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise TrtbuildError(f"onnxruntime cannot load {self.path}: {e}") from None
        self.inputs = self.session.get_inputs()
        names = [i.name for i in self.inputs]
        if "input_ids" not in names:
            raise TrtbuildError(f"{self.path} has no 'input_ids' input (inputs: {', '.join(names)})",
                                hint="export a causal LM taking input_ids and returning logits")
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = "logits" if "logits" in outputs else outputs[0]

    def feeds(self, ids: tuple[int, ...]) -> dict[str, np.ndarray]:
        n = len(ids)
        feeds: dict[str, np.ndarray] = {}
        for i in self.inputs:
            dtype = _ort_dtype(i.type)
            if i.name == "input_ids":
                feeds[i.name] = np.array([ids], dtype=dtype)
            elif i.name == "attention_mask":
                feeds[i.name] = np.ones((1, n), dtype=dtype)
            elif i.name == "position_ids":
                feeds[i.name] = np.arange(n, dtype=dtype)[None, :]
            elif "past" in i.name or "cache" in i.name:
                # batch 1, every other symbolic dimension (the past sequence length) empty
                shape = [1] + [d if isinstance(d, int) else 0 for d in i.shape[1:]]
                feeds[i.name] = np.zeros(shape, dtype=dtype)
            else:
                raise TrtbuildError(f"{self.path}: input '{i.name}' is not understood",
                                    hint="validate expects input_ids, attention_mask, position_ids and past_* inputs")
        return feeds

    def logits(self, ids):
        import torch

        out = self.session.run([self.output], self.feeds(ids))[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)[0])


def _ort_dtype(ort_type: str):
    return {
        "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
        "tensor(float16)": np.float16, "tensor(bool)": np.bool_, "tensor(double)": np.float64,
    }[ort_type]


def find_onnx_model(path: Path) -> Path:
    """The model file of an export directory (export.json's `model_file`, checked), or a .onnx file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        return path
    if (path / "export.json").is_file():
        from trtbuild.build.onnx_export import load_export

        manifest = load_export(path)
        if manifest.get("task") != "text-generation-with-past":
            raise TrtbuildError(f"{path} is a '{manifest.get('task')}' export; validate compares causal LMs",
                                hint="export with --task text-generation-with-past")
        return path / manifest.get("model_file", "model.onnx")
    if path.is_dir():
        found = [path / "model.onnx"] if (path / "model.onnx").is_file() else sorted(path.glob("*.onnx"))
        if found:
            return found[0]
    raise TrtbuildError(f"no ONNX model at {path}", hint="pass a .onnx file or a directory that holds model.onnx")


ONNX_EXPORT_PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8_sq"}  # ORT int8 quantizes activations too


def onnx_precision(path: Path) -> str:
    """From `trtbuild export onnx`'s export.json; otherwise from the weights' element types."""
    import onnx
    from onnx import TensorProto

    manifest = Path(path) / "export.json"
    if manifest.is_file():
        precision = json.loads(manifest.read_text()).get("precision")
        if precision in ONNX_EXPORT_PRECISIONS:
            return ONNX_EXPORT_PRECISIONS[precision]
    model = onnx.load(str(find_onnx_model(path)), load_external_data=False)
    types = {t.data_type for t in model.graph.initializer}
    if types & {TensorProto.INT8, TensorProto.UINT8}:
        activations = {"QLinearMatMul", "MatMulInteger", "DynamicQuantizeLinear"}
        return "int8_sq" if any(n.op_type in activations for n in model.graph.node) else "int8_wo"
    if types & {TensorProto.INT4, TensorProto.UINT4}:
        return "int4_wo"
    if TensorProto.FLOAT16 in types:
        return "fp16"
    if TensorProto.BFLOAT16 in types:
        return "bf16"
    return "fp32"


def checkpoint_precision(checkpoint: Path) -> str:
    """The precision a Hugging Face checkpoint's files declare (quantization config first, then dtype)."""
    checkpoint = Path(checkpoint)
    hf_quant = checkpoint / "hf_quant_config.json"
    if hf_quant.is_file():
        algo = (json.loads(hf_quant.read_text()).get("quantization") or {}).get("quant_algo")
        if precision_of_quant_algo(algo or ""):
            return precision_of_quant_algo(algo)
    from trtbuild.checkpoint import read_config

    config = read_config(checkpoint)
    algo = (config.get("quantization_config") or {}).get("quant_algo")
    if precision_of_quant_algo(algo or ""):
        return precision_of_quant_algo(algo)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return PRECISION_ALIASES.get(dtype, "fp32")


# --------------------------------------------------------------------------------------- variants
@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """What to compare against the reference: `hf:DIR`, `onnx:PATH`, or a fake-quant precision."""

    kind: str  # "hf", "onnx", "fakequant"
    location: Path | None = None
    precision: str | None = None  # fakequant: the quantization format; otherwise the gate precision (None: inferred)
    name: str | None = None

    @classmethod
    def parse(cls, text: str, gate_precision: str | None = None) -> "VariantSpec":
        kind, sep, location = text.partition(":")
        if not sep or kind not in ("hf", "onnx") or not location:
            raise TrtbuildError(f"--variant '{text}' is not KIND:PATH", hint="use hf:DIR or onnx:PATH")
        path = Path(location)
        if not path.exists():
            raise TrtbuildError(f"--variant {text}: {path} does not exist")
        return cls(kind, path, normalize_precision(gate_precision) if gate_precision else None)

    @classmethod
    def fake_quant(cls, precision: str) -> "VariantSpec":
        if precision not in FAKE_QUANT_PRECISIONS:
            raise TrtbuildError(f"--precision {precision} cannot be fake-quantized",
                                hint=f"choose one of {', '.join(FAKE_QUANT_PRECISIONS)}")
        return cls("fakequant", None, precision)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "fakequant":
            return f"fakequant-{self.precision}"
        return f"{self.kind}:{self.location.name if self.location else '?'}"

    def gate_precision(self) -> str:
        if self.precision:
            return normalize_precision(self.precision)
        if self.kind == "hf":
            return checkpoint_precision(self.location)
        if self.kind == "onnx":
            return onnx_precision(self.location)
        raise ValueError(self.kind)


def load_hf_model(checkpoint: Path, dtype: str | None = "float32"):
    """A transformers causal LM on CPU; dtype None keeps the checkpoint's own dtype."""
    import torch
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=getattr(torch, dtype) if dtype else "auto"
        )
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        raise TrtbuildError(f"transformers cannot load {checkpoint}: {str(e).splitlines()[0]}") from None
    return model.eval()


def load_tokenizer(checkpoint: Path):
    from transformers import AutoTokenizer

    from trtbuild.checkpoint import check_tokenizer

    check_tokenizer(checkpoint)
    return AutoTokenizer.from_pretrained(checkpoint)


def build_fake_quant(checkpoint: Path, precision: str, calib_samples: int | None = None):
    """The fp32 reference fake-quantized in memory the way `trtbuild quantize` does it.

    trtbuild.build.quantize's plan picks the ModelOpt config (INT4 group size, per-channel int4_wo), the
    calibration samples (trtbuild/data/calibration.txt, its held-out tail unused) and the 16-bit
    export dtype the weights are first rounded to, so validation sees what the build exports.
    """
    import tempfile

    import torch
    import modelopt.torch.quantization as mtq

    from trtbuild.build import quantize as q

    options = q.QuantizeOptions(precision=precision, format="trtllm")
    if calib_samples:
        options = dataclasses.replace(options, calib_size=calib_samples)
    with tempfile.TemporaryDirectory(prefix="trtbuild-validate-") as scratch:
        plan = q.plan(checkpoint, Path(scratch) / "unused", options)  # checks only; nothing is written there
    model = load_hf_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(getattr(torch, plan.dtype)).to(param.dtype))
    _, config = q.modelopt_config(plan)
    if config is None:
        return model
    samples = [tokenizer(t, return_tensors="pt", truncation=True, max_length=options.calib_max_len).input_ids
               for t in plan.calibration.calib]

    def forward_loop(m) -> None:
        with torch.no_grad():
            for ids in samples:
                m(input_ids=ids, use_cache=False)

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # ModelOpt prints per layer
        warnings.simplefilter("ignore")
        return mtq.quantize(model, config, forward_loop)


def open_variant(spec: VariantSpec, checkpoint: Path, calib_samples: int | None = None) -> LogitSource:
    if spec.kind == "hf":
        return TorchSource(load_hf_model(spec.location, dtype=None))
    if spec.kind == "onnx":
        return OnnxSource(spec.location)
    if spec.kind == "fakequant":
        return TorchSource(build_fake_quant(checkpoint, spec.precision, calib_samples))
    raise ValueError(spec.kind)


# --------------------------------------------------------------------------------------- metrics
@dataclasses.dataclass
class OfflineMetrics:
    """Running sums over windows; `finish()` turns them into the reported metrics."""

    predictions: int = 0
    nll_reference: float = 0.0
    nll: float = 0.0
    kl: float = 0.0
    top1_matches: int = 0
    max_logit_diff: float = 0.0

    def add(self, ref_logits, var_logits, targets) -> None:
        """Score predictions at positions 0..T-2 (the ones with a next token)."""
        import torch

        if ref_logits.shape != var_logits.shape:
            raise TrtbuildError(f"the variant's logits have shape {tuple(var_logits.shape)}, the reference's "
                                f"{tuple(ref_logits.shape)}", hint="is the variant built from the same model?")
        r = ref_logits[:-1].double()
        v = var_logits[:-1].double()
        t = torch.as_tensor(targets[1:], dtype=torch.long)
        lr = torch.log_softmax(r, dim=-1)
        lv = torch.log_softmax(v, dim=-1)
        self.predictions += len(t)
        self.nll_reference -= float(lr.gather(1, t[:, None]).sum())
        self.nll -= float(lv.gather(1, t[:, None]).sum())
        self.kl += float((lr.exp() * (lr - lv)).sum())
        self.top1_matches += int((r.argmax(-1) == v.argmax(-1)).sum())
        self.max_logit_diff = max(self.max_logit_diff, float((r - v).abs().max()))

    def finish(self) -> dict[str, float]:
        n = max(self.predictions, 1)
        ppl_ref = math.exp(self.nll_reference / n)
        ppl = math.exp(self.nll / n)
        return {
            "predictions": self.predictions,
            "ppl_reference": ppl_ref,
            "ppl": ppl,
            "ppl_delta": ppl - ppl_ref,
            "ppl_delta_rel": (ppl - ppl_ref) / ppl_ref,
            "kl_mean": self.kl / n,
            "top1_agreement": self.top1_matches / n,
            "max_logit_diff": self.max_logit_diff,
        }


def compare_logits(reference: LogitSource, variants: dict[str, LogitSource], corpus: Corpus,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, float]]:
    """Score every window once with the reference and with each variant."""
    sums = {name: OfflineMetrics() for name in variants}
    for i, window in enumerate(corpus.windows):
        ref = reference.logits(window)
        for name, source in variants.items():
            sums[name].add(ref, source.logits(window), window)
        if progress:
            progress(i + 1, len(corpus.windows))
    return {name: s.finish() for name, s in sums.items()}


# --------------------------------------------------------------------------------------- report
@dataclasses.dataclass
class VariantResult:
    name: str
    kind: str  # hf, onnx, fakequant, served
    location: str | None
    precision: str  # the precision whose thresholds gate it
    metrics: dict[str, float | None]
    gates: list[Gate]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    report: str | None = None  # the report file it came from, for --compare

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failures(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["gates"] = [g.to_json() for g in self.gates]
        data["passed"] = self.passed
        data.pop("report")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], report: str | None = None) -> "VariantResult":
        return cls(data["name"], data["kind"], data.get("location"), data["precision"], data["metrics"],
                   [Gate.from_json(g) for g in data.get("gates", [])], data.get("details", {}), report)


@dataclasses.dataclass
class ValidationReport:
    reference: str | None
    settings: dict[str, Any]
    variants: list[VariantResult]
    created: str = dataclasses.field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.variants)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "created": self.created,
            "reference": self.reference,
            "settings": self.settings,
            "passed": self.passed,
            "variants": [v.to_json() for v in self.variants],
        }

    @classmethod
    def load(cls, path: Path) -> "ValidationReport":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrtbuildError(f"cannot read validate report {path}: {e}") from None
        if not isinstance(data, dict) or data.get("version") != REPORT_VERSION or "variants" not in data:
            raise TrtbuildError(f"{path} is not a trtbuild validate report (version {REPORT_VERSION})",
                                hint="pass the report.json that `trtbuild validate --out DIR` wrote")
        variants = [VariantResult.from_json(v, str(path)) for v in data["variants"]]
        return cls(data.get("reference"), data.get("settings", {}), variants, data.get("created", ""))

    def markdown(self) -> str:
        return markdown_table(self.variants, title=f"Validation against {self.reference}" if self.reference else None)


TABLE_COLUMNS = (
    ("ppl_reference", "ppl ref", "{:.3f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("ppl_delta", "Δppl", "{:+.4f}"),
    ("ppl_delta_rel", "Δppl %", "{:+.3%}"),
    ("kl_mean", "KL mean", "{:.2e}"),
    ("top1_agreement", "top-1 agree", "{:.2%}"),
    ("max_logit_diff", "max abs Δlogit", "{:.3g}"),
    ("exact_match_rate", "exact match", "{:.0%}"),
    ("token_agreement", "token agree", "{:.1%}"),
    ("first_divergence_mean", "1st diverg.", "{:.1f}"),
    ("logprob_delta_max", "max abs Δlogprob", "{:.3g}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def markdown_table(results: list[VariantResult], title: str | None = None) -> str:
    """One row per variant; columns only for metrics some variant has."""
    columns = [c for c in TABLE_COLUMNS if any(c[0] in r.metrics for r in results)]
    lines = [f"## {title}", ""] if title else []
    lines.append("| variant | precision | " + " | ".join(c[1] for c in columns) + " | gate |")
    lines.append("|---|---|" + "---:|" * len(columns) + "---|")
    for r in results:
        cells = [_cell(r.metrics.get(key), fmt) if key in r.metrics else "" for key, _, fmt in columns]
        gate = "PASS" if r.passed else "FAIL: " + "; ".join(g.describe() for g in r.failures)
        lines.append(f"| {r.name} | {r.precision} | " + " | ".join(cells) + f" | {gate} |")
    notes = [f"- {r.name}: {r.details['logprob_note']}" for r in results if r.details.get("logprob_note")]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


# metric -> (axis title, transform of the stored value to a "delta": 0 means identical to the reference)
CHART_METRICS: dict[str, tuple[str, Callable[[float], float]]] = {
    "ppl_delta_rel": ("perplexity increase (%)", lambda v: 100 * v),
    "kl_mean": ("mean KL (nats)", lambda v: v),
    "top1_agreement": ("top-1 disagreement (%)", lambda v: 100 * (1 - v)),
    "max_logit_diff": ("max |Δ logit|", lambda v: v),
    "exact_match_rate": ("served: not exact (%)", lambda v: 100 * (1 - v)),
    "token_agreement": ("served: token disagreement (%)", lambda v: 100 * (1 - v)),
}


def plot_deltas(results: list[VariantResult], out: Path) -> Path:
    """A bar chart per metric, every variant side by side; failed variants in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in CHART_METRICS if any(r.metrics.get(m) is not None for r in results)]
    if not metrics:
        raise TrtbuildError("nothing to plot: the reports hold no metrics")
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    names = [r.name for r in results]
    colors = ["#2e7d32" if r.passed else "#c62828" for r in results]
    for ax, metric in zip(axes.flat, metrics):
        title, transform = CHART_METRICS[metric]
        values = [transform(r.metrics[metric]) if r.metrics.get(metric) is not None else 0.0 for r in results]
        bars = ax.bar(range(len(results)), values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.3g}" if r.metrics.get(metric) is not None else "n/a"
                                   for v, r in zip(values, results)], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(results)), names, rotation=30, ha="right", fontsize=7)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("Deltas vs. the reference checkpoint (green: gates pass, red: a gate fails)", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(report: ValidationReport, out: Path, *, inputs=(), force: bool = False, extra: list[VariantResult] | None = None) -> Path:
    """report.json, report.md and deltas.png (the chart also shows `extra` results from --compare)."""
    shown = report.variants + list(extra or [])
    with atomic_output_dir(Path(out), force=force, inputs=inputs) as staging:
        (staging / "report.json").write_text(json.dumps(report.to_json(), indent=2, allow_nan=True) + "\n")
        text = report.markdown()
        if extra:
            text += "\n" + markdown_table(shown, title="Compared with earlier reports")
        (staging / "report.md").write_text(text)
        if shown:
            plot_deltas(shown, staging / "deltas.png")
    return Path(out)


def merge_reports(paths: Iterable[Path]) -> list[VariantResult]:
    """The variants of several earlier reports; names get their report's stem where they collide."""
    results = [v for p in paths for v in ValidationReport.load(p).variants]
    counts: dict[str, int] = {}
    for r in results:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in results:
        if counts[r.name] > 1 and r.report:
            r.name = f"{Path(r.report).parent.name or Path(r.report).stem}/{r.name}"
    return results


# --------------------------------------------------------------------------------------- runs
def validate_offline(
    checkpoint: Path,
    variants: list[VariantSpec],
    *,
    corpus: Path = DEFAULT_CORPUS,
    seq_len: int = 256,
    max_tokens: int | None = None,
    overrides: Thresholds | None = None,
    calib_samples: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[VariantResult], Corpus]:
    """Load the fp32 reference and every variant, score the corpus, gate each variant."""
    checkpoint = Path(checkpoint)
    say = progress or (lambda _msg: None)
    tokenizer = load_tokenizer(checkpoint)
    data = load_corpus(corpus, tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    say(f"loading the reference {checkpoint}")
    reference = TorchSource(load_hf_model(checkpoint))
    sources: dict[str, LogitSource] = {}
    labels = _unique_labels(variants)
    load_seconds = {}
    for label, spec in zip(labels, variants):
        say(f"loading {label}")
        started = time.perf_counter()
        sources[label] = open_variant(spec, checkpoint, calib_samples)
        load_seconds[label] = time.perf_counter() - started
    started = time.perf_counter()
    metrics = compare_logits(reference, sources, data,
                             lambda i, n: say(f"scoring window {i}/{n} ({data.predictions} predictions)"))
    seconds = time.perf_counter() - started
    results = []
    for label, spec in zip(labels, variants):
        precision = spec.gate_precision()
        results.append(VariantResult(
            name=label, kind=spec.kind, location=str(spec.location.absolute()) if spec.location else None,
            precision=precision, metrics=metrics[label], gates=evaluate_gates(metrics[label], precision, overrides),
            details={"load_seconds": round(load_seconds[label], 2), "score_seconds_all_variants": round(seconds, 2)},
        ))
    return results, data


def _unique_labels(variants: list[VariantSpec]) -> list[str]:
    labels = [v.label for v in variants]
    return [f"{l}#{labels[:i].count(l) + 1}" if labels.count(l) > 1 else l for i, l in enumerate(labels)]


def corpus_settings(corpus: Corpus) -> dict[str, Any]:
    return {"corpus": str(corpus.path), "corpus_sha256": corpus.sha256, "seq_len": corpus.seq_len,
            "windows": len(corpus.windows), "tokens": corpus.tokens, "predictions": corpus.predictions}


def write_variant_checkpoint(checkpoint: Path, out: Path, *, noise: float = 0.0, dtype: str | None = None,
                             seed: int = 0, force: bool = False) -> Path:
    """A copy of `checkpoint`, optionally cast and with Gaussian weight noise (std = noise x each tensor's std).

    A noisy copy is the negative control of a validation run: it must fail the gates.
    """
    import torch

    model = load_hf_model(checkpoint)
    if noise:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.add_(torch.randn(p.shape, generator=generator) * (noise * float(p.std())))
    if dtype:
        model = model.to(getattr(torch, dtype))
    tokenizer = load_tokenizer(checkpoint)
    with atomic_output_dir(Path(out), force=force, inputs=(checkpoint,)) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return Path(out)


def iter_failures(results: Iterable[VariantResult]) -> Iterator[tuple[VariantResult, Gate]]:
    for r in results:
        for g in r.failures:
            yield r, g
