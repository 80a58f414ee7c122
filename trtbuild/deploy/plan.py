"""Capacity planning from a measured benchmark sweep: `trtbuild plan BENCH.json --rps R --slo ...`.

Input: the JSON `trtbuild bench` writes (trtbuild/bench/run.py). Per run it reads `load.concurrency` or
`load.request_rate` (the sweep's load level), and from `metrics`: `requests_per_s`,
`output_tokens_per_s`, `error_rate` and the percentile statistics `ttft_ms`, `itl_ms`, `latency_ms`
(`{"p50", "p90", "p95", "p99", ...}`; TTFT and ITL exist for streamed runs only).

Method
1. Sort the runs by load level (one kind per sweep: concurrency or request rate). A run meets the SLO
   when every SLO metric at the chosen percentile (p95 unless --percentile says otherwise) is at or
   below its limit and its error rate is at most --max-error-rate.
2. The highest load per replica is found between the last run that meets the SLO (a) and the first
   one that does not (b), by linear interpolation in load level: for each metric b violates,
   t = (limit - a) / (b - a); the smallest t wins. The throughput at that load is interpolated the
   same way, and never taken below a's measured throughput. Runs after b are ignored, even if they
   pass again (latency is assumed to grow with load; a later pass is noise).
   If every run meets the SLO, the capacity is the last run's throughput: a lower bound (the report says
   so); if the first run fails, there is no capacity and the command says which metric failed.
3. Replicas for R requests/s: ceil(R / (C * (1 - headroom))), C the capacity per replica. Headroom keeps
   every replica below (1 - headroom) of its SLO limit, for bursts and for the minutes a new GPU pod
   takes to load.
4. GPUs = replicas * GPUs per replica. Cost per hour = GPUs * GPU price; per 1k requests =
   cost per hour / (R * 3600) * 1000; per 1M output tokens uses the output tokens per request measured
   at the capacity point (interpolated like the throughput).
5. HPA: minReplicas = the replicas for R (so the target load is served before the HPA reacts);
   maxReplicas = the replicas for peak_factor * R (default 2 * R).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from trtbuild.errors import TrtbuildError

SLO_METRICS = ("ttft_ms", "itl_ms", "latency_ms")
PERCENTILES = (50, 90, 95, 99)


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep, reduced to what planning needs."""

    load: float  # concurrency or request rate
    requests_per_s: float
    output_tokens_per_s: float
    error_rate: float
    percentiles: dict[str, dict[str, float]]  # "ttft_ms" -> {"p95": 123.0, ...}
    label: str = ""
    completed: int = 1  # requests that finished; 0: the run failed as a whole

    def value(self, metric: str, percentile: int) -> float | None:
        stats = self.percentiles.get(metric) or {}
        v = stats.get(f"p{percentile}")
        return None if v is None else float(v)


@dataclasses.dataclass(frozen=True)
class Sweep:
    points: tuple[SweepPoint, ...]
    load_kind: str  # concurrency | request_rate
    source: str
    model: str | None = None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TrtbuildError(f"{where} is {value!r}, not a number")
    return float(value)


