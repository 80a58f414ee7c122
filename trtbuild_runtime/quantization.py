"""FP8 weights and activations for the runtime's linear layers (W8A8, e4m3, row-wise scales).

Weights are e4m3 with one scale per output channel: computed at load from the 16-bit weights, or
taken from a ModelOpt FP8 checkpoint (`trtbuild quantize --precision fp8 --format hf`), whose
calibrated per-tensor scales become per-channel ones (q, k and v keep their own in the merged
matrix). Activations are quantized per token (row amax / 448) by the op that produces them: the
RMSNorm before qkv and gate_up, SiLU(gate) * up before down (`quant_kernels` on CUDA, the torch
functions below elsewhere), and only the attention output needs a pass of its own. One
`torch._scaled_mm` per layer then multiplies e4m3 by e4m3 with both scale vectors.

The output head stays 16-bit: it sets every token, and FP8 there costs the most accuracy.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from trtbuild_runtime.config import FP8_GEMMS

FP8_MAX = 448.0
FP8 = torch.float8_e4m3fn


@dataclasses.dataclass
class QuantizedActivation:
    """An activation already in e4m3, as its producer wrote it: data [rows, N], scale [rows, 1] float32."""

    data: torch.Tensor
    scale: torch.Tensor


def _fused(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dim() == 2 and x.stride(-1) == 1


def quantize_rows(x: torch.Tensor) -> QuantizedActivation:
    if _fused(x):
        from trtbuild_runtime import quant_kernels

        return QuantizedActivation(*quant_kernels.quantize_rows(x))
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return QuantizedActivation((x / scale).to(FP8), scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = False):
    """RMSNorm as transformers computes it; with `quantize`, its output in e4m3."""
    if _fused(x):
        from trtbuild_runtime import quant_kernels

        out = quant_kernels.rms_norm(x, weight, eps, quantize)
        return QuantizedActivation(*out) if quantize else out
    dtype = x.dtype
    h = x.float()
    y = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return quantize_rows(y) if quantize else y


def silu_mul(gate_up: torch.Tensor, quantize: bool = False):
    if quantize and _fused(gate_up):
        from trtbuild_runtime import quant_kernels

        return QuantizedActivation(*quant_kernels.silu_mul_quant(gate_up))
    gate, up = gate_up.chunk(2, dim=-1)
    y = nn.functional.silu(gate) * up
    return quantize_rows(y) if quantize else y


class Fp8Linear(nn.Module):
    """y = (x_q * s_x) @ (W_q * s_w)^T + b.

    `gemm` picks how the scales are applied (the same product either way): "rowwise", one GEMM with
    both scale vectors (cuBLASLt's outer-vector-scaled kernels), "rowwise_fast_accum" the same with
    Hopper's fast FP8 accumulation (partial sums promoted less often); "tensorwise", a unit-scale FP8
    GEMM (the kernels tuned for TensorRT-LLM's per-tensor FP8) and one epilogue kernel that
    multiplies rows and columns by their scales. Which is faster depends on the GPU and the batch:
    bench/gpu_suite.py measures both.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                 gemm: str = "rowwise"):
        super().__init__()
        if gemm not in FP8_GEMMS:
            raise ValueError(f"fp8_gemm must be one of {', '.join(FP8_GEMMS)}, got {gemm!r}")
        self.gemm = gemm
        self.register_buffer("weight", weight)  # [out, in] e4m3
        self.register_buffer("weight_scale", scale.reshape(1, -1).float().contiguous())  # [1, out]
        self.register_buffer("bias", None if bias is None else bias.to(out_dtype))
        self.register_buffer("unit_scale", torch.ones((), dtype=torch.float32, device=weight.device), persistent=False)  # tensorwise
        self.out_dtype = out_dtype
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, channel_scale: torch.Tensor | None = None, gemm: str = "rowwise") -> "Fp8Linear":
        """From 16-bit weights: per-channel scales from their amax, or the ones given (a checkpoint's)."""
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX if channel_scale is None else channel_scale.float()
        q = (weight / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return cls(q, scale, None if linear.bias is None else linear.bias.detach(), linear.weight.dtype, gemm)

    def forward(self, x) -> torch.Tensor:
        """x: an activation its producer quantized ([rows, in]), or a 16-bit tensor of any leading shape."""
        if not isinstance(x, QuantizedActivation):
            leading = x.shape[:-1]
            return self(quantize_rows(x.reshape(-1, self.in_features))).reshape(*leading, self.out_features)
        if self.gemm == "tensorwise" and x.data.is_cuda:
            from trtbuild_runtime import quant_kernels

            one = self.unit_scale
            y = torch._scaled_mm(x.data, self.weight.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            return quant_kernels.scale_outer_(y, x.scale, self.weight_scale, self.bias).to(self.out_dtype)
        # row-wise scaled GEMMs on CUDA write bfloat16 only
        mm_dtype = torch.bfloat16 if x.data.is_cuda else self.out_dtype
        y = torch._scaled_mm(x.data, self.weight.t(), scale_a=x.scale, scale_b=self.weight_scale, out_dtype=mm_dtype,
                             use_fast_accum=self.gemm == "rowwise_fast_accum" and x.data.is_cuda)
        y = y.to(self.out_dtype)
        return y if self.bias is None else y + self.bias


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers the forward pass reads (the KV pool is not the model's)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t is not None}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def quantize_fp8(model, checkpoint_scales: dict[int, torch.Tensor] | None = None, gemm: str = "rowwise") -> int:
    """Swap the decoder's linear layers for Fp8Linear and make their producers emit e4m3.

    `checkpoint_scales`: per-channel weight scales by id() of the 16-bit weight they belong to (the
    dequantized ModelOpt weights), so the layer re-quantizes onto exactly the calibrated grid.
    """
    checkpoint_scales = checkpoint_scales or {}
    swapped = 0
    for layer in model.layers:
        for owner, name in ((layer.attn, "qkv"), (layer.attn, "o"), (layer.mlp, "gate_up"), (layer.mlp, "down")):
            linear = getattr(owner, name)
            if linear.in_features % 16 or linear.out_features % 16:
                raise ValueError(f"FP8 GEMMs need dimensions divisible by 16; {name} is {linear.out_features}x{linear.in_features}")
            setattr(owner, name, Fp8Linear.from_linear(linear, checkpoint_scales.get(id(linear.weight)), gemm))
            swapped += 1
        layer.input_norm.quantize_output = True
        layer.post_attn_norm.quantize_output = True
        layer.mlp.quantize_activation = True
    return swapped
