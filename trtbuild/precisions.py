"""The precisions trtbuild builds, one row each: every command (quantize, engine, inspect, validate)
reads its names, quantization algorithms, ModelOpt presets and byte sizes from this table."""

from __future__ import annotations

import dataclasses

MIN_CAPABILITY = (8, 0)  # Ampere: what TensorRT-LLM's engine flow needs at all
FP8_CAPABILITY = (8, 9)  # Ada / Hopper: FP8 tensor cores


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str
    quant_algo: str | None  # TensorRT-LLM QuantAlgo in a TensorRT-LLM checkpoint's config.json
    hf_quant_algo: str | None  # what ModelOpt's Hugging Face export declares (its int4_wo is group-wise, like AWQ)
    modelopt_config: str | None  # ModelOpt preset (modelopt.torch.quantization); None: a cast, nothing to calibrate
    weight_bits: int
    min_capability: tuple[int, int]
    dtype: str | None  # activation dtype the precision fixes; None: --dtype or the checkpoint's
    description: str
    build_time_weight_only: bool = False  # trtllm-build quantizes the exported 16-bit weights itself

    @property
    def weight_bytes(self) -> float:
        return self.weight_bits / 8


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp16", None, None, None, 16, MIN_CAPABILITY, "float16", "FP16 weights and activations"),
        Precision("bf16", None, None, None, 16, MIN_CAPABILITY, "bfloat16", "BF16 weights and activations"),
        Precision("fp8", "FP8", "FP8", "FP8_DEFAULT_CFG", 8, FP8_CAPABILITY, None,
                  "FP8 weights and activations, per-tensor scales"),
        Precision("int8_sq", "W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_CHANNEL", "INT8_SMOOTHQUANT_CFG", 8, MIN_CAPABILITY, None,
                  "INT8 SmoothQuant (W8A8), per-channel weight scales"),
        Precision("int8_wo", "W8A16", "W8A16", "INT8_WEIGHT_ONLY_CFG", 8, MIN_CAPABILITY, None,
                  "INT8 weight-only, 16-bit activations", build_time_weight_only=True),
        Precision("int4_wo", "W4A16", "W4A16_AWQ", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", 4, MIN_CAPABILITY, None,
                  "INT4 weight-only, 16-bit activations", build_time_weight_only=True),
        Precision("int4_awq", "W4A16_AWQ", "W4A16_AWQ", "INT4_AWQ_CFG", 4, MIN_CAPABILITY, None,
                  "INT4 AWQ, group size 128, 16-bit activations"),
    )
}
NAMES = tuple(PRECISIONS)
QUANTIZED = tuple(name for name, p in PRECISIONS.items() if p.modelopt_config)  # what ModelOpt calibrates
CAST_DTYPES = {name: p.dtype for name, p in PRECISIONS.items() if p.modelopt_config is None}  # fp16/bf16: a cast
KV_CACHE_DTYPES = ("auto", "fp8", "int8")
KV_CACHE_QUANT_ALGOS: dict[str, str | None] = {"auto": None, "fp8": "FP8", "int8": "INT8"}
# Precisions read from checkpoints others made, though trtbuild does not build them.
FOREIGN_QUANT_ALGOS = {"W4A8_AWQ": "w4a8_awq"}


def precision_of_quant_algo(quant_algo: str) -> str | None:
    """Our name for a checkpoint's `quant_algo` (TensorRT-LLM's or ModelOpt's), None if unknown."""
    for p in PRECISIONS.values():
        if quant_algo in (p.quant_algo, p.hf_quant_algo) and not (p.name == "int4_wo" and quant_algo == "W4A16_AWQ"):
            return p.name
    return FOREIGN_QUANT_ALGOS.get(quant_algo)
