"""Export encoders and small decoders to ONNX, convert their precision, and prove the result.

The graph comes from `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). Hugging Face
Optimum's exporter is not used: `optimum-onnx` 0.1.0 requires transformers<4.58 and this project
runs transformers 5.x, whose cache classes (DynamicCache) and masking code Optimum does not know.
Decoders are wrapped in a module whose forward takes every past key/value as a named tensor and
builds a DynamicCache from them (`*args` loses the dynamic axes), so the graph has Optimum's I/O
names: input_ids, attention_mask, position_ids, past_key_values.N.key/value -> logits, present.N.key/value.

Precision is converted on the ONNX graph with ONNX Runtime's own tools: FP16 by
`onnxruntime.transformers` (I/O stays FP32), INT8 by `onnxruntime.quantization`, dynamic (weights
only, any task) or static QDQ (calibrated on text, encoders only). Every export is run by ONNX
Runtime against PyTorch on fresh random token ids; an export outside its precision's tolerance is
an error and nothing is written. The numbers, timings, tool versions and file hashes go into
`export.json` next to the model, which `trtbuild repo` reads.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from trtbuild.atomic import atomic_output_dir, check_output_dir
from trtbuild.checkpoint import WEIGHT_GLOBS, check_against_config, read_config
from trtbuild.errors import TrtbuildError, read_json_file

EXPORT_MANIFEST = "export.json"
MODEL_FILE = "model.onnx"
MANIFEST_FORMAT = "trtbuild-onnx-export/1"
MIN_OPSET = 18  # torch's dynamo exporter writes opset 18 natively; lower ones go through a version
# converter that keeps opset 18 without telling when it cannot convert (measured: 10 and 13 -> 18).
PROTOBUF_LIMIT = 2**31 - 1  # above this, ONNX weights must live in external data
PRECISIONS = ("fp32", "fp16", "int8")
INT8_MODES = ("dynamic", "static")
# Files copied next to the model so the export directory is also the tokenizer directory.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json",
)


@dataclasses.dataclass(frozen=True)
class Task:
    """What is exported for one `--task`, and what the checkpoint must contain for it."""

    name: str
    auto_class: str  # transformers class that loads the checkpoint
    head_suffix: str | None  # the checkpoint's architecture must end with this (None: any head)
    output: str  # the graph's main output
    decoder: bool


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("feature-extraction", "AutoModel", None, "last_hidden_state", False),
        Task("text-classification", "AutoModelForSequenceClassification", "ForSequenceClassification", "logits", False),
        Task("text-generation-with-past", "AutoModelForCausalLM", "ForCausalLM", "logits", True),
    )
}


@dataclasses.dataclass(frozen=True)
class OnnxArchitecture:
    """How one `model_type` exports.

    `fp32_modules` names the layers INT8 leaves in FP32: the FFN down-projections, whose inputs (after
    GELU/SwiGLU) carry outlier channels that one activation scale cannot cover. Measured on
    all-MiniLM-L6-v2, mean-pooled cosine to FP32 on random ids: dynamic INT8 0.987 -> 0.994, static
    INT8 0.88 -> 0.97 when they are excluded.
    """

    model_type: str
    tasks: tuple[str, ...]
    token_type_ids: bool
    fp32_modules: str  # regex over module paths


_ENCODER_TASKS = ("feature-extraction", "text-classification")
ONNX_ARCHITECTURES: dict[str, OnnxArchitecture] = {
    a.model_type: a
    for a in (
        OnnxArchitecture("bert", _ENCODER_TASKS, True, r"\.layer\.\d+\.output\.dense$"),
        OnnxArchitecture("roberta", _ENCODER_TASKS, False, r"\.layer\.\d+\.output\.dense$"),
        OnnxArchitecture("xlm-roberta", _ENCODER_TASKS, False, r"\.layer\.\d+\.output\.dense$"),
        OnnxArchitecture("electra", _ENCODER_TASKS, True, r"\.layer\.\d+\.output\.dense$"),
        OnnxArchitecture("distilbert", _ENCODER_TASKS, False, r"\.ffn\.lin2$"),
        OnnxArchitecture("llama", ("text-generation-with-past",), False, r"\.mlp\.down_proj$"),
        OnnxArchitecture("mistral", ("text-generation-with-past",), False, r"\.mlp\.down_proj$"),
        OnnxArchitecture("qwen2", ("text-generation-with-past",), False, r"\.mlp\.down_proj$"),
        OnnxArchitecture("qwen3", ("text-generation-with-past",), False, r"\.mlp\.down_proj$"),
    )
}


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far ONNX Runtime may be from PyTorch: `rel` is max |ort - torch| / max |torch| per output;
    `top1` the share of positions whose argmax agrees (logits); `cosine` the smallest cosine between
    mean-pooled hidden states (feature extraction, what the served embedding is)."""

    rel: float
    top1: float
    cosine: float


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rel=1e-4, top1=0.999, cosine=0.99999),
    "fp16": Tolerance(rel=2e-2, top1=0.98, cosine=0.999),
    "int8": Tolerance(rel=0.3, top1=0.85, cosine=0.95),
}


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    checkpoint: Path
    task: str
    out: Path
    opset: int = MIN_OPSET
    precision: str = "fp32"
    int8_mode: str | None = None  # None: dynamic when precision is int8
    calib_data: Path | None = None
    calib_samples: int = 128
    calib_seq_len: int = 128
    force: bool = False
    seed: int = 1234


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What the exporter needs from config.json."""

    path: Path
    config: dict[str, Any]  # config.json as written
    hf: Any  # transformers' PretrainedConfig: one attribute name per concept across architectures
    task: Task
    arch: OnnxArchitecture

    @property
    def vocab_size(self) -> int:
        return int(self.hf.vocab_size)

    @property
    def hidden_size(self) -> int:
        return int(self.hf.hidden_size)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.hf, "max_position_embeddings", None) or 512)

    @property
    def num_layers(self) -> int:
        return int(self.hf.num_hidden_layers)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.hf, "num_key_value_heads", None) or self.hf.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.hf, "head_dim", None) or self.hidden_size // self.hf.num_attention_heads)

    @property
    def input_names(self) -> list[str]:
        if self.task.decoder:
            return ["input_ids", "attention_mask", "position_ids", *past_names(self.num_layers)]
        return ["input_ids", "attention_mask", *(["token_type_ids"] if self.arch.token_type_ids else [])]

    @property
    def output_names(self) -> list[str]:
        if self.task.decoder:
            return ["logits", *(f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value"))]
        return [self.task.output]


@dataclasses.dataclass
class ExportResult:
    out: Path
    manifest: dict[str, Any]


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


# ----------------------------------------------------------------------------------------- checks
def inspect_checkpoint(checkpoint: Path, task_name: str) -> CheckpointInfo:
    """Refuse a checkpoint the exporter cannot take, before anything is loaded."""
    checkpoint = Path(checkpoint)
    if task_name not in TASKS:
        raise TrtbuildError(f"--task {task_name} is not one of {', '.join(TASKS)}")
    task = TASKS[task_name]
    config = read_config(checkpoint)
    model_type = config.get("model_type")
    where = f"{checkpoint / 'config.json'}"
    if model_type not in ONNX_ARCHITECTURES:
        raise TrtbuildError(
            f"{where}: model_type '{model_type}' is not supported by the ONNX exporter",
            hint=f"supported: {', '.join(sorted(ONNX_ARCHITECTURES))}",
        )
    arch = ONNX_ARCHITECTURES[model_type]
    if task_name not in arch.tasks:
        raise TrtbuildError(f"{where}: a {model_type} checkpoint cannot be exported as --task {task_name}",
                            hint=f"use --task {' or '.join(arch.tasks)}")
    architecture = (config.get("architectures") or [""])[0]
    if task.head_suffix and not architecture.endswith(task.head_suffix):
        raise TrtbuildError(
            f"{where}: architectures is {architecture or 'missing'}, which has no *{task.head_suffix} head, "
            f"so --task {task_name} would export untrained weights",
            hint="use a fine-tuned checkpoint, or --task feature-extraction" if not task.decoder else None,
        )
    if not any(any(checkpoint.glob(g)) for g in WEIGHT_GLOBS):
        raise TrtbuildError(f"{checkpoint} has no weights (*.safetensors or pytorch_model.bin)")
    if config.get("vocab_size") and config.get("hidden_size"):
        check_against_config(checkpoint, int(config["vocab_size"]), int(config["hidden_size"]))
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError, KeyError) as e:
        raise TrtbuildError(f"{where}: transformers cannot read it: {str(e).splitlines()[0][:200]}") from None
    return CheckpointInfo(checkpoint, config, hf, task, arch)


def check_options(o: ExportOptions, info: CheckpointInfo) -> str | None:
    """Validate the option combination; returns the effective INT8 mode."""
    if not isinstance(o.opset, int) or o.opset < MIN_OPSET:
        raise TrtbuildError(
            f"--opset {o.opset} is older than {MIN_OPSET}, the oldest opset the dynamo exporter writes natively",
            hint=f"use --opset {MIN_OPSET} or newer",
        )
    import onnx

    if o.opset > onnx.defs.onnx_opset_version():
        raise TrtbuildError(f"--opset {o.opset} is newer than onnx {onnx.__version__} knows "
                            f"({onnx.defs.onnx_opset_version()})")
    if o.precision not in PRECISIONS:
        raise TrtbuildError(f"--precision {o.precision} is not one of {', '.join(PRECISIONS)}")
    mode = o.int8_mode
    if o.precision != "int8":
        if mode is not None:
            raise TrtbuildError(f"--int8-mode only applies to --precision int8 (got --precision {o.precision})")
        if o.calib_data is not None:
            raise TrtbuildError("--calib-data only applies to --precision int8 --int8-mode static")
        return None
    mode = mode or "dynamic"
    if mode not in INT8_MODES:
        raise TrtbuildError(f"--int8-mode {mode} is not one of {', '.join(INT8_MODES)}")
    if mode == "dynamic" and o.calib_data is not None:
        raise TrtbuildError("--calib-data only applies to --int8-mode static (dynamic INT8 needs no calibration)")
    if mode == "static":
        if info.task.decoder:
            raise TrtbuildError(
                "--int8-mode static is not supported for text-generation-with-past: one set of activation "
                "scales cannot cover both the prompt pass and the KV-cache steps",
                hint="use --int8-mode dynamic or --precision fp16",
            )
        if o.calib_data is None:
            raise TrtbuildError("--int8-mode static needs --calib-data FILE (one text sample per line, or JSONL with 'text')")
        if not Path(o.calib_data).is_file():
            raise TrtbuildError(f"--calib-data {o.calib_data} does not exist")
    return mode


def read_calibration_texts(path: Path, limit: int) -> list[str]:
    """One sample per line; a .jsonl file holds objects with a 'text' field."""
    path = Path(path)
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                line = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TrtbuildError(f"{path} line {number}: expected a JSON object with a 'text' field") from None
        texts.append(str(line))
        if len(texts) >= limit:
            break
    if not texts:
        raise TrtbuildError(f"--calib-data {path} holds no text")
    return texts


# ----------------------------------------------------------------------------------------- export
def _wrappers():
    """nn.Modules with one named tensor per graph input (what torch.export needs for dynamic axes)."""
    import torch
    from transformers import DynamicCache

    class Encoder(torch.nn.Module):
        def __init__(self, model, output):
            super().__init__()
            self.m, self.output = model, output

        def forward(self, input_ids, attention_mask):
            return getattr(self.m(input_ids=input_ids, attention_mask=attention_mask), self.output)

    class EncoderWithTypes(Encoder):
        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return getattr(out, self.output)

    class Decoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, position_ids, past_key_values):
            cache = DynamicCache(ddp_cache_data=past_key_values, config=self.m.config)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return Encoder, EncoderWithTypes, Decoder


def load_torch_model(info: CheckpointInfo):
    """The PyTorch module in FP32, wrapped so its forward matches the graph's inputs."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    auto = getattr(transformers, info.task.auto_class)
    try:
        model = auto.from_pretrained(info.path, dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise TrtbuildError(f"cannot load {info.path} as {info.task.auto_class}: {str(e).splitlines()[0]}") from None
    Encoder, EncoderWithTypes, Decoder = _wrappers()
    if info.task.decoder:
        return Decoder(model)
    return (EncoderWithTypes if info.arch.token_type_ids else Encoder)(model, info.task.output)


def _example_inputs(info: CheckpointInfo, module) -> tuple[tuple, dict]:
    """Tracing inputs and dynamic shapes; sizes > 1 so that no axis is specialised."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=1024)
    gen = torch.Generator().manual_seed(0)
    b, s = 2, 9
    ids = torch.randint(0, info.vocab_size, (b, s), generator=gen)
    if not info.task.decoder:
        seq = torch.export.Dim("sequence", min=1, max=info.max_positions)
        args = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if info.arch.token_type_ids else ())
        return args, {name: {0: batch, 1: seq} for name in info.input_names}
    p = 3
    seq = torch.export.Dim("sequence", min=1, max=info.max_positions)
    past_seq = torch.export.Dim("past_sequence", min=0, max=info.max_positions)
    total = torch.export.Dim("total_sequence", min=1, max=2 * info.max_positions)
    shape = (b, info.num_kv_heads, p, info.head_dim)
    past = tuple((torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(info.num_layers))
    args = (ids, torch.ones(b, s + p, dtype=torch.long), torch.arange(p, p + s).expand(b, s).contiguous(), past)
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": tuple(({0: batch, 2: past_seq}, {0: batch, 2: past_seq}) for _ in range(info.num_layers)),
    }
    return args, dynamic


def _parameter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_fp32(info: CheckpointInfo, module, path: Path, opset: int) -> None:
    import torch

    args, dynamic = _example_inputs(info, module)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(
            module, args, None, dynamo=True, opset_version=opset, input_names=info.input_names,
            output_names=info.output_names, dynamic_shapes=dynamic, verbose=False,
        )
    except Exception as e:  # torch.export / onnxscript raise many types; the first line says what failed
        raise TrtbuildError(f"torch.onnx.export failed for {info.path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    program.save(str(path), external_data=_parameter_bytes(module) >= PROTOBUF_LIMIT)


def _is_large(path: Path) -> bool:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) >= PROTOBUF_LIMIT


def _module_path(node) -> str:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def int8_nodes(path: Path, fp32_modules: str) -> tuple[list[str], list[str]]:
    """Weight MatMuls to quantize, and those left in FP32 (by module path from the exporter's metadata)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    keep, skip = [], []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in weights:
            (skip if re.search(fp32_modules, _module_path(node)) else keep).append(node.name)
    return keep, skip


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst), use_external_data_format=_is_large(src))
    return {"tool": "onnxruntime.transformers.OnnxModel.convert_float_to_float16", "keep_io_types": True}


