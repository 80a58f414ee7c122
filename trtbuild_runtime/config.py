"""What an engine is built with, and which checkpoints it can run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
QUANTIZATIONS = ("none", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")
SPECULATIVE_MODES = ("none", "ngram")
FP8_GEMMS = ("rowwise", "rowwise_fast_accum", "tensorwise")  # quantization.Fp8Linear's tactics


class UnsupportedModel(ValueError):
    """The checkpoint needs something this engine does not implement; the transformers runtime serves it."""


@dataclasses.dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"  # auto (the checkpoint's), float32, float16, bfloat16
    device: str = "auto"
    max_num_seqs: int = 64  # sequences in one decode step (CUDA graphs are captured up to this)
    max_num_batched_tokens: int = 8192  # token budget of one step: chunked prefill splits prompts beyond it
    max_model_len: int = 2048  # prompt + generated tokens
    page_size: int = 32  # tokens per KV block
    num_blocks: int | None = None  # None: from gpu_memory_fraction on CUDA, max_num_seqs full sequences on CPU
    gpu_memory_fraction: float = 0.9  # of the memory free after weights and warm-up, for the KV pool
    enable_prefix_caching: bool = False
    enforce_eager: bool = False  # no CUDA graphs
    seed: int = 0
    quantization: str = "none"  # weights and activations: none, fp8 (e4m3, per-channel weight, per-token activation scales)
    fp8_gemm: str = "rowwise"  # FP8 GEMM tactic: rowwise (scales in the GEMM), rowwise_fast_accum, tensorwise (an epilogue)
    kv_cache_dtype: str = "auto"  # auto (the model dtype), fp8 (e4m3 pages, one scale per layer)
    speculative: str = "none"  # none, ngram (prompt lookup)
    num_speculative_tokens: int = 4  # draft tokens verified per step (TensorRT-LLM's max_draft_len)
    prompt_lookup_max: int = 3  # longest suffix n-gram prompt lookup matches

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "page_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.page_size & (self.page_size - 1) or self.page_size < 16:
            raise ValueError(f"page_size must be a power of two >= 16 (the attention kernel's tile), got {self.page_size}")
        for name, value, allowed in (("quantization", self.quantization, QUANTIZATIONS),
                                     ("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES),
                                     ("speculative", self.speculative, SPECULATIVE_MODES),
                                     ("fp8_gemm", self.fp8_gemm, FP8_GEMMS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.speculative != "none" and not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        # a whole prompt of max_model_len must fit in one step's budget or be chunked: both work,
        # but a step must at least hold one token per running sequence
        self.max_num_batched_tokens = max(self.max_num_batched_tokens, self.max_num_seqs)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)


def read_hf_config(model: str | Path) -> dict:
    path = Path(model) / "config.json"
    return json.loads(path.read_text())


def checkpoint_quantization(config: dict) -> str:
    """'fp8' for a ModelOpt FP8 checkpoint (`trtbuild quantize --precision fp8 --format hf`), else 'none'."""
    q = config.get("quantization_config")
    if not q:
        return "none"
    method, algo = q.get("quant_method", "?"), q.get("quant_algo")
    if method == "modelopt" and algo == "FP8":
        return "fp8"
    raise UnsupportedModel(f"a pre-quantized checkpoint (quantization_config {method} {algo or ''}; the engine runs ModelOpt FP8)")


def check_supported(model: str | Path, max_model_len: int | None = None) -> dict:
    """The checkpoint's config.json if this engine can run it; UnsupportedModel says why not."""
    config = read_hf_config(model)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(f"model_type '{model_type}' (the engine runs {', '.join(SUPPORTED_MODEL_TYPES)})")
    checkpoint_quantization(config)
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act '{config.get('hidden_act')}'")
    if config.get("mlp_bias"):
        raise UnsupportedModel("mlp_bias")
    window = config.get("sliding_window")
    if config.get("use_sliding_window") or (model_type == "mistral" and window and (max_model_len is None or window < max_model_len)):
        raise UnsupportedModel(f"sliding-window attention (window {window} tokens)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(f"rope_type '{rope_type}'")
    if not list(Path(model).glob("*.safetensors")):
        raise UnsupportedModel("weights that are not safetensors")
    return config
