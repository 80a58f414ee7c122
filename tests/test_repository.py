import dataclasses
import json
import shutil

import pytest
from google.protobuf import json_format

from trtbuild.repository import interface
from trtbuild.errors import TrtbuildError
from trtbuild.resources import TEMPLATE_ROOT
from trtbuild.repository.templates import environment
from trtbuild.runtimes import generate
from trtbuild.runtimes.transformers import plan as plan_llm_repository
from trtbuild.repository.render import render


def _configs(repo):
    return {p.parent.name: p.read_text() for p in repo.glob("*/config.pbtxt")}


def test_repository_layout_and_manifest(tiny_spec, tmp_path):
    repo = generate(tiny_spec, tmp_path / "repo")
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == ["ensemble", "llm", "llm_bls", "postprocessing", "preprocessing"]
    for model in ("llm", "preprocessing", "postprocessing"):
        assert (repo / model / "1" / "model.py").is_file()
        assert (repo / model / "1" / "trtbuild_runtime" / "backend" / "tensors.py").is_file()
    assert (repo / "ensemble" / "1").is_dir()
    manifest = json.loads((repo / "trtbuild.json").read_text())
    assert manifest["spec"]["max_batch_size"] == tiny_spec.max_batch_size
    assert manifest["spec"]["max_seq_len"] == tiny_spec.max_seq_len


def test_every_value_comes_from_the_spec(tiny_spec):
    rendered = {m.plan.name: m.config for m in render(plan_llm_repository(tiny_spec))}
    for config in rendered.values():
        assert config.max_batch_size == tiny_spec.max_batch_size
    llm = rendered["llm"]
    params = {k: v.string_value for k, v in llm.parameters.items()}
    assert params["max_input_len"] == str(tiny_spec.max_input_len)
    assert params["checkpoint_dir"] == str(tiny_spec.checkpoint.absolute())
    assert int(params["kv_cache_num_blocks"]) * tiny_spec.kv_cache.page_size >= tiny_spec.max_batch_size * tiny_spec.max_seq_len
    assert llm.model_transaction_policy.decoupled


def test_ensemble_matches_nvidias_tensor_interface(tiny_spec):
    ensemble = {m.plan.name: m.config for m in render(plan_llm_repository(tiny_spec))}["ensemble"]
    inputs = {t.name: t for t in ensemble.input}
    # text_input and max_tokens are required but declared optional (the deviations): Triton 2.51
    # answers a decoupled ensemble's missing required input with an empty stream; the text model
    # refuses each by name instead (tests/test_serving.py::test_a_missing_max_tokens_is_an_error_on_every_path,
    # tests/test_bad_input_served.py)
    assert inputs["text_input"].optional and inputs["max_tokens"].optional
    as_json = {n: json_format.MessageToDict(t) for n, t in inputs.items()}
    assert as_json["text_input"]["dataType"] == "TYPE_STRING"
    assert as_json["max_tokens"]["dataType"] == "TYPE_INT32"
    assert as_json["stream"]["dataType"] == "TYPE_BOOL"
    assert as_json["seed"]["dataType"] == "TYPE_UINT64"
    for name in ("bad_words", "stop_words", "end_id", "pad_id", "top_k", "top_p", "temperature", "length_penalty",
                 "repetition_penalty", "min_tokens", "presence_penalty", "frequency_penalty", "return_log_probs",
                 "beam_width", "exclude_input_in_output", "num_return_sequences"):
        assert inputs[name].optional, name
    assert {t.name for t in ensemble.output} >= {"text_output", "cum_log_probs", "output_log_probs", "batch_index", "sequence_index"}


def _broken_root(tmp_path, template, old, new):
    root = tmp_path / "templates"
    shutil.copytree(TEMPLATE_ROOT, root)
    path = root / template
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return root


@pytest.mark.parametrize(
    "template, old, new, message",
    [
        ("preprocessing/config.pbtxt.j2", 'backend: "python"', 'backend: "python"\nbogus_field: 3',
         r"model 'preprocessing': config.pbtxt from template preprocessing/config.pbtxt.j2 is invalid: .*bogus_field"),
        ("llm_transformers/config.pbtxt.j2", "max_batch_size: {{ spec.max_batch_size }}", "max_batch_size: {{ max_batch }}",
         r"model 'llm': template llm_transformers/config.pbtxt.j2 uses an unfilled value: 'max_batch' is undefined"),
        ("llm_transformers/config.pbtxt.j2", "max_batch_size: {{ spec.max_batch_size }}", "max_batch_size: ${triton_max_batch_size}",
         r"model 'llm': config.pbtxt from template llm_transformers/config.pbtxt.j2 is invalid"),
        ("ensemble/config.pbtxt.j2", "{%- for step in steps %}", "{%- for step in steps[1:] %}",
         r"ensemble 'ensemble' .*output 'text_output' is produced by no step"),
    ],
)
def test_broken_templates_are_rejected_with_model_field_and_template(tiny_spec, tmp_path, template, old, new, message):
    root = _broken_root(tmp_path, template, old, new)
    with pytest.raises(TrtbuildError, match=message):
        render(plan_llm_repository(tiny_spec), environment(root))


def _tensorrtllm_plans(tiny_spec, tmp_path):
    """NVIDIA's token-id LLM step: its ensembles tokenize, generate and detokenize in three steps."""
    from trtbuild.runtimes import tensorrtllm

    return tensorrtllm.plan(dataclasses.replace(tiny_spec, runtime="tensorrtllm", engine_dir=tmp_path))


def test_a_three_step_ensemble_missing_a_step_is_rejected(tiny_spec, tmp_path):
    root = _broken_root(tmp_path, "ensemble/config.pbtxt.j2", "{%- for step in steps %}", "{%- for step in steps[1:] %}")
    with pytest.raises(TrtbuildError, match=r"ensemble 'ensemble' .*'_\w+' feeds 'tensorrt_llm\.\w+' but nothing upstream produces it"):
        render(_tensorrtllm_plans(tiny_spec, tmp_path), environment(root))


def test_type_mismatch_in_ensemble_wiring_is_rejected(tiny_spec, tmp_path, monkeypatch):
    bad = tuple(
        interface.Tensor(t.name, "TYPE_FP32", t.dims, t.optional) if t.name == "INPUT_ID" else t
        for t in interface.PREPROCESSING_OUTPUTS
    )
    monkeypatch.setattr(interface, "PREPROCESSING_OUTPUTS", bad)
    with pytest.raises(TrtbuildError, match=r"'_INPUT_ID' is TYPE_FP32\[-1\] but 'tensorrt_llm.input_ids' wants TYPE_INT32\[-1\]"):
        render(_tensorrtllm_plans(tiny_spec, tmp_path))


def test_failed_render_writes_nothing(tiny_spec, tmp_path, monkeypatch):
    out = tmp_path / "repo"
    monkeypatch.setattr(interface, "TEXT_ENSEMBLE_OUTPUTS", interface.TEXT_ENSEMBLE_OUTPUTS + (interface.Tensor("nope", "TYPE_FP32", (1,)),))
    with pytest.raises(TrtbuildError, match="step 'llm' has no output 'nope'"):
        generate(tiny_spec, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_force(tiny_spec, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TrtbuildError, match="exists and is not empty.*--force"):
        generate(tiny_spec, out)
    assert (out / "keep.txt").read_text() == "mine"
    generate(tiny_spec, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "ensemble" / "config.pbtxt").is_file()