def quantize_int8_dynamic(src: Path, dst: Path, arch: OnnxArchitecture) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from trtbuild.build.cpu import int8_kernels

    kernels = int8_kernels()
    nodes, fp32 = int8_nodes(src, arch.fp32_modules)
    _quiet_quantizer()
    weight_type = QuantType.QInt8 if kernels.weights == "int8" else QuantType.QUInt8
    quantize_dynamic(str(src), str(dst), nodes_to_quantize=nodes, per_channel=True, weight_type=weight_type,
                     use_external_data_format=_is_large(src))
    return {"tool": "onnxruntime.quantization.quantize_dynamic", "weights": f"{kernels.weights} per-channel",
            "weight_type": kernels.weights, "kernel_choice": kernels.reason,
            "activations": "uint8 per-tensor, scaled at run time", "quantized_matmuls": len(nodes), "fp32_matmuls": len(fp32)}


def text_calibration(info: CheckpointInfo, texts: list[str], seq_len: int, batch: int = 8):
    """A CalibrationDataReader over tokenized text, padded to one length so that histogram
    calibrators see arrays of one shape."""
    from onnxruntime.quantization import CalibrationDataReader
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(info.path)
    seq_len = min(seq_len, info.max_positions)
    feeds = []
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start:start + batch], padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="np")
        feeds.append({name: enc[name].astype(np.int64) for name in info.input_names})

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.count = len(texts)
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    return Reader()


