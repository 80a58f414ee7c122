"""Triton model repositories for an ONNX export (`trtbuild export onnx`), on three runtimes.

- `onnxruntime`: Triton's ONNX Runtime backend (platform onnxruntime_onnx), optionally with ONNX
  Runtime's TensorRT execution provider (optimization.execution_accelerators);
- `onnxruntime-python`: the same repository with the model step in the Python backend running ONNX
  Runtime, for servers that only have the Python backend (the local pytriton server);
- `tensorrt`: a `tensorrt_plan` model plus the `trtexec` command that builds its model.plan with
  optimization profiles from the spec's batch size and sequence length (run in the pinned TensorRT
  container: a plan loads only in the TensorRT version that built it).

Encoders get text in -> tokenizer (Python) -> ONNX model -> pooling or labels (Python), wired as an
ensemble. Decoders (text-generation-with-past) keep the LLM ensemble of the other runtimes
(preprocessing, `llm`, postprocessing, same client interface); their `llm` step is a Python model
that decodes greedily with the KV cache, calling the ONNX step model (`llm_step`, which takes and
returns the cache) once per token through BLS, so the ONNX model itself runs on whichever backend
the runtime names. Triton's ONNX Runtime backend cannot loop, hence the Python driver.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
from pathlib import Path
from typing import Any

import click

from trtbuild.repository import interface
from trtbuild.errors import TrtbuildError
from trtbuild.repository.interface import Step, Tensor
from trtbuild.build.onnx_export import EXPORT_MANIFEST, MODEL_FILE, load_export
from trtbuild.repository.plan import Batching, ModelPlan, plan_llm_repository
from trtbuild.repository.render import Written, render, version, write_repository
from trtbuild.runtimes.base import RepoRequest, Runtime, runtime_option
from trtbuild.repository.serving import ServingPolicy, apply_policy

ONNX_RUNTIMES = ("onnxruntime", "onnxruntime-python", "tensorrt")
TRITON_RELEASE = "25.12"  # the TensorRT container that builds a plan must match the serving container
TENSORRT_IMAGE = f"nvcr.io/nvidia/tensorrt:{TRITON_RELEASE}-py3"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-py3"
TRT_PRECISIONS = ("FP32", "FP16", "INT8")
ONNX_TO_TRITON = {
    "FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "DOUBLE": "TYPE_FP64",
    "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL",
}
DEFAULT_QUEUE_DELAY_US = 1000  # small batches form under load at a 1 ms cost
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclasses.dataclass(frozen=True)
class OnnxServeSpec:
    """How an ONNX export is served: limits, batching, instances and acceleration."""

    export_dir: Path
    runtime: str = "onnxruntime"
    max_batch_size: int = 8
    max_input_len: int = 512  # tokens per text (encoders) or per prompt (decoders)
    max_output_len: int = 256  # generated tokens (decoders)
    opt_batch_size: int | None = None  # TensorRT optimization profile; None: max_batch_size
    opt_seq_len: int = 128
    device: str = "auto"  # auto: GPU for onnxruntime/tensorrt, CPU for onnxruntime-python
    serving: ServingPolicy = ServingPolicy()  # queues, batching, instances, cache (trtbuild.repository.serving)
    trt_accelerator: str = "auto"  # auto | on | off (TensorRT execution provider, runtime onnxruntime)
    trt_precision: str | None = None  # None: the export's precision
    trt_workspace_mib: int = 1024
    trt_engine_cache: str | None = "/tmp/trtbuild/trt_engine_cache"
    pad_to_multiple_of: int = 8
    intra_op_threads: int = 0

    def validate(self, manifest: dict[str, Any]) -> None:
        def positive(flag: str, value: int) -> None:
            if not isinstance(value, int) or value < 1:
                raise TrtbuildError(f"--{flag} must be a positive integer, got {value!r}")

        if self.runtime not in ONNX_RUNTIMES:
            raise TrtbuildError(f"--runtime {self.runtime} is not an ONNX runtime ({', '.join(ONNX_RUNTIMES)})")
        for flag in ("max_batch_size", "max_input_len", "max_output_len", "opt_seq_len", "trt_workspace_mib",
                     "pad_to_multiple_of"):
            positive(flag.replace("_", "-"), getattr(self, flag))
        self.serving.validate(self.max_batch_size)
        if self.opt_batch_size is not None and not 1 <= self.opt_batch_size <= self.max_batch_size:
            raise TrtbuildError(f"--opt-batch-size {self.opt_batch_size} is outside 1..{self.max_batch_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrtbuildError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.trt_accelerator not in ("auto", "on", "off"):
            raise TrtbuildError(f"--trt-accelerator must be auto, on or off, got {self.trt_accelerator!r}")
        if self.trt_precision is not None and self.trt_precision.upper() not in TRT_PRECISIONS:
            raise TrtbuildError(f"--trt-precision {self.trt_precision} is not one of {', '.join(TRT_PRECISIONS)}")
        limit = manifest["model"]["max_position_embeddings"]
        decoder = manifest["task"] == "text-generation-with-past"
        length = self.max_input_len + self.max_output_len if decoder else self.max_input_len
        if length > limit:
            what = "--max-input-len + --max-output-len" if decoder else "--max-input-len"
            raise TrtbuildError(f"{what} = {length} exceeds the model's max_position_embeddings ({limit})",
                                hint="lower it")
        if self.runtime == "tensorrt":
            if self.device == "cpu":
                raise TrtbuildError("--runtime tensorrt runs on GPUs only; use --runtime onnxruntime --device cpu")
            if decoder:
                raise TrtbuildError(
                    "--runtime tensorrt serves encoders only: a KV-cache decoder needs a generation loop TensorRT "
                    "plans do not have", hint="use --runtime tensorrtllm (TensorRT-LLM) or --runtime onnxruntime")
            if manifest.get("int8_mode") == "dynamic":
                raise TrtbuildError(
                    "this export is dynamic INT8 (DynamicQuantizeLinear/MatMulInteger), which TensorRT cannot build",
                    hint="re-export with --int8-mode static (QDQ) or --precision fp16")

    @property
    def kind(self) -> str:
        if self.runtime == "tensorrt":
            return "KIND_GPU"
        if self.device == "auto":
            return "KIND_CPU" if self.runtime == "onnxruntime-python" else "KIND_GPU"
        return "KIND_GPU" if self.device == "cuda" else "KIND_CPU"

    @property
    def batching(self) -> Batching:
        """The planned batcher of every non-decoupled model; the serving policy may override it."""
        return Batching(max_queue_delay_us=DEFAULT_QUEUE_DELAY_US)


@dataclasses.dataclass(frozen=True)
class OnnxRepository:
    """A written repository and what a user still has to do with it."""

    out: Path
    manifest: dict[str, Any]
    trtexec: str | None  # the engine build command (runtime tensorrt)


# ------------------------------------------------------------------------------------- tensors
def graph_tensors(io: list[dict[str, Any]]) -> tuple[Tensor, ...]:
    """Triton tensors from the export's graph I/O; the first axis is the batch axis Triton owns."""
    tensors = []
    for t in io:
        if t["dtype"] not in ONNX_TO_TRITON:
            raise TrtbuildError(f"graph tensor '{t['name']}' has type {t['dtype']}, which Triton cannot carry")
        dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in t["shape"][1:])
        tensors.append(Tensor(t["name"], ONNX_TO_TRITON[t["dtype"]], dims))
    return tuple(tensors)


