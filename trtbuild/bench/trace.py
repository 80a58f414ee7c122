"""`trtbuild profile --server HOST:PORT/MODEL`: where a served request's time goes, model by model.

Triton's trace API (`/v2/trace/setting`) is turned on at TIMESTAMPS level for N requests, which are
then sent (one at a time, streamed), and set back as it was. Triton writes traces only to a file
fixed at start-up (`--trace-config triton,file=PATH`: `trtbuild serve --trace-file PATH`; the API
refuses to change it), which this command reads, so the server must run on this machine.
Per model of the ensemble (or BLS) the trace's timestamps give, in ms (means over the requests):
- queue = COMPUTE_START - QUEUE_START, compute input = COMPUTE_INPUT_END - COMPUTE_START,
  compute infer = COMPUTE_OUTPUT_START - COMPUTE_INPUT_END, compute output = COMPUTE_END - COMPUTE_OUTPUT_START;
- after compute = REQUEST_END - COMPUTE_END: a decoupled model's execute() returns at once and its
  responses follow from its own thread, so its generation time shows here;
- end to end = REQUEST_END - REQUEST_START.
Written as trace_split.json, a markdown table and a stacked bar PNG.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from trtbuild.errors import TrtbuildError

PARTS = (("queue", "QUEUE_START", "COMPUTE_START"), ("compute_input", "COMPUTE_START", "COMPUTE_INPUT_END"),
         ("compute_infer", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"),
         ("compute_output", "COMPUTE_OUTPUT_START", "COMPUTE_END"), ("after_compute", "COMPUTE_END", "REQUEST_END"))


def trace_config_args(trace_file: Path) -> tuple[str, ...]:
    """tritonserver flags that let `trtbuild profile --server` trace: the file, tracing off until asked."""
    return (f"--trace-config=triton,file={Path(trace_file).absolute()}", "--trace-config=level=OFF")


@dataclasses.dataclass(frozen=True)
class ModelSplit:
    model: str
    requests: int
    depth: int  # 0: the entry point, 1: a model it calls, ...
    ms: dict[str, float]  # part -> mean ms
    end_to_end_ms: float


def _request(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise TrtbuildError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:200]}") from None
    except OSError as e:
        raise TrtbuildError(f"cannot reach {url}: {e}", hint="--server is the HTTP port (8000), HOST:PORT/MODEL") from None


def read_traces(files: list[Path]) -> list[dict[str, Any]]:
    """Triton writes a trace as fragments with the same id; merged here into one dict per trace."""
    merged: dict[int, dict[str, Any]] = {}
    for f in files:
        for fragment in json.loads(f.read_text() or "[]"):
            t = merged.setdefault(fragment["id"], {"id": fragment["id"], "timestamps": {}})
            for k, v in fragment.items():
                if k == "timestamps":
                    t["timestamps"].update({s["name"]: s["ns"] for s in v})
                elif k != "id":
                    t[k] = v
    return list(merged.values())


def split(traces: list[dict[str, Any]]) -> list[ModelSplit]:
    by_id = {t["id"]: t for t in traces}

    def depth(t: dict) -> int:
        d, parent = 0, t.get("parent_id")
        while parent in by_id and d < 16:
            d, parent = d + 1, by_id[parent].get("parent_id")
        return d

    groups: dict[str, list[dict]] = {}
    for t in traces:
        if "model_name" in t and {"REQUEST_START", "REQUEST_END"} <= set(t["timestamps"]):
            groups.setdefault(t["model_name"], []).append(t)
    out = []
    for model, ts in groups.items():
        ms = {}
        for part, start, end in PARTS:
            values = [(t["timestamps"][end] - t["timestamps"][start]) / 1e6 for t in ts if {start, end} <= set(t["timestamps"])]
            ms[part] = sum(values) / len(values) if values else 0.0
        e2e = sum((t["timestamps"]["REQUEST_END"] - t["timestamps"]["REQUEST_START"]) / 1e6 for t in ts) / len(ts)
        out.append(ModelSplit(model, len(ts), min(depth(t) for t in ts), ms, e2e))
    return sorted(out, key=lambda s: (s.depth, s.model))


def collect(server: str, model: str, *, requests: int = 8, prompt: str = "The capital of France is",
            max_tokens: int = 16, trace_file: Path | None = None, grpc_url: str | None = None) -> list[ModelSplit]:
    """Trace `requests` generate requests to `model` at `server` (host:http_port) and split their time."""
    from trtbuild.clients.generate import generate

    if requests < 1:
        raise TrtbuildError(f"--requests must be >= 1, got {requests}")
    base = f"http://{server}"
    before = _request(f"{base}/v2/trace/setting")
    path = Path(trace_file or before.get("trace_file") or "")
    if not str(path) or str(path) == ".":
        raise TrtbuildError(f"{server} was started without a trace file, and Triton cannot be given one at run time",
                            hint="restart it with `trtbuild serve REPO --trace-file PATH` (tritonserver --trace-config triton,file=PATH)")
    existing = {p: p.stat().st_mtime_ns for p in path.parent.glob(path.name + "*")}
    _request(f"{base}/v2/trace/setting", {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": str(requests),
                                          "log_frequency": "0"})
    try:
        for _ in range(requests):
            generate(server, prompt, max_tokens, protocol="http", model=model, stream=True)
    finally:
        _request(f"{base}/v2/trace/setting", {k: before[k] for k in ("trace_level", "trace_rate", "trace_count", "log_frequency")
                                              if k in before})
    deadline = time.monotonic() + 10
    while True:
        new = [p for p in path.parent.glob(path.name + "*") if existing.get(p) != p.stat().st_mtime_ns]
        traces = read_traces(new) if new else []
        splits = split(traces)
        entry = next((s for s in splits if s.model == model), None)
        if entry is not None and entry.requests >= requests or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not splits:
        raise TrtbuildError(f"no trace of {model} appeared in {path}*", hint="is the server on this machine, writing that file?")
    return splits


def markdown(splits: list[ModelSplit]) -> str:
    head = "| model | requests | queue | compute input | compute infer | compute output | after compute | end to end |"
    lines = [head, "|" + "---|" + "---:|" * 7]
    for s in splits:
        lines.append(f"| {'  ' * s.depth}{s.model} | {s.requests} | " + " | ".join(f"{s.ms[p]:.2f}" for p, _, _ in PARTS)
                     + f" | {s.end_to_end_ms:.2f} |")
    return "\n".join(lines) + ("\n\n(mean ms per request. An ensemble has no queue or compute of its own: its end to end "
                               "covers its steps. Triton ends a decoupled Python model's trace when execute() returns, so "
                               "the tokens it streams after that show only in the entry point's end to end.)\n")


def plot(splits: list[ModelSplit], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(splits)))
    names = [s.model for s in splits][::-1]
    left = [0.0] * len(splits)
    for part, _, _ in PARTS:
        values = [s.ms[part] for s in splits][::-1]
        ax.barh(names, values, left=left, label=part.replace("_", " "))
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("mean ms per request")
    ax.set_title("Triton trace: where each model's time goes")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(splits: list[ModelSplit], out: Path, *, force: bool = False) -> Path:
    from trtbuild.atomic import atomic_output_dir

    with atomic_output_dir(Path(out), force=force, inputs=()) as staging:
        (staging / "trace_split.json").write_text(json.dumps([dataclasses.asdict(s) for s in splits], indent=2))
        (staging / "trace_split.md").write_text(markdown(splits))
        plot(splits, staging / "trace_split.png")
    return Path(out)