def quantize_int8_static(src: Path, dst: Path, info: CheckpointInfo, texts: list[str], seq_len: int,
                         scratch: Path) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    nodes, fp32 = int8_nodes(src, info.arch.fp32_modules)
    prepared = scratch / "prepared.onnx"
    _quiet_quantizer()
    # symbolic shape inference cannot resolve the dynamo graph's shape arithmetic; ONNX's own can
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True, save_as_external_data=_is_large(src))
    reader = text_calibration(info, texts, seq_len)
    quantize_static(
        str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ, nodes_to_quantize=nodes, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}, use_external_data_format=_is_large(src),
    )
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "weights": "int8 symmetric per-channel",
            "activations": "int8 symmetric per-tensor (what TensorRT's explicit quantization accepts)",
            "calibration_method": "MinMax", "calibration_samples": reader.count,
            "calibration_seq_len": min(seq_len, info.max_positions),
            "quantized_matmuls": len(nodes), "fp32_matmuls": len(fp32)}


def _quiet_quantizer() -> None:
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs advice through the root logger


# ------------------------------------------------------------------------------------- validation
@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seq: int
    past: int = 0


ENCODER_CASES = (Case(1, 8), Case(4, 37), Case(3, 5))
DECODER_CASES = (Case(1, 8), Case(4, 37), Case(4, 1, 16), Case(2, 5, 23))


