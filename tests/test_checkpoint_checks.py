"""A checkpoint is checked before any command works on it: safetensors files whole, the embedding
shape as config.json says, the tokenizer inside the vocabulary. Every command that reads one
refuses a broken one with one line naming the file and field, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from trtbuild.cli import main


def _copy(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    return ckpt


def cut_in_half(ckpt):
    weights = next(ckpt.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return weights.name, "is cut short"


def wrong_vocab(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["vocab_size"] = 1000
    (ckpt / "config.json").write_text(json.dumps(config))
    return "config.json", "vocab_size 1000 and hidden_size"


def tokenizer_too_big(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    embed = config["vocab_size"]
    tokenizer = json.loads((ckpt / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({"id": embed + 5, "content": "<|beyond|>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
    (ckpt / "tokenizer.json").write_text(json.dumps(tokenizer))
    return "tokenizer.json", "('<|beyond|>') is outside vocab_size"


def garbage_header(ckpt):
    weights = next(ckpt.glob("*.safetensors"))
    weights.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    return weights.name, "is not a complete safetensors file"


BREAKS = [cut_in_half, wrong_vocab, tokenizer_too_big, garbage_header]
COMMANDS = {
    "repo": lambda ckpt, out: ["repo", str(ckpt), "--out", str(out)],
    "inspect": lambda ckpt, out: ["inspect", str(ckpt)],
    "quantize": lambda ckpt, out: ["quantize", str(ckpt), "--precision", "fp8", "--out", str(out)],
    "export onnx": lambda ckpt, out: ["export", "onnx", str(ckpt), "--task", "text-generation-with-past", "--out", str(out)],
    "engine": lambda ckpt, out: ["engine", str(ckpt), "--precision", "fp16", "--out", str(out), "--dry-run"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("breaking", BREAKS, ids=[b.__name__ for b in BREAKS])
def test_a_broken_checkpoint_is_refused_before_any_work(tiny_checkpoint, tmp_path, command, breaking):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    where, message = breaking(ckpt)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, COMMANDS[command](ckpt, out))
    assert result.exit_code == 2, result.output
    assert message in result.output and where in result.output and "Traceback" not in result.output, result.output
    assert not out.exists()


def test_an_intact_checkpoint_passes(tiny_checkpoint):
    from trtbuild.checkpoint import check_against_config, load_model_spec

    spec = load_model_spec(tiny_checkpoint)
    check_against_config(tiny_checkpoint, spec.vocab_size, spec.hidden_size)


def test_a_kv_pool_that_cannot_fit_this_cpu_is_refused_when_the_repository_is_generated(tiny_checkpoint, tmp_path):
    out = tmp_path / "repo"
    result = CliRunner().invoke(main, ["repo", str(tiny_checkpoint), "--out", str(out), "--device", "cpu",
                                       "--max-batch-size", "100000"])
    assert result.exit_code == 2 and "--max-batch-size 100000" in result.output, result.output
    assert "the KV cache needs 2,400,000 blocks of 32 tokens" in result.output and "GiB RAM available" in result.output
    assert not out.exists()
    fits = CliRunner().invoke(main, ["repo", str(tiny_checkpoint), "--out", str(out), "--device", "cpu", "--max-batch-size", "64"])
    assert fits.exit_code == 0, fits.output


def test_a_build_that_cannot_fit_the_named_gpu_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "repo"
    result = CliRunner().invoke(main, ["repo", str(tiny_checkpoint), "--out", str(out), "--device", "cuda", "--gpu-mem-gib", "0.001"])
    assert result.exit_code == 2 and "cannot be served on a 0.0 GiB GPU: the weights" in result.output, result.output
    assert not out.exists()
    fits = CliRunner().invoke(main, ["repo", str(tiny_checkpoint), "--out", str(out), "--device", "cuda", "--gpu-mem-gib", "80"])
    assert fits.exit_code == 0, fits.output


@pytest.mark.server
def test_serve_names_the_model_that_failed_to_load_and_why(tiny_spec, tmp_path):
    """A checkpoint broken after the repository was generated: the cause from Triton's log, not only
    "failed to load all models"."""
    import dataclasses

    from trtbuild.deploy.server import TritonServer
    from trtbuild.errors import TrtbuildError
    from trtbuild.runtimes import generate

    ckpt = _copy(tiny_spec.checkpoint, tmp_path)
    repo = generate(dataclasses.replace(tiny_spec, checkpoint=ckpt), tmp_path / "repo")
    cut_in_half(ckpt)
    server = TritonServer(repo, log_path=tmp_path / "tritonserver.log")
    with pytest.raises(TrtbuildError) as failed:
        server.start(timeout=120)
    assert "model 'llm': Internal: SafetensorError" in str(failed.value), str(failed.value)