def sweep_from_bench(data: dict[str, Any], source: str = "<bench>") -> Sweep:
    """Read the `trtbuild bench` JSON schema (see the module docstring)."""
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not runs:
        raise TrtbuildError(f"{source}: no 'runs' list", hint="pass the JSON written by `trtbuild bench`")
    points, kinds = [], set()
    for i, run in enumerate(runs):
        where = f"{source}: runs[{i}]"
        load = run.get("load") or {}
        metrics = run.get("metrics")
        if not isinstance(metrics, dict):
            raise TrtbuildError(f"{where} has no 'metrics'")
        if load.get("concurrency") is not None:
            kind, level = "concurrency", load["concurrency"]
        elif load.get("request_rate") is not None:
            kind, level = "request_rate", load["request_rate"]
        else:
            raise TrtbuildError(f"{where}.load has neither 'concurrency' nor 'request_rate'")
        kinds.add(kind)
        completed = int(metrics.get("completed") or 0)
        percentiles = {m: {k: v for k, v in (metrics.get(m) or {}).items() if k.startswith("p") and v is not None}
                       for m in SLO_METRICS if isinstance(metrics.get(m), dict)}
        points.append(SweepPoint(
            load=_number(level, f"{where}.load.{kind}"),
            requests_per_s=_number(metrics.get("requests_per_s"), f"{where}.metrics.requests_per_s"),
            output_tokens_per_s=_number(metrics.get("output_tokens_per_s", 0.0), f"{where}.metrics.output_tokens_per_s"),
            error_rate=_number(metrics.get("error_rate", 0.0), f"{where}.metrics.error_rate") if completed else 1.0,
            percentiles=percentiles,
            label=str(run.get("label") or run.get("key") or kind),
            completed=completed,
        ))
    if len(kinds) > 1:
        raise TrtbuildError(f"{source} mixes concurrency and request-rate runs",
                            hint="plan from a sweep of one kind (bench --concurrency ... or --request-rate ...)")
    levels = [p.load for p in points]
    if len(set(levels)) != len(levels):
        raise TrtbuildError(f"{source}: two runs share a load level", hint="keep one run per concurrency / rate")
    return Sweep(tuple(sorted(points, key=lambda p: p.load)), kinds.pop(), source,
                 (data.get("target") or {}).get("model"))


def load_sweep(path: Path) -> Sweep:
    """A `trtbuild bench run` result: its results.json, or the --out folder holding it (as `bench compare` takes)."""
    from trtbuild.bench.compare import load_result

    path = Path(path)
    return sweep_from_bench(load_result(path), str(path / "results.json" if path.is_dir() else path))


