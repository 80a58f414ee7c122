"""Benchmark metrics, defined as AIPerf / genai-perf define them.

Times are `time.perf_counter()` seconds (a monotonic clock). `send` is taken right before the
request is handed to the transport; a response "arrives" when the client has read it.

Per request
- TTFT (time to first token) = arrival of the first response carrying output - send.
- Request latency (end to end) = arrival of the last response carrying output - send.
- ITL (inter-token latency) = (latency - TTFT) / (output tokens - 1); undefined for one output token.
- Input and output tokens: the server's own counts when the model returns them
  (`num_input_tokens` / `num_output_tokens`), otherwise the prompt and the returned text tokenized
  with the model's tokenizer without special tokens (what AIPerf does).
- A request that ends with an error counts as failed; its timings enter no statistic.

Per run (warm-up requests excluded)
- Benchmark duration = end of the last measured request - send of the first one.
- Output token throughput = all output tokens of completed requests / duration.
- Request throughput = completed requests / duration.
- Goodput = completed requests meeting every SLO (`ttft_ms`, `itl_ms`, `latency_ms`) / duration.
- Error rate = failed / (completed + failed).
- Statistics of each per-request metric: p50, p90, p95, p99 (numpy linear interpolation), mean,
  population standard deviation, min, max.
- TTFT and ITL are reported for streamed runs only: a non-streamed request has a single response,
  so its TTFT would be its latency.
- Cost (given the GPU price per hour): USD per 1k requests = price / 3600 / requests per s * 1e3;
  USD per 1M output tokens = price / 3600 / output tokens per s * 1e6.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np

from trtbuild.errors import TrtbuildError

PERCENTILES = (50, 90, 95, 99)
SLO_KEYS = ("ttft_ms", "itl_ms", "latency_ms")


@dataclasses.dataclass
class RequestRecord:
    """What the client saw of one request."""

    index: int
    send: float
    prompt_index: int | None = None
    arrivals: list[float] = dataclasses.field(default_factory=list)  # responses that carried output
    end: float | None = None  # when the client knew the request was over (stream closed, body read)
    error: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    requested_output_tokens: int | None = None
    token_source: str = ""  # "server" or "tokenizer"
    scheduled: float | None = None  # open loop: when the arrival process wanted it sent
    text: str = ""
    warmup: bool = False
    raw: list[Any] = dataclasses.field(default_factory=list, repr=False)  # transport data decoded after the run

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.arrivals)

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.send if self.arrivals else None

    @property
    def latency(self) -> float | None:
        return self.arrivals[-1] - self.send if self.arrivals else None

    @property
    def itl(self) -> float | None:
        if not self.arrivals or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def finished(self) -> float:
        """The last moment this request occupied the client."""
        candidates = [t for t in (self.end, self.arrivals[-1] if self.arrivals else None) if t is not None]
        return max(candidates) if candidates else self.send


@dataclasses.dataclass(frozen=True)
class Stats:
    count: int
    mean: float
    stddev: float
    min: float
    max: float
    p50: float
    p90: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Iterable[float]) -> "Stats | None":
        a = np.asarray([v for v in values if v is not None], dtype=np.float64)
        if a.size == 0:
            return None
        p = np.percentile(a, PERCENTILES)
        return cls(int(a.size), float(a.mean()), float(a.std()), float(a.min()), float(a.max()), *map(float, p))


@dataclasses.dataclass(frozen=True)
class SLO:
    """Service-level objectives; a request is "good" when it meets every one that is set."""

    ttft_ms: float | None = None
    itl_ms: float | None = None
    latency_ms: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> "SLO":
        """`ttft_ms=200,itl_ms=50,latency_ms=2000` (any subset)."""
        if not text:
            return cls()
        values: dict[str, float] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in SLO_KEYS:
                raise TrtbuildError(f"--slo: cannot read '{part}'", hint=f"use key=value with keys {', '.join(SLO_KEYS)}")
            try:
                values[key] = float(value)
            except ValueError:
                raise TrtbuildError(f"--slo: '{value}' for {key} is not a number") from None
            if values[key] <= 0:
                raise TrtbuildError(f"--slo: {key} must be positive, got {value}")
        return cls(**values)

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.itl_ms, self.latency_ms))

    def met(self, record: RequestRecord) -> bool:
        if not record.ok:
            return False
        checks = ((self.ttft_ms, record.ttft), (self.itl_ms, record.itl), (self.latency_ms, record.latency))
        for limit, value in checks:
            if limit is None:
                continue
            if value is None:  # ITL of a one-token answer: nothing between tokens to be slow
                continue
            if value * 1e3 > limit:
                return False
        return True

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Cost:
    gpu_hourly_usd: float
    usd_per_1k_requests: float | None
    usd_per_1m_output_tokens: float | None

    @classmethod
    def of(cls, gpu_hourly_usd: float, requests_per_s: float, output_tokens_per_s: float) -> "Cost":
        per_s = gpu_hourly_usd / 3600.0
        return cls(
            gpu_hourly_usd,
            per_s / requests_per_s * 1e3 if requests_per_s > 0 else None,
            per_s / output_tokens_per_s * 1e6 if output_tokens_per_s > 0 else None,
        )


@dataclasses.dataclass(frozen=True)
class RunMetrics:
    """Aggregates of one load point."""

    completed: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    input_tokens_per_s: float
    good_requests: int | None
    goodput_per_s: float | None
    error_rate: float
    latency_ms: Stats | None
    ttft_ms: Stats | None
    itl_ms: Stats | None
    input_tokens: Stats | None
    output_tokens: Stats | None
    cost: Cost | None
    errors: dict[str, int]

    def flat(self) -> dict[str, float | int | None]:
        """One level of keys (`ttft_ms_p50`, ...) for CSV rows and comparisons."""
        out: dict[str, float | int | None] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Stats):
                for k, v in dataclasses.asdict(value).items():
                    if k != "count":
                        out[f"{f.name}_{k}"] = v
            elif isinstance(value, Cost):
                out.update({k: v for k, v in dataclasses.asdict(value).items()})
            elif f.name in ("ttft_ms", "itl_ms", "latency_ms", "input_tokens", "output_tokens"):
                for k in ("mean", "stddev", "min", "max", "p50", "p90", "p95", "p99"):
                    out[f"{f.name}_{k}"] = None
            elif f.name != "errors":
                out[f.name] = value
        return out


def _ms(values: Iterable[float | None]) -> list[float]:
    return [v * 1e3 for v in values if v is not None]


def summarize(records: Sequence[RequestRecord], *, streaming: bool, slo: SLO = SLO(),
              gpu_hourly_usd: float | None = None) -> RunMetrics:
    """Aggregate the measured (non-warm-up) records of one load point."""
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.ok]
    failed = len(measured) - len(ok)
    duration = (max(r.finished for r in measured) - min(r.send for r in measured)) if measured else 0.0
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    in_tokens = sum(r.input_tokens or 0 for r in ok)
    good = sum(slo.met(r) for r in ok) if slo.active else None
    errors: dict[str, int] = {}
    for r in measured:
        if not r.ok:
            key = (r.error or "no response carried output").splitlines()[0][:200]
            errors[key] = errors.get(key, 0) + 1
    requests_per_s, tokens_per_s = per_s(len(ok)), per_s(out_tokens)
    return RunMetrics(
        completed=len(ok),
        failed=failed,
        duration_s=duration,
        requests_per_s=requests_per_s,
        output_tokens_per_s=tokens_per_s,
        input_tokens_per_s=per_s(in_tokens),
        good_requests=good,
        goodput_per_s=None if good is None else per_s(good),
        error_rate=failed / len(measured) if measured else 0.0,
        latency_ms=Stats.of(_ms(r.latency for r in ok)),
        ttft_ms=Stats.of(_ms(r.ttft for r in ok)) if streaming else None,
        itl_ms=Stats.of(_ms(r.itl for r in ok)) if streaming else None,
        input_tokens=Stats.of(r.input_tokens for r in ok),
        output_tokens=Stats.of(r.output_tokens for r in ok),
        cost=Cost.of(gpu_hourly_usd, requests_per_s, tokens_per_s) if gpu_hourly_usd else None,
        errors=errors,
    )


def samples(records: Sequence[RequestRecord], *, streaming: bool) -> dict[str, list[float]]:
    """Per-request values (ms) of the completed measured requests: what `bench compare` tests."""
    ok = [r for r in records if r.ok and not r.warmup]
    out = {"latency_ms": _ms(r.latency for r in ok)}
    if streaming:
        out["ttft_ms"] = _ms(r.ttft for r in ok)
        out["itl_ms"] = _ms(r.itl for r in ok)
    return out