def _by_name(tensors: tuple[Tensor, ...]) -> dict[str, Tensor]:
    return {t.name: t for t in tensors}


# ------------------------------------------------------------------------------------- plans
def _accelerator(serve: OnnxServeSpec, manifest: dict[str, Any], model: str) -> list[tuple[str, Any]]:
    """TensorRT execution-provider parameters for Triton's onnxruntime backend, or none."""
    wanted = serve.trt_accelerator
    problem = None
    if serve.kind != "KIND_GPU":
        problem = "it needs a GPU instance (--device cuda)"
    elif manifest.get("int8_mode") == "dynamic":
        problem = "TensorRT cannot run dynamic INT8 ops (MatMulInteger); re-export with --int8-mode static"
    elif manifest["task"] == "text-generation-with-past":
        problem = "the KV-cache length changes every step and would rebuild TensorRT engines"
    if wanted == "off" or (wanted == "auto" and problem):
        return []
    if problem:
        raise TrtbuildError(f"--trt-accelerator on: {problem}")
    precision = (serve.trt_precision or {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}[manifest["precision"]]).upper()
    params: list[tuple[str, Any]] = [
        ("precision_mode", precision),
        ("max_workspace_size_bytes", serve.trt_workspace_mib << 20),
    ]
    if serve.trt_engine_cache:
        params += [("trt_engine_cache_enable", "1"), ("trt_engine_cache_path", f"{serve.trt_engine_cache.rstrip('/')}/{model}")]
    return params