@dataclasses.dataclass(frozen=True)
class Objectives:
    slo: dict[str, float]  # metric -> limit (ms), keys from SLO_METRICS
    percentile: int = 95
    max_error_rate: float = 0.01

    def __post_init__(self):
        if not self.slo:
            raise TrtbuildError("--slo needs at least one of ttft_ms, itl_ms, latency_ms")
        unknown = set(self.slo) - set(SLO_METRICS)
        if unknown:
            raise TrtbuildError(f"--slo: unknown key(s) {', '.join(sorted(unknown))}", hint=f"use {', '.join(SLO_METRICS)}")
        if self.percentile not in PERCENTILES:
            raise TrtbuildError(f"--percentile must be one of {PERCENTILES}, got {self.percentile}")
        if not 0 <= self.max_error_rate < 1:
            raise TrtbuildError("--max-error-rate must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Capacity:
    """The highest load one replica sustains within the SLO."""

    requests_per_s: float
    load: float  # concurrency or request rate at that point
    output_tokens_per_request: float | None
    bounded: bool  # False: every run met the SLO, so this is a lower bound
    limited_by: str | None  # the metric that reached its limit first
    between: tuple[str, str] | None  # labels of the runs it was interpolated between


def _checks(point: SweepPoint, objectives: Objectives, where: str) -> dict[str, tuple[float, float]]:
    """metric -> (value, limit) for everything the SLO constrains at this point."""
    out = {}
    for metric, limit in objectives.slo.items():
        if not point.completed:
            break  # no request finished: the error rate alone fails it
        value = point.value(metric, objectives.percentile)
        if value is None:
            raise TrtbuildError(f"{where}: run '{point.label}' has no {metric} p{objectives.percentile}",
                                hint="TTFT and ITL are measured on streamed runs only (bench --stream)"
                                if metric != "latency_ms" else None)
        out[metric] = (value, limit)
    out["error_rate"] = (point.error_rate, objectives.max_error_rate)
    return out


def _tokens_per_request(p: SweepPoint) -> float | None:
    return p.output_tokens_per_s / p.requests_per_s if p.requests_per_s > 0 and p.output_tokens_per_s > 0 else None


def capacity(sweep: Sweep, objectives: Objectives) -> Capacity:
    points = sweep.points
    checks = [_checks(p, objectives, sweep.source) for p in points]
    failing = [i for i, c in enumerate(checks) if any(v > limit for v, limit in c.values())]
    if not failing:
        last = points[-1]
        return Capacity(last.requests_per_s, last.load, _tokens_per_request(last), False, None, None)
    f = failing[0]
    if f == 0:
        misses = ", ".join(f"{m} {v:.4g} > {limit:.4g}" for m, (v, limit) in checks[0].items() if v > limit)
        raise TrtbuildError(f"{sweep.source}: even the lightest load ({sweep.load_kind} {points[0].load:g}) misses "
                            f"the SLO at p{objectives.percentile}: {misses}",
                            hint="relax the SLO, or measure lighter loads / a faster build")
    a, b = points[f - 1], points[f]
    fractions = {}
    for metric, (vb, limit) in checks[f].items():
        if vb <= limit:
            continue
        va = checks[f - 1][metric][0]
        fractions[metric] = (limit - va) / (vb - va)
    limited_by = min(fractions, key=fractions.get)
    t = fractions[limited_by]
    rps = max(a.requests_per_s, a.requests_per_s + t * (b.requests_per_s - a.requests_per_s))
    ta, tb = _tokens_per_request(a), _tokens_per_request(b)
    tokens = ta + t * (tb - ta) if ta is not None and tb is not None else (ta or tb)
    return Capacity(rps, a.load + t * (b.load - a.load), tokens, True, limited_by, (a.label, b.label))


@dataclasses.dataclass(frozen=True)
class Plan:
    target_rps: float
    headroom: float
    capacity: Capacity
    replicas: int
    gpus_per_replica: int
    gpus: int
    hpa_min: int
    hpa_max: int
    peak_factor: float
    cost_per_hour: float | None
    cost_per_1k_requests: float | None
    cost_per_1m_output_tokens: float | None
    objectives: Objectives
    load_kind: str
    source: str

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["utilisation_at_target"] = self.target_rps / (self.replicas * self.capacity.requests_per_s)
        return d


def replicas_for(rps: float, capacity_rps: float, headroom: float) -> int:
    usable = capacity_rps * (1.0 - headroom)
    return max(1, math.ceil(rps / usable - 1e-9))


def make_plan(sweep: Sweep, objectives: Objectives, target_rps: float, *, headroom: float = 0.2,
              gpus_per_replica: int = 1, gpu_hourly_cost: float | None = None, peak_factor: float = 2.0) -> Plan:
    if not target_rps > 0:
        raise TrtbuildError(f"--rps must be positive, got {target_rps}")
    if not 0 <= headroom < 1:
        raise TrtbuildError(f"--headroom must be in [0, 1), got {headroom}")
    if gpus_per_replica < 1:
        raise TrtbuildError(f"--gpus-per-replica must be at least 1, got {gpus_per_replica}")
    if gpu_hourly_cost is not None and gpu_hourly_cost < 0:
        raise TrtbuildError(f"--gpu-hourly-cost must not be negative, got {gpu_hourly_cost}")
    if peak_factor < 1:
        raise TrtbuildError(f"--peak-factor must be at least 1, got {peak_factor}")
    cap = capacity(sweep, objectives)
    if cap.requests_per_s <= 0:
        raise TrtbuildError(f"{sweep.source}: the capacity within the SLO is 0 requests/s")
    replicas = replicas_for(target_rps, cap.requests_per_s, headroom)
    gpus = replicas * gpus_per_replica
    cost = gpus * gpu_hourly_cost if gpu_hourly_cost is not None else None
    per_1k = cost / (target_rps * 3600) * 1e3 if cost is not None else None
    per_1m = (cost / (target_rps * cap.output_tokens_per_request * 3600) * 1e6
              if cost is not None and cap.output_tokens_per_request else None)
    return Plan(target_rps, headroom, cap, replicas, gpus_per_replica, gpus, replicas,
                max(replicas, replicas_for(peak_factor * target_rps, cap.requests_per_s, headroom)), peak_factor,
                cost, per_1k, per_1m, objectives, sweep.load_kind, sweep.source)
