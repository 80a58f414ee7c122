"""The FP8 path of the transformers engine (the runtime's Fp8Linear on its modules) and the sampling
conventions both engines share; runs on CPU."""

import pytest
import torch

from trtbuild_runtime.backend import hf_engine, sampling
from trtbuild_runtime.quantization import Fp8Linear


def test_fp8_linear_matches_the_bf16_layer_within_e4m3_precision():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=True).to(torch.bfloat16)
    x = torch.randn(4, 7, 256, dtype=torch.bfloat16)
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (1, 128)
    ref, out = linear(x).float(), fp8(x).float()
    assert out.shape == ref.shape
    rel = (out - ref).norm() / ref.norm()
    assert 1e-4 < rel < 0.06  # e4m3 has a 3-bit mantissa: a few percent, never exact
    dequantized = fp8.weight.float() * fp8.weight_scale.t()
    assert torch.allclose(dequantized, linear.weight.float(), rtol=0.07, atol=1e-3)


def test_quantize_fp8_keeps_the_head_and_stays_close_to_bf16(tiny_checkpoint):
    model = hf_engine.load_model(str(tiny_checkpoint), "bfloat16", "cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits.float()
    swapped = hf_engine.quantize_fp8(model)
    assert swapped == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, Fp8Linear)
    with torch.no_grad():
        out = model(ids).logits.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.1, rel
    # random weights leave near-ties between logits, so only most greedy tokens survive e4m3 rounding
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.6


@pytest.mark.parametrize(
    "values, expected",
    [
        ({}, {"top_k": 1, "top_p": 1.0, "temperature": 1.0}),
        ({"temperature": 0.0, "top_k": 40}, {"top_k": 1, "top_p": 1.0, "temperature": 1.0}),
        ({"top_k": 1, "temperature": 0.7}, {"top_k": 1, "top_p": 1.0, "temperature": 1.0}),
        ({"temperature": 0.7, "top_p": 0.9}, {"top_k": 100, "top_p": 0.9, "temperature": 0.7}),
        ({"top_k": 5}, {"top_k": 5, "top_p": 1.0, "temperature": 1.0}),
    ],
)
def test_sampling_follows_tensorrt_llm_greedy_convention(values, expected):
    assert sampling.sampling_kwargs(True, 100, **values) == pytest.approx(expected)


@pytest.mark.parametrize("values, message", [
    (dict(top_p=1.5, top_k=3), "top_p must be in"),
    (dict(temperature=-1.0), "temperature must be >= 0"),  # alone: a greedy request would otherwise ignore it
    (dict(top_k=-1), "runtime_top_k must be >= 0"),
    (dict(top_k=101), "exceeds the vocabulary"),
    (dict(seed=-1), "seed must be in"),
])
def test_sampling_rejects_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        sampling.check_sampling(100, **values)


def test_sampling_needs_per_request_processors():
    with pytest.raises(ValueError, match="no per-request sampling"):
        sampling.sampling_kwargs(False, 100, top_k=3)
