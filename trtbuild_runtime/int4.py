"""INT4 weight-only linear layers (W4A16, group-wise scales) and the checkpoints they load from.

One layout for every source: `qweight` int32 [K / 8, N], eight 4-bit codes along K per word (code
i of a word in bits 4i..4i+3, the GPTQ packing), `scales` [K / group, N] in the model dtype, and
the zero point either the constant 8 (symmetric: signed int4 stored as code = q + 8) or `zeros`
[K / group, N] (asymmetric GPTQ). The weight is w[n, k] = (code - zero) * scale[k // group, n].

Sources:
- ModelOpt's HF export of int4_awq (`quantization_config` quant_method modelopt, quant_algo
  W4A16_AWQ): `weight` uint8 [N / 2, K] (two output channels per byte, signed nibbles),
  `weight_scale` [N, K / group] (amax / 7), and an optional `pre_quant_scale` [K] that multiplies
  the activation first (AWQ's smoothing, when ModelOpt could not fold it into the norm before);
- HF GPTQ checkpoints (quant_method gptq, 4 bits): `qweight` int32 [K / 8, N], `qzeros` int32
  [K / group, N / 8] (stored minus one in the original `gptq` format, as is in `gptq_v2`),
  `scales` [K / group, N], `g_idx` [K] (act-order: K is permuted so that groups are contiguous
  and the activation is gathered in the same order);
- 16-bit weights, quantized at load by round-to-nearest (`quantize_rtn`, ModelOpt's formula: scale =
  group amax / 7, codes clamped to [-8, 7]), which is what the GPU suite uses for random weights.

The GEMM (`w4a16_matmul`) is one Triton kernel that loads the packed codes, dequantizes a tile in
registers and feeds the tensor cores: decode reads 4-bit weights instead of 16-bit ones. Small M
splits K across programs (fp32 atomics) so a 1-row GEMM still fills the GPU; large M (prefill
chunks) dequantizes the weight once and runs the 16-bit GEMM. On CPU the layer dequantizes and
calls F.linear; the tests run the kernel under Triton's interpreter against that reference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

INT4_METHODS = ("int4_awq", "int4_gptq")
DEQUANT_M = 1024  # above this many rows, dequantize the weight once and run the 16-bit GEMM


# ---------------------------------------------------------------------- packing
def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [K, N] (0..15) -> int32 [K / 8, N], code i of each word in bits 4i."""
    k, n = codes.shape
    if k % 8:
        raise ValueError(f"INT4 packing needs K divisible by 8, got {k}")
    c = codes.to(torch.int32).reshape(k // 8, 8, n)
    word = torch.zeros(k // 8, n, dtype=torch.int32, device=codes.device)
    for i in range(8):
        word |= c[:, i] << (4 * i)
    return word


def unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K / 8, N] -> codes [K, N] int32 (0..15)."""
    kw, n = qweight.shape
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    return ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(kw * 8, n)


def quantize_rtn(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16-bit weight [N, K] -> (codes [K, N] 0..15, scales [K / group, N] float32), symmetric, ModelOpt's rounding."""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"INT4 group size {group} does not divide the input dimension {k}")
    w = weight.float().reshape(n, k // group, group)
    scale = w.abs().amax(dim=-1).clamp(min=1e-8) / 7.0  # [N, K / group]
    q = (w / scale[..., None]).round().clamp(-8, 7).to(torch.int32) + 8
    return q.reshape(n, k).t().contiguous(), scale.t().contiguous()


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit weight [N, K] the layer multiplies by (the kernel's reference)."""
    codes = unpack_codes(qweight).float()  # [K, N]
    k = codes.shape[0]
    rows = torch.arange(k, device=qweight.device) // group
    zero = 8.0 if zeros is None else zeros.float()[rows]
    return ((codes - zero) * scales.float()[rows]).to(dtype).t()


# ---------------------------------------------------------------------- the kernel
_kernel = None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _w4a16(X, QW, S, Z, Y, M, N, K, stride_xm, stride_ym, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
               SPLIT_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        m_ok = offs_m < M
        n_ok = offs_n < N
        shifts = tl.arange(0, 8) * 4
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kt in range(pid_k, K // BK, SPLIT_K):
            offs_k = kt * BK + tl.arange(0, BK)
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None], other=0.0)
            # each int32 word once ([BK / 8, BN]), unpacked in registers to [BK, BN]: row 8w + i is bits 4i of word w
            offs_w = kt * (BK // 8) + tl.arange(0, BK // 8)
            q = tl.load(QW + offs_w[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0)
            codes = tl.reshape((q[:, None, :] >> shifts[None, :, None]) & 0xF, (BK, BN))
            # code - 8 (or - zero) as float without an int-to-float conversion (a quarter-rate instruction): the
            # bits of 2^23 + code are that float, and one subtraction removes 2^23 and the zero point together
            g = (kt * BK) // GROUP  # the tile lies in one group
            s = tl.load(S + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            magic = (codes | 0x4B000000).to(tl.float32, bitcast=True)
            if HAS_ZEROS:
                z = tl.load(Z + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                w = (magic - (8388608.0 + z[None, :])) * s[None, :]
            else:
                w = (magic - 8388616.0) * s[None, :]
            acc = tl.dot(x, w.to(x.dtype), acc)
        ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            tl.store(ptrs, acc.to(Y.dtype.element_ty), mask=ok)
        else:
            tl.atomic_add(ptrs, acc, mask=ok)

    return _w4a16


def _config(m: int, n: int, k: int, group: int, sms: int) -> tuple[int, int, int, int, int, int]:
    """(BM, BN, BK, SPLIT_K, num_warps, num_stages) for an M x N x K W4A16 GEMM."""
    bk = min(128, group)
    if m <= 16:
        tiles = -(-n // 128)
        # H100, M=1, runs 1-3 (bench/results/2026-12-05-h100-engine8b*.json, int4_gemm tactics): the narrow GEMMs
        # (o, down, qkv: 32-48 tiles of 128 columns) do best with 256-column tiles and K split 8 ways; gate_up
        # (224 tiles) with 128 columns and K split 4 ways
        bn, split, warps, stages = (256, 8, 8, 3) if tiles < sms // 2 else (128, 4 if tiles < 2 * sms else 2 if tiles < 4 * sms else 1, 4, 4)
        bm = 16
    elif m <= 64:  # run 1's tactics (64 streams: 4,905 tok/s; run 3's 16-row tactics at 64 rows: 3,662)
        bm = 32 if m <= 32 else 64
        bn, warps, stages = 64, 4, 4
        tiles = -(-m // bm) * -(-n // bn)
        split = max(1, min((k // bk) // 4, -(-2 * sms // tiles)))
    else:
        return 64, 128, min(64, group), 1, 4, 3
    split = min(split, k // bk)
    while split > 1 and (k // bk) % split:
        split -= 1
    return bm, bn, bk, split, warps, stages


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group: int, config: tuple | None = None) -> torch.Tensor:
    """x [M, K] (16-bit) @ dequantized(qweight)^T -> [M, N] in x's dtype, by the Triton kernel."""
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    m, k = x.shape
    n = qweight.shape[1]
    if k % group or group % 16:
        raise ValueError(f"W4A16 needs the group size ({group}) to divide K ({k}) and be a multiple of 16")
    x = x.contiguous()
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8
    bm, bn, bk, split, warps, stages = config or _config(m, n, k, group, sms)
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device) if split > 1 else torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (-(-m // bm), -(-n // bn), split)
    _kernel[grid](x, qweight, scales, zeros if zeros is not None else scales, y, m, n, k, x.stride(0), y.stride(0),
                  GROUP=group, HAS_ZEROS=zeros is not None, SPLIT_K=split, BM=bm, BN=bn, BK=bk, num_warps=warps,
                  num_stages=stages)
    return y.to(x.dtype) if split > 1 else y


# ---------------------------------------------------------------------- the layer
class Int4Linear(nn.Module):
    """y = x @ W^T + b with W in 4-bit codes and per-group scales (see the module docstring)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
                 bias: torch.Tensor | None = None, perm: torch.Tensor | None = None, pre_scale: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("qweight", qweight.to(torch.int32).contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("zeros", None if zeros is None else zeros.to(scales.dtype).contiguous())
        self.register_buffer("bias", bias)
        self.register_buffer("perm", perm)  # act-order GPTQ: the input columns in group order
        self.register_buffer("pre_scale", pre_scale)  # AWQ: the activation is multiplied by this first
        self.group = group
        self.in_features, self.out_features = qweight.shape[0] * 8, qweight.shape[1]

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group: int, bias: torch.Tensor | None = None) -> "Int4Linear":
        """Round-to-nearest from a 16-bit weight [N, K] (no calibration)."""
        codes, scales = quantize_rtn(weight, group)
        return cls(pack_codes(codes), scales.to(weight.dtype), None, group, bias)

    def weight_16bit(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.group, dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if self.pre_scale is not None:
            x = x * self.pre_scale
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if x.is_cuda and x.shape[0] <= DEQUANT_M:
            y = w4a16_matmul(x, self.qweight, self.scales, self.zeros, self.group)
        else:
            y = F.linear(x, self.weight_16bit(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


# ---------------------------------------------------------------------- checkpoints
def from_modelopt(weight: torch.Tensor, weight_scale: torch.Tensor, group: int, dtype: torch.dtype,
                  pre_quant_scale: torch.Tensor | None = None):
    """ModelOpt W4A16_AWQ tensors -> (qweight, scales, pre_scale) in this module's layout (the group size is read off the shapes)."""
    packed = weight.view(torch.uint8).to(torch.int32)  # [N / 2, K]
    group = packed.shape[1] // weight_scale.shape[1]  # hf_quant_config.json has it too, config.json's quantization_config not
    low, high = packed & 0xF, (packed >> 4) & 0xF  # signed nibbles, two's complement
    signed = torch.stack((low, high), dim=1).reshape(-1, packed.shape[1])  # [N, K]: row 2r low, 2r + 1 high
    signed = torch.where(signed >= 8, signed - 16, signed)
    codes = (signed + 8).t().contiguous()
    if weight_scale.shape != (signed.shape[0], signed.shape[1] // group):
        raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}, expected {(signed.shape[0], signed.shape[1] // group)}")
    return pack_codes(codes), weight_scale.t().contiguous().to(dtype), None if pre_quant_scale is None else pre_quant_scale.to(dtype)


def to_modelopt(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [K, N] 0..15, scales [K / group, N]) -> ModelOpt's (weight uint8 [N / 2, K], weight_scale [N, K / group])."""
    signed = codes.t().to(torch.int32) - 8  # [N, K]
    nib = signed & 0xF
    packed = nib[0::2] | (nib[1::2] << 4)
    return packed.to(torch.uint8).contiguous(), scales.t().contiguous()


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, group: int,
              dtype: torch.dtype, v2: bool = False):
    """HF GPTQ tensors -> (qweight, scales, zeros or None, perm or None)."""
    k = qweight.shape[0] * 8
    n = qweight.shape[1]
    group = k // scales.shape[0]
    shifts = torch.arange(0, 32, 4, device=qzeros.device, dtype=torch.int32)
    zeros = ((qzeros.to(torch.int32)[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(qzeros.shape[0], -1)[:, :n]
    if not v2:
        zeros = (zeros + 1) & 0xF  # the gptq format stores zero - 1 (4-bit wrap, as the exllama kernels read it)
    perm = None
    qweight = qweight.to(torch.int32)
    if g_idx is not None:
        g_idx = g_idx.to(torch.long)
        if not torch.equal(g_idx, torch.arange(k, device=g_idx.device) // group):  # act-order: sort K by group
            perm = torch.argsort(g_idx, stable=True)
            codes = unpack_codes(qweight)[perm]
            qweight = pack_codes(codes)
            if not torch.equal(g_idx[perm], torch.arange(k, device=g_idx.device) // group):
                raise ValueError("GPTQ g_idx does not hold group_size columns per group")
    zeros_out = None if bool((zeros == 8).all()) else zeros.to(dtype)
    return qweight, scales.to(dtype), zeros_out, perm


def to_gptq(codes: torch.Tensor, scales: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """(codes [K, N], scales [K / group, N]) -> HF GPTQ tensors (symmetric, format gptq: zeros stored minus one)."""
    k, n = codes.shape
    zeros = torch.full((k // group, n), 7, dtype=torch.int32, device=codes.device)  # 8 - 1
    packed_zeros = pack_codes(zeros.t().contiguous()).t().contiguous()  # pack along N: [K / group, N / 8]
    return {"qweight": pack_codes(codes), "qzeros": packed_zeros, "scales": scales.to(torch.float16),
            "g_idx": torch.arange(k, dtype=torch.int32, device=codes.device) // group}


def checkpoint_int4(config: dict) -> tuple[str, int, dict] | None:
    """('int4_awq' | 'int4_gptq', group size, details) for an INT4 checkpoint's quantization_config, else None."""
    q = config.get("quantization_config") or {}
    method = q.get("quant_method")
    if method == "modelopt" and str(q.get("quant_algo", "")).upper() in ("W4A16_AWQ", "INT4_AWQ", "W4A16"):
        group = q.get("group_size") or (((q.get("config_groups") or {}).get("group_0") or {}).get("weights") or {}).get("group_size") or 128
        return "int4_awq", int(group), {"exclude": q.get("exclude_modules") or q.get("ignore") or []}
    if method == "gptq":
        if int(q.get("bits", 4)) != 4:
            raise ValueError(f"GPTQ with {q.get('bits')} bits (the engine runs 4-bit GPTQ)")
        group = int(q.get("group_size", 128))
        if group <= 0:
            raise ValueError("GPTQ without groups (group_size -1): the engine runs group-wise INT4")
        return "int4_gptq", group, {"v2": q.get("checkpoint_format") == "gptq_v2", "sym": q.get("sym", True)}
    return None
