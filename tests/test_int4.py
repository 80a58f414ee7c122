"""INT4 weight-only (W4A16) in the runtime: packing, the ModelOpt W4A16_AWQ and HF GPTQ checkpoint
layouts, the engine loading them, and the Triton dequantizing GEMM under Triton's interpreter."""

from __future__ import annotations


import pytest
import torch


from conftest import run_under_triton_interpreter  # noqa: E402
from trtbuild_runtime import int4
from trtbuild_runtime.int4 import Int4Linear


def test_pack_unpack_and_rtn_round_trip():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 24), generator=g)
    assert torch.equal(int4.unpack_codes(int4.pack_codes(codes)), codes.int())
    w = torch.randn(24, 256, generator=g)
    codes, scales = int4.quantize_rtn(w, 128)
    assert codes.shape == (256, 24) and scales.shape == (2, 24) and int(codes.min()) >= 0 and int(codes.max()) <= 15
    back = int4.dequantize(int4.pack_codes(codes), scales, None, 128, torch.float32)
    assert back.shape == w.shape
    step = scales.t().repeat_interleave(128, dim=1)
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())  # round to nearest: at most half a step off


def test_modelopt_layout_matches_modelopt_packing():
    """Our writer of ModelOpt's W4A16_AWQ layout equals ModelOpt's own pack_int4_in_uint8, and our reader inverts it."""
    quant_utils = pytest.importorskip("modelopt.torch.export.quant_utils")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=g)
    codes, scales = int4.quantize_rtn(w, 128)
    packed, weight_scale = int4.to_modelopt(codes, scales)
    theirs = quant_utils.pack_int4_in_uint8(w, weight_scale, 128)
    assert torch.equal(packed, theirs)
    qweight, sc, pre = int4.from_modelopt(theirs, weight_scale, 128, torch.float32)
    assert torch.equal(int4.unpack_codes(qweight), codes.int()) and torch.equal(sc, scales) and pre is None