def plan_onnx_model(name: str, serve: OnnxServeSpec, manifest: dict[str, Any], inputs: tuple[Tensor, ...],
                    outputs: tuple[Tensor, ...], batching: Batching | None) -> ModelPlan:
    """The ONNX model step on the runtime's backend; the model file is copied into the repository."""
    model_path = serve.export_dir / manifest.get("model_file", MODEL_FILE)
    external = model_path.with_name(model_path.name + ".data")
    context = dict(
        max_batch_size=serve.max_batch_size, inputs=inputs, outputs=outputs, batching=batching,
        instances=1, kind=serve.kind, task=manifest["task"], precision=manifest["precision"],
        source=str(serve.export_dir.absolute()),
    )
    if serve.runtime == "tensorrt":
        context.update(trtexec=trtexec_command(name, serve, manifest, inputs), image=TENSORRT_IMAGE,
                       triton_image=TRITON_IMAGE)
        artifacts = {"onnx/model.onnx": model_path}
        if external.is_file():
            artifacts["onnx/model.onnx.data"] = external
        return ModelPlan(name, "onnx_tensorrt_plan", context, artifacts=artifacts,
                         extra_files={"build_engine.sh": "onnx_tensorrt_plan/build_engine.sh.j2"})
    # ONNX Runtime resolves external data next to the model: a model with it becomes a folder
    artifacts = {"1/model.onnx/model.onnx": model_path, "1/model.onnx/model.onnx.data": external} if external.is_file() \
        else {"1/model.onnx": model_path}
    parameters = [("intra_op_thread_count", serve.intra_op_threads)]
    if serve.runtime == "onnxruntime-python":  # the Python backend's default_model_filename is its model.py
        return ModelPlan(name, "onnx_python", dict(context, parameters=[*parameters, ("onnx_file", "model.onnx")]),
                         python_model="onnx_python",
                         artifacts=artifacts)
    return ModelPlan(name, "onnx_model", dict(context, parameters=parameters, accelerator=_accelerator(serve, manifest, name)),
                     artifacts=artifacts)


def trtexec_command(name: str, serve: OnnxServeSpec, manifest: dict[str, Any], inputs: tuple[Tensor, ...]) -> str:
    """trtexec with one optimization profile: batch 1..max, sequence 1..max_input_len."""
    opt_batch = serve.opt_batch_size or serve.max_batch_size
    opt_seq = min(serve.opt_seq_len, serve.max_input_len)

    def shapes(batch: int, seq: int) -> str:
        return ",".join(f"{t.name}:{batch}x{seq}" for t in inputs)

    args = [
        "trtexec",
        f"--onnx={name}/onnx/model.onnx",
        f"--saveEngine={name}/1/model.plan",
        f"--minShapes={shapes(1, 1)}",
        f"--optShapes={shapes(opt_batch, opt_seq)}",
        f"--maxShapes={shapes(serve.max_batch_size, serve.max_input_len)}",
        "--stronglyTyped",  # precision comes from the graph (FP16 casts, INT8 QDQ), as TensorRT 11 requires
        f"--memPoolSize=workspace:{serve.trt_workspace_mib}",
    ]
    return " ".join(shlex.quote(a) for a in args)


