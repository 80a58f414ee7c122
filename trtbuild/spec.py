"""The build spec: one typed description of what is built and served.

Every generated file (config.pbtxt, model.yaml, trtllm-build flags, docker-compose.yml, Kubernetes
manifests) is rendered from a `BuildSpec`, so the engine, the repository and the deployment cannot
disagree about a value.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from trtbuild.errors import TrtbuildError
from trtbuild_runtime.config import ENGINE_DEFAULTS, QUANTIZATIONS, SPECULATIVE_MODES
from trtbuild.repository.serving import ServingPolicy

Runtime = Literal["transformers", "tensorrtllm", "llmapi", "onnxruntime", "onnxruntime-python", "tensorrt"]
RUNTIMES: tuple[str, ...] = ("transformers", "tensorrtllm", "llmapi", "onnxruntime", "onnxruntime-python", "tensorrt")
LLM_RUNTIMES = ("transformers", "tensorrtllm", "llmapi")
DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one Hugging Face `model_type` maps onto the tools that convert it."""

    model_type: str
    hf_class: str
    trtllm_architecture: str | None  # TensorRT-LLM checkpoint `architecture`
    modelopt_decoder: str | None  # modelopt export `decoder_type`


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "LlamaForCausalLM", "LlamaForCausalLM", "llama"),
        Architecture("mistral", "MistralForCausalLM", "LlamaForCausalLM", "llama"),
        Architecture("qwen2", "Qwen2ForCausalLM", "Qwen2ForCausalLM", "qwen"),
        Architecture("qwen3", "Qwen3ForCausalLM", "Qwen3ForCausalLM", "qwen"),
        Architecture("phi3", "Phi3ForCausalLM", "Phi3ForCausalLM", "phi3"),
        Architecture("gemma", "GemmaForCausalLM", "GemmaForCausalLM", "gemma"),
        Architecture("gemma2", "Gemma2ForCausalLM", "Gemma2ForCausalLM", "gemma2"),
    )
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the checkpoint's config.json says about the model."""

    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    dtype: str
    hidden_act: str = "silu"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.model_type]

    @property
    def num_parameters(self) -> int:
        """Parameters of a Llama-style decoder, counted from the shapes (no weights loaded)."""
        h, i, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = h * self.num_heads * hd + 2 * h * self.num_kv_heads * hd + self.num_heads * hd * h
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        embed = v * h
        head = 0 if self.tie_word_embeddings else v * h
        return self.num_layers * per_layer + embed + head + h

    def kv_bytes_per_token(self, kv_bytes_per_value: float = 2.0) -> float:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * kv_bytes_per_value

    @classmethod
    def from_config(cls, config: dict[str, Any], source: Path) -> "ModelSpec":
        model_type = config.get("model_type")
        if not model_type:
            raise TrtbuildError(f"{source}: field 'model_type' is missing", hint="is this a Hugging Face config.json?")
        if model_type not in ARCHITECTURES:
            raise TrtbuildError(
                f"{source}: model_type '{model_type}' is not supported",
                hint=f"supported: {', '.join(sorted(ARCHITECTURES))}",
            )
        text = config.get("text_config") or config

        def need(key: str, *alternatives: str) -> Any:
            for k in (key, *alternatives):
                if text.get(k) is not None:
                    return text[k]
            raise TrtbuildError(f"{source}: field '{key}' is missing", hint="the checkpoint's config.json is incomplete")

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        rope = text.get("rope_parameters") or {}
        rope_theta = text.get("rope_theta") or rope.get("rope_theta") or 10000.0
        rope_type = rope.get("rope_type") or (text.get("rope_scaling") or {}).get("rope_type")
        rope_scaling = text.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} if rope_type not in (None, "default") else None)
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
        return cls(
            model_type=model_type,
            architecture=(config.get("architectures") or [ARCHITECTURES[model_type].hf_class])[0],
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            intermediate_size=int(need("intermediate_size")),
            max_position_embeddings=int(need("max_position_embeddings")),
            dtype=dtype if dtype in DTYPES else "float32",
            hidden_act=str(text.get("hidden_act", "silu")),
            norm_eps=float(text.get("rms_norm_eps") or text.get("layer_norm_eps") or 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            bos_token_id=text.get("bos_token_id"),
            eos_token_id=text.get("eos_token_id"),
        )


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    """Paged KV cache: the block size, and how much memory the cache may take."""

    page_size: int = ENGINE_DEFAULTS["kv_cache_page_size"]
    free_gpu_mem_fraction: float = ENGINE_DEFAULTS["kv_cache_free_gpu_mem_fraction"]
    num_blocks: int | None = None  # None: enough for max_batch_size full sequences
    enable_reuse: bool = False
    dtype: str = "auto"  # auto, fp8, int8

    def blocks_for(self, max_batch_size: int, max_seq_len: int) -> int:
        if self.num_blocks:
            return self.num_blocks
        per_seq = -(-max_seq_len // self.page_size)
        return max_batch_size * per_seq


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """Everything a build and its Triton repository need, validated once."""

    checkpoint: Path
    model: ModelSpec
    runtime: str = "transformers"
    dtype: str = "auto"
    max_batch_size: int = 8
    max_input_len: int = 512
    max_output_len: int = 256
    max_beam_width: int = 1
    device: str = "auto"
    tokenizer_dir: Path | None = None
    kv_cache: KVCacheSpec = dataclasses.field(default_factory=KVCacheSpec)
    preprocessing_instances: int = 1
    postprocessing_instances: int = 1
    exclude_input_in_output: bool = True
    add_special_tokens: bool = True
    skip_special_tokens: bool = True
    world_size: int = 1
    quantization: str = "none"  # transformers runtime: "fp8" runs the Linear layers on FP8 tensor cores (W8A8)
    engine_dir: Path | None = None
    # A Python environment for the text (BYTES) models: Triton 2.51's Python backend mis-reads
    # numpy>=2 output buffers, so where the LLM's environment has numpy 2 the tokenizer models
    # run in a numpy<2 environment (EXECUTION_ENV_PATH).
    text_env: Path | None = None
    serving: ServingPolicy = ServingPolicy()  # queues, priorities, batching, cache, rate limiter (trtbuild.repository.serving)
    # transformers runtime: which engine runs the LLM step. auto: trtbuild_runtime where it supports
    # the checkpoint (the Llama family, unquantized), transformers' continuous batching otherwise.
    llm_engine: str = "auto"
    max_num_tokens: int = ENGINE_DEFAULTS["max_num_tokens"]  # token budget of one engine step; longer prefills are chunked
    # streamed responses: tokens produced faster than they are sent go out together, at most every
    # stream_interval_ms and at most stream_max_tokens per response (0: no bound; 1: one token each)
    stream_interval_ms: float = 0.0
    stream_max_tokens: int = 0
    # speculative decoding (trtbuild engine): "ngram" drafts from the prompt (prompt lookup), up to
    # max_draft_len tokens per step, matching suffixes of up to max_matching_ngram_size tokens
    speculative_decoding_mode: str = "none"
    max_draft_len: int = ENGINE_DEFAULTS["max_draft_len"]
    max_matching_ngram_size: int = ENGINE_DEFAULTS["max_matching_ngram_size"]
    # the LLM step's health: an engine with requests in flight and no progress for this long is wedged
    engine_stall_timeout_s: float = 60.0
    # the GPU the build is for, when it is not the one visible here: repo checks the build fits it
    gpu_mem_gib: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def max_seq_len(self) -> int:
        return self.max_input_len + self.max_output_len

    @property
    def torch_dtype(self) -> str:
        return self.model.dtype if self.dtype == "auto" else self.dtype

    @property
    def tokenizer(self) -> Path:
        return self.tokenizer_dir or self.checkpoint

    @property
    def names(self) -> "ModelNames":
        return ModelNames.for_runtime(self.runtime)

    def validate(self) -> None:
        def positive(name: str, value: int) -> None:
            if not isinstance(value, int) or value < 1:
                raise TrtbuildError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")

        if self.runtime not in RUNTIMES:
            raise TrtbuildError(f"unknown runtime '{self.runtime}'", hint=f"choose one of {', '.join(RUNTIMES)}")
        for name in ("max_batch_size", "max_input_len", "max_output_len", "max_beam_width", "world_size",
                     "preprocessing_instances", "postprocessing_instances"):
            positive(name, getattr(self, name))
        if self.dtype not in ("auto", *DTYPES):
            raise TrtbuildError(f"--dtype {self.dtype} is not one of auto, {', '.join(DTYPES)}")
        if self.max_seq_len > self.model.max_position_embeddings:
            raise TrtbuildError(
                f"--max-input-len + --max-output-len = {self.max_seq_len} exceeds the model's "
                f"max_position_embeddings ({self.model.max_position_embeddings}) in {self.checkpoint}/config.json",
                hint="lower one of them",
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrtbuildError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.runtime == "transformers" and self.max_beam_width != 1:
            raise TrtbuildError("the transformers runtime does not support beam search", hint="use --max-beam-width 1")
        if self.runtime == "transformers" and self.quantization not in QUANTIZATIONS:
            raise TrtbuildError(f"--quantization {self.quantization} is not available on the transformers runtime",
                                hint=f"use {', '.join(QUANTIZATIONS)} here; other formats go through `trtbuild engine`")
        if not 0.0 < self.kv_cache.free_gpu_mem_fraction <= 1.0:
            raise TrtbuildError("--kv-cache-free-gpu-mem-fraction must be in (0, 1]")
        positive("kv_cache_page_size", self.kv_cache.page_size)
        positive("max_num_tokens", self.max_num_tokens)
        if self.gpu_mem_gib is not None and not self.gpu_mem_gib > 0:
            raise TrtbuildError(f"--gpu-mem-gib must be > 0, got {self.gpu_mem_gib}")
        if not self.engine_stall_timeout_s > 0:
            raise TrtbuildError(f"--engine-stall-timeout-s must be > 0, got {self.engine_stall_timeout_s}")
        if self.stream_interval_ms < 0 or self.stream_max_tokens < 0:
            raise TrtbuildError("--stream-interval-ms and --stream-max-tokens must be >= 0 (0: no bound)")
        if self.speculative_decoding_mode not in SPECULATIVE_MODES:
            raise TrtbuildError(f"--speculative-decoding-mode {self.speculative_decoding_mode} is not one of "
                                f"{', '.join(SPECULATIVE_MODES)}")
        if self.speculative_decoding_mode != "none" and not 1 <= self.max_draft_len <= 16:
            raise TrtbuildError(f"--max-draft-len must be in [1, 16], got {self.max_draft_len}")
        if self.speculative_decoding_mode != "none" and self.max_matching_ngram_size < 1:
            raise TrtbuildError(f"--max-matching-ngram-size must be >= 1, got {self.max_matching_ngram_size}")
        if self.runtime == "transformers" and self.kv_cache.dtype not in ("auto", "fp8"):
            raise TrtbuildError(f"--kv-cache-dtype {self.kv_cache.dtype} is not available on the transformers runtime",
                                hint="trtbuild_runtime stores FP8 (e4m3) pages: use fp8; int8 KV needs `trtbuild engine`")
        if self.llm_engine not in LLM_ENGINES:
            raise TrtbuildError(f"--llm-engine {self.llm_engine} is not one of {', '.join(LLM_ENGINES)}")
        self.serving.validate(self.max_batch_size)

    @property
    def engine_choice(self) -> "EngineChoice":
        """Which engine the transformers runtime's LLM step runs, and why (recorded in trtbuild.json)."""
        return choose_llm_engine(self)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["max_seq_len"] = self.max_seq_len
        return json.loads(json.dumps(data, default=str))


LLM_ENGINES = ("auto", "trtbuild", "transformers")


@dataclasses.dataclass(frozen=True)
class EngineChoice:
    engine: str  # trtbuild or transformers
    reason: str


def choose_llm_engine(spec: BuildSpec) -> EngineChoice:
    """trtbuild_runtime where it can run the build, else transformers' continuous batching."""
    from trtbuild_runtime.config import UnsupportedModel, check_supported

    needs = [name for name, on in (("--kv-cache-dtype fp8", spec.kv_cache.dtype == "fp8"),
                                   (f"--quantization {spec.quantization}", spec.quantization.startswith("int4")),
                                   ("--speculative-decoding-mode " + spec.speculative_decoding_mode,
                                    spec.speculative_decoding_mode != "none")) if on]
    if spec.llm_engine == "transformers":
        if needs:
            raise TrtbuildError(f"{' and '.join(needs)} need trtbuild_runtime, not transformers' continuous batching",
                                hint="use --llm-engine auto or trtbuild")
        return EngineChoice("transformers", "asked for (--llm-engine transformers)")
    why = None
    if spec.kv_cache.page_size < 16 or spec.kv_cache.page_size & (spec.kv_cache.page_size - 1):
        why = f"--kv-cache-page-size {spec.kv_cache.page_size} is not a power of two >= 16 (the attention kernel's tile)"
    else:
        try:
            check_supported(spec.checkpoint, spec.max_seq_len)
        except UnsupportedModel as e:
            why = f"trtbuild_runtime does not run {e}"
    if why is None:
        return EngineChoice("trtbuild", "the Llama family on trtbuild_runtime (paged KV, CUDA graphs, Triton kernels)")
    if spec.llm_engine == "trtbuild" or needs:
        asked = "--llm-engine trtbuild" if spec.llm_engine == "trtbuild" else " and ".join(needs)
        raise TrtbuildError(f"{asked} cannot serve {spec.checkpoint}: {why}",
                            hint="use --llm-engine auto or transformers" if not needs else f"drop {' and '.join(needs)}")
    return EngineChoice("transformers", why)


@dataclasses.dataclass(frozen=True)
class ModelNames:
    """Model names in the repository; NVIDIA's names where we serve NVIDIA's backend."""

    preprocessing: str
    llm: str
    postprocessing: str
    ensemble: str
    bls: str

    @classmethod
    def for_runtime(cls, runtime: str) -> "ModelNames":
        if runtime in ("tensorrtllm", "llmapi"):
            return cls("preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls")
        return cls("preprocessing", "llm", "postprocessing", "ensemble", "llm_bls")
