"""`trtbuild profile --server`: Triton's trace API turned on for N requests of a real local server
started with a trace file (as `trtbuild serve --trace-file` starts it), the time split per model of
the ensemble, and the server's trace settings put back."""

from __future__ import annotations

import json
import urllib.request

import pytest
from click.testing import CliRunner

from trtbuild.bench.trace import read_traces, split

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def traced_server(tiny_repository, tmp_path_factory):
    from trtbuild.bench.trace import trace_config_args
    from trtbuild.deploy.server import ServerOptions, TritonServer

    folder = tmp_path_factory.mktemp("traces")
    with TritonServer(tiny_repository, ServerOptions(extra_args=trace_config_args(folder / "trace.json")),
                      log_path=folder / "tritonserver.log") as server:
        yield server


def _setting(server) -> dict:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/trace/setting", timeout=5) as r:
        return json.loads(r.read())


def test_trace_split_per_model_of_the_ensemble(traced_server, tiny_repository, tmp_path):
    from trtbuild.cli import main

    entry = json.loads((tiny_repository / "trtbuild.json").read_text())["entrypoints"]
    out = tmp_path / "split"
    result = CliRunner().invoke(main, ["profile", "--server", f"{traced_server.http_url}/{entry['ensemble']}", "--requests", "3",
                                       "--output-tokens", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    splits = {s["model"]: s for s in json.loads((out / "trace_split.json").read_text())}
    assert set(splits) == {entry["ensemble"], entry["text"]}  # the ensemble and the text model it calls
    ensemble, text = splits[entry["ensemble"]], splits[entry["text"]]
    assert (ensemble["depth"], text["depth"]) == (0, 1)
    assert ensemble["requests"] == text["requests"] == 3
    assert text["ms"]["compute_infer"] > 0 and all(v >= 0 for v in text["ms"].values())
    assert ensemble["end_to_end_ms"] >= text["end_to_end_ms"] > 0
    assert "| model | requests | queue |" in result.output and (out / "trace_split.png").stat().st_size > 5_000
    assert _setting(traced_server)["trace_level"] == ["OFF"]  # put back as it was


def test_a_server_without_a_trace_file_is_one_line(tiny_server, tmp_path):
    from trtbuild.cli import main

    result = CliRunner().invoke(main, ["profile", "--server", f"{tiny_server.http_url}/ensemble", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "trtbuild serve REPO --trace-file PATH" in result.output


def test_fragments_merge_by_id(tmp_path):
    f = tmp_path / "t.json.0"
    f.write_text(json.dumps([
        {"id": 1, "model_name": "ensemble"}, {"id": 2, "model_name": "llm", "parent_id": 1},
        *({"id": 2, "timestamps": [{"name": n, "ns": ns}]} for n, ns in (
            ("REQUEST_START", 0), ("QUEUE_START", 0), ("COMPUTE_START", 1_000_000), ("COMPUTE_INPUT_END", 2_000_000),
            ("COMPUTE_OUTPUT_START", 5_000_000), ("COMPUTE_END", 6_000_000), ("REQUEST_END", 6_000_000))),
        {"id": 1, "timestamps": [{"name": "REQUEST_START", "ns": 0}, {"name": "REQUEST_END", "ns": 9_000_000}]},
    ]))
    (ensemble, llm) = split(read_traces([f]))
    assert (ensemble.model, ensemble.depth, ensemble.end_to_end_ms) == ("ensemble", 0, 9.0)
    assert llm.ms == {"queue": 1.0, "compute_input": 1.0, "compute_infer": 3.0, "compute_output": 1.0, "after_compute": 0.0}
