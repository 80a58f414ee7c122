"""Paged attention against naive float64 attention: the torch reference (what CPU runs, and what the
Triton kernel is held to) and the Triton kernel itself, run by Triton's interpreter on the CPU."""

from __future__ import annotations


import pytest
import torch
from conftest import run_under_triton_interpreter

from trtbuild_runtime.attention import paged_attention_reference


def naive(q, keys, values, positions):
    """q [H, D] at `positions` (a list per query), keys/values [L, Hkv, D]; float64, causal."""
    heads, kv_heads = q.shape[-2], keys.shape[1]
    k = keys.double().repeat_interleave(heads // kv_heads, 1)
    v = values.double().repeat_interleave(heads // kv_heads, 1)
    out = []
    for qi, pos in zip(q.double(), positions):
        scores = torch.einsum("hd,lhd->hl", qi, k[: pos + 1]) / q.shape[-1] ** 0.5
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v[: pos + 1]))
    return torch.stack(out)


def pool_of(sequences, page, kv_heads, dim, dtype, generator):
    """Scatter each sequence's K/V into shuffled blocks of a pool; returns pool, tables, lengths."""
    blocks = sum(-(-len(k) // page) for k, _ in sequences) + 1
    order = torch.randperm(blocks - 1, generator=generator).tolist()
    k_pool = torch.randn(blocks, page, kv_heads, dim, generator=generator).to(dtype)  # garbage outside the sequences
    v_pool = torch.randn(blocks, page, kv_heads, dim, generator=generator).to(dtype)
    tables = torch.zeros(len(sequences), max(-(-len(k) // page) for k, _ in sequences), dtype=torch.int32)
    for s, (k, v) in enumerate(sequences):
        for j in range(-(-len(k) // page)):
            block = order.pop()
            tables[s, j] = block
            chunk = slice(j * page, min((j + 1) * page, len(k)))
            k_pool[block, : chunk.stop - chunk.start] = k[chunk]
            v_pool[block, : chunk.stop - chunk.start] = v[chunk]
    lengths = torch.tensor([len(k) for k, _ in sequences], dtype=torch.int32)
    return k_pool, v_pool, tables, lengths


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, page = 6, 2, 24, 16  # GQA group 3, a head dim that is not a power of two
    lengths = [1, 15, 16, 17, 70]
    seqs = [(torch.randn(n, kv_heads, dim, generator=g), torch.randn(n, kv_heads, dim, generator=g)) for n in lengths]
    return g, heads, kv_heads, dim, page, seqs


def test_decode_reference_equals_naive(case):
    g, heads, kv_heads, dim, page, seqs = case
    k_pool, v_pool, tables, lengths = pool_of(seqs, page, kv_heads, dim, torch.float32, g)
    q = torch.randn(len(seqs), 1, heads, dim, generator=g)
    out = paged_attention_reference(q, k_pool, v_pool, tables, lengths, (lengths - 1).long(), dim ** -0.5)
    for s, (k, v) in enumerate(seqs):
        expected = naive(q[s], k, v, [len(k) - 1])
        torch.testing.assert_close(out[s].double(), expected, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_reference_equals_naive(case):
    g, heads, kv_heads, dim, page, seqs = case
    k_pool, v_pool, tables, lengths = pool_of(seqs, page, kv_heads, dim, torch.float32, g)
    queries = 5  # the last 5 positions of each sequence (fewer for the short ones: padding rows)
    q = torch.randn(len(seqs), queries, heads, dim, generator=g)
    starts = (lengths - queries).clamp(min=0).long()
    out = paged_attention_reference(q, k_pool, v_pool, tables, lengths, starts, dim ** -0.5)
    for s, (k, v) in enumerate(seqs):
        n = min(queries, len(k))
        expected = naive(q[s, :n], k, v, list(range(int(starts[s]), int(starts[s]) + n)))
        torch.testing.assert_close(out[s, :n].double(), expected, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(out[s]).all()


def kernel_check() -> None:
    """Run under TRITON_INTERPRET=1 (set before triton is imported, so in its own process)."""
    from trtbuild_runtime.kernels import paged_decode_attention

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, page = 6, 2, 24, 16
    seqs = [(torch.randn(n, kv_heads, dim, generator=g), torch.randn(n, kv_heads, dim, generator=g)) for n in (1, 15, 16, 17, 70)]
    k_pool, v_pool, tables, lengths = pool_of(seqs, page, kv_heads, dim, torch.float32, g)
    q = torch.randn(len(seqs) + 1, heads, dim, generator=g)
    lengths = torch.cat([lengths, torch.zeros(1, dtype=torch.int32)])  # a CUDA-graph padding row: length 0
    tables = torch.cat([tables, torch.zeros(1, tables.shape[1], dtype=torch.int32)])
    out = paged_decode_attention(q, k_pool, v_pool, tables, lengths, dim ** -0.5)
    for s, (k, v) in enumerate(seqs):
        torch.testing.assert_close(out[s].double(), naive(q[s:s + 1], k, v, [len(k) - 1])[0], atol=1e-4, rtol=1e-4)
    assert (out[-1] == 0).all()
    print("kernel == naive")


def test_triton_kernel_equals_naive():
    run_under_triton_interpreter(__file__, "kernel_check", "kernel == naive")
