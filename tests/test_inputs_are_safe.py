"""No command deletes or overwrites what it reads, whatever --force says (issue: data loss)."""

import shutil

import pytest
from click.testing import CliRunner

from trtbuild.atomic import atomic_output_dir, check_output_dir
from trtbuild.cli import main
from trtbuild.errors import TrtbuildError


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    target = tmp_path / "models" / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    return target


def snapshot(directory):
    return {p.relative_to(directory): p.stat().st_size for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("where", ["itself", "parent", "inside"])
def test_repo_never_replaces_its_checkpoint(ckpt, where):
    out = {"itself": ckpt, "parent": ckpt.parent, "inside": ckpt / "repo"}[where]
    before = snapshot(ckpt.parent)
    code, output = run("repo", ckpt, "--out", out, "--force", "--max-batch-size", 2, "--max-input-len", 32,
                       "--max-output-len", 16)
    assert code == 2, output
    assert "the input" in output and "--force never overrides" in output and "Traceback" not in output
    assert snapshot(ckpt.parent) == before


def test_repo_never_replaces_its_tokenizer_dir(ckpt, tmp_path):
    tokenizer = tmp_path / "tok"
    shutil.copytree(ckpt, tokenizer)
    code, output = run("repo", ckpt, "--tokenizer-dir", tokenizer, "--out", tokenizer, "--force")
    assert code == 2 and "the input" in output
    assert (tokenizer / "model.safetensors").is_file()


def test_export_onnx_never_replaces_its_checkpoint(ckpt):
    before = snapshot(ckpt)
    code, output = run("export", "onnx", ckpt, "--task", "text-generation-with-past", "--out", ckpt, "--force")
    assert code == 2, output
    assert "the input" in output and "Traceback" not in output
    assert snapshot(ckpt) == before


def test_guard_covers_files_and_symlinks(tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("hello\n")
    with pytest.raises(TrtbuildError, match="the input"):
        check_output_dir(tmp_path, True, inputs=(data,))  # --out holds the calibration file
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    (tmp_path / "real").mkdir()
    with pytest.raises(TrtbuildError, match="the input"):
        check_output_dir(link, True, inputs=(tmp_path / "real",))
    check_output_dir(tmp_path / "elsewhere", False, inputs=(data, None))


def test_unwritable_out_is_an_error_not_a_traceback(tmp_path):
    with pytest.raises(TrtbuildError, match="cannot write under"):
        with atomic_output_dir("/proc/trtbuild-out", inputs=()):
            pass
