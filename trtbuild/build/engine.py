"""TensorRT-LLM engines: refuse impossible builds up front, then convert/quantize and run `trtllm-build`.

A build has two steps. A Hugging Face checkpoint is first turned into a TensorRT-LLM checkpoint on
this machine by ModelOpt (`trtbuild.build.quantize`; it quantizes unless the precision is fp16/bf16); an
already exported TensorRT-LLM checkpoint skips that step. `trtllm-build` then runs where it is on
PATH or inside the pinned Triton TRT-LLM container, because engines only load in the TensorRT and
TensorRT-LLM versions that built them. Every check that can fail (GPU generation, lengths, ranks,
architecture x precision, plugin combinations) runs before any work, and the exact commands,
image, versions and build_config are recorded in `trtbuild-engine.json` next to the engine.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

from trtbuild.atomic import atomic_output_dir, check_output_dir
from trtbuild.checkpoint import WEIGHT_GLOBS, check_against_config, check_tokenizer, read_config
from trtbuild.errors import TrtbuildError, read_json_file
from trtbuild.precisions import FP8_CAPABILITY, KV_CACHE_DTYPES, PRECISIONS, precision_of_quant_algo
from trtbuild.spec import ARCHITECTURES, BuildSpec, KVCacheSpec, ModelSpec

# The last Triton TRT-LLM container that still builds and serves engines. NVIDIA's release
# compatibility matrix lists it with TensorRT-LLM 1.1.0, TensorRT 10.13.3.9, CUDA 13.0.2, Python 3.12.3.
TRITON_TRTLLM_IMAGE = "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"
ENGINE_MANIFEST = "trtbuild-engine.json"
TRTLLM_BUILD = "trtllm-build"

# TensorRT-LLM 1.x supports Ampere (SM80) and newer; FP8 needs Ada (SM89) or Hopper; FP8 context
# FMHA is a Hopper kernel.
FP8_FMHA_CAPABILITY = (9, 0)

KV_CACHE_TYPES = ("paged", "continuous", "disabled")
GEMM_PLUGINS = ("auto", "disable", "float16", "bfloat16", "fp8")
LOGITS_DTYPES = ("float32", "float16")
ACTIVATION_DTYPES = ("auto", "float16", "bfloat16")
RUNNERS = ("auto", "local", "docker")
TRTLLM_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}
TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                   "chat_template.*", "generation_config.json", "*.tiktoken")


_ALL = tuple(PRECISIONS)
# TensorRT-LLM architecture -> precisions its engine flow builds (TensorRT-LLM's precision support
# matrix and per-model READMEs; the newer architectures conservatively).
ARCHITECTURE_PRECISIONS: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": _ALL,
    "GemmaForCausalLM": _ALL,
    "Qwen2ForCausalLM": _ALL,
    "Qwen3ForCausalLM": ("fp16", "bf16", "fp8", "int8_wo", "int4_wo", "int4_awq"),
    "Gemma2ForCausalLM": ("fp16", "bf16", "fp8", "int8_wo", "int4_wo"),
    "Phi3ForCausalLM": ("fp16", "bf16", "fp8", "int8_wo", "int4_wo"),
}


def precision_of(quant_algo: str | None, dtype: str) -> str:
    """The --precision an exported TensorRT-LLM checkpoint was made with."""
    if quant_algo is None:
        return {"float16": "fp16", "bfloat16": "bf16"}.get(dtype, "fp16")
    name = precision_of_quant_algo(quant_algo)
    if name not in PRECISIONS:
        raise TrtbuildError(
            f"quant_algo {quant_algo} is not one trtbuild builds",
            hint=f"supported: {', '.join(p.quant_algo for p in PRECISIONS.values() if p.quant_algo)}",
        )
    return name


# ----------------------------------------------------------------------------------------- GPUs
@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int]
    memory_mib: int | None = None

    @property
    def sm(self) -> str:
        return f"SM{self.capability[0]}{self.capability[1]}"


def detect_gpus() -> tuple[Gpu, ...]:
    """Visible GPUs from nvidia-smi (or torch); empty when none is visible."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout
            gpus = []
            for line in out.strip().splitlines():
                name, cap, mem = (f.strip() for f in line.split(","))
                major, minor = cap.split(".")
                gpus.append(Gpu(name, (int(major), int(minor)), int(float(mem))))
            return tuple(gpus)
        except (subprocess.SubprocessError, ValueError, OSError):
            pass
    try:
        import torch

        if torch.cuda.is_available():
            return tuple(
                Gpu(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i),
                    torch.cuda.get_device_properties(i).total_memory // 2**20)
                for i in range(torch.cuda.device_count())
            )
    except ImportError:
        pass
    return ()


# ----------------------------------------------------------------------------------- checkpoints
@dataclasses.dataclass(frozen=True)
class Mapping:
    tp_size: int = 1
    pp_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


