"""Triton kernels that produce FP8 activations where they are made, so no GEMM waits on a separate pass.

- `rms_norm`: one program per row; RMSNorm exactly as transformers computes it (float32 statistics,
  the normalised row cast to the model dtype, then times the weight in that dtype) and, with
  `quantize`, the row's e4m3 copy and its scale (row amax / 448) in the same pass.
- `silu_mul_quant`: SiLU(gate) * up of the MLP, quantized the same way, from the merged gate_up row.
- `quantize_rows`: the per-row quantization alone (the attention output before o_proj).

`quantization.py` holds the same computations in torch; the tests compare the two under Triton's
interpreter, and the CPU runs the torch ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0


@triton.jit
def _quantize_store(y, Q, S, row, cols, ok, stride_q):
    amax = tl.max(tl.where(ok, tl.abs(y), 0.0), axis=0)
    scale = tl.maximum(amax, 1e-12) / 448.0
    tl.store(Q + row * stride_q + cols, (y / scale).to(tl.float8e4nv), mask=ok)
    tl.store(S + row, scale)


@triton.jit
def _rms_norm(X, W, Y, Q, S, eps, N, stride_x, stride_y, stride_q, BLOCK: tl.constexpr, QUANTIZE: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    dtype = Y.dtype.element_ty
    normed = (x * rstd).to(dtype).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    y = (w * normed).to(dtype)
    if QUANTIZE:
        _quantize_store(y.to(tl.float32), Q, S, row, cols, ok, stride_q)
    else:
        tl.store(Y + row * stride_y + cols, y, mask=ok)


@triton.jit
def _silu_mul_quant(GU, Q, S, INTER, stride_gu, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < INTER
    dtype = GU.dtype.element_ty
    gate = tl.load(GU + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GU + row * stride_gu + INTER + cols, mask=ok, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    y = (act * up).to(dtype).to(tl.float32)
    _quantize_store(y, Q, S, row, cols, ok, stride_q)


@triton.jit
def _quantize_rows(X, Q, S, N, stride_x, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    _quantize_store(x, Q, S, row, cols, ok, stride_q)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool):
    """x [rows, N] -> y [rows, N] in x's dtype, or (e4m3 [rows, N], float32 scales [rows, 1])."""
    rows, n = x.shape
    block = triton.next_power_of_2(n)
    if quantize:
        q = torch.empty(rows, n, dtype=torch.float8_e4m3fn, device=x.device)
        s = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
        _rms_norm[(rows,)](x, weight, x, q, s, eps, n, x.stride(0), 0, q.stride(0), BLOCK=block, QUANTIZE=True,
                           num_warps=_warps(block))
        return q, s
    y = torch.empty_like(x)
    _rms_norm[(rows,)](x, weight, y, y, y, eps, n, x.stride(0), y.stride(0), 0, BLOCK=block, QUANTIZE=False,
                       num_warps=_warps(block))
    return y


def silu_mul_quant(gate_up: torch.Tensor):
    rows, width = gate_up.shape
    inter = width // 2
    block = triton.next_power_of_2(inter)
    q = torch.empty(rows, inter, dtype=torch.float8_e4m3fn, device=gate_up.device)
    s = torch.empty(rows, 1, dtype=torch.float32, device=gate_up.device)
    _silu_mul_quant[(rows,)](gate_up, q, s, inter, gate_up.stride(0), q.stride(0), BLOCK=block, num_warps=_warps(block))
    return q, s


def quantize_rows(x: torch.Tensor):
    rows, n = x.shape
    block = triton.next_power_of_2(n)
    q = torch.empty(rows, n, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    _quantize_rows[(rows,)](x, q, s, n, x.stride(0), q.stride(0), BLOCK=block, num_warps=_warps(block))
    return q, s


@triton.jit
def _scale_outer(Y, SX, SW, B, M, N, stride_y, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    ptr = Y + rows[:, None] * stride_y + cols[None, :]
    y = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
    sx = tl.load(SX + rows, mask=rows < M, other=0.0)
    sw = tl.load(SW + cols, mask=cols < N, other=0.0)
    y = y * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(ptr, y.to(Y.dtype.element_ty), mask=ok)


def scale_outer_(y: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y[i, j] = y[i, j] * row_scale[i] * col_scale[j] (+ bias[j]), in place: the epilogue of a unit-scale GEMM."""
    m, n = y.shape
    grid = (triton.cdiv(m, 16), triton.cdiv(n, 256))
    _scale_outer[grid](y, row_scale, col_scale, bias if bias is not None else y, m, n, y.stride(0),
                       HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=256, num_warps=4)
    return y
