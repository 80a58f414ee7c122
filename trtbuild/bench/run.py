"""`trtbuild bench`: load a Triton model the way LLM benchmarking tools (AIPerf, genai-perf) do.

One benchmark is a sweep of load points (trtbuild.bench.loadgen) against one model (trtbuild.clients.target)
over gRPC or HTTP (trtbuild.clients.transport). Prompts and requests are built before the timed loop;
responses are decoded after it; metrics follow trtbuild.bench.metrics, whose docstring defines them.
Around every run the model's Triton statistics are read, so the result also holds the server's
own count of the requests and its mean queue and compute times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import platform
import socket
import sys
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable

from trtbuild.errors import TrtbuildError
from trtbuild.bench.loadgen import LoadPoint, LoadResult, closed_loop, open_loop
from trtbuild.bench.metrics import SLO, RequestRecord, RunMetrics, samples, summarize
from trtbuild.clients.prompts import LengthDistribution, Prompt, count_tokens, load_jsonl, load_tokenizer, synthetic_prompts
from trtbuild.clients.target import KINDS, ModelInterface, interface_from, llm_arrays, llm_json, random_tensor_inputs
from trtbuild.clients.transport import GrpcTransport, make_transport, one_line

@dataclasses.dataclass(frozen=True)
class BenchConfig:
    url: str
    protocol: str = "grpc"
    model: str = "ensemble"
    interface: str = "auto"
    stream: bool = True
    loads: tuple[LoadPoint, ...] = (LoadPoint(concurrency=1),)
    requests: int | None = 100
    duration: float | None = None
    warmup: int = 2
    input_tokens: LengthDistribution = LengthDistribution(128)
    output_tokens: LengthDistribution = LengthDistribution(128)
    prompts_file: Path | None = None
    num_prompts: int = 1000  # distinct prompts cycled through when the run is bounded by duration
    tokenizer: Path | None = None
    force_output_len: bool = True
    slo: SLO = SLO()
    gpu_hourly_cost: float | None = None
    request_timeout: float = 600.0
    max_errors: int | None = 100
    seed: int = 0
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    http_binary: bool = True
    request_id_prefix: str | None = None  # send request ids "<prefix><prompt index>" (to match Triton traces to records)
    metrics_url: str | None = None  # the server's Prometheus endpoint (host:8002): GPU memory in the result, for `trtbuild select`

    def __post_init__(self):
        if self.protocol not in ("grpc", "http"):
            raise TrtbuildError(f"--protocol must be grpc or http, got {self.protocol!r}")
        if self.interface not in KINDS:
            raise TrtbuildError(f"--interface must be one of {', '.join(KINDS)}")
        if self.requests is None and self.duration is None:
            raise TrtbuildError("give --requests N or --duration S to bound each run")
        if self.requests is not None and self.requests < 1:
            raise TrtbuildError(f"--requests must be at least 1, got {self.requests}")
        if self.duration is not None and self.duration <= 0:
            raise TrtbuildError(f"--duration must be positive, got {self.duration}")
        if self.warmup < 0:
            raise TrtbuildError(f"--warmup must be >= 0, got {self.warmup}")
        if not self.loads:
            raise TrtbuildError("give at least one --concurrency or --request-rate")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["loads"] = [dataclasses.asdict(p) | {"label": p.label} for p in self.loads]
        d["slo"] = self.slo.as_dict()
        d["input_shapes"] = {k: list(v) for k, v in self.input_shapes}
        for k in ("prompts_file", "tokenizer"):
            d[k] = None if d[k] is None else str(d[k])
        return d


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    load: LoadPoint
    metrics: RunMetrics
    records: list[RequestRecord]
    server: dict[str, Any] | None
    aborted: str | None
    started_at: str

    def to_json(self, streaming: bool) -> dict[str, Any]:
        return {
            "key": self.load.key,
            "label": self.load.label,
            "load": dataclasses.asdict(self.load),
            "started_at": self.started_at,
            "aborted": self.aborted,
            "metrics": dataclasses.asdict(self.metrics),
            "server": self.server,
            "samples": samples(self.records, streaming=streaming),
        }


@dataclasses.dataclass
class BenchResult:
    config: BenchConfig
    interface: ModelInterface
    streaming: bool
    runs: list[RunResult]
    warmup: list[RequestRecord]
    environment: dict[str, Any]
    notes: list[str]
    tokenizer: str | None
    memory: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": "trtbuild bench",
            "config": self.config.as_dict(),
            "target": {"model": self.interface.name, "interface": self.interface.kind, "decoupled": self.interface.decoupled,
                       "streaming": self.streaming, "tokenizer": self.tokenizer,
                       "token_counts": "server" if self.interface.count_outputs else ("tokenizer" if self.tokenizer else None)},
            "environment": self.environment,
            "notes": self.notes,
            "memory": self.memory,
            "runs": [r.to_json(self.streaming) for r in self.runs],
        }


RunProgress = Callable[[LoadPoint, int, int, float], None]  # (load point, finished, failed, elapsed s)


async def _alive(transport) -> bool:
    """Whether the server still serves: a sweep against a dead one, or one shutting down (it answers
    metadata through its exit grace period but is no longer ready), would only add failures."""
    try:
        return await asyncio.wait_for(transport.server_ready(), timeout=5)
    except Exception:  # noqa: BLE001 - any failure to answer means the same here
        return False


def run_benchmark(config: BenchConfig, progress: RunProgress | None = None,
                  on_start: Callable[[LoadPoint, int | None], None] | None = None) -> BenchResult:
    """Run every load point of `config` against the server; partial results survive interruption."""
    return asyncio.run(bench_async(config, progress, on_start))


async def bench_async(config: BenchConfig, progress: RunProgress | None = None,
                      on_start: Callable[[LoadPoint, int | None], None] | None = None) -> BenchResult:
    transport = make_transport(config.protocol, config.url, config.request_timeout, config.http_binary)
    await transport.open()
    try:
        iface, server_meta = await _discover(transport, config)
        notes: list[str] = []
        streaming = config.stream and iface.is_llm
        if streaming and not iface.decoupled:
            raise TrtbuildError(f"model '{iface.name}' is not decoupled, so it cannot stream", hint="pass --no-stream")
        tokenizer, tokenizer_path = await _tokenizer(transport, iface, config, notes)
        prompts = _prompts(config, iface, tokenizer)
        if iface.is_llm and config.force_output_len and not iface.has_input("min_tokens"):
            notes.append(f"output lengths are not forced: model '{iface.name}' has no {iface.input_name('min_tokens')} input")
        requests = _prepare(transport, config, iface, streaming, prompts)

        warm_slots, measured_slots = _slots(len(requests), config.warmup)

        def sender(first_index: int, first_slot: int, slots: int):
            async def send(index: int) -> RequestRecord:
                slot = first_slot + (index - first_index) % slots
                record = RequestRecord(index=index, send=0.0, prompt_index=slot, input_tokens=prompts[slot].input_tokens,
                                       requested_output_tokens=prompts[slot].output_tokens or None)
                record.send = time.perf_counter()
                await transport.send(iface, requests[slot], record)
                return record
            return send

        baseline = await _stats(transport, iface.name, wait=0.5)
        warmup, interrupted = await _warmup(sender(0, *warm_slots), config)
        if interrupted:
            notes.append("interrupted during the warm-up: no load point was measured")
        expected = _count(baseline or {}, "success", "count") + sum(r.error is None for r in warmup)
        before = await _stats(transport, iface.name, expected)
        runs: list[RunResult] = []
        first_index = config.warmup
        for point in () if interrupted else config.loads:
            if on_start:
                on_start(point, config.requests)
            started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            result = await _run_point(sender(first_index, *measured_slots), point, config, first_index, progress)
            first_index += len(result.records)
            _decode(transport, iface, result.records, tokenizer)
            expected += sum(r.ok for r in result.records)
            try:
                after = await _stats(transport, iface.name, expected)
            except asyncio.CancelledError:  # interrupted while reading statistics: keep the run
                _uncancel()
                after, result.aborted = None, result.aborted or "interrupted"
            metrics = summarize(result.records, streaming=streaming, slo=config.slo, gpu_hourly_usd=config.gpu_hourly_cost)
            runs.append(RunResult(point, metrics, sorted(result.records, key=lambda r: r.index),
                                  _stats_delta(before, after), result.aborted, started_at))
            before = after
            if not result.aborted and any(not r.ok for r in result.records) and not await _alive(transport):
                result.aborted = runs[-1].aborted = "the server stopped answering"
            if result.aborted:
                skipped = config.loads[len(runs):]
                if skipped:
                    notes.append(f"{point.label}: {result.aborted}; skipped {', '.join(p.label for p in skipped)}")
                break
        _decode(transport, iface, warmup, tokenizer)
        mismatched = sum(1 for run in runs for r in run.records
                         if r.ok and config.force_output_len and iface.has_input("min_tokens")
                         and r.token_source == "tokenizer" and r.output_tokens != r.requested_output_tokens)
        if mismatched:
            notes.append(f"{mismatched} completed request(s) re-tokenized to a different length than the forced output "
                         "length (the text of generated tokens does not always re-tokenize to the same tokens); "
                         "token counts come from the tokenizer")
        environment = _environment(config, server_meta, iface)
        memory = await asyncio.to_thread(server_memory, config.metrics_url, notes) if config.metrics_url else None
        return BenchResult(config, iface, streaming, runs, warmup, environment, notes, tokenizer_path, memory)
    finally:
        await transport.close()


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


async def _discover(transport, config: BenchConfig) -> tuple[ModelInterface, dict]:
    try:
        server_meta = await transport.server_metadata()
    except TrtbuildError:
        raise
    except Exception as e:  # noqa: BLE001
        raise TrtbuildError(f"cannot reach the {config.protocol} endpoint at {config.url}: {one_line(e)}",
                            hint="is the server running? gRPC is usually port 8001, HTTP 8000") from None
    try:
        metadata = await transport.model_metadata(config.model)
        model_config = await transport.model_config(config.model)
    except Exception as e:  # noqa: BLE001
        try:
            available = ", ".join(await transport.models()) or "none"
        except Exception:  # noqa: BLE001
            available = "unknown"
        raise TrtbuildError(f"model '{config.model}' is not available at {config.url}: {one_line(e)}",
                            hint=f"models on this server: {available}") from None
    return interface_from(config.model, metadata, model_config, config.interface), server_meta


async def _tokenizer(transport, iface: ModelInterface, config: BenchConfig, notes: list[str]):
    if not iface.is_llm:
        return None, None
    path = config.tokenizer
    if path is None:
        path = await discover_tokenizer_dir(transport, iface)
        if path is not None:
            notes.append(f"tokenizer found in the server's model configuration: {path}")
    if path is None:
        if config.prompts_file is None and not iface.count_outputs:
            raise TrtbuildError("synthetic prompts and token counts need the model's tokenizer",
                                hint="pass --tokenizer DIR (the checkpoint or tokenizer folder)")
        if not iface.count_outputs:
            notes.append("no tokenizer: token counts and token throughput are unavailable")
        return None, None
    return load_tokenizer(path), str(path)


async def discover_tokenizer_dir(transport, iface: ModelInterface) -> Path | None:
    """A `tokenizer_dir` parameter of the model or of a model it calls (ensemble step, BLS
    parameter naming a model), if that folder exists on this machine."""
    seen: set[str] = set()
    pending = [iface.name]
    configs = {iface.name: iface.config}
    try:
        served = set(await transport.models())
    except Exception:  # noqa: BLE001
        served = set()
    while pending:
        name = pending.pop(0)
        if name in seen:
            continue
        seen.add(name)
        config = configs.get(name)
        if config is None:
            try:
                config = await transport.model_config(name)
            except Exception:  # noqa: BLE001
                continue
        params = {k: (v or {}).get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        candidate = params.get("tokenizer_dir")
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
        steps = ((config.get("ensemble_scheduling") or {}).get("step") or [])
        pending += [s["model_name"] for s in steps if s.get("model_name")]
        pending += [v for v in params.values() if v in served]
    return None


def _prompts(config: BenchConfig, iface: ModelInterface, tokenizer) -> list[Prompt]:
    count = config.warmup + config.requests if config.requests is not None else config.warmup + config.num_prompts
    if not iface.is_llm:
        return [Prompt("", None, 0)]
    if config.prompts_file is not None:
        return load_jsonl(config.prompts_file, tokenizer, config.output_tokens, config.seed)
    return synthetic_prompts(tokenizer, count, config.input_tokens, config.output_tokens, config.seed)


def _prepare(transport, config: BenchConfig, iface: ModelInterface, streaming: bool, prompts: list[Prompt]) -> list[Any]:
    if not iface.is_llm:
        arrays = random_tensor_inputs(iface, dict(config.input_shapes), config.seed)
        if isinstance(transport, GrpcTransport):
            return [transport.prepare(iface, arrays)]
        return [transport.prepare(iface, arrays, False, config.request_id_prefix or "")]
    prepared = []
    for k, prompt in enumerate(prompts):
        request_id = "" if config.request_id_prefix is None else f"{config.request_id_prefix}{k}"
        if isinstance(transport, GrpcTransport):
            prepared.append(transport.prepare(iface, llm_arrays(iface, prompt, streaming, config.force_output_len), request_id))
        else:
            prepared.append(transport.prepare(iface, llm_json(iface, prompt, streaming, config.force_output_len, request_id), streaming))
    return prepared


def _slots(count: int, warmup: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(first slot, number of slots) of the warm-up and of the measured requests: distinct prompts
    when there are enough, and every load point of a sweep cycles through the same ones."""
    if count > warmup:
        return (0, max(warmup, 1)), (warmup, count - warmup)
    return (0, count), (0, count)