@dataclasses.dataclass(frozen=True)
class TrtllmModelConfig:
    """A TensorRT-LLM `pretrained_config` (checkpoint config.json, or the engine's copy of it)."""

    architecture: str
    dtype: str
    logits_dtype: str
    mapping: Mapping
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    group_size: int | None
    model: ModelSpec
    raw: dict[str, Any]

    @property
    def precision(self) -> str:
        return precision_of(self.quant_algo, self.dtype)

    @property
    def kv_cache_dtype(self) -> str:
        return {None: "auto", "FP8": "fp8", "INT8": "int8"}.get(self.kv_cache_quant_algo, str(self.kv_cache_quant_algo).lower())

    @classmethod
    def parse(cls, config: dict[str, Any], source: Path) -> "TrtllmModelConfig":
        def need(key: str) -> Any:
            if config.get(key) is None:
                raise TrtbuildError(f"{source}: field '{key}' is missing", hint="is this a TensorRT-LLM checkpoint or engine?")
            return config[key]

        architecture = str(need("architecture"))
        model_types = [a.model_type for a in ARCHITECTURES.values() if a.trtllm_architecture == architecture]
        if not model_types:
            supported = sorted({a.trtllm_architecture for a in ARCHITECTURES.values() if a.trtllm_architecture})
            raise TrtbuildError(f"{source}: architecture '{architecture}' is not supported", hint=f"supported: {', '.join(supported)}")
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        mapping = config.get("mapping") or {}
        quant = config.get("quantization") or {}
        dtype = str(need("dtype"))
        model = ModelSpec(
            model_type=model_types[0],
            architecture=architecture,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_size") or hidden // heads),
            intermediate_size=int(config.get("intermediate_size") or 4 * hidden),
            max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
            dtype=dtype if dtype in TRTLLM_DTYPES else "float16",
            hidden_act=str(config.get("hidden_act", "silu")),
            norm_eps=float(config.get("norm_epsilon") or 1e-5),
            rope_theta=float(config.get("rotary_base") or 10000.0),
            rope_scaling=config.get("rotary_scaling"),
            tie_word_embeddings=bool(config.get("share_embedding_table", False)),
        )
        return cls(
            architecture=architecture,
            dtype=dtype,
            logits_dtype=str(config.get("logits_dtype") or "float32"),
            mapping=Mapping(int(mapping.get("tp_size") or 1), int(mapping.get("pp_size") or 1)),
            quant_algo=quant.get("quant_algo"),
            kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
            group_size=quant.get("group_size"),
            model=model,
            raw=config,
        )


@dataclasses.dataclass(frozen=True)
class Source:
    """What `trtbuild engine` was pointed at."""

    path: Path
    format: str  # "hf" or "trtllm"
    model: ModelSpec
    architecture: str  # TensorRT-LLM architecture
    trtllm: TrtllmModelConfig | None = None  # set for TensorRT-LLM checkpoints
    tokenizer: Path | None = None


def _has_tokenizer(directory: Path) -> bool:
    try:
        check_tokenizer(directory)
        return True
    except TrtbuildError:
        return False


def read_source(path: Path, *, need_weights: bool = True) -> Source:
    """Recognise a Hugging Face checkpoint or an exported TensorRT-LLM checkpoint; load no weights."""
    path = Path(path).absolute()
    config = read_config(path)
    config_path = path / "config.json"
    if "build_config" in config:
        raise TrtbuildError(f"{path} is already a TensorRT-LLM engine", hint="point `trtbuild engine` at a checkpoint, or `trtbuild repo` at this engine")
    if "architecture" in config and "model_type" not in config:
        trtllm = TrtllmModelConfig.parse(config, config_path)
        missing = [f"rank{r}.safetensors" for r in range(trtllm.mapping.world_size) if not (path / f"rank{r}.safetensors").is_file()]
        if missing and need_weights:
            raise TrtbuildError(f"{path}: mapping in config.json says world size {trtllm.mapping.world_size} but {', '.join(missing)} is missing")
        return Source(path, "trtllm", trtllm.model, trtllm.architecture, trtllm, path if _has_tokenizer(path) else None)
    model = ModelSpec.from_config(config, config_path)
    if (path / "hf_quant_config.json").is_file():
        raise TrtbuildError(
            f"{path} is a ModelOpt Hugging Face export (hf_quant_config.json), which trtllm-build cannot read",
            hint="serve it with `trtbuild repo --runtime llmapi`, or build from the unquantized checkpoint",
        )
    if need_weights and not any(any(path.glob(g)) for g in WEIGHT_GLOBS):
        raise TrtbuildError(f"{path} has no weights (*.safetensors or pytorch_model.bin)")
    check_against_config(path, model.vocab_size, model.hidden_size)
    architecture = model.arch.trtllm_architecture
    if architecture is None:
        raise TrtbuildError(f"{config_path}: model_type '{model.model_type}' has no TensorRT-LLM architecture")
    return Source(path, "hf", model, architecture, None, path if _has_tokenizer(path) else None)