def plan_encoder_repository(serve: OnnxServeSpec, manifest: dict[str, Any]) -> list[ModelPlan]:
    """text_input -> preprocessing -> encoder (ONNX) -> postprocessing -> embedding or label."""
    task = manifest["task"]
    graph_in, graph_out = graph_tensors(manifest["inputs"]), graph_tensors(manifest["outputs"])
    hidden = manifest["model"]["hidden_size"]
    text_input = Tensor("text_input", "TYPE_STRING", (1,))
    tokens = tuple(Tensor(t.name, "TYPE_INT64", (-1,)) for t in graph_in)
    if any(t.data_type != "TYPE_INT64" for t in graph_in):
        raise TrtbuildError(f"{serve.export_dir / EXPORT_MANIFEST}: encoder inputs must be INT64 token tensors")
    max_len = serve.max_input_len
    if manifest.get("pooling", {}).get("max_seq_length"):
        max_len = min(max_len, int(manifest["pooling"]["max_seq_length"]))  # what sentence-transformers truncates at
    tokenizer = {f"tokenizer/{f}": serve.export_dir / f for f in TOKENIZER_FILES if (serve.export_dir / f).is_file()}
    if "tokenizer/tokenizer.json" not in tokenizer:
        raise TrtbuildError(f"{serve.export_dir} has no tokenizer.json", hint="export from a checkpoint with a fast tokenizer")
    preprocessing = ModelPlan(
        "preprocessing", "onnx_text_preprocessing",
        dict(max_batch_size=serve.max_batch_size, inputs=(text_input,), outputs=tokens, batching=serve.batching,
             instances=1,
             parameters=[("tokenizer_dir", "tokenizer"), ("max_seq_len", max_len),
                         ("pad_to_multiple_of", serve.pad_to_multiple_of),
                         ("outputs", json.dumps([t.name for t in tokens]))]),
        python_model="onnx_text_preprocessing", artifacts=tokenizer,
    )
    encoder = plan_onnx_model("encoder", serve, manifest, graph_in, graph_out, serve.batching)
    if task == "feature-extraction":
        pooling = manifest.get("pooling") or {"mode": "mean", "normalize": False}
        post_in = (Tensor("last_hidden_state", "TYPE_FP32", (-1, hidden)), Tensor("attention_mask", "TYPE_INT64", (-1,)))
        post_out = (Tensor("embedding", "TYPE_FP32", (hidden,)),)
        post_params = [("task", task), ("pooling", pooling["mode"]), ("normalize", str(bool(pooling["normalize"])).lower())]
        post_map = (("last_hidden_state", "_last_hidden_state"), ("attention_mask", "_attention_mask"))
        encoder_out = (("last_hidden_state", "_last_hidden_state"),)
        outputs = post_out
        post_out_map = (("embedding", "embedding"),)
    else:
        labels = manifest["model"].get("id2label") or {}
        num_labels = int(manifest["model"].get("num_labels") or len(labels))
        logits = Tensor("logits", "TYPE_FP32", (num_labels,))
        post_in = (logits,)
        post_out = (Tensor("label", "TYPE_STRING", (1,)), Tensor("score", "TYPE_FP32", (1,)))
        post_params = [("task", task), ("id2label", json.dumps(labels))]
        post_map = (("logits", "logits"),)
        encoder_out = (("logits", "logits"),)
        outputs = (*post_out, logits)
        post_out_map = (("label", "label"), ("score", "score"))
    postprocessing = ModelPlan(
        "postprocessing", "onnx_text_postprocessing",
        dict(max_batch_size=serve.max_batch_size, inputs=post_in, outputs=post_out, batching=serve.batching,
             instances=1, parameters=post_params, task=task),
        python_model="onnx_text_postprocessing",
    )
    steps = (
        Step("preprocessing", (("text_input", "text_input"),), tuple((t.name, f"_{t.name}") for t in tokens)),
        Step("encoder", tuple((t.name, f"_{t.name}") for t in tokens), encoder_out),
        Step("postprocessing", post_map, post_out_map),
    )
    ensemble = ModelPlan("ensemble", "onnx_ensemble",
                         dict(max_batch_size=serve.max_batch_size, inputs=(text_input,), outputs=outputs, steps=steps,
                              task=task))
    return [preprocessing, encoder, postprocessing, ensemble]