async def _warmup(send, config: BenchConfig) -> tuple[list[RequestRecord], bool]:
    if not config.warmup:
        return [], False
    result = await closed_loop(send, min(config.warmup, config.loads[0].warmup_concurrency), requests=config.warmup)
    for r in result.records:
        r.warmup = True
    return result.records, result.aborted == "interrupted"


async def _run_point(send, point: LoadPoint, config: BenchConfig, first_index: int, progress: RunProgress | None) -> LoadResult:
    report = (lambda done, failed, elapsed: progress(point, done, failed, elapsed)) if progress else None
    bounds = dict(requests=config.requests, duration=config.duration, max_errors=config.max_errors,
                  progress=report, first_index=first_index)
    if point.concurrency is not None:
        return await closed_loop(send, point.concurrency, **bounds)
    return await open_loop(send, point.request_rate, arrival=point.arrival, max_concurrency=point.max_concurrency,
                           seed=config.seed, **bounds)


def _decode(transport, iface: ModelInterface, records: list[RequestRecord], tokenizer) -> None:
    """Turn what was kept during the run into text, token counts and errors."""
    retokenize = []
    for r in records:
        counts = transport.decode(iface, r)
        r.raw = []
        if not iface.is_llm:
            continue
        if "num_input_tokens" in counts:
            r.input_tokens = counts["num_input_tokens"]
        if "num_output_tokens" in counts:
            r.output_tokens, r.token_source = counts["num_output_tokens"], "server"
        elif tokenizer is not None and r.ok:
            retokenize.append(r)
    for r, n in zip(retokenize, count_tokens(tokenizer, [r.text for r in retokenize]) if retokenize else []):
        r.output_tokens, r.token_source = n, "tokenizer"