# ---------------------------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """What the user asked for; `None` means "derive it from the checkpoint"."""

    precision: str | None = None
    kv_cache_dtype: str | None = None
    dtype: str = "auto"
    max_batch_size: int = 64
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    max_beam_width: int = 1
    kv_cache_type: str = "paged"
    tokens_per_block: int = 32
    use_paged_context_fmha: bool = True
    use_fp8_context_fmha: bool | None = None
    multiple_profiles: bool = False
    gemm_plugin: str = "auto"
    logits_dtype: str = "float32"
    tp_size: int | None = None
    pp_size: int | None = None
    inflight_batching: bool = True
    workers: int = 1


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Every value `trtllm-build` receives, resolved and checked."""

    precision: str
    kv_cache_dtype: str
    dtype: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    max_beam_width: int
    kv_cache_type: str
    tokens_per_block: int
    use_paged_context_fmha: bool
    use_fp8_context_fmha: bool
    multiple_profiles: bool
    gemm_plugin: str
    logits_dtype: str
    tp_size: int
    pp_size: int
    inflight_batching: bool
    workers: int

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def trtllm_build_args(self, checkpoint_dir: Path, output_dir: Path) -> tuple[str, ...]:
        def flag(on: bool) -> str:
            return "enable" if on else "disable"

        return (
            TRTLLM_BUILD,
            "--checkpoint_dir", str(checkpoint_dir),
            "--output_dir", str(output_dir),
            "--max_batch_size", str(self.max_batch_size),
            "--max_input_len", str(self.max_input_len),
            "--max_seq_len", str(self.max_seq_len),
            "--max_num_tokens", str(self.max_num_tokens),
            "--max_beam_width", str(self.max_beam_width),
            "--kv_cache_type", self.kv_cache_type,
            "--tokens_per_block", str(self.tokens_per_block),
            "--gpt_attention_plugin", "auto",
            "--remove_input_padding", "enable",
            "--context_fmha", "enable",
            "--use_paged_context_fmha", flag(self.use_paged_context_fmha),
            "--use_fp8_context_fmha", flag(self.use_fp8_context_fmha),
            "--multiple_profiles", flag(self.multiple_profiles),
            "--gemm_plugin", self.gemm_plugin,
            "--logits_dtype", self.logits_dtype,
            "--workers", str(self.workers),
        )


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def resolve(source: Source, options: EngineOptions, gpus: tuple[Gpu, ...] = ()) -> BuildConfig:
    """Fill what the checkpoint decides and refuse every impossible combination, before any work."""
    errors: list[str] = []
    model = source.model
    ckpt = source.trtllm

    precision = options.precision
    if ckpt is not None:
        if precision is not None and precision != ckpt.precision:
            errors.append(f"{source.path} is a {ckpt.precision} TensorRT-LLM checkpoint (quant_algo {ckpt.quant_algo}) but "
                          f"--precision is {precision}: omit --precision or export the checkpoint again")
        precision = ckpt.precision
    if precision is None:
        raise TrtbuildError(f"--precision is required for the Hugging Face checkpoint {source.path}",
                            hint=f"one of {', '.join(PRECISIONS)}")
    if precision not in PRECISIONS:
        raise TrtbuildError(f"--precision {precision} is not one of {', '.join(PRECISIONS)}")
    p = PRECISIONS[precision]

    kv_dtype = options.kv_cache_dtype
    if ckpt is not None:
        if kv_dtype is not None and kv_dtype != ckpt.kv_cache_dtype:
            errors.append(f"{source.path} was exported with a {ckpt.kv_cache_dtype} KV cache (kv_cache_quant_algo "
                          f"{ckpt.kv_cache_quant_algo}) but --kv-cache-dtype is {kv_dtype}: the KV-cache format is fixed at export")
        kv_dtype = ckpt.kv_cache_dtype
    kv_dtype = kv_dtype or "auto"
    if kv_dtype not in KV_CACHE_DTYPES:
        errors.append(f"--kv-cache-dtype {kv_dtype} is not one of {', '.join(KV_CACHE_DTYPES)}")

    if options.dtype not in ACTIVATION_DTYPES:
        errors.append(f"--dtype {options.dtype} is not one of {', '.join(ACTIVATION_DTYPES)}")
    if ckpt is not None:
        dtype = ckpt.dtype
        if options.dtype not in ("auto", dtype):
            errors.append(f"{source.path} holds {dtype} weights; --dtype {options.dtype} would need a new export")
    elif p.dtype is not None:
        dtype = p.dtype
        if options.dtype not in ("auto", dtype):
            errors.append(f"--precision {precision} means {dtype}; --dtype {options.dtype} contradicts it (use the other 16-bit precision)")
    else:
        dtype = options.dtype if options.dtype != "auto" else (model.dtype if model.dtype in ("float16", "bfloat16") else "float16")

    supported = ARCHITECTURE_PRECISIONS.get(source.architecture, ("fp16", "bf16"))
    if precision not in supported:
        errors.append(f"TensorRT-LLM cannot build {source.architecture} ({model.model_type}) at {precision}: "
                      f"supported precisions are {', '.join(supported)}")

    tp = options.tp_size
    pp = options.pp_size
    if ckpt is not None:
        if (tp or ckpt.mapping.tp_size, pp or ckpt.mapping.pp_size) != (ckpt.mapping.tp_size, ckpt.mapping.pp_size):
            errors.append(f"{source.path}/config.json mapping has tp_size {ckpt.mapping.tp_size} x pp_size {ckpt.mapping.pp_size} "
                          f"(rank0..rank{ckpt.mapping.world_size - 1}.safetensors) but --tp-size {tp} --pp-size {pp} was asked: "
                          f"ranks are fixed at export")
        tp, pp = ckpt.mapping.tp_size, ckpt.mapping.pp_size
    tp, pp = tp or 1, pp or 1
    if tp < 1 or pp < 1:
        errors.append(f"--tp-size and --pp-size must be >= 1, got {tp} and {pp}")
    else:
        if model.num_heads % tp:
            errors.append(f"--tp-size {tp} does not divide num_attention_heads {model.num_heads}")
        kv = model.num_kv_heads
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            errors.append(f"--tp-size {tp} and num_key_value_heads {kv}: one must divide the other")
        if pp > model.num_layers:
            errors.append(f"--pp-size {pp} exceeds the {model.num_layers} layers")

    max_seq_len = options.max_seq_len or min(2048, model.max_position_embeddings)
    max_input_len = options.max_input_len or min(1024, max(1, max_seq_len // 2))
    for name, value in (("max_batch_size", options.max_batch_size), ("max_input_len", max_input_len),
                        ("max_seq_len", max_seq_len), ("max_beam_width", options.max_beam_width),
                        ("workers", options.workers)):
        if value < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if max_input_len >= max_seq_len:
        errors.append(f"--max-input-len {max_input_len} must be smaller than --max-seq-len {max_seq_len} "
                      f"(max_seq_len counts prompt and generated tokens)")
    if max_seq_len > model.max_position_embeddings:
        errors.append(f"--max-seq-len {max_seq_len} exceeds the model's max_position_embeddings {model.max_position_embeddings}")
    max_num_tokens = options.max_num_tokens or max(max_input_len, min(8192, options.max_batch_size * max_seq_len))
    if max_num_tokens < 1:
        errors.append(f"--max-num-tokens must be >= 1, got {max_num_tokens}")
    if options.workers > tp * pp:
        errors.append(f"--workers {options.workers} exceeds the {tp * pp} ranks to build")

    if options.kv_cache_type not in KV_CACHE_TYPES:
        errors.append(f"--kv-cache-type {options.kv_cache_type} is not one of {', '.join(KV_CACHE_TYPES)}")
    elif options.kv_cache_type != "paged":
        if options.inflight_batching:
            errors.append(f"in-flight batching needs a paged KV cache: --kv-cache-type {options.kv_cache_type} "
                          f"cannot serve gpt_model_type inflight_fused_batching (use paged, or --no-inflight-batching)")
        if options.use_paged_context_fmha:
            errors.append(f"--use-paged-context-fmha needs --kv-cache-type paged, not {options.kv_cache_type}")
    if not _power_of_two(options.tokens_per_block):
        errors.append(f"--tokens-per-block must be a power of two, got {options.tokens_per_block}")
    if max_num_tokens < max_input_len and not options.use_paged_context_fmha:
        errors.append(f"--max-num-tokens {max_num_tokens} < --max-input-len {max_input_len} needs chunked context, "
                      f"which needs --use-paged-context-fmha")

    fp8_fmha = options.use_fp8_context_fmha
    if fp8_fmha is None:
        fp8_fmha = precision == "fp8" and (kv_dtype == "fp8" or not options.use_paged_context_fmha) and all(
            g.capability >= FP8_FMHA_CAPABILITY for g in gpus) and bool(gpus)
    elif fp8_fmha:
        if precision != "fp8":
            errors.append(f"--use-fp8-context-fmha needs --precision fp8, not {precision}")
        elif options.use_paged_context_fmha and kv_dtype != "fp8":
            errors.append("--use-fp8-context-fmha with --use-paged-context-fmha needs --kv-cache-dtype fp8")

    if options.gemm_plugin not in GEMM_PLUGINS:
        errors.append(f"--gemm-plugin {options.gemm_plugin} is not one of {', '.join(GEMM_PLUGINS)}")
    elif options.gemm_plugin == "fp8" and precision != "fp8":
        errors.append(f"--gemm-plugin fp8 needs --precision fp8, not {precision}")
    elif options.gemm_plugin in ("float16", "bfloat16") and options.gemm_plugin != dtype:
        errors.append(f"--gemm-plugin {options.gemm_plugin} with {dtype} activations: use --gemm-plugin auto")
    if options.logits_dtype not in LOGITS_DTYPES:
        errors.append(f"--logits-dtype {options.logits_dtype} is not one of {', '.join(LOGITS_DTYPES)}")

    needs = [(p.min_capability, f"--precision {precision}")]
    if kv_dtype == "fp8":
        needs.append((FP8_CAPABILITY, "--kv-cache-dtype fp8"))
    if fp8_fmha:
        needs.append((FP8_FMHA_CAPABILITY, "--use-fp8-context-fmha"))
    for index, gpu in enumerate(gpus):
        for capability, what in needs:
            if gpu.capability < capability:
                errors.append(f"{what} needs SM{capability[0]}{capability[1]} or newer but GPU {index} ({gpu.name}) is "
                              f"{gpu.sm}: choose another precision or build on a newer GPU")

    if errors:
        raise TrtbuildError(errors[0] if len(errors) == 1 else f"{len(errors)} problems: " + "; ".join(errors))
    return BuildConfig(
        precision=precision, kv_cache_dtype=kv_dtype, dtype=dtype, max_batch_size=options.max_batch_size,
        max_input_len=max_input_len, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens,
        max_beam_width=options.max_beam_width, kv_cache_type=options.kv_cache_type,
        tokens_per_block=options.tokens_per_block, use_paged_context_fmha=options.use_paged_context_fmha,
        use_fp8_context_fmha=fp8_fmha, multiple_profiles=options.multiple_profiles, gemm_plugin=options.gemm_plugin,
        logits_dtype=options.logits_dtype, tp_size=tp, pp_size=pp, inflight_batching=options.inflight_batching,
        workers=options.workers,
    )


# ----------------------------------------------------------------------------------------- runners
@dataclasses.dataclass(frozen=True)
class Runner:
    """Where trtllm-build runs: this machine, or the pinned container with paths mounted 1:1."""

    kind: str  # "local" or "docker"
    image: str | None = None

    def command(self, argv: tuple[str, ...], *, mounts: dict[Path, Path], workdir: Path, readonly: tuple[Path, ...] = ()) -> tuple[str, ...]:
        """`mounts` maps host paths to the paths the command sees; locally they must be the same."""
        if self.kind == "local":
            return argv
        docker = ["docker", "run", "--rm", "--gpus", "all", "--ipc=host",
                  "--ulimit", "memlock=-1", "--ulimit", "stack=67108864",
                  "--user", f"{os.getuid()}:{os.getgid()}", "-e", "HOME=/tmp", "-e", "HF_HUB_OFFLINE=1"]
        for host, inside in mounts.items():
            docker += ["-v", f"{host}:{inside}" + (":ro" if host in readonly else "")]
        return (*docker, "-w", str(workdir), str(self.image), *argv)

    def check(self) -> None:
        """The runner can build: trtllm-build on PATH, or a reachable Docker daemon with NVIDIA's runtime."""
        if self.kind == "local":
            if not shutil.which(TRTLLM_BUILD):
                raise TrtbuildError(f"{TRTLLM_BUILD} is not on PATH", hint="use --runner docker to build in the pinned container")
            return
        if not shutil.which("docker"):
            raise TrtbuildError("docker is not on PATH",
                                hint="install Docker with the NVIDIA container toolkit, or run where trtllm-build is installed")
        try:
            info = subprocess.run(["docker", "info", "--format", "{{json .Runtimes}}"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            raise TrtbuildError("the Docker daemon did not answer `docker info` within 30 s",
                                hint="check that dockerd is running (systemctl status docker)") from None
        if info.returncode != 0:
            why = (info.stderr or info.stdout).strip().splitlines()
            raise TrtbuildError(f"the Docker daemon is not reachable ({why[-1] if why else f'docker info exit {info.returncode}'})",
                                hint="start it (sudo systemctl start docker) or add your user to the docker group; "
                                     "or run where trtllm-build is installed (--runner local)")
        if "nvidia" not in info.stdout:
            raise TrtbuildError("Docker has no NVIDIA runtime, so the build container would see no GPU",
                                hint="install the NVIDIA Container Toolkit (nvidia-ctk runtime configure --runtime=docker) "
                                     "and restart Docker")

    def versions_command(self) -> tuple[str, ...]:
        probe = ("import importlib.metadata as m, json\n"
                 "v = {}\n"
                 "for p in ('tensorrt_llm', 'tensorrt', 'tensorrt_cu12', 'tensorrt_cu13', 'torch', 'nvidia-modelopt'):\n"
                 "    try: v[p] = m.version(p)\n"
                 "    except m.PackageNotFoundError: pass\n"
                 "print(json.dumps(v))")
        python = "python3"
        if self.kind == "local":
            python = _script_interpreter(shutil.which(TRTLLM_BUILD)) or python
            return (python, "-c", probe)
        return ("docker", "run", "--rm", str(self.image), python, "-c", probe)


def _script_interpreter(script: str | None) -> str | None:
    """The Python a console script runs under (its shebang), so versions come from the same place."""
    if not script:
        return None
    try:
        first = Path(script).read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    return first[2:].strip() if first.startswith("#!") and "python" in first else None


def choose_runner(kind: str = "auto", image: str | None = None) -> Runner:
    if kind not in RUNNERS:
        raise TrtbuildError(f"--runner {kind} is not one of {', '.join(RUNNERS)}")
    if kind == "local" and image:
        raise TrtbuildError("--image only applies to --runner docker (or auto)", hint="drop --image or use --runner docker")
    if kind == "auto":
        kind = "docker" if image else ("local" if shutil.which(TRTLLM_BUILD) else "docker")
    return Runner(kind, (image or TRITON_TRTLLM_IMAGE) if kind == "docker" else None)


# ------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class ConvertStep:
    """Hugging Face checkpoint -> TensorRT-LLM checkpoint with ModelOpt, on this machine."""

    source: Path
    precision: str
    kv_cache_dtype: str
    dtype: str
    tp_size: int
    pp_size: int

    def describe(self, output: Path) -> str:
        return (f"trtbuild.build.quantize: {self.source} -> {output} (precision {self.precision}, KV cache {self.kv_cache_dtype}, "
                f"dtype {self.dtype}, tp {self.tp_size}, pp {self.pp_size})")


Converter = Callable[[ConvertStep, Path], None]

CHECKPOINT_SUBDIR = ".trtllm-checkpoint"  # inside the staging dir while building, removed after
WORK_SUBDIR = ".work"  # trtllm-build's working directory (timing cache), removed after


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    source: Source
    config: BuildConfig
    out: Path
    runner: Runner
    tokenizer: Path | None
    gpus: tuple[Gpu, ...] = ()

    @property
    def convert(self) -> ConvertStep | None:
        if self.source.format != "hf":
            return None
        c = self.config
        return ConvertStep(self.source.path, c.precision, c.kv_cache_dtype, c.dtype, c.tp_size, c.pp_size)

    @property
    def inputs(self) -> tuple[Path | None, ...]:
        """What the build reads, which its --out must never touch."""
        return (self.source.path, self.tokenizer, getattr(self.config, "calib_data", None))

    def commands_for(self, staging: Path) -> tuple[Path, tuple[str, ...]]:
        """(where the checkpoint is written, the build command) with outputs going to `staging`."""
        docker = self.runner.kind == "docker"
        seen_out = self.out if docker else staging  # the container sees the staging dir at the final path
        host_ckpt = staging / CHECKPOINT_SUBDIR if self.convert else self.source.path
        seen_ckpt = seen_out / CHECKPOINT_SUBDIR if self.convert else self.source.path
        argv = self.config.trtllm_build_args(seen_ckpt, seen_out)
        mounts = {staging: seen_out}
        readonly: tuple[Path, ...] = ()
        if not self.convert:
            mounts[self.source.path] = self.source.path
            readonly = (self.source.path,)
        return host_ckpt, self.runner.command(argv, mounts=mounts, workdir=seen_out / WORK_SUBDIR, readonly=readonly)

    def describe(self) -> list[str]:
        """The steps, as a reader would run them (outputs shown at their final place)."""
        ckpt, build = self.commands_for(self.out)
        steps = []
        if self.convert:
            steps.append(self.convert.describe(ckpt))
        steps.append(shlex.join(build))
        steps.append(f"write {self.out / ENGINE_MANIFEST}" + (f", copy the tokenizer from {self.tokenizer}" if self.tokenizer else ""))
        return steps

    def to_json(self) -> dict[str, Any]:
        return {
            "source": str(self.source.path),
            "source_format": self.source.format,
            "architecture": self.source.architecture,
            "out": str(self.out),
            "runner": self.runner.kind,
            "image": self.runner.image,
            "build_config": dataclasses.asdict(self.config),
            "gpus": [dataclasses.asdict(g) for g in self.gpus],
            "steps": self.describe(),
        }


def plan_engine(checkpoint: Path, options: EngineOptions, out: Path, *, runner: Runner | None = None,
                tokenizer_dir: Path | None = None, gpus: tuple[Gpu, ...] | None = None) -> EnginePlan:
    """Everything checked, nothing run: what `build_engine` will do."""
    source = read_source(checkpoint)
    gpus = detect_gpus() if gpus is None else gpus
    config = resolve(source, options, gpus)
    tokenizer = Path(tokenizer_dir).absolute() if tokenizer_dir else source.tokenizer
    if tokenizer_dir:
        check_tokenizer(tokenizer)
    plan = EnginePlan(source, config, Path(out).absolute(), runner or choose_runner(), tokenizer, gpus)
    if plan.convert:
        check_conversion(plan.convert, plan.out / CHECKPOINT_SUBDIR)
    return plan


def check_conversion(step: ConvertStep, output: Path) -> None:
    """trtbuild.build.quantize's own up-front checks (no weights loaded), so a refused export fails the plan."""
    try:
        from trtbuild.build import quantize
    except ImportError:
        return  # build_engine reports it
    quantize.plan(step.source, output, quantize.QuantizeOptions(
        precision=step.precision, kv_cache_dtype=step.kv_cache_dtype, dtype=step.dtype,
        tp_size=step.tp_size, pp_size=step.pp_size, format="trtllm"))


# ------------------------------------------------------------------------------------------ build
@dataclasses.dataclass
class EngineManifest:
    """What built this engine, recorded next to it as trtbuild-engine.json."""

    trtbuild_version: str
    created: str
    source: str
    source_format: str
    architecture: str
    precision: str
    kv_cache_dtype: str
    dtype: str
    tp_size: int
    pp_size: int
    runner: str
    image: str | None
    commands: list[list[str]]
    versions: dict[str, str]
    gpus: list[dict[str, Any]]
    build_config: dict[str, Any]  # as trtllm-build wrote it into config.json
    requested: dict[str, Any]  # the resolved BuildConfig trtbuild asked for
    tokenizer_dir: str | None  # relative to the engine dir when copied into it

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def write(self, directory: Path) -> Path:
        path = Path(directory) / ENGINE_MANIFEST
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> "EngineManifest | None":
        path = Path(directory) / ENGINE_MANIFEST
        if not path.is_file():
            return None
        fields = [f.name for f in dataclasses.fields(cls)]
        try:
            data = json.loads(path.read_text())
            return cls(**{k: v for k, v in data.items() if k in fields})
        except (json.JSONDecodeError, TypeError, AttributeError):
            raise TrtbuildError(f"{path} is not a trtbuild engine manifest (fields: {', '.join(fields)})",
                                hint="delete it, or rebuild the engine with `trtbuild engine`") from None


def _run(argv: tuple[str, ...], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), cwd=cwd, check=True, text=True, stdout=None, stderr=None)
    except FileNotFoundError:
        raise TrtbuildError(f"cannot run {argv[0]}: not found on PATH", hint="install it, or choose another --runner") from None
    except subprocess.CalledProcessError as e:
        raise TrtbuildError(f"{argv[0]} failed with exit code {e.returncode}: {shlex.join(argv)}") from None


def _probe_versions(runner: Runner) -> dict[str, str]:
    try:
        out = subprocess.run(list(runner.versions_command()), capture_output=True, text=True, timeout=600, check=True).stdout
        return {k: str(v) for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as e:
        return {"error": f"version probe failed: {e}"}


def _image_digest(image: str) -> str | None:
    try:
        out = subprocess.run(["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", image],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        digests = json.loads(out)
        return digests[0] if digests else None
    except (subprocess.SubprocessError, OSError, ValueError):
        return None


def copy_tokenizer(source: Path, target: Path) -> None:
    """Copy the tokenizer files (and a Hugging Face config.json) so the engine dir is self-contained."""
    target.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        if item.is_file() and any(item.match(g) for g in TOKENIZER_GLOBS):
            shutil.copy2(item, target / item.name)
    config = source / "config.json"
    if config.is_file() and "model_type" in json.loads(config.read_text()):  # AutoTokenizer may need it
        shutil.copy2(config, target / "config.json")


def default_converter(step: ConvertStep, output: Path) -> None:
    """Export (and quantize) with ModelOpt through trtbuild.build.quantize."""
    try:
        from trtbuild.build import quantize
    except ImportError:
        raise TrtbuildError("trtbuild.build.quantize is not available, so a Hugging Face checkpoint cannot be converted",
                            hint="export a TensorRT-LLM checkpoint first and pass that directory") from None
    quantize.quantize_for_engine(step, output)


def build_engine(plan: EnginePlan, *, force: bool = False, converter: Converter | None = None) -> EngineManifest:
    """Run the plan; the engine directory appears only when complete."""
    check_output_dir(plan.out, force, inputs=plan.inputs)
    plan.runner.check()  # before any work: a quantization that ends in an unusable runner wastes its time
    from trtbuild import __version__

    with atomic_output_dir(plan.out, force=force, inputs=plan.inputs) as staging:
        host_ckpt, build = plan.commands_for(staging)
        commands: list[list[str]] = []
        if plan.convert:
            (converter or default_converter)(plan.convert, host_ckpt)
            commands.append(["trtbuild.build.quantize", plan.convert.describe(host_ckpt)])
        work = staging / WORK_SUBDIR
        work.mkdir()
        _run(build, cwd=work if plan.runner.kind == "local" else None)
        commands.append(list(build))
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging / CHECKPOINT_SUBDIR, ignore_errors=True)

        engine = read_engine_config(staging)
        _check_built(plan, engine, staging)
        tokenizer_rel = None
        if plan.tokenizer:
            copy_tokenizer(plan.tokenizer, staging / "tokenizer")
            tokenizer_rel = "tokenizer"
        versions = _probe_versions(plan.runner)
        versions["tensorrt_llm (config.json)"] = engine.version
        if plan.runner.image:
            digest = _image_digest(plan.runner.image)
            if digest:
                versions["image_digest"] = digest
        c = plan.config
        manifest = EngineManifest(
            trtbuild_version=__version__,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            source=str(plan.source.path), source_format=plan.source.format, architecture=plan.source.architecture,
            precision=c.precision, kv_cache_dtype=c.kv_cache_dtype, dtype=c.dtype, tp_size=c.tp_size, pp_size=c.pp_size,
            runner=plan.runner.kind, image=plan.runner.image, commands=commands, versions=versions,
            gpus=[dataclasses.asdict(g) for g in plan.gpus], build_config=engine.build_config,
            requested=dataclasses.asdict(c), tokenizer_dir=tokenizer_rel,
        )
        manifest.write(staging)
    return manifest


def _check_built(plan: EnginePlan, engine: "EngineConfig", directory: Path) -> None:
    c = plan.config
    expected = {"max_batch_size": c.max_batch_size, "max_input_len": c.max_input_len, "max_seq_len": c.max_seq_len,
                "max_beam_width": c.max_beam_width, "world_size": c.world_size}
    got = {"max_batch_size": engine.max_batch_size, "max_input_len": engine.max_input_len, "max_seq_len": engine.max_seq_len,
           "max_beam_width": engine.max_beam_width, "world_size": engine.trtllm.mapping.world_size}
    wrong = {k: (expected[k], got[k]) for k in expected if expected[k] != got[k]}
    if wrong:
        raise TrtbuildError(f"trtllm-build wrote an engine that differs from the request: {wrong} (asked, got) in {directory}/config.json")


# ------------------------------------------------------------------------------------ engine dirs
@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The engine's config.json (`version`, `pretrained_config`, `build_config`), as trtllm-build writes it."""

    path: Path
    version: str
    trtllm: TrtllmModelConfig
    build_config: dict[str, Any]
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_beam_width: int
    max_num_tokens: int | None
    paged_kv_cache: bool
    tokens_per_block: int
    use_paged_context_fmha: bool
    gather_context_logits: bool
    gather_generation_logits: bool

    @property
    def logits_datatype(self) -> str:
        return {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}.get(self.trtllm.logits_dtype, "TYPE_FP32")


def read_engine_config(engine_dir: Path) -> EngineConfig:
    engine_dir = Path(engine_dir).absolute()
    path = engine_dir / "config.json"
    data = read_json_file(path, missing=f"{engine_dir} has no config.json", hint="point at a directory written by trtllm-build")
    if "build_config" not in data or "pretrained_config" not in data:
        what = "a TensorRT-LLM checkpoint" if "architecture" in data else "a Hugging Face checkpoint" if "model_type" in data else "not an engine"
        raise TrtbuildError(f"{path} has no build_config/pretrained_config: {engine_dir} is {what}",
                            hint="build an engine first with `trtbuild engine`")
    trtllm = TrtllmModelConfig.parse(data["pretrained_config"], path)
    build = data["build_config"]
    plugin = build.get("plugin_config") or {}

    def need(key: str) -> int:
        if build.get(key) is None:
            raise TrtbuildError(f"{path}: build_config.{key} is missing")
        return int(build[key])

    kv_type = str(build.get("kv_cache_type") or "").lower()
    paged = kv_type == "paged" or (not kv_type and bool(plugin.get("paged_kv_cache")))
    missing = [f"rank{r}.engine" for r in range(trtllm.mapping.world_size) if not (engine_dir / f"rank{r}.engine").is_file()]
    if missing:
        raise TrtbuildError(f"{engine_dir}: world size {trtllm.mapping.world_size} in config.json but {', '.join(missing)} is missing")
    return EngineConfig(
        path=engine_dir,
        version=str(data.get("version", "unknown")),
        trtllm=trtllm,
        build_config=build,
        max_batch_size=need("max_batch_size"),
        max_input_len=need("max_input_len"),
        max_seq_len=need("max_seq_len"),
        max_beam_width=int(build.get("max_beam_width") or 1),
        max_num_tokens=build.get("max_num_tokens"),
        paged_kv_cache=paged,
        tokens_per_block=int(plugin.get("tokens_per_block") or 32),
        use_paged_context_fmha=bool(plugin.get("use_paged_context_fmha", False)),
        gather_context_logits=bool(build.get("gather_context_logits", False)),
        gather_generation_logits=bool(build.get("gather_generation_logits", False)),
    )


def engine_tokenizer(engine: EngineConfig, manifest: EngineManifest | None) -> Path | None:
    """The tokenizer that belongs to the engine: copied next to it, or where the manifest says."""
    candidates = []
    if manifest and manifest.tokenizer_dir:
        candidates.append(engine.path / manifest.tokenizer_dir)
    candidates.append(engine.path / "tokenizer")
    if manifest:
        candidates.append(Path(manifest.source))
    return next((c for c in candidates if c.is_dir() and _has_tokenizer(c)), None)


# Values the engine fixed: a command-line value may be lower (Triton then sends less) but never higher.
ENGINE_LIMITS = ("max_batch_size", "max_input_len", "max_output_len", "max_beam_width")


def spec_from_engine(engine_dir: Path, *, tokenizer_dir: Path | None = None, requested: dict[str, Any] | None = None,
                     kv_cache_free_gpu_mem_fraction: float = 0.9, enable_kv_cache_reuse: bool | None = None,
                     batch_scheduler_policy: str = "guaranteed_no_evict",
                     exclude_input_in_output: bool = True) -> BuildSpec:
    """A BuildSpec whose every engine-fixed value is read from the engine, so the repository cannot disagree."""
    engine = read_engine_config(engine_dir)
    manifest = EngineManifest.read(engine.path)
    if not engine.paged_kv_cache:
        raise TrtbuildError(f"{engine.path}/config.json: the engine has no paged KV cache, so the tensorrt_llm model "
                            f"cannot run it with in-flight batching", hint="rebuild with --kv-cache-type paged")
    tokenizer = Path(tokenizer_dir).absolute() if tokenizer_dir else engine_tokenizer(engine, manifest)
    if tokenizer is None:
        raise TrtbuildError(f"no tokenizer found for the engine {engine.path}", hint="pass --tokenizer-dir (the Hugging Face checkpoint)")
    check_tokenizer(tokenizer)
    engine_values = {
        "max_batch_size": engine.max_batch_size,
        "max_input_len": engine.max_input_len,
        "max_output_len": engine.max_seq_len - engine.max_input_len,
        "max_beam_width": engine.max_beam_width,
    }
    values = dict(engine_values)
    for key, value in (requested or {}).items():
        if key in ("kv_cache_page_size",):
            if value != engine.tokens_per_block:
                raise TrtbuildError(f"--kv-cache-page-size {value} differs from the engine's tokens_per_block "
                                    f"{engine.tokens_per_block} ({engine.path}/config.json)", hint="omit it; the engine fixes it")
            continue
        if key in ("dtype",):
            wanted = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}.get(value, value)
            if value != "auto" and wanted != engine.trtllm.dtype:
                raise TrtbuildError(f"--dtype {value} differs from the engine's dtype {engine.trtllm.dtype}", hint="omit it; the engine fixes it")
            continue
        if key not in ENGINE_LIMITS:
            raise TrtbuildError(f"--{key.replace('_', '-')} cannot be set for a TensorRT-LLM engine", hint="the engine fixes it")
        if value > engine_values[key]:
            raise TrtbuildError(
                f"--{key.replace('_', '-')} {value} exceeds the engine's {key} {engine_values[key]} "
                f"({engine.path}/config.json build_config)", hint="rebuild the engine with a larger value, or omit it")
        values[key] = value
    if enable_kv_cache_reuse and not engine.use_paged_context_fmha:
        raise TrtbuildError(f"KV-cache reuse needs an engine built with --use-paged-context-fmha ({engine.path}/config.json)")
    reuse = engine.use_paged_context_fmha if enable_kv_cache_reuse is None else enable_kv_cache_reuse
    chunked = engine.max_num_tokens is not None and int(engine.max_num_tokens) < values["max_input_len"]
    kv_dtype = {None: "auto", "FP8": "fp8", "INT8": "int8"}.get(engine.trtllm.kv_cache_quant_algo, "auto")
    return BuildSpec(
        checkpoint=engine.path,
        model=engine.trtllm.model,
        runtime="tensorrtllm",
        dtype=engine.trtllm.model.dtype,
        max_batch_size=values["max_batch_size"],
        max_input_len=values["max_input_len"],
        max_output_len=values["max_output_len"],
        max_beam_width=values["max_beam_width"],
        device="cuda",
        tokenizer_dir=tokenizer,
        kv_cache=KVCacheSpec(page_size=engine.tokens_per_block, free_gpu_mem_fraction=kv_cache_free_gpu_mem_fraction,
                             enable_reuse=reuse, dtype=kv_dtype),
        exclude_input_in_output=exclude_input_in_output,
        world_size=engine.trtllm.mapping.world_size,
        engine_dir=engine.path,
        extra={
            "logits_datatype": engine.logits_datatype,
            "batch_scheduler_policy": batch_scheduler_policy,
            "enable_chunked_context": chunked,
            "tp_size": engine.trtllm.mapping.tp_size,
            "pp_size": engine.trtllm.mapping.pp_size,
            "engine_version": engine.version,
            "engine_image": manifest.image if manifest else None,
            "precision": engine.trtllm.precision,
        },
    )