def _case_inputs(info: CheckpointInfo, module, case: Case, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Random token ids with padding in one row; returns the feeds and the attention mask."""
    import torch

    b, s, p = case.batch, case.seq, case.past
    ids = rng.integers(0, info.vocab_size, (b, s), dtype=np.int64)
    mask = np.ones((b, p + s), np.int64)
    if b > 1:
        pad = max(1, (p + s) // 3)
        if info.task.decoder:
            mask[-1, :pad] = 0  # decoders are left-padded
        else:
            mask[-1, (p + s) - pad:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if not info.task.decoder:
        if info.arch.token_type_ids:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return feeds, mask
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    feeds["position_ids"] = positions[:, p:]
    empty = torch.zeros(b, info.num_kv_heads, 0, info.head_dim)
    past = tuple((empty, empty) for _ in range(info.num_layers))
    if p:  # a real cache: PyTorch's own keys/values for a random prefix
        prefix = torch.from_numpy(rng.integers(0, info.vocab_size, (b, p), dtype=np.int64))
        with torch.no_grad():
            out = module(prefix, torch.from_numpy(mask[:, :p]), torch.from_numpy(positions[:, :p]), past)
        past = tuple((out[1 + 2 * i], out[2 + 2 * i]) for i in range(info.num_layers))
    for i, (k, v) in enumerate(past):
        feeds[f"past_key_values.{i}.key"] = k.numpy()
        feeds[f"past_key_values.{i}.value"] = v.numpy()
    return feeds, mask


def _torch_outputs(info: CheckpointInfo, module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        if info.task.decoder:
            past = tuple((t[f"past_key_values.{i}.key"], t[f"past_key_values.{i}.value"]) for i in range(info.num_layers))
            out = module(t["input_ids"], t["attention_mask"], t["position_ids"], past)
        else:
            out = module(*(t[name] for name in info.input_names))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _valid(name: str, ref: np.ndarray, mask: np.ndarray, info: CheckpointInfo, case: Case) -> np.ndarray:
    """Positions whose values mean something: padded query positions attend to nothing and differ freely."""
    if name == "last_hidden_state":
        return np.broadcast_to(mask.astype(bool)[:, :, None], ref.shape)
    if info.task.decoder and name == "logits":
        return np.broadcast_to(mask[:, case.past:].astype(bool)[:, :, None], ref.shape)
    if name.startswith("present."):
        return np.broadcast_to(mask.astype(bool)[:, None, :, None], ref.shape)
    return np.ones(ref.shape, bool)


def _compare(name: str, got: np.ndarray, ref: np.ndarray, valid: np.ndarray, mask: np.ndarray, case: Case,
             info: CheckpointInfo) -> dict[str, float]:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))[valid]
    scale = float(np.abs(ref[valid]).max()) if valid.any() else 0.0
    row = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "rel": float(diff.max() / scale) if scale else 0.0}
    if name == "logits":
        rows = valid[..., 0]
        row["top1"] = float((got.argmax(-1) == ref.argmax(-1))[rows].mean())
    if name == "last_hidden_state":
        m = mask.astype(np.float64)[:, :, None]
        a, b = (got.astype(np.float64) * m).sum(1) / m.sum(1), (ref.astype(np.float64) * m).sum(1) / m.sum(1)
        row["cosine"] = float(np.min(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))
    return row


def validate(info: CheckpointInfo, module, onnx_path: Path, precision: str, seed: int) -> dict[str, Any]:
    """Run ONNX Runtime and PyTorch on the same random inputs; raise when outside tolerance."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise TrtbuildError(f"ONNX Runtime cannot load the exported {precision} model: {str(e).splitlines()[0][:300]}") from None
    names = [o.name for o in session.get_outputs()]
    tol = TOLERANCES[precision]
    rng = np.random.default_rng(seed)
    cases = []
    for case in (DECODER_CASES if info.task.decoder else ENCODER_CASES):
        feeds, mask = _case_inputs(info, module, case, rng)
        got = dict(zip(names, session.run(names, feeds)))
        ref = dict(zip(info.output_names, _torch_outputs(info, module, feeds)))
        outputs = {n: _compare(n, got[n], ref[n], _valid(n, ref[n], mask, info, case), mask, case, info) for n in info.output_names}
        cases.append({**dataclasses.asdict(case), "outputs": outputs})
    summary = _summarise(cases)
    failures = []
    if summary["rel"] > tol.rel:
        failures.append(f"relative difference {summary['rel']:.3g} > {tol.rel:g} (output {summary['worst_output']})")
    if "top1" in summary and summary["top1"] < tol.top1:
        failures.append(f"top-1 agreement {summary['top1']:.4f} < {tol.top1:g}")
    if "cosine" in summary and summary["cosine"] < tol.cosine:
        failures.append(f"pooled cosine {summary['cosine']:.5f} < {tol.cosine:g}")
    result = {"tolerance": dataclasses.asdict(tol), "summary": summary, "cases": cases, "passed": not failures,
              "inputs": "random token ids (numpy default_rng seed %d), one padded row per batch" % seed}
    if failures:
        raise TrtbuildError(f"the {precision} ONNX export is outside tolerance vs PyTorch: {'; '.join(failures)}",
                            hint="nothing was written; try a higher precision")
    return result


def _summarise(cases: list[dict]) -> dict[str, Any]:
    rows = [(name, row) for c in cases for name, row in c["outputs"].items()]
    worst = max(rows, key=lambda r: r[1]["rel"])
    summary: dict[str, Any] = {
        "max_abs": max(r["max_abs"] for _, r in rows),
        "rel": worst[1]["rel"],
        "worst_output": worst[0],
    }
    for key in ("top1", "cosine"):
        values = [r[key] for _, r in rows if key in r]
        if values:
            summary[key] = min(values)
    return summary


# ------------------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy", "trtbuild"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _graph_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type),
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output],
            "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}


