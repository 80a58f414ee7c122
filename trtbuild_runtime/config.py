"""What an engine is built with, and which checkpoints it can run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
QUANTIZATIONS = ("none", "fp8", "int4_wo", "int4_awq", "int4_gptq")  # int4_*: W4A16, trtbuild_runtime/int4.py
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
    max_batch_size: int = 64  # sequences in one decode step (CUDA graphs are captured up to this)
    max_num_tokens: int = 8192  # token budget of one step: chunked prefill splits prompts beyond it
    max_seq_len: int = 2048  # prompt + generated tokens
    kv_cache_page_size: int = 32  # tokens per KV block
    kv_cache_num_blocks: int | None = None  # None: from kv_cache_free_gpu_mem_fraction on CUDA, max_batch_size full sequences on CPU
    kv_cache_free_gpu_mem_fraction: float = 0.9  # of the memory free after weights and warm-up, for the KV pool
    enable_kv_cache_reuse: bool = False
    enforce_eager: bool = False  # no CUDA graphs
    seed: int = 0
    quantization: str = "none"  # none, fp8 (e4m3 W8A8: per-channel weight, per-token activation scales), int4_wo (W4A16
    # round-to-nearest at load), int4_awq / int4_gptq (W4A16 from a ModelOpt int4_awq or an HF GPTQ checkpoint, which set it)
    block_size: int = 128  # INT4 group size for int4_wo (trtbuild quantize --block-size); INT4 checkpoints carry their own
    fp8_gemm: str = "rowwise"  # FP8 GEMM tactic: rowwise (scales in the GEMM), rowwise_fast_accum, tensorwise (an epilogue)
    kv_cache_dtype: str = "auto"  # auto (the model dtype), fp8 (e4m3 pages, one scale per layer)
    speculative_decoding_mode: str = "none"  # none, ngram (prompt lookup)
    max_draft_len: int = 4  # draft tokens verified per step (TensorRT-LLM's max_draft_len)
    max_matching_ngram_size: int = 3  # longest suffix n-gram prompt lookup matches
    fault_injection_step_delay_ms: float = 0.0  # sleep after every step: a deliberately slower build (A/B tests, alert drills)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_num_tokens", "max_seq_len", "kv_cache_page_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_page_size & (self.kv_cache_page_size - 1) or self.kv_cache_page_size < 16:
            raise ValueError(f"kv_cache_page_size must be a power of two >= 16 (the attention kernel's tile), got {self.kv_cache_page_size}")
        for name, value, allowed in (("quantization", self.quantization, QUANTIZATIONS),
                                     ("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES),
                                     ("speculative_decoding_mode", self.speculative_decoding_mode, SPECULATIVE_MODES),
                                     ("fp8_gemm", self.fp8_gemm, FP8_GEMMS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.speculative_decoding_mode != "none" and not 1 <= self.max_draft_len <= 16:
            raise ValueError(f"max_draft_len must be in [1, 16], got {self.max_draft_len}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size (the INT4 group size) must be a power of two >= 16, got {self.block_size}")
        if not 0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0:
            raise ValueError(f"kv_cache_free_gpu_mem_fraction must be in (0, 1], got {self.kv_cache_free_gpu_mem_fraction}")
        # a whole prompt of max_seq_len must fit in one step's budget or be chunked: both work,
        # but a step must at least hold one token per running sequence
        self.max_num_tokens = max(self.max_num_tokens, self.max_batch_size)

    @classmethod
    def from_parameters(cls, parameters: dict[str, str], **values) -> "EngineConfig":
        """From a config.pbtxt's string parameters, which carry each setting under the field's own name."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, text in parameters.items():
            if name in fields and name not in values:
                kind = type(fields[name].default)
                values[name] = (text.lower() == "true" if kind is bool else
                                int(text) if kind is int or name == "kv_cache_num_blocks" else
                                float(text) if kind is float else text)
        return cls(**values)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_seq_len // self.kv_cache_page_size)


def resolve_device(device: str) -> str:
    """'auto' is CUDA where a GPU is visible."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def read_hf_config(model: str | Path) -> dict:
    path = Path(model) / "config.json"
    return json.loads(path.read_text())


def checkpoint_quantization(config: dict) -> str:
    """'fp8' for a ModelOpt FP8 checkpoint (`trtbuild quantize --precision fp8 --format hf`), 'int4_awq' for a
    ModelOpt W4A16_AWQ one (`--precision int4_awq --format hf`), 'int4_gptq' for an HF GPTQ (4-bit, grouped) one, else 'none'."""
    from trtbuild_runtime.int4 import checkpoint_int4

    q = config.get("quantization_config")
    if not q:
        return "none"
    method, algo = q.get("quant_method", "?"), q.get("quant_algo")
    if method == "modelopt" and algo == "FP8":
        return "fp8"
    try:
        int4 = checkpoint_int4(config)
    except ValueError as e:
        raise UnsupportedModel(str(e)) from e
    if int4:
        return int4[0]
    raise UnsupportedModel(f"a pre-quantized checkpoint (quantization_config {method} {algo or ''}; the engine runs ModelOpt FP8, "
                           "ModelOpt W4A16_AWQ and 4-bit GPTQ)")


def check_supported(model: str | Path, max_seq_len: int | None = None) -> dict:
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
    if config.get("use_sliding_window") or (model_type == "mistral" and window and (max_seq_len is None or window < max_seq_len)):
        raise UnsupportedModel(f"sliding-window attention (window {window} tokens)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(f"rope_type '{rope_type}'")
    if not list(Path(model).glob("*.safetensors")):
        raise UnsupportedModel("weights that are not safetensors")
    return config


# What trtbuild's BuildSpec and CLI start from, so a default is written once, here.
ENGINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