async def _stats(transport, model: str, min_success: int = 0, wait: float = 5.0) -> dict | None:
    """The model's inference statistics once they count at least `min_success` successes and stop
    moving: Triton counts a request when it releases it, a moment after the client has read the
    last response (longer on a busy machine), so reading at once would miss the last requests."""
    previous = None
    deadline = time.perf_counter() + wait
    while True:
        try:
            stats = await transport.model_stats(model)
        except Exception:  # noqa: BLE001 - statistics are a bonus; a dead server must not hide the results
            return None
        current = next((e.get("inference_stats", {}) for e in stats.get("model_stats", []) if e.get("name") == model), None)
        if current is None:
            return None
        counted = _count(current, "success", "count") >= min_success
        if (counted and current == previous) or time.perf_counter() > deadline:
            return current
        previous = current
        await asyncio.sleep(0.05)


def _count(stats: dict, key: str, field: str) -> int:
    return int((stats.get(key) or {}).get(field, 0) or 0)


def _stats_delta(before: dict | None, after: dict | None) -> dict[str, Any] | None:
    """Triton's own view of the run: request counts and mean durations (ms) from its statistics."""
    if before is None or after is None:
        return None

    out: dict[str, Any] = {}
    for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        count = _count(after, key, "count") - _count(before, key, "count")
        ns = _count(after, key, "ns") - _count(before, key, "ns")
        out[f"{key}_count"] = count
        out[f"{key}_ms_mean"] = ns / count / 1e6 if count else None
    return out


def _environment(config: BenchConfig, server_meta: dict, iface: ModelInterface) -> dict[str, Any]:
    versions = {}
    for package in ("trtbuild", "tritonclient", "grpcio", "numpy", "transformers"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "packages": versions,
        "command": sys.argv,
        "server": {"name": server_meta.get("name"), "version": server_meta.get("version")},
        "model_config": iface.config,
    }


def server_memory(metrics_url: str, notes: list[str]) -> dict[str, Any] | None:
    """GPU memory the server holds after the run, from Triton's nv_gpu_memory_used_bytes (summed over GPUs):
    the measured footprint `trtbuild select --max-memory-gib` compares."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = metrics_url if "://" in metrics_url else f"http://{metrics_url}"
    url = url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except Exception as e:  # noqa: BLE001 - the benchmark stands without it
        notes.append(f"memory not read: {url}: {one_line(e)}")
        return None
    used = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "nv_gpu_memory_used_bytes"]
    if not used:
        notes.append(f"memory not read: {url} has no nv_gpu_memory_used_bytes (a server without GPUs)")
        return None
    return {"gpu_memory_used_gib": sum(used) / 2**30, "gpus": len(used), "source": url}
