"""Attention over the paged KV pool, and what a step tells every layer about where tokens live.

The pool of one layer is K and V of shape [num_blocks + 1, page_size, kv_heads, head_dim]; block
`num_blocks` is a scratch block that padded rows of a CUDA graph write into. A step's tokens are
flat ([tokens, heads, head_dim]); `slot_mapping` says where each token's K and V go.

Three ways to attend, chosen per step:
- a prefill of prompts that start at position 0 (nothing cached): the prompts are padded into one
  batch and run through SDPA with `is_causal` (the flash path on CUDA), never touching the pool;
- a prefill that continues a sequence (a chunk of a long prompt, a prefix taken from the cache):
  on CUDA, each query token is a decode-kernel row that sees its own position's context; on CPU
  the context is gathered from the pool and masked (`paged_attention_reference`);
- a decode step (one token per sequence): the Triton kernel on CUDA, the same reference on CPU.

An FP8 pool (`kv_cache_dtype="fp8"`) stores K / k_scale and V / v_scale in e4m3 (half the bytes of
16-bit pages) and every reader multiplies the scale back; the step's own prompt attends to its
unquantized K/V, as TensorRT-LLM's context phase does.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class StepContext:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [tokens] int64: block * page_size + offset
    context_lens: torch.Tensor | None = None  # [seqs] int32: tokens with KV after this step
    block_tables: torch.Tensor | None = None  # [seqs, max_blocks] int32
    query_starts: torch.Tensor | None = None  # [seqs] int64: position of each sequence's first query (paged prefill)
    # prefill
    fresh: bool = False  # every sequence starts at position 0: plain causal attention
    num_seqs: int = 0
    max_query_len: int = 0
    pad_index: torch.Tensor | None = None  # [tokens] int64 into [num_seqs * max_query_len]; None: no padding needed
    token_tables: torch.Tensor | None = None  # CUDA paged prefill: [tokens, max_blocks] int32, each token's sequence's table
    token_lens: torch.Tensor | None = None  # [tokens] int32: the context each token sees (its position + 1)


_context: StepContext | None = None


def set_context(context: StepContext | None) -> None:
    global _context
    _context = context


def get_context() -> StepContext:
    assert _context is not None, "attention ran outside a step"
    return _context


FP8 = torch.float8_e4m3fn


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    blocks, page, heads, dim = k_cache.shape
    if k.is_cuda:
        from trtbuild_runtime.kernels import store_kv as store_kv_kernel

        if store_kv_kernel(k_cache, v_cache, k, v, slots, k_scale, v_scale):
            return
    if k_cache.dtype == FP8:  # copied as bytes: index_copy_ has no float8 kernels
        k, v = (k.float() / k_scale).to(FP8).view(torch.uint8), (v.float() / v_scale).to(FP8).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(blocks * page, heads, dim).index_copy_(0, slots, k)
    v_cache.view(blocks * page, heads, dim).index_copy_(0, slots, v)


def gather_pages(cache: torch.Tensor, block_tables: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """[seqs, blocks * page, kv_heads, dim] in `dtype`: each sequence's pages in order, dequantized."""
    seqs = block_tables.shape[0]
    if cache.dtype != FP8:
        return cache[block_tables.long()].reshape(seqs, -1, *cache.shape[2:])
    pages = cache.view(torch.uint8)[block_tables.long()].view(FP8)
    return (pages.to(torch.float32) * scale).to(dtype).reshape(seqs, -1, *cache.shape[2:])


def _pad(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """[tokens, H, D] -> [seqs, max_query_len, H, D] (right-padded)."""
    if ctx.pad_index is None:
        return x.view(ctx.num_seqs, ctx.max_query_len, *x.shape[1:])
    padded = x.new_zeros(ctx.num_seqs * ctx.max_query_len, *x.shape[1:])
    padded.index_copy_(0, ctx.pad_index, x)
    return padded.view(ctx.num_seqs, ctx.max_query_len, *x.shape[1:])


def _unpad(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    flat = x.reshape(ctx.num_seqs * ctx.max_query_len, *x.shape[2:])
    return flat if ctx.pad_index is None else flat.index_select(0, ctx.pad_index)


def causal_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext, scale: float) -> torch.Tensor:
    """Prompts from position 0: right padding is harmless under a causal mask (padding only follows)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    qp, kp, vp = (_pad(t, ctx).transpose(1, 2) for t in (q, k, v))
    if heads != kv_heads:
        kp, vp = kp.repeat_interleave(heads // kv_heads, dim=1), vp.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale)
    return _unpad(out.transpose(1, 2), ctx)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                              context_lens: torch.Tensor, query_starts: torch.Tensor, scale: float,
                              k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q [seqs, queries, H, D] at positions query_starts + i, against each sequence's pooled context.

    Query i of a sequence sees keys 0 .. query_starts + i (causal) and none at or past its context length.
    """
    seqs, queries, heads, dim = q.shape
    page, kv_heads = k_cache.shape[1], k_cache.shape[2]
    keys = gather_pages(k_cache, block_tables, k_scale, q.dtype).transpose(1, 2)
    values = gather_pages(v_cache, block_tables, v_scale, q.dtype).transpose(1, 2)
    if heads != kv_heads:
        keys, values = keys.repeat_interleave(heads // kv_heads, 1), values.repeat_interleave(heads // kv_heads, 1)
    key_pos = torch.arange(keys.shape[2], device=q.device)
    query_pos = query_starts.view(-1, 1) + torch.arange(queries, device=q.device)
    mask = (key_pos.view(1, 1, -1) <= query_pos.unsqueeze(-1)) & (key_pos.view(1, 1, -1) < context_lens.view(-1, 1, 1))
    mask[:, :, 0] |= ~mask.any(-1)  # rows with no key at all (padding) attend to key 0 instead of producing NaN
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask.unsqueeze(1), scale=scale)
    return out.transpose(1, 2)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: StepContext, scale: float,
                  k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """A continued prompt (a cached prefix, a later chunk). On CUDA every query token is a row of
    the decode kernel with its own context length: causal by construction, and no gather of the pool."""
    if q.is_cuda and ctx.token_tables is not None:
        from trtbuild_runtime.kernels import paged_decode_attention

        return paged_decode_attention(q, k_cache, v_cache, ctx.token_tables, ctx.token_lens, scale, k_scale, v_scale)
    out = paged_attention_reference(_pad(q, ctx), k_cache, v_cache, ctx.block_tables, ctx.context_lens, ctx.query_starts,
                                    scale, k_scale, v_scale)
    return _unpad(out, ctx)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: StepContext, scale: float,
                 k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """One query per sequence: q [seqs, H, D]."""
    if q.is_cuda:
        from trtbuild_runtime.kernels import paged_decode_attention

        return paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, k_scale, v_scale)
    starts = (ctx.context_lens - 1).clamp(min=0).long()
    return paged_attention_reference(q.unsqueeze(1), k_cache, v_cache, ctx.block_tables, ctx.context_lens, starts, scale,
                                     k_scale, v_scale).squeeze(1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
           k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Store this step's K/V in the pool and attend; q/k/v are [tokens, heads, head_dim]."""
    ctx = get_context()
    store_kv(k_cache, v_cache, k, v, ctx.slot_mapping, k_scale, v_scale)
    if not ctx.is_prefill:
        return paged_decode(q, k_cache, v_cache, ctx, scale, k_scale, v_scale)
    if ctx.fresh:
        return causal_prefill(q, k, v, ctx, scale)
    return paged_prefill(q, k_cache, v_cache, ctx, scale, k_scale, v_scale)
