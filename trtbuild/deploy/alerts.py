"""Regression alerts against a recorded baseline: `trtbuild k8s --baseline BENCH.json`.

The baseline is one run of a `trtbuild bench run` result (the sweep's last load point unless
`load` names one): its end-to-end latency p99. Alerts, on the entry points the repository's
trtbuild.json names, read only series Triton exposes (with the metrics flags the deployment passes,
trtbuild.deploy.monitoring.TRITON_METRICS_ARGS) or that our rules record:
- TrtbuildLatencyRegression: Triton's p99 request time (its summary quantile 0.99, worst replica)
  above `latency_factor` x the baseline p99 for `latency_for`;
- TrtbuildErrorRatio: failed / all requests of the entry points above `error_ratio` for 5 minutes;
- TrtbuildQueueSaturation: a replica's queue/compute ratio (the HPA's metric) above `queue_ratio`
  for 10 minutes: the HPA is at its maximum or cannot add pods fast enough.
Each alert carries the runbook step: roll back to the previous revision (`kubectl rollout undo`, or
for a canary, scale it to zero / set KServe's canaryTrafficPercent to 0). Recording rules publish the
baseline and the thresholds as series, so the dashboard draws them as lines beside the live values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from trtbuild.errors import TrtbuildError

ALERT_GROUP = "trtbuild-alerts"
BASELINE_P99 = "trtbuild:baseline:request_latency_p99_us"
LATENCY_LIMIT = "trtbuild:alert:request_latency_p99_limit_us"
P99 = "model:nv_inference_request_summary_us:p99"


@dataclasses.dataclass(frozen=True)
class Baseline:
    source: str
    load: str
    latency_p99_ms: float

    @classmethod
    def from_bench(cls, path: Path, load: str | None = None) -> "Baseline":
        from trtbuild.bench.compare import load_result

        result = load_result(path)
        runs = [r for r in result["runs"] if not r.get("aborted") and (r.get("metrics") or {}).get("latency_ms")]
        if load is not None:
            runs = [r for r in runs if r.get("key") == load]
        if not runs:
            keys = ", ".join(r.get("key", "?") for r in result["runs"]) or "none"
            raise TrtbuildError(f"--baseline {path}: no complete run{f' at {load}' if load else ''} with latencies",
                                hint=f"its load points: {keys} (--baseline-load KEY picks one)")
        run = runs[-1]
        return cls(str(path), run["key"], float(run["metrics"]["latency_ms"]["p99"]))


@dataclasses.dataclass(frozen=True)
class AlertSettings:
    latency_factor: float = 1.2
    latency_for: str = "10m"
    error_ratio: float = 0.01
    queue_ratio: float = 3.0

    def check(self) -> None:
        if self.latency_factor <= 1:
            raise TrtbuildError(f"--alert-latency-factor must be above 1, got {self.latency_factor}")
        if not 0 < self.error_ratio < 1:
            raise TrtbuildError(f"--alert-error-ratio must be in (0, 1), got {self.error_ratio}")
        if self.queue_ratio <= 0:
            raise TrtbuildError(f"--alert-queue-ratio must be positive, got {self.queue_ratio}")


def _regex(names: tuple[str, ...]) -> str:
    import re

    return "|".join(re.escape(n) for n in names)


def rollback_step(workload: str, namespace: str | None, *, kserve_canary: bool = False, canary: str | None = None) -> str:
    """The command that undoes the last rollout (KServe in RawDeployment mode owns a Deployment too)."""
    ns = f" -n {namespace}" if namespace else ""
    if kserve_canary:
        return (f"kubectl patch inferenceservice {canary or workload}{ns} --type merge "
                "-p '{\"spec\":{\"predictor\":{\"canaryTrafficPercent\":0}}}' (KServe sends all traffic back to the "
                "last ready revision)")
    if canary:
        return (f"kubectl scale deployment/{canary}{ns} --replicas=0 (stops the canary); if the stable build itself "
                f"regressed: kubectl rollout undo deployment/{workload}{ns}")
    return f"kubectl rollout undo deployment/{workload}{ns} (back to the previous Deployment revision)"


def alert_group(baseline: Baseline, entrypoints: tuple[str, ...], settings: AlertSettings, runbook: str) -> dict[str, Any]:
    """The `trtbuild-alerts` rule group: baseline recordings first, then the alerts."""
    settings.check()
    if not entrypoints:
        raise TrtbuildError("the repository's trtbuild.json names no entry points to alert on")
    entry = f'model=~"{_regex(entrypoints)}"'
    baseline_us = baseline.latency_p99_ms * 1e3
    limit_us = baseline_us * settings.latency_factor
    from trtbuild.deploy.monitoring import PER_REPLICA, QUEUE_COMPUTE_RATIO

    def alert(name: str, expr: str, duration: str, summary: str, description: str, severity: str) -> dict[str, Any]:
        return {"alert": name, "expr": expr, "for": duration, "labels": {"severity": severity},
                "annotations": {"summary": summary, "description": description, "runbook": runbook}}

    failures = f"sum(rate(nv_inference_request_failure{{{entry}}}[5m]))"
    successes = f"sum(rate(nv_inference_request_success{{{entry}}}[5m]))"
    return {"name": ALERT_GROUP, "interval": "30s", "rules": [
        {"record": P99, "expr": f'max by ({PER_REPLICA}, model) (nv_inference_request_summary_us{{quantile="0.99"}})'},
        {"record": BASELINE_P99, "expr": f"vector({baseline_us:.0f})",
         "labels": {"baseline": Path(baseline.source).name, "load": baseline.load}},
        {"record": LATENCY_LIMIT, "expr": f"vector({limit_us:.0f})"},
        alert("TrtbuildLatencyRegression", f"max by ({PER_REPLICA}, model) ({P99}{{{entry}}}) > {limit_us:.0f}",
              settings.latency_for,
              f"p99 request latency of {{{{ $labels.model }}}} on {{{{ $labels.pod }}}}{{{{ $labels.instance }}}} above "
              f"{settings.latency_factor:g}x the baseline",
              f"p99 {{{{ $value | humanize }}}}us > {settings.latency_factor:g} x {baseline_us:.0f}us, the p99 that "
              f"{Path(baseline.source).name} measured at {baseline.load}.", "critical"),
        alert("TrtbuildErrorRatio", f"{failures}\n  / clamp_min({successes} + {failures}, 1e-9) > {settings.error_ratio:g}",
              "5m", f"more than {settings.error_ratio:.1%} of requests fail",
              "failed / all requests of the entry points over 5 minutes is {{ $value | humanizePercentage }}.", "critical"),
        alert("TrtbuildQueueSaturation", f"max by ({PER_REPLICA}) ({QUEUE_COMPUTE_RATIO}) > {settings.queue_ratio:g}", "10m",
              "requests queue faster than the replicas serve them",
              f"queue/compute ratio {{{{ $value | humanize }}}} > {settings.queue_ratio:g} on {{{{ $labels.pod }}}}"
              f"{{{{ $labels.instance }}}}: the HPA is at its maximum or pods do not come up; if this began with a "
              "rollout, roll back.", "warning"),
    ]}


def baseline_targets(entrypoints: tuple[str, ...]) -> dict[str, tuple]:
    """Lines the dashboard's latency panel adds (ms): the live p99 beside the baseline and the alert limit."""
    from trtbuild.deploy.monitoring import LATENCY_PANEL, Target

    entry = f'model=~"{_regex(entrypoints)}"'
    return {LATENCY_PANEL: (Target(f"max by (model) ({P99}{{{entry}}}) / 1000", "p99 {{model}}"),
                            Target(f"max({BASELINE_P99}) / 1000", "baseline p99"),
                            Target(f"max({LATENCY_LIMIT}) / 1000", "alert limit"))}
