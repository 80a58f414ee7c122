"""The runtime's FP8 path (weights, activations, KV pages) and prompt-lookup drafting.

FP8 GEMMs run on this CPU too (torch implements `_scaled_mm` here), so the same layers the GPU
runs are checked against float32; the Triton kernels that produce e4m3 activations on CUDA are
checked against the torch functions under Triton's interpreter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_under_triton_interpreter

from trtbuild_runtime import EngineConfig, LLMEngine, SamplingParams
from trtbuild_runtime import attention
from trtbuild_runtime.models import load_model
from trtbuild_runtime.quantization import Fp8Linear, QuantizedActivation, quantize_rows, rms_norm, silu_mul
from trtbuild_runtime.speculative import PromptLookup, accept


def prefill_logits(checkpoint, ids: torch.Tensor, quantization: str = "none") -> torch.Tensor:
    model = load_model(checkpoint, torch.float32, torch.device("cpu"), 128, quantization)
    n = len(ids)
    attn = model.layers[0].attn
    scratch = torch.zeros(2, 1, 16, attn.kv_heads, attn.head_dim)
    for layer in model.layers:
        layer.attn.k_cache, layer.attn.v_cache = scratch[0], scratch[1]
    attention.set_context(attention.StepContext(True, torch.zeros(n, dtype=torch.long), fresh=True, num_seqs=1, max_query_len=n))
    try:
        with torch.no_grad():
            return model.logits(model(ids, torch.arange(n)))
    finally:
        attention.set_context(None)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def modelopt_fp8(tiny_checkpoint, tmp_path_factory) -> Path:
    """A real ModelOpt FP8 export (weights and KV scales) of the tiny model."""
    from trtbuild.build.quantize import QuantizeOptions, quantize

    out = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    options = QuantizeOptions(precision="fp8", kv_cache_dtype="fp8", format="hf", calib_size=8, eval_size=2, device="cpu")
    quantize(tiny_checkpoint, out, options)
    return out


def test_fp8_linear_is_close_to_the_float_layer():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(5, 64, generator=g)
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (1, 48)
    with torch.no_grad():
        assert relative_error(fp8(x), linear(x)) < 0.06  # e4m3 keeps 3 mantissa bits: ~4% per element
    pre = quantize_rows(x)
    torch.testing.assert_close(fp8(pre), fp8(x))  # a producer's e4m3 output is the same input


def test_modelopt_fp8_checkpoint_runs_on_its_own_grid(tiny_checkpoint, modelopt_fp8):
    """The e4m3 codes the runtime multiplies are exactly the ones ModelOpt calibrated and wrote."""
    from safetensors import safe_open

    model = load_model(modelopt_fp8, torch.float32, torch.device("cpu"), 64, "fp8")
    with safe_open(str(next(modelopt_fp8.glob("*.safetensors"))), framework="pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
        k_scale = float(f.get_tensor("model.layers.0.self_attn.k_proj.k_scale"))
    qkv = model.layers[0].attn.qkv
    assert isinstance(qkv, Fp8Linear)
    assert torch.equal(qkv.weight[: q.shape[0]].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(qkv.weight[q.shape[0]: q.shape[0] + k.shape[0]].view(torch.uint8), k.view(torch.uint8))
    assert model.layers[0].attn.k_scale == pytest.approx(k_scale)
    ids = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(1))
    assert relative_error(prefill_logits(modelopt_fp8, ids, "fp8"), prefill_logits(tiny_checkpoint, ids)) < 0.2


def test_the_checkpoint_says_how_it_runs(modelopt_fp8):
    """A ModelOpt FP8 export runs FP8 with its calibrated FP8 KV pages, without being told; other
    pre-quantized formats are refused by name."""
    engine = LLMEngine(EngineConfig(str(modelopt_fp8), max_seq_len=64, max_batch_size=2))
    assert engine.runner.quantization == "fp8" and engine.runner.kv.dtype == torch.float8_e4m3fn
    from trtbuild_runtime.config import UnsupportedModel, checkpoint_quantization

    with pytest.raises(UnsupportedModel, match="awq"):
        checkpoint_quantization({"quantization_config": {"quant_method": "awq", "bits": 4}})


@pytest.mark.parametrize("options", [dict(quantization="fp8"), dict(kv_cache_dtype="fp8"),
                                     dict(quantization="fp8", kv_cache_dtype="fp8", speculative_decoding_mode="ngram")])
def test_quantized_engine_serves_and_stays_close(tiny_checkpoint, options):
    base = LLMEngine(EngineConfig(str(tiny_checkpoint), max_seq_len=64, max_batch_size=4, kv_cache_page_size=16))
    engine = LLMEngine(EngineConfig(str(tiny_checkpoint), max_seq_len=64, max_batch_size=4, kv_cache_page_size=16, **options))
    fp8_kv = options.get("kv_cache_dtype") == "fp8"
    assert engine.runner.kv.dtype == (torch.float8_e4m3fn if fp8_kv else torch.float32)
    assert engine.runner.block_bytes == base.runner.block_bytes // (4 if fp8_kv else 1)  # 1 byte vs float32's 4
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10 + i] * 3 for i in range(4)]  # decode reads the pages the prompts wrote
    params = SamplingParams(max_tokens=12, top_k=1)
    outputs = engine.generate(prompts, params)
    assert all(len(o.generated_tokens) == 12 and o.error is None for o in outputs)
    expected = base.generate(prompts, params)
    same = sum(a == b for o, e in zip(outputs, expected) for a, b in zip(o.generated_tokens, e.generated_tokens))
    assert same / 48 > 0.3  # a random tiny model diverges quickly once a token differs; none would be a broken path
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_fp8_kv_pages_hold_scaled_values():
    k_cache = torch.zeros(2, 16, 1, 4, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    k = torch.tensor([[[0.5, -1.0, 2.0, 8.0]]])
    attention.store_kv(k_cache, v_cache, k, k, torch.tensor([3]), k_scale=0.5, v_scale=2.0)
    assert k_cache[0, 3, 0].float().tolist() == [1.0, -2.0, 4.0, 16.0]
    assert v_cache[0, 3, 0].float().tolist() == [0.25, -0.5, 1.0, 4.0]
    pages = attention.gather_pages(k_cache, torch.tensor([[0]], dtype=torch.int32), 0.5, torch.float32)
    assert pages[0, 3, 0].tolist() == k[0, 0].tolist()


def kernels_check() -> None:
    """Run under TRITON_INTERPRET=1: the fused producers equal the torch functions."""
    from trtbuild_runtime import quant_kernels
    from trtbuild_runtime.kernels import paged_decode_attention

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=g) * 3
    w = torch.rand(96, generator=g) + 0.5
    torch.testing.assert_close(quant_kernels.rms_norm(x, w, 1e-5, False), rms_norm(x, w, 1e-5), atol=1e-6, rtol=1e-6)
    for got, want in ((quant_kernels.rms_norm(x, w, 1e-5, True), rms_norm(x, w, 1e-5, True)),
                      (quant_kernels.silu_mul_quant(x), silu_mul(x, True)),
                      (quant_kernels.quantize_rows(x), quantize_rows(x))):
        q, s = got
        assert isinstance(want, QuantizedActivation)
        torch.testing.assert_close(s, want.scale, atol=1e-7, rtol=1e-6)
        # Triton 3.6's interpreter converts e4m3 values with a zero mantissa (powers of two) one
        # binade low; the GPU converts in hardware (bench/gpu_suite.py checks these kernels there)
        exact = want.data.float()
        mantissa = torch.frexp(exact.abs().clamp(min=2**-9))[0] != 0.5
        torch.testing.assert_close(q.float()[mantissa], exact[mantissa], atol=0, rtol=0)
    # the decode kernel on an e4m3 pool equals the reference that dequantizes as it gathers
    heads, kv_heads, dim, page = 4, 2, 16, 16
    k_pool = (torch.randn(5, page, kv_heads, dim, generator=g) * 2).to(torch.float8_e4m3fn)
    v_pool = (torch.randn(5, page, kv_heads, dim, generator=g) * 2).to(torch.float8_e4m3fn)
    tables = torch.tensor([[0, 3], [2, 0], [4, 1]], dtype=torch.int32)
    lengths = torch.tensor([20, 5, 32], dtype=torch.int32)
    q = torch.randn(3, heads, dim, generator=g)
    out = paged_decode_attention(q, k_pool, v_pool, tables, lengths, dim ** -0.5, 0.5, 0.25)
    ctx = attention.StepContext(False, torch.zeros(3, dtype=torch.long), context_lens=lengths, block_tables=tables)
    ref = attention.paged_decode(q, k_pool, v_pool, ctx, dim ** -0.5, 0.5, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # a continued prompt as decode rows (one per query token, its own context length) == the masked reference
    starts = torch.tensor([12, 0], dtype=torch.int32)
    counts = [6, 5]
    token_tables = torch.repeat_interleave(tables[:2], torch.tensor(counts), dim=0)
    token_lens = torch.cat([torch.arange(int(s0) + 1, int(s0) + n + 1) for s0, n in zip(starts, counts)]).int()
    queries = torch.randn(sum(counts), heads, dim, generator=g)
    rows = paged_decode_attention(queries, k_pool, v_pool, token_tables, token_lens, dim ** -0.5, 0.5, 0.25)
    padded = torch.zeros(2, max(counts), heads, dim)
    padded[0, :6], padded[1, :5] = queries[:6], queries[6:]
    ref = attention.paged_attention_reference(padded, k_pool, v_pool, tables[:2], starts + torch.tensor(counts, dtype=torch.int32),
                                              starts.long(), dim ** -0.5, 0.5, 0.25)
    torch.testing.assert_close(rows, torch.cat([ref[0, :6], ref[1, :5]]), atol=1e-4, rtol=1e-4)
    # K/V stored by one kernel launch == the torch path, for a 16-bit and an e4m3 pool
    from trtbuild_runtime.kernels import store_kv

    k_new, v_new = torch.randn(3, kv_heads, dim, generator=g), torch.randn(3, kv_heads, dim, generator=g)
    slots = torch.tensor([5, 40, 17])
    for dtype in (torch.float32, torch.float8_e4m3fn):
        pools = [torch.zeros(5, page, kv_heads, dim, dtype=dtype) for _ in range(4)]
        assert store_kv(pools[0], pools[1], k_new, v_new, slots, 0.5, 2.0)
        attention.store_kv(pools[2], pools[3], k_new, v_new, slots, 0.5, 2.0)
        for got, want in ((pools[0], pools[2]), (pools[1], pools[3])):
            # the interpreter's e4m3 quirks (above; subnormals too) aside
            magnitude = want.float().abs()
            keep = (torch.frexp(magnitude.clamp(min=2**-9))[0] != 0.5) & (magnitude >= 2**-6)
            if dtype != torch.float8_e4m3fn:
                keep = torch.ones_like(keep)
            torch.testing.assert_close(got.float()[keep], want.float()[keep], atol=0, rtol=0)
    # the unit-scale GEMM's epilogue
    y = torch.randn(5, 300, generator=g)
    sx, sw, bias = torch.rand(5, 1, generator=g), torch.rand(1, 300, generator=g), torch.randn(300, generator=g)
    torch.testing.assert_close(quant_kernels.scale_outer_(y.clone(), sx, sw, bias), y * sx * sw + bias)
    print("fp8 kernels == torch")


def test_fp8_triton_kernels_equal_torch():
    run_under_triton_interpreter(__file__, "kernels_check", "fp8 kernels == torch")


# ------------------------------------------------------------------ prompt lookup
def test_prompt_lookup_drafts_what_followed_the_latest_match():
    lookup = PromptLookup(num_tokens=3, max_ngram=2)
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3]
    assert lookup.propose(tokens, limit=10) == [7, 8, 6]  # the bigram (2, 3) last recurred before 7
    assert lookup.propose(tokens, limit=2) == [7, 8]
    assert lookup.propose([5, 6, 7], limit=10) == []
    assert lookup.propose(tokens, limit=0) == []


def test_accept_keeps_the_agreed_prefix_and_the_target_token():
    assert accept([4, 5, 6], [4, 5, 9, 1]) == [4, 5, 9]
    assert accept([4, 5, 6], [4, 5, 6, 1]) == [4, 5, 6, 1]
    assert accept([4, 5, 6], [3, 5, 6, 1]) == [3]
