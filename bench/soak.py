"""Soak: the served repository under abuse, on the local server. A benchmark script (prints a table,
writes JSON, exits 1 when a check fails), not a test.

A tiny Llama repository (`--max-batch-size 64`) takes `--requests` requests (10,000) from
`--concurrency` (256) concurrent clients, spread over every entry point (ensemble, llm_bls, llm),
gRPC streaming and not, HTTP /generate and /generate_stream: valid ones, invalid ones (each with
the reason it must be refused for), and `--kill` (5%) whose client goes away after the first
response. Checks:

- every valid request is answered with the text a lone request gets (greedy);
- every invalid one is refused, with its reason in the error;
- no request hangs (each has a deadline), no stub dies (server log), the server still answers;
- killed streams leave no KV blocks behind (free blocks back to idle);
- server memory (the server and its stubs, summed RSS) is flat after warm-up: the last sample within
  `--rss-growth` of the first one after warm-up;
- the client's counts beside Triton's statistics per model (Triton 2.51 counts a decoupled model's
  error responses as successes and a failed ensemble request twice: reported, not equated).

Usage: python -m bench.soak [--requests 10000] [--concurrency 256] [--out bench/results/DATE-cpu-soak.json]
Loopback only; every loop is bounded by a request count and a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPTS = [f"Request about topic {i}: tell me something about the number {i * 7}." for i in range(24)]
MODELS = ("ensemble", "llm_bls", "llm")
# (what is wrong, extra or replaced inputs, the reason the error must carry)
INVALID = (
    ("no max_tokens", {"max_tokens": None}, "max_tokens"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens must be at least 1"),
    ("top_p 1.5", {"top_p": 1.5}, "top_p must be in [0, 1]"),
    ("prompt too long", {"text_input": "word " * 400}, "more than max_input_len"),
    ("beam search", {"beam_width": 2}, "beam_width=2 cannot be honoured"),
    ("max_tokens above the build's", {"max_tokens": 1000}, "exceeds this build's limits"),
)
DTYPES = {"max_tokens": np.int32, "top_p": np.float32, "beam_width": np.int32, "stream": np.bool_, "min_tokens": np.int32}


def plan_requests(n: int, kill: float, invalid: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.random()
        kind = "killed" if r < kill else "invalid" if r < kill + invalid else "valid"
        protocol = "grpc" if kind == "killed" or rng.random() < 0.8 else "http"
        request = {"id": i, "kind": kind, "model": rng.choice(MODELS), "protocol": protocol,
                   "stream": kind == "killed" or rng.random() < 0.6,
                   "inputs": {"text_input": rng.choice(PROMPTS), "max_tokens": rng.choice((4, 8, 16))}}
        if kind == "killed":
            request["inputs"].update(max_tokens=32, min_tokens=32)  # long enough to be cut mid-stream
        if kind == "invalid":
            what, change, reason = rng.choice(INVALID)
            request.update(what=what, reason=reason)
            request["inputs"].update(change)
            request["inputs"] = {k: v for k, v in request["inputs"].items() if v is not None}
        out.append(request)
    return out


def grpc_inputs(inputs: dict, stream: bool):
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, value in {**inputs, "stream": stream}.items():
        array = np.array([[value.encode()]], dtype=np.object_) if name == "text_input" else np.array([[value]], dtype=DTYPES[name])
        tensor = grpcclient.InferInput(name, list(array.shape), "BYTES" if name == "text_input" else
                                       {np.int32: "INT32", np.float32: "FP32", np.bool_: "BOOL"}[DTYPES[name]])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


async def send_grpc(client, request: dict, deadline: float) -> dict:
    async def single():
        yield {"model_name": request["model"], "inputs": grpc_inputs(request["inputs"], request["stream"]),
               "request_id": str(request["id"])}

    text, error = [], None
    responses = client.stream_infer(single(), stream_timeout=deadline)
    try:
        async for result, err in responses:
            if err is not None:
                error = str(err)
                break
            out = result.as_numpy("text_output")
            if out is not None:
                text.append(out.reshape(-1)[0].decode())
                if request["kind"] == "killed":
                    responses.cancel()  # the client goes away mid-stream
                    return {"text": "".join(text), "error": None, "killed": True}
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        if error is not None:
            responses.cancel()
    return {"text": "".join(text), "error": error}


async def send_http(session, base: str, request: dict, deadline: float) -> dict:
    import aiohttp

    body = {**request["inputs"], "stream": request["stream"]}
    endpoint = "generate_stream" if request["stream"] else "generate"
    async with session.post(f"{base}/v2/models/{request['model']}/{endpoint}", json=body,
                            timeout=aiohttp.ClientTimeout(total=deadline)) as r:
        if not request["stream"]:
            data = await r.json(content_type=None)
            return {"text": data.get("text_output", ""), "error": data.get("error") if r.status != 200 or "error" in data else None}
        text = []
        async for line in r.content:
            if line.startswith(b"data:"):
                data = json.loads(line[5:])
                if "error" in data:
                    return {"text": "".join(text), "error": data["error"]}
                text.append(data.get("text_output", ""))
        return {"text": "".join(text), "error": None if r.status == 200 else f"HTTP {r.status}"}


def server_rss(pid: int) -> int:
    import psutil

    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0


async def run(args, server, references) -> dict:
    import aiohttp
    import tritonclient.grpc.aio as grpcaio

    requests = plan_requests(args.requests, args.kill, args.invalid, args.seed)
    semaphore = asyncio.Semaphore(args.concurrency)
    grpc_clients = [grpcaio.InferenceServerClient(server.grpc_url) for _ in range(8)]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency))
    results, rss, done = {}, [], [0]

    async def one(request):
        async with semaphore:
            started = time.monotonic()
            try:
                if request["protocol"] == "grpc":
                    out = await asyncio.wait_for(send_grpc(grpc_clients[request["id"] % 8], request, args.deadline), args.deadline)
                else:
                    out = await send_http(session, f"http://{server.http_url}", request, args.deadline)
            except asyncio.TimeoutError:
                out = {"text": "", "error": None, "hung": True}
            except Exception as e:  # noqa: BLE001  every failure is recorded and judged below
                out = {"text": "", "error": f"{type(e).__name__}: {e}"}
            out["seconds"] = time.monotonic() - started
            results[request["id"]] = out
            done[0] += 1

    async def sample():
        while done[0] < len(requests):
            rss.append((done[0], server_rss(server.process.pid)))
            await asyncio.sleep(2.0)

    started = time.monotonic()
    sampler = asyncio.ensure_future(sample())
    await asyncio.gather(*(one(r) for r in requests))
    elapsed = time.monotonic() - started
    sampler.cancel()
    rss.append((done[0], server_rss(server.process.pid)))
    await session.close()
    for client in grpc_clients:
        await client.close()
    return judge(requests, results, references, rss, elapsed, args)


def judge(requests, results, references, rss, elapsed, args) -> dict:
    counts, failures = collections.Counter(), []
    per_model = collections.defaultdict(collections.Counter)
    for request in requests:
        out, kind = results[request["id"]], request["kind"]
        key = (request["inputs"].get("text_input"), request["inputs"].get("max_tokens"))
        if out.get("hung"):
            verdict = "hung"
        elif kind == "valid":
            verdict = "ok" if out["error"] is None and out["text"] == references[key] else "wrong"
        elif kind == "invalid":
            verdict = "refused" if out["error"] and request["reason"] in out["error"] else "not refused with its reason"
        else:
            verdict = "killed" if out.get("killed") or out["error"] is None else "wrong"
        counts[f"{kind}: {verdict}"] += 1
        per_model[request["model"]]["errors" if out["error"] else "answered"] += 1
        if verdict not in ("ok", "refused", "killed"):
            failures.append({"request": {k: v for k, v in request.items() if k != "inputs"}, "inputs": {
                k: (v[:60] if isinstance(v, str) else v) for k, v in request["inputs"].items()}, "result": out,
                "expected": references.get(key)})
    warm = next((mb for n, mb in rss if n >= len(requests) * 0.1), rss[0][1] if rss else 0)
    return {"elapsed_s": round(elapsed, 1), "requests_per_s": round(len(requests) / elapsed, 1), "counts": dict(counts),
            "client_per_model": {m: dict(c) for m, c in per_model.items()}, "failures": failures[:20],
            "failure_count": len(failures), "rss_mib": [(n, round(b / 2**20, 1)) for n, b in rss],
            "rss_growth_after_warmup": round(rss[-1][1] / warm - 1, 4) if warm else None}


def references_for(server) -> dict:
    """The text a lone request gets, for every (prompt, max_tokens) the soak sends valid."""
    from trtbuild.clients.generate import generate

    return {(p, n): generate(server.grpc_url, p, n, model="llm").text for p in PROMPTS for n in (4, 8, 16)}


def free_blocks(server) -> float:
    match = re.search(r'trtbuild_kv_cache_free_blocks\{model="llm"\} (\S+)', server.metrics())
    return float(match.group(1)) if match else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--kill", type=float, default=0.05, help="share of clients that leave mid-stream")
    ap.add_argument("--invalid", type=float, default=0.2, help="share of invalid requests")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds after which a request counts as hung")
    ap.add_argument("--rss-growth", type=float, default=0.10, help="largest accepted RSS growth after warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("artifacts/soak.json"))
    args = ap.parse_args()

    from trtbuild.checkpoint import load_model_spec, write_demo_checkpoint
    from trtbuild.deploy.server import TritonServer
    from trtbuild.runtimes import generate as generate_repository
    from trtbuild.spec import BuildSpec

    work = Path(tempfile.mkdtemp(prefix="trtbuild-soak-"))
    checkpoint = write_demo_checkpoint(work / "checkpoint", "tiny-llama")
    spec = BuildSpec(checkpoint=checkpoint, model=load_model_spec(checkpoint), max_batch_size=args.max_batch_size,
                     max_input_len=128, max_output_len=32)
    server = TritonServer(generate_repository(spec, work / "repo"), log_path=work / "tritonserver.log").start()
    try:
        references = references_for(server)
        time.sleep(1.0)  # the gauges refresh every 0.1 s
        idle = free_blocks(server)
        report = asyncio.run(run(args, server, references))
        deadline = time.monotonic() + 10
        while free_blocks(server) < idle and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        log = server.log_path.read_text(errors="replace")
        stats = json.loads(_get(f"http://{server.http_url}/v2/models/stats"))["model_stats"]
        report.update(
            settings=vars(args) | {"out": str(args.out)},
            kv_blocks={"idle": idle, "after": free_blocks(server)},
            stub_deaths=len(re.findall(r"Stub process .* is not healthy|Failed to process the request", log)),
            still_serving=_alive(server),
            triton_statistics={s["name"]: {k: int(v["count"]) for k, v in s["inference_stats"].items() if k in ("success", "fail")}
                               for s in stats if s["name"] in (*MODELS, "preprocessing", "postprocessing")},
        )
    finally:
        server.stop()
    checks = {
        "every valid request answered with the lone request's text": report["counts"].get("valid: wrong", 0) == 0,
        "every invalid request refused with its reason": report["counts"].get("invalid: not refused with its reason", 0) == 0,
        "no request hung": not any(k.endswith("hung") for k in report["counts"]),
        "no stub died": report["stub_deaths"] == 0,
        "killed streams freed their KV blocks": report["kv_blocks"]["after"] == report["kv_blocks"]["idle"],
        "the server still answers": report["still_serving"],
        f"RSS flat after warm-up (<= {args.rss_growth:.0%})": (report["rss_growth_after_warmup"] or 0) <= args.rss_growth,
    }
    report["checks"] = checks
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nsoak: {args.requests} requests, {args.concurrency} concurrent, max batch {args.max_batch_size}: "
          f"{report['elapsed_s']} s ({report['requests_per_s']} req/s)")
    for name, n in sorted(report["counts"].items()):
        print(f"  {name:45s} {n:6d}")
    print(f"  client per model: {report['client_per_model']}")
    print(f"  Triton statistics: {report['triton_statistics']}")
    print(f"  KV blocks idle/after: {report['kv_blocks']}; RSS MiB (done, MiB): {report['rss_mib'][:2]} ... {report['rss_mib'][-2:]}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    print(f"wrote {args.out}")
    return 0 if all(checks.values()) else 1


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def _alive(server) -> bool:
    from trtbuild.clients.generate import generate

    return bool(generate(server.grpc_url, PROMPTS[0], 4, model="ensemble").text)


if __name__ == "__main__":
    raise SystemExit(main())