def test_gptq_layout_and_act_order():
    g = torch.Generator().manual_seed(2)
    k, n, group = 256, 32, 64
    w = torch.randn(n, k, generator=g)
    codes, scales = int4.quantize_rtn(w, group)
    t = int4.to_gptq(codes, scales, group)
    qweight, sc, zeros, perm = int4.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group, torch.float32)
    assert zeros is None and perm is None and torch.equal(int4.unpack_codes(qweight), codes.int())
    # act-order: column k belongs to group g_idx[k]; the layer gathers x in group order
    g_idx = torch.randperm(k, generator=g) // group
    zero_codes = torch.randint(3, 12, (k // group, n), generator=g)
    packed_zeros = int4.pack_codes((zero_codes - 1).t().contiguous()).t().contiguous()
    qweight, sc, zeros, perm = int4.from_gptq(t["qweight"], packed_zeros, t["scales"], g_idx.int(), group, torch.float32)
    assert perm is not None and zeros is not None
    layer = Int4Linear(qweight, sc, zeros, group, perm=perm)
    reference = (codes.float() - zero_codes.float()[g_idx]) * t["scales"].float()[g_idx]  # [K, N], in the checkpoint's order
    x = torch.randn(3, k, generator=g)
    torch.testing.assert_close(layer(x), x @ reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["int4_awq", "int4_gptq"])
def test_engine_loads_int4_checkpoints_like_int4_wo(method, tiny_checkpoint, tmp_path):
    """An AWQ / GPTQ checkpoint holding the round-to-nearest codes runs exactly as int4_wo on the 16-bit one."""
    from trtbuild_runtime import EngineConfig, LLMEngine, SamplingParams
    from trtbuild_runtime.quantization import weight_bytes

    from bench.engine8b import write_int4_checkpoint

    ckpt = write_int4_checkpoint(tiny_checkpoint, tmp_path / method, method, 32)
    kw = dict(device="cpu", dtype="float32", max_batch_size=4, max_seq_len=64)
    loaded = LLMEngine(EngineConfig(str(ckpt), **kw))
    assert loaded.runner.quantization == method
    rtn = LLMEngine(EngineConfig(str(tiny_checkpoint), quantization="int4_wo", block_size=32, **kw))
    plain = LLMEngine(EngineConfig(str(tiny_checkpoint), **kw))
    layer = loaded.runner.model.layers[0]
    assert isinstance(layer.attn.qkv, Int4Linear) and isinstance(layer.mlp.down, Int4Linear)
    assert weight_bytes(loaded.runner.model) < weight_bytes(plain.runner.model)
    for a, b in zip(loaded.runner.model.layers, rtn.runner.model.layers):
        for name in ("qkv", "o"):
            assert torch.equal(getattr(a.attn, name).qweight, getattr(b.attn, name).qweight)
    prompts = [[5, 9, 13, 2, 7, 7, 1], [3, 3, 8]]
    params = SamplingParams(max_tokens=8, top_k=1, ignore_eos=True)
    ours = [o.generated_tokens for o in loaded.generate(prompts, params)]
    assert ours == [o.generated_tokens for o in rtn.generate(prompts, params)]
    with pytest.raises(ValueError, match="cannot run as fp8"):
        LLMEngine(EngineConfig(str(ckpt), quantization="fp8", **kw))


def test_int4_awq_from_modelopt_export(tiny_checkpoint, tmp_path):
    """`trtbuild quantize --precision int4_awq --format hf` (ModelOpt AWQ calibration) runs in the engine, near its 16-bit model."""
    pytest.importorskip("modelopt")
    from trtbuild.build.quantize import QuantizeOptions, Tolerance, quantize
    from trtbuild_runtime import EngineConfig, LLMEngine

    out = tmp_path / "awq"
    quantize(tiny_checkpoint, out, QuantizeOptions(precision="int4_awq", format="hf", block_size=64, calib_size=6, eval_size=4,
                                                   calib_max_len=48, tolerance=Tolerance(10.0, 0.0)))
    kw = dict(device="cpu", dtype="float32", max_batch_size=2, max_seq_len=64)
    engine = LLMEngine(EngineConfig(str(out), **kw))
    assert engine.runner.quantization == "int4_awq"
    assert isinstance(engine.runner.model.layers[0].mlp.gate_up, Int4Linear)
    plain = LLMEngine(EngineConfig(str(tiny_checkpoint), **kw))
    ids = torch.tensor([[5, 9, 13, 2, 7, 7, 1, 4]])
    with torch.no_grad():
        a = plain.runner.model.logits(_hidden(plain, ids))
        b = engine.runner.model.logits(_hidden(engine, ids))
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.5, rel


def _hidden(engine, ids):
    from trtbuild_runtime import attention

    model = engine.runner.model
    n = ids.shape[1]
    attention.set_context(attention.StepContext(True, torch.full((n,), engine.runner.trash_slot), fresh=True, num_seqs=1,
                                                max_query_len=n))
    try:
        return model(ids[0], torch.arange(n))
    finally:
        attention.set_context(None)


def kernel_check():
    """Run under TRITON_INTERPRET=1: the W4A16 kernel against F.linear with the dequantized weight."""
    g = torch.Generator().manual_seed(3)
    for m, n, k, group, asym in ((1, 96, 256, 128, False), (5, 64, 512, 64, True), (70, 128, 256, 128, False),
                                 (17, 80, 384, 128, True)):
        w = torch.randn(n, k, generator=g)
        codes, scales = int4.quantize_rtn(w, group)
        zeros = torch.randint(4, 12, (k // group, n), generator=g).float() if asym else None
        qweight = int4.pack_codes(codes)
        x = torch.randn(m, k, generator=g)
        out = int4.w4a16_matmul(x, qweight, scales, zeros, group)
        ref = x @ int4.dequantize(qweight, scales, zeros, group, torch.float32).t()
        err = ((out - ref).norm() / ref.norm()).item()
        assert out.shape == (m, n) and err < 1e-5, (m, n, k, group, err)
        cfg = int4._config(m, n, k, group, 8)
        print(f"m={m} split_k={cfg[3]} rel err {err:.2e}")
    print("w4a16 kernel == dequantized reference")


def test_w4a16_kernel_under_triton_interpreter():
    run_under_triton_interpreter(__file__, "kernel_check", "w4a16 kernel == dequantized reference")