def decoder_build_spec(serve: OnnxServeSpec):
    """The LLM BuildSpec the shared preprocessing/postprocessing/ensemble plans take."""
    from trtbuild.checkpoint import read_config
    from trtbuild.spec import BuildSpec, ModelSpec

    model = ModelSpec.from_config(read_config(serve.export_dir), serve.export_dir / "config.json")
    return BuildSpec(checkpoint=serve.export_dir.absolute(), model=model, runtime=serve.runtime,
                     max_batch_size=serve.max_batch_size, max_input_len=serve.max_input_len,
                     max_output_len=serve.max_output_len, tokenizer_dir=serve.export_dir.absolute(),
                     serving=serve.serving)


def plan_decoder_repository(serve: OnnxServeSpec, manifest: dict[str, Any]) -> list[ModelPlan]:
    """The LLM ensemble with a greedy KV-cache `llm` step driving the ONNX `llm_step` model."""
    spec = decoder_build_spec(serve)
    facts = manifest["model"]
    graph_in, graph_out = graph_tensors(manifest["inputs"]), graph_tensors(manifest["outputs"])
    past = next(t for t in graph_in if t.name.startswith("past_key_values."))
    step_name = "llm_step"
    end_id = facts.get("eos_token_id")
    end_id = end_id[0] if isinstance(end_id, list) else end_id

    def greedy_llm(spec) -> ModelPlan:
        return ModelPlan(
            spec.names.llm, "onnx_greedy_llm",
            dict(max_batch_size=spec.max_batch_size, inputs=interface.LLM_INPUTS, outputs=interface.LLM_OUTPUTS,
                 batching=serve.batching, instances=1,
                 parameters=[
                     ("step_model", step_name),
                     ("num_layers", facts["num_layers"]),
                     ("num_kv_heads", facts["num_kv_heads"]),
                     ("head_dim", facts["head_dim"]),
                     ("past_dtype", past.data_type),
                     ("max_input_len", spec.max_input_len),
                     ("max_output_len", spec.max_output_len),
                     ("end_id", end_id if end_id is not None else -1),
                     ("pad_id", facts.get("pad_token_id") if facts.get("pad_token_id") is not None else (end_id or 0)),
                     ("exclude_input_in_output", str(spec.exclude_input_in_output).lower()),
                 ]),
            python_model="onnx_greedy_llm",
        )

    plans = [p for p in plan_llm_repository(spec, llm_plan=greedy_llm) if p.name != spec.names.bls]
    step = plan_onnx_model(step_name, serve, manifest, graph_in, graph_out, None)
    return [*plans, step]


def plan_onnx_repository(serve: OnnxServeSpec, manifest: dict[str, Any]) -> list[ModelPlan]:
    """The repository's plans with the serving policy applied."""
    serve.validate(manifest)
    decoder = manifest["task"] == "text-generation-with-past"
    plans = plan_decoder_repository(serve, manifest) if decoder else plan_encoder_repository(serve, manifest)
    return apply_policy(plans, serve.serving)


