import json

import pytest

from trtbuild.checkpoint import load_model_spec
from trtbuild.errors import TrtbuildError
from trtbuild.spec import BuildSpec, KVCacheSpec, ModelNames, ModelSpec

LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float16",
}


def test_llama2_7b_shape_is_derived_from_config(tmp_path):
    spec = ModelSpec.from_config(LLAMA, tmp_path / "config.json")
    assert spec.num_kv_heads == 32 and spec.head_dim == 128 and spec.dtype == "float16"
    # Llama-2-7B has 6.74e9 parameters
    assert spec.num_parameters == pytest.approx(6.74e9, rel=0.01)
    assert spec.kv_bytes_per_token(2) == 2 * 32 * 32 * 128 * 2


def test_rope_parameters_of_transformers_5_are_read(tmp_path):
    config = dict(LLAMA, rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0})
    spec = ModelSpec.from_config(config, tmp_path / "config.json")
    assert spec.rope_theta == 500000.0
    assert spec.rope_scaling == {"rope_type": "llama3", "factor": 8.0}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "bert"}, "model_type 'bert' is not supported"),
        ({"model_type": None}, "'model_type' is missing"),
        ({"hidden_size": None}, "'hidden_size' is missing"),
    ],
)
def test_bad_configs_name_the_file_and_field(tmp_path, change, message):
    config = {k: v for k, v in {**LLAMA, **change}.items() if v is not None}
    with pytest.raises(TrtbuildError, match=message) as e:
        ModelSpec.from_config(config, tmp_path / "config.json")
    assert "config.json" in str(e.value)


def test_tiny_checkpoint_spec(tiny_checkpoint):
    spec = load_model_spec(tiny_checkpoint)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert spec.vocab_size == config["vocab_size"] == 49152
    assert spec.num_layers == 2 and spec.num_kv_heads == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_batch_size": 0}, "--max-batch-size must be a positive integer"),
        ({"max_input_len": 900, "max_output_len": 200}, "exceeds the model's max_position_embeddings"),
        ({"max_beam_width": 2}, "does not support beam search"),
        ({"runtime": "vllm"}, "unknown runtime"),
        ({"kv_cache": KVCacheSpec(free_gpu_mem_fraction=1.5)}, "free-gpu-mem-fraction"),
    ],
)
def test_build_spec_rejects_impossible_values(tiny_checkpoint, kwargs, message):
    with pytest.raises(TrtbuildError, match=message):
        BuildSpec(checkpoint=tiny_checkpoint, model=load_model_spec(tiny_checkpoint), **kwargs)


def test_kv_cache_blocks_cover_every_sequence_at_full_length():
    kv = KVCacheSpec(page_size=32)
    assert kv.blocks_for(max_batch_size=4, max_seq_len=100) == 4 * 4
    assert KVCacheSpec(num_blocks=7).blocks_for(4, 100) == 7


def test_model_names_follow_nvidia_for_the_trtllm_backend():
    assert ModelNames.for_runtime("tensorrtllm").llm == "tensorrt_llm"
    assert ModelNames.for_runtime("tensorrtllm").bls == "tensorrt_llm_bls"
    assert ModelNames.for_runtime("transformers").llm == "llm"
