#!/usr/bin/env python
"""Can `trtbuild bench` be trusted? A benchmark script (not a test): prints tables, writes JSON.

1. Triton's own accounting. A tiny random Llama repository is served with per-request tracing
   (TIMESTAMPS for every request) and benchmarked over gRPC and HTTP, streamed and not, ensemble
   and BLS. For each run:
   - the model's success counter (/v2/models/NAME/stats and `nv_inference_request_success` on
     /metrics) must move by exactly the client's completed count;
   - every request is matched to its server trace by request id. Python's perf_counter and
     Triton's trace timestamps both read CLOCK_MONOTONIC, so they compare directly. The server's
     window runs from receiving the request (GRPC_WAITREAD_END / HTTP_RECV_START / REQUEST_START)
     to sending its last response (last GRPC_SEND_START; INFER_RESPONSE_COMPLETE over HTTP, whose
     send timestamps this Triton leaves at 0). The client's span, from send to the moment it
     knew the request was over (stream closed, body read), must contain it; the difference is the
     client + network overhead, reported at p50 and split into send -> received and last sent ->
     client end. Client latency as AIPerf defines it (send -> last response carrying output) is
     at least the server's window unless the model's last response carries no output: the BLS
     sends an empty final response after the last token, which only ends the stream.
     REQUEST_END is not the end of the window: Triton records it when the model releases the
     request, after its last response (the "release lag" column). The statistics' mean request
     duration (success ns / count) is shown for reference only: for these decoupled models it
     does not match the traced windows, so durations are compared with traces, not statistics.
2. Load-generator ceiling. A trivial Python-backend identity model (not decoupled) is driven at
   the same concurrency by wrk (C, HTTP/1.1 keep-alive, the same KServe v2 JSON body through
   bench/wrk_infer.lua) and by `trtbuild bench` over HTTP and gRPC. The ratio ours / wrk says how
   close our client comes to a load generator that is not the bottleneck (goal: HTTP >= 0.5x wrk,
   gRPC above our HTTP). perf_analyzer is measured too when it is on PATH.

Loopback only; every loop is bounded by a request count or a duration.
Usage: python -m bench.trust [--out artifacts/bench-trust.json] [--duration 3] [--repeats 3] [--concurrency 1,16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from trtbuild.deploy.server import ServerOptions, TritonServer
from trtbuild.bench.run import BenchConfig, run_benchmark
from trtbuild.bench.loadgen import LoadPoint
from trtbuild.clients.prompts import LengthDistribution
from trtbuild.clients.target import interface_from, random_tensor_inputs
from trtbuild.clients.transport import HttpTransport

console = Console(width=max(Console().width, 170))

ACCOUNTING_CASES = (  # protocol, model, streamed
    ("grpc", "ensemble", True),
    ("http", "ensemble", True),
    ("grpc", "ensemble", False),
    ("http", "ensemble", False),
    ("grpc", "llm_bls", True),
    ("http", "llm_bls", True),
)

IDENTITY_CONFIG = """
name: "identity"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 16 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] } ]
instance_group [ { count: 2, kind: KIND_CPU } ]
"""
IDENTITY_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())])
                for r in requests]
'''


# ------------------------------------------------------------------------------------ part 1
def success_counter(metrics: str, model: str) -> int:
    for line in metrics.splitlines():
        if line.startswith("nv_inference_request_success{") and f'model="{model}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def read_traces(folder: Path) -> dict[str, dict]:
    """Top-level traces (no parent) by request id: model name and every timestamp (s) by name."""
    entries = []
    for path in sorted(folder.glob("trace.json*")):
        text = path.read_text().strip()
        if text:
            entries += json.loads(text)
    traces: dict[int, dict] = {}
    for e in entries:
        t = traces.setdefault(e["id"], {"timestamps": {}})
        for key in ("model_name", "request_id", "parent_id"):
            if key in e:
                t[key] = e[key]
        for ts in e.get("timestamps", []):
            if int(ts["ns"]) > 0:
                t["timestamps"].setdefault(ts["name"], []).append(int(ts["ns"]) / 1e9)
    return {t["request_id"]: t for t in traces.values() if t.get("request_id") and "parent_id" not in t}


def server_window(ts: dict[str, list[float]]) -> tuple[float, float, float] | None:
    """(request received, last response sent, request released) from one trace. The last response
    leaves at the last GRPC_SEND_START (gRPC; GRPC_SEND_END is when the server's completion queue
    reports the write, which can be after the client has read it) or INFER_RESPONSE_COMPLETE (HTTP,
    whose send timestamps this Triton leaves at 0); REQUEST_END comes when the model releases the
    request."""
    received = [*ts.get("GRPC_WAITREAD_END", []), *ts.get("HTTP_RECV_START", []), *ts.get("REQUEST_START", [])]
    sent = [*ts.get("GRPC_SEND_START", []), *ts.get("HTTP_SEND_START", []), *ts.get("INFER_RESPONSE_COMPLETE", [])]
    if not received or not sent or "REQUEST_END" not in ts:
        return None
    return min(received), max(sent), max(ts["REQUEST_END"])


def accounting(work: Path, requests: int, concurrency: int) -> list[dict]:
    from trtbuild.checkpoint import load_model_spec, write_demo_checkpoint
    from trtbuild.runtimes import generate
    from trtbuild.spec import BuildSpec

    checkpoint = write_demo_checkpoint(work / "tiny-llama", "tiny-llama", force=True)
    spec = BuildSpec(checkpoint=checkpoint, model=load_model_spec(checkpoint), max_batch_size=4, max_input_len=128, max_output_len=64)
    repository = generate(spec, work / "llm_repo", force=True)
    trace_dir = work / "traces"
    trace_dir.mkdir(exist_ok=True)
    options = ServerOptions(extra_args=(f"--trace-config=triton,file={trace_dir / 'trace.json'}", "--trace-config=level=TIMESTAMPS",
                                        "--trace-config=rate=1", "--trace-config=count=-1", "--trace-config=triton,log-frequency=0"))
    server = TritonServer(repository, options, log_path=work / "llm_server.log")
    runs = []
    with console.status("part 1: tiny Llama with tracing"):
        server.start()
        try:
            for number, (protocol, model, stream) in enumerate(ACCOUNTING_CASES):
                url = server.grpc_url if protocol == "grpc" else server.http_url
                before_stats, before_metrics = model_success(server, model), success_counter(server.metrics(), model)
                config = BenchConfig(url=url, protocol=protocol, model=model, stream=stream, loads=(LoadPoint(concurrency=concurrency),),
                                     requests=requests, warmup=2, input_tokens=LengthDistribution(32),
                                     output_tokens=LengthDistribution(16), request_id_prefix=f"t{number}-")
                result = run_benchmark(config)
                runs.append({"protocol": protocol, "model": model, "stream": stream, "result": result, "prefix": config.request_id_prefix,
                             "stats_delta": model_success(server, model) - before_stats,
                             "metrics_delta": success_counter(server.metrics(), model) - before_metrics})
        finally:
            server.stop()
    traces = read_traces(trace_dir)
    rows = []
    for case in runs:
        result = case["result"]
        run = result.runs[0]
        warm = sum(r.ok for r in result.warmup)
        ok = [r for r in run.records if r.ok]
        contains, covers, missing, violations = 0, 0, 0, []
        overhead, inbound, outbound, server_ms, release_lag = [], [], [], [], []
        for r in ok:
            window = server_window((traces.get(f"{case['prefix']}{r.prompt_index}") or {}).get("timestamps", {}))
            if window is None:
                missing += 1
                continue
            received, last_sent, released = window
            inside = r.send <= received and last_sent <= r.end
            contains += inside
            if not inside:
                violations.append({"prompt_index": r.prompt_index, "send_to_received_ms": (received - r.send) * 1e3,
                                   "last_sent_to_end_ms": (r.end - last_sent) * 1e3})
            covers += r.latency >= last_sent - received
            overhead.append(((r.end - r.send) - (last_sent - received)) * 1e3)
            inbound.append((received - r.send) * 1e3)
            outbound.append((r.end - last_sent) * 1e3)
            server_ms.append((last_sent - received) * 1e3)
            release_lag.append((released - last_sent) * 1e3)
        p50 = lambda v: float(np.median(v)) if v else None  # noqa: E731
        rows.append({
            "protocol": case["protocol"], "model": case["model"], "stream": case["stream"],
            "client_completed": run.metrics.completed, "client_failed": run.metrics.failed, "warmup": warm,
            "server_success_delta_stats": case["stats_delta"] - warm,
            "server_success_delta_metrics": case["metrics_delta"] - warm,
            "counts_match": case["stats_delta"] - warm == run.metrics.completed == case["metrics_delta"] - warm,
            "traced": len(ok) - missing,
            "client_span_contains_server": contains,
            "client_latency_ge_server_duration": covers,
            "client_latency_ms_p50": run.metrics.latency_ms.p50,
            "server_duration_ms_p50": p50(server_ms),
            "overhead_ms_p50": p50(overhead),
            "overhead_ms_min": float(np.min(overhead)) if overhead else None,
            "send_to_server_ms_p50": p50(inbound),
            "server_to_client_ms_p50": p50(outbound),
            "release_after_last_response_ms_p50": p50(release_lag),
            "violations": violations,
            "stats_request_ms_mean": (run.server or {}).get("success_ms_mean"),
        })
    return rows


def model_success(server: TritonServer, model: str) -> int:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.loads(r.read())
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


# ------------------------------------------------------------------------------------ part 2
def identity_repository(folder: Path) -> Path:
    (folder / "identity" / "1").mkdir(parents=True, exist_ok=True)
    (folder / "identity" / "config.pbtxt").write_text(IDENTITY_CONFIG.lstrip())
    (folder / "identity" / "1" / "model.py").write_text(textwrap.dedent(IDENTITY_MODEL).lstrip())
    return folder


def request_body(server: TritonServer, seed: int) -> bytes:
    """The KServe v2 JSON body `trtbuild bench --http-json` sends for the identity model."""
    def get(path):
        with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=10) as r:
            return json.loads(r.read())

    iface = interface_from("identity", get("/v2/models/identity"), get("/v2/models/identity/config"), "tensor")
    return HttpTransport(server.http_url, 10, binary=False).prepare(iface, random_tensor_inputs(iface, {}, seed), False)["body"]


def _duration_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(server: TritonServer, body_file: Path, concurrency: int, duration: float) -> dict:
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{int(duration)}s", "--latency", "-s", str(ROOT / "bench" / "wrk_infer.lua"),
           f"http://{server.http_url}/v2/models/identity/infer"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, env={**os.environ, "WRK_BODY": str(body_file)})
    if out.returncode != 0 or "Non-2xx" in out.stdout:
        raise RuntimeError(f"wrk failed or got error responses:\n{out.stderr}{out.stdout}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1))
    p50 = re.search(r"^\s+50%\s+(\S+)", out.stdout, re.M)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out.stdout)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out.stdout)
    return {"requests_per_s": rate, "latency_ms_p50": _duration_ms(p50.group(1)) if p50 else None,
            "non_2xx": int(bad.group(1)) if bad else 0, "socket_errors": sum(map(int, errors.groups())) if errors else 0}


def run_perf_analyzer(server: TritonServer, concurrency: int, duration: float) -> dict | None:
    if shutil.which("perf_analyzer") is None:
        return None
    cmd = ["perf_analyzer", "-m", "identity", "-u", server.http_url, "-i", "http", f"--concurrency-range={concurrency}",
           f"--measurement-interval={int(duration * 1000)}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration * 10 + 60)
    match = re.search(r"Throughput:\s+([\d.]+)\s+infer/sec", out.stdout)
    return {"requests_per_s": float(match.group(1))} if match else {"error": (out.stderr or out.stdout)[-300:]}


def run_ours(server: TritonServer, protocol: str, concurrency: int, duration: float) -> dict:
    config = BenchConfig(url=server.grpc_url if protocol == "grpc" else server.http_url, protocol=protocol, model="identity",
                         interface="tensor", loads=(LoadPoint(concurrency=concurrency),), requests=None, duration=duration,
                         warmup=20, http_binary=False, max_errors=10)
    run = run_benchmark(config).runs[0]
    m = run.metrics
    return {"requests_per_s": m.requests_per_s, "latency_ms_p50": m.latency_ms.p50 if m.latency_ms else None,
            "completed": m.completed, "failed": m.failed, "server_success": (run.server or {}).get("success_count")}


def _median_try(tries: list[dict]) -> dict:
    return sorted(tries, key=lambda t: t["requests_per_s"])[len(tries) // 2]


def ceiling(work: Path, concurrencies: list[int], duration: float, repeats: int = 3, seed: int = 0) -> list[dict]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    server = TritonServer(identity_repository(work / "identity_repo"), log_path=work / "identity_server.log")
    rows = []
    with console.status("part 2: identity model, wrk vs trtbuild bench"):
        server.start()
        try:
            body_file = work / "identity_body.json"
            body_file.write_bytes(request_body(server, seed))
            run_wrk(server, body_file, 1, 1)  # warm the server up
            for c in concurrencies:
                tries = {"wrk": [], "http": [], "grpc": []}
                for _ in range(repeats):  # interleaved, so that a busy moment on the machine hits all three alike
                    tries["wrk"].append(run_wrk(server, body_file, c, duration))
                    tries["http"].append(run_ours(server, "http", c, duration))
                    tries["grpc"].append(run_ours(server, "grpc", c, duration))
                wrk, http, grpc = (_median_try(tries[k]) for k in ("wrk", "http", "grpc"))
                pa = run_perf_analyzer(server, c, duration)
                rows.append({"concurrency": c, "repeats": repeats, "wrk": wrk, "ours_http": http, "ours_grpc": grpc, "perf_analyzer": pa,
                             "tries_requests_per_s": {k: [t["requests_per_s"] for t in v] for k, v in tries.items()},
                             "http_vs_wrk": http["requests_per_s"] / wrk["requests_per_s"],
                             "grpc_vs_wrk": grpc["requests_per_s"] / wrk["requests_per_s"],
                             "grpc_vs_http": grpc["requests_per_s"] / http["requests_per_s"]})
        finally:
            server.stop()
    return rows


# ------------------------------------------------------------------------------------ output
def _f(v, digits=1):
    return "-" if v is None else f"{v:,.{digits}f}"


def print_accounting(rows: list[dict]) -> None:
    t = Table(title="1. trtbuild bench vs Triton's own accounting (tiny Llama, traced)")
    for c in ("protocol", "model", "stream", "client ok", "server ok (stats / metrics)", "traced", "span ⊇ server",
              "latency ≥ server", "client p50 ms", "server p50 ms", "overhead p50 ms", "in / out p50 ms", "release lag p50 ms", "stats mean ms"):
        t.add_column(c, justify="left" if c in ("protocol", "model", "stream") else "right")
    for r in rows:
        colour = "green" if r["counts_match"] else "red"
        t.add_row(r["protocol"], r["model"], "yes" if r["stream"] else "no", str(r["client_completed"]),
                  f"[{colour}]{r['server_success_delta_stats']} / {r['server_success_delta_metrics']}[/]", str(r["traced"]),
                  f"{r['client_span_contains_server']}/{r['traced']}", f"{r['client_latency_ge_server_duration']}/{r['traced']}",
                  _f(r["client_latency_ms_p50"]), _f(r["server_duration_ms_p50"]), _f(r["overhead_ms_p50"], 2),
                  f"{_f(r['send_to_server_ms_p50'], 2)} / {_f(r['server_to_client_ms_p50'], 2)}", _f(r["release_after_last_response_ms_p50"], 1),
                  _f(r["stats_request_ms_mean"]))
    console.print(t)


def print_ceiling(rows: list[dict]) -> None:
    t = Table(title="2. load-generator ceiling: identity model over loopback (requests/s, median of interleaved tries)")
    for c in ("concurrency", "wrk", "ours HTTP", "ours gRPC", "perf_analyzer", "HTTP / wrk", "gRPC / wrk", "gRPC / HTTP",
              "p50 ms wrk / HTTP / gRPC"):
        t.add_column(c, justify="right")
    for r in rows:
        ok = r["http_vs_wrk"] >= 0.5
        t.add_row(str(r["concurrency"]), _f(r["wrk"]["requests_per_s"], 0), _f(r["ours_http"]["requests_per_s"], 0),
                  _f(r["ours_grpc"]["requests_per_s"], 0),
                  "not on PATH" if r["perf_analyzer"] is None else _f(r["perf_analyzer"].get("requests_per_s"), 0),
                  f"[{'green' if ok else 'red'}]{r['http_vs_wrk']:.2f}x[/]", f"{r['grpc_vs_wrk']:.2f}x",
                  f"[{'green' if r['grpc_vs_http'] > 1 else 'yellow'}]{r['grpc_vs_http']:.2f}x[/]",
                  f"{_f(r['wrk']['latency_ms_p50'], 2)} / {_f(r['ours_http']['latency_ms_p50'], 2)} / {_f(r['ours_grpc']['latency_ms_p50'], 2)}")
    console.print(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench-trust.json")
    parser.add_argument("--requests", type=int, default=24, help="part 1: measured requests per case")
    parser.add_argument("--accounting-concurrency", type=int, default=4)
    parser.add_argument("--concurrency", default="1,16", help="part 2: concurrencies")
    parser.add_argument("--duration", type=float, default=3.0, help="part 2: seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="part 2: interleaved measurements per tool (the median is kept)")
    parser.add_argument("--skip-accounting", action="store_true")
    parser.add_argument("--skip-ceiling", action="store_true")
    args = parser.parse_args()
    report: dict = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-trust.") as tmp:
        work = Path(tmp)
        if not args.skip_accounting:
            report["accounting"] = accounting(work, args.requests, args.accounting_concurrency)
            print_accounting(report["accounting"])
        if not args.skip_ceiling:
            report["ceiling"] = ceiling(work, [int(c) for c in args.concurrency.split(",")], args.duration, args.repeats)
            print_ceiling(report["ceiling"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