def generate_onnx_repository(serve: OnnxServeSpec, out: Path, *, force: bool = False) -> OnnxRepository:
    """Check the export, render and check every config.pbtxt, write the repository atomically."""
    serve = dataclasses.replace(serve, export_dir=Path(serve.export_dir).absolute())
    export = load_export(serve.export_dir)
    plans = plan_onnx_repository(serve, export)
    rendered = render(plans)
    trtexec = next((p.context.get("trtexec") for p in plans if p.context.get("trtexec")), None)
    manifest = {
        "trtbuild_version": version(),
        "runtime": serve.runtime,
        "task": export["task"],
        "export": {"dir": str(serve.export_dir), "precision": export["precision"], "int8_mode": export.get("int8_mode"),
                   "opset": export["opset"], "model_sha256": export["files"][export["model_file"]]["sha256"]},
        "serve": json.loads(json.dumps(dataclasses.asdict(serve), default=str)),
        "serving": serve.serving.to_json(),  # what `trtbuild serve` reads (trtbuild.repository.serving.repository_policy)
        "models": {m.plan.name: m.plan.template for m in rendered},
        "entrypoints": {"ensemble": "ensemble"},
    }
    if export["task"] == "text-generation-with-past":
        manifest["spec"] = decoder_build_spec(serve).to_json()
    if trtexec:
        manifest["trtexec"] = {"command": trtexec, "image": TENSORRT_IMAGE, "serve_image": TRITON_IMAGE,
                               "script": "encoder/build_engine.sh"}
    write_repository(rendered, out, manifest, inputs=(serve.export_dir,), force=force)
    return OnnxRepository(Path(out), manifest, trtexec)


# The options only these runtimes read (batching, instances and queues come from the serving options).
OPTIONS = (
    runtime_option("--trt-accelerator", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                   help="ONNX: TensorRT execution provider in the onnxruntime backend (auto: on where it can run)."),
    runtime_option("--trt-precision", type=click.Choice(TRT_PRECISIONS, case_sensitive=False), default=None,
                   help="ONNX: TensorRT execution-provider precision; default: the export's."),
    runtime_option("--trt-workspace-mib", type=int, default=1024, show_default=True,
                   help="ONNX: TensorRT workspace (execution provider and trtexec)."),
    runtime_option("--trt-engine-cache", default="/tmp/trtbuild/trt_engine_cache", show_default=True,
                   help="ONNX: where the TensorRT execution provider caches engines ('' to disable)."),
    runtime_option("--opt-batch-size", type=int, default=None, help="ONNX, tensorrt: profile batch size (default: max)."),
    runtime_option("--opt-seq-len", type=int, default=128, show_default=True, help="ONNX, tensorrt: profile sequence length."),
    runtime_option("--pad-to-multiple-of", type=int, default=8, show_default=True,
                   help="ONNX encoders: the tokenizer pads each request to a multiple of this many tokens."),
)
HONOURS = frozenset({"max_batch_size", "max_input_len", "max_output_len", "device"})


def serve_spec(runtime: str, request: RepoRequest) -> OnnxServeSpec:
    o = request.options
    return OnnxServeSpec(
        export_dir=Path(request.checkpoint), runtime=runtime, max_batch_size=o["max_batch_size"],
        max_input_len=o["max_input_len"], max_output_len=o["max_output_len"], device=o.get("device", "auto"),
        serving=request.serving, trt_accelerator=o["trt_accelerator"], trt_precision=o["trt_precision"],
        trt_workspace_mib=o["trt_workspace_mib"], trt_engine_cache=o["trt_engine_cache"] or None,
        opt_batch_size=o["opt_batch_size"], opt_seq_len=o["opt_seq_len"], pad_to_multiple_of=o["pad_to_multiple_of"],
    )


def write(serve: OnnxServeSpec, out: Path, force: bool = False) -> Written:
    result = generate_onnx_repository(serve, out, force=force)
    notes = ()
    if result.trtexec:
        info = result.manifest["trtexec"]
        notes = (f"build the TensorRT plan before serving (in {info['image']}, or where trtexec exists):",
                 f"  docker run --rm --gpus all -v {Path(out).absolute()}:/models -w /models {info['image']} bash {info['script']}",
                 f"  ({result.trtexec})")
    return Written(Path(out), tuple(result.manifest["models"]), tuple(result.manifest["entrypoints"].values()), notes)


RUNTIMES = tuple(
    Runtime(name, f"an ONNX export dir (trtbuild export onnx){', ' + where if where else ''}",
            functools.partial(serve_spec, name), write, HONOURS,
            "the export directory fixes the precision and holds the tokenizer", OPTIONS)
    for name, where in (("onnxruntime", "Triton's ONNX Runtime backend"),
                        ("onnxruntime-python", "ONNX Runtime in the Python backend"),
                        ("tensorrt", "a TensorRT plan built with trtexec"))
)