def _model_facts(info: CheckpointInfo) -> dict[str, Any]:
    facts = {
        "model_type": info.config.get("model_type"),
        "architecture": (info.config.get("architectures") or [None])[0],
        "vocab_size": info.vocab_size,
        "hidden_size": info.hidden_size,
        "num_layers": info.num_layers,
        "max_position_embeddings": info.max_positions,
    }
    if info.task.decoder:
        facts.update(num_kv_heads=info.num_kv_heads, head_dim=info.head_dim, eos_token_id=info.hf.eos_token_id,
                     bos_token_id=info.hf.bos_token_id, pad_token_id=info.hf.pad_token_id)
    if info.task.name == "text-classification":
        facts["id2label"] = {str(k): v for k, v in info.hf.id2label.items()}
        facts["num_labels"] = int(info.hf.num_labels)
    return facts


def _pooling(checkpoint: Path) -> dict[str, Any]:
    """Sentence-transformers pooling (mean by default) and whether embeddings are L2-normalised."""
    pooling = {"mode": "mean", "normalize": False, "max_seq_length": None}
    pool_cfg = checkpoint / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        cfg = json.loads(pool_cfg.read_text())
        for mode in ("cls_token", "max_tokens", "mean_tokens"):
            if cfg.get(f"pooling_mode_{mode}"):
                pooling["mode"] = mode.split("_")[0]
    modules = checkpoint / "modules.json"
    if modules.is_file():
        pooling["normalize"] = any(m.get("type", "").endswith(".Normalize") for m in json.loads(modules.read_text()))
    st = checkpoint / "sentence_bert_config.json"
    if st.is_file():
        pooling["max_seq_length"] = json.loads(st.read_text()).get("max_seq_length")
    return pooling


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for rel in SIDE_FILES:
        if (src / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)
            copied.append(rel)
    return copied


