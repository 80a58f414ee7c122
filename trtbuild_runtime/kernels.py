"""The paged decode attention kernel (Triton): one program per (sequence, KV head).

A program holds the query heads that share its KV head (the GQA group, padded to the 16 rows
`tl.dot` needs), walks the sequence's pages through its block table with an online softmax
(running max and sum, rescaled per page), and writes the normalised result. Context lengths and
block tables are read on the device, so a captured CUDA graph replays it for any lengths.
`attention.paged_attention_reference` is the same computation in plain torch; the tests compare them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode(Q, K, V, O, block_tables, context_lens, scale, k_scale, v_scale,
                  stride_qs, stride_qh, stride_kb, stride_kp, stride_kh, stride_os, stride_oh, stride_bt,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                  PAGE: tl.constexpr, KV_FP8: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    length = tl.load(context_lens + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    p = tl.arange(0, PAGE)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(Q + seq * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for i in range(0, tl.cdiv(length, PAGE)):
        block = tl.load(block_tables + seq * stride_bt + i).to(tl.int64)
        offsets = block * stride_kb + p[:, None] * stride_kp + kv_head * stride_kh + d[None, :]
        k = tl.load(K + offsets, mask=d_ok[None, :], other=0.0)
        if KV_FP8:
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(((i * PAGE + p) < length)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        weights = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(weights, 1)
        v = tl.load(V + offsets, mask=d_ok[None, :], other=0.0)
        if KV_FP8:
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v)
        m = m_new
    out = acc / tl.maximum(total, 1e-30)[:, None]
    tl.store(O + seq * stride_os + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q [seqs, heads, dim] against the pool [blocks, page, kv_heads, dim]; rows of length 0 give zeros.
    An e4m3 pool is dequantized as it is read (K * k_scale, V * v_scale)."""
    seqs, heads, dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    _paged_decode[(seqs, kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale, k_scale, v_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, DIM_PAD=max(16, triton.next_power_of_2(dim)),
        PAGE=page, KV_FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=4, num_stages=2,
    )
    return out


@triton.jit
def _store_kv(K, V, KC, VC, slots, k_scale, v_scale, stride_k, stride_v, ROW: tl.constexpr, ROW_PAD: tl.constexpr,
              KV_FP8: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slots + token).to(tl.int64)
    cols = tl.arange(0, ROW_PAD)
    ok = cols < ROW
    k = tl.load(K + token * stride_k + cols, mask=ok, other=0.0)
    v = tl.load(V + token * stride_v + cols, mask=ok, other=0.0)
    if KV_FP8:
        k = k.to(tl.float32) / k_scale
        v = v.to(tl.float32) / v_scale
    tl.store(KC + slot * ROW + cols, k.to(KC.dtype.element_ty), mask=ok)
    tl.store(VC + slot * ROW + cols, v.to(VC.dtype.element_ty), mask=ok)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
             k_scale: float, v_scale: float) -> bool:
    """K and V of a step's tokens into their slots, quantized on the way for an e4m3 pool: one launch.
    False (nothing written) where a layout is not the one the kernel indexes."""
    tokens, heads, dim = k.shape
    if tokens == 0 or k.stride(1) != dim or k.stride(2) != 1 or v.stride(1) != dim or v.stride(2) != 1 \
            or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        return False
    row = heads * dim
    _store_kv[(tokens,)](k, v, k_cache, v_cache, slots, k_scale, v_scale, k.stride(0), v.stride(0),
                         ROW=row, ROW_PAD=triton.next_power_of_2(row), KV_FP8=k_cache.dtype == torch.float8_e4m3fn,
                         num_warps=4 if row <= 2048 else 8)
    return True