def export_onnx(options: ExportOptions, progress=None) -> ExportResult:
    """Export, convert, validate and write `options.out` atomically (nothing is written on failure)."""
    say = progress or (lambda message: None)
    info = inspect_checkpoint(options.checkpoint, options.task)
    mode = check_options(options, info)
    inputs = (options.checkpoint, options.calib_data)
    check_output_dir(Path(options.out).absolute(), options.force, inputs=inputs)
    texts = read_calibration_texts(options.calib_data, options.calib_samples) if mode == "static" else None
    started = time.perf_counter()
    timings: dict[str, float] = {}
    say(f"loading {info.path} ({info.task.auto_class})")
    t = time.perf_counter()
    module = load_torch_model(info)
    timings["load_s"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="trtbuild-onnx-") as scratch_dir, \
            atomic_output_dir(Path(options.out), force=options.force, inputs=inputs) as staging:
        scratch = Path(scratch_dir)
        fp32_path = scratch / MODEL_FILE
        say(f"exporting {info.task.name} with torch.onnx.export(dynamo=True, opset {options.opset})")
        t = time.perf_counter()
        export_fp32(info, module, fp32_path, options.opset)
        timings["export_s"] = time.perf_counter() - t
        written = _graph_io(fp32_path)["opset"]
        if written != options.opset:
            raise TrtbuildError(f"--opset {options.opset} was requested but the exporter wrote opset {written}")
        final = staging / MODEL_FILE
        t = time.perf_counter()
        if options.precision == "fp32":
            conversion = {"tool": "torch.onnx.export"}
            for f in scratch.glob(MODEL_FILE + "*"):
                shutil.copy2(f, staging / f.name)
        elif options.precision == "fp16":
            say("converting to FP16 (onnxruntime.transformers)")
            conversion = convert_fp16(fp32_path, final)
        elif mode == "dynamic":
            say("quantizing to INT8, dynamic (onnxruntime.quantization)")
            conversion = quantize_int8_dynamic(fp32_path, final, info.arch)
        else:
            say(f"quantizing to INT8, static QDQ, calibrating on {len(texts)} samples of {options.calib_data}")
            conversion = quantize_int8_static(fp32_path, final, info, texts, options.calib_seq_len, scratch)
        timings["convert_s"] = time.perf_counter() - t
        if mode is not None and not conversion.get("quantized_matmuls"):
            raise TrtbuildError(f"INT8 quantization found no weight MatMul to quantize in the {info.arch.model_type} graph")
        say("validating with ONNX Runtime against PyTorch")
        t = time.perf_counter()
        validation = validate(info, module, final, options.precision, options.seed)
        timings["validate_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - started
        side = _copy_side_files(info.path, staging)
        io = _graph_io(final)
        manifest = {
            "format": MANIFEST_FORMAT,
            "task": info.task.name,
            "checkpoint": str(info.path.absolute()),
            "model": _model_facts(info),
            "opset": io["opset"],
            "precision": options.precision,
            "int8_mode": mode,
            "calibration": None if mode != "static" else {"file": str(Path(options.calib_data).absolute()),
                                                          "sha256": _sha256(Path(options.calib_data))},
            "conversion": conversion,
            "model_file": MODEL_FILE,
            "external_data": (staging / (MODEL_FILE + ".data")).is_file(),
            "inputs": io["inputs"],
            "outputs": io["outputs"],
            "validation": validation,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "tools": tool_versions(),
            "files": {},
            "side_files": side,
        }
        if info.task.name == "feature-extraction":
            manifest["pooling"] = _pooling(info.path)
        for f in sorted(p for p in staging.rglob("*") if p.is_file()):
            manifest["files"][str(f.relative_to(staging))] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
        (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return ExportResult(Path(options.out), manifest)


def load_export(directory: Path) -> dict[str, Any]:
    """Read an export directory's manifest and check that its model file is a loadable ONNX graph."""
    import onnx

    directory = Path(directory)
    if not directory.is_dir():
        raise TrtbuildError(f"{directory} does not exist", hint="run `trtbuild export onnx` first")
    manifest_path = directory / EXPORT_MANIFEST
    manifest = read_json_file(manifest_path, missing=f"{directory} has no {EXPORT_MANIFEST}",
                              hint="was it written by `trtbuild export onnx`?")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise TrtbuildError(f"{manifest_path}: format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    model = directory / manifest.get("model_file", MODEL_FILE)
    if not model.is_file():
        raise TrtbuildError(f"{model} is missing")
    try:
        onnx.checker.check_model(str(model))
    except Exception as e:  # DecodeError, ValidationError, OSError for a missing .data file
        raise TrtbuildError(f"{model} is not a valid ONNX model: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                            hint="re-run `trtbuild export onnx`") from None
    expected = manifest.get("files", {}).get(model.name, {}).get("sha256")
    if expected and _sha256(model) != expected:
        raise TrtbuildError(f"{model} does not match the sha256 in {manifest_path}: the file changed after export",
                            hint="re-run `trtbuild export onnx`")
    return manifest
