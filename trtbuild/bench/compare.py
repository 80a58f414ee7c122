"""`trtbuild bench compare BASE.json NEW.json`: is the new build faster, slower, or no different?

Runs are matched by load point (same concurrency, or same request rate and arrival process).
For each match:
- every metric's ratio, as a speedup (> 1 means NEW is better: new/base for throughputs,
  base/new for latencies);
- Welch's t-test (scipy.stats.ttest_ind, equal_var=False) on the per-request samples of TTFT, ITL
  and latency, with its p-value;
- a verdict from the test on the samples behind the chosen metric (latency for throughput
  metrics): faster or slower when p < alpha, otherwise no significant difference;
- a regression check: the chosen metric got worse by more than `max_regression` (a fraction).
The command exits non-zero when any matched load point regressed past that threshold.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from trtbuild.errors import TrtbuildError

THROUGHPUTS = ("output_tokens_per_s", "requests_per_s", "goodput_per_s", "input_tokens_per_s")
FAMILIES = ("ttft", "itl", "latency")
STATS = ("p50", "p90", "p95", "p99", "mean")
METRICS = THROUGHPUTS + tuple(f"{f}_{s}" for f in FAMILIES for s in STATS)
TABLE_METRICS = ("output_tokens_per_s", "requests_per_s", "goodput_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99",
                 "latency_p50", "latency_p99")


def higher_is_better(metric: str) -> bool:
    return metric in THROUGHPUTS


def sample_of(metric: str) -> str:
    """The per-request sample a metric is tested on."""
    family = metric.split("_")[0]
    return f"{family}_ms" if family in FAMILIES else "latency_ms"


def metric_value(run: dict[str, Any], metric: str) -> float | None:
    m = run["metrics"]
    if metric in THROUGHPUTS:
        return m.get(metric)
    family, _, stat = metric.rpartition("_")
    stats = m.get(f"{family}_ms")
    return None if stats is None else stats.get(stat)


@dataclasses.dataclass(frozen=True)
class MetricChange:
    metric: str
    base: float | None
    new: float | None

    @property
    def speedup(self) -> float | None:
        """> 1: NEW is better."""
        if not self.base or not self.new:
            return None
        return self.new / self.base if higher_is_better(self.metric) else self.base / self.new

    @property
    def regression(self) -> float | None:
        """How much worse NEW is, as a fraction of BASE (negative: better)."""
        if self.base is None or self.new is None or self.base == 0:
            return None
        change = (self.new - self.base) / self.base
        return -change if higher_is_better(self.metric) else change


@dataclasses.dataclass(frozen=True)
class WelchTest:
    sample: str
    base_n: int
    new_n: int
    base_mean: float | None
    new_mean: float | None
    t: float | None
    p_value: float | None


def welch(sample: str, base: list[float], new: list[float]) -> WelchTest:
    from scipy import stats

    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    if len(base) < 2 or len(new) < 2:
        return WelchTest(sample, len(base), len(new), mean(base), mean(new), None, None)
    result = stats.ttest_ind(new, base, equal_var=False)
    t, p = float(result.statistic), float(result.pvalue)
    if math.isnan(p):  # identical constant samples
        t, p = 0.0, 1.0
    return WelchTest(sample, len(base), len(new), mean(base), mean(new), t, p)


@dataclasses.dataclass(frozen=True)
class PointComparison:
    key: str
    label: str
    changes: tuple[MetricChange, ...]
    tests: tuple[WelchTest, ...]
    metric: str
    alpha: float
    max_regression: float

    @property
    def chosen(self) -> MetricChange:
        return next(c for c in self.changes if c.metric == self.metric)

    @property
    def test(self) -> WelchTest | None:
        return next((t for t in self.tests if t.sample == sample_of(self.metric)), None)

    @property
    def verdict(self) -> str:
        test = self.test
        if test is None or test.p_value is None:
            return "not enough requests for a t-test"
        if test.p_value >= self.alpha:
            return "no significant difference"
        return "faster" if test.new_mean < test.base_mean else "slower"

    @property
    def regressed(self) -> bool:
        r = self.chosen.regression
        return r is not None and r > self.max_regression


@dataclasses.dataclass(frozen=True)
class Comparison:
    base: str
    new: str
    metric: str
    max_regression: float
    alpha: float
    points: tuple[PointComparison, ...]
    unmatched: tuple[str, ...]

    @property
    def regressed(self) -> bool:
        return any(p.regressed for p in self.points)

    def verdict_lines(self) -> list[str]:
        lines = []
        for p in self.points:
            t = p.test
            speed = p.chosen.speedup
            detail = [f"{self.metric} x{speed:.3f}" if speed is not None else f"{self.metric} unavailable"]
            if t is not None and t.p_value is not None:
                detail.append(f"Welch p={t.p_value:.3g} on {t.sample}")
            if p.regressed:
                detail.append(f"REGRESSION {p.chosen.regression:+.1%} > {self.max_regression:.0%} allowed")
            phrase = {"faster": f"{self.new} is faster than {self.base}", "slower": f"{self.new} is slower than {self.base}",
                      "no significant difference": f"no significant difference between {self.new} and {self.base}"}
            lines.append(f"{p.label}: {phrase.get(p.verdict, p.verdict)} ({'; '.join(detail)})")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base, "new": self.new, "metric": self.metric, "max_regression": self.max_regression, "alpha": self.alpha,
            "regressed": self.regressed, "unmatched": list(self.unmatched), "verdicts": self.verdict_lines(),
            "points": [{"key": p.key, "label": p.label, "verdict": p.verdict, "regressed": p.regressed,
                        "changes": [dataclasses.asdict(c) | {"speedup": c.speedup, "regression": c.regression} for c in p.changes],
                        "tests": [dataclasses.asdict(t) for t in p.tests]} for p in self.points],
        }


def load_result(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrtbuildError(f"{path} does not exist", hint="pass the results.json (or the --out folder) of `trtbuild bench run`") from None
    except json.JSONDecodeError as e:
        raise TrtbuildError(f"{path} is not JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise TrtbuildError(f"{path} is not a `trtbuild bench run` result (no 'runs' list)")
    return data


def compare(base: dict[str, Any], new: dict[str, Any], *, metric: str = "output_tokens_per_s", max_regression: float = 0.2,
            alpha: float = 0.05, base_name: str = "BASE", new_name: str = "NEW") -> Comparison:
    if metric not in METRICS:
        raise TrtbuildError(f"--metric {metric} is unknown", hint=f"choose from {', '.join(METRICS)}")
    if max_regression < 0:
        raise TrtbuildError(f"--max-regression must be >= 0, got {max_regression}")
    new_runs = {r["key"]: r for r in new["runs"]}
    base_runs = {r["key"]: r for r in base["runs"]}
    points = []
    for key, b in base_runs.items():
        n = new_runs.get(key)
        if n is None:
            continue
        changes = tuple(MetricChange(m, metric_value(b, m), metric_value(n, m)) for m in dict.fromkeys((*TABLE_METRICS, metric)))
        tests = tuple(welch(s, b.get("samples", {}).get(s, []), n.get("samples", {}).get(s, []))
                      for s in ("ttft_ms", "itl_ms", "latency_ms") if s in b.get("samples", {}) and s in n.get("samples", {}))
        points.append(PointComparison(key, b.get("label", key), changes, tests, metric, alpha, max_regression))
    unmatched = tuple(sorted(set(base_runs) ^ set(new_runs)))
    if not points:
        raise TrtbuildError(f"{base_name} and {new_name} share no load point",
                            hint=f"base has {', '.join(base_runs) or 'none'}; new has {', '.join(new_runs) or 'none'}")
    return Comparison(base_name, new_name, metric, max_regression, alpha, tuple(points), unmatched)


def table(comparison: Comparison) -> Table:
    t = Table(title=f"trtbuild bench compare: {comparison.new} vs {comparison.base} (speedup > 1: NEW better)")
    for c in ("load", "metric", "base", "new", "speedup", "Welch p"):
        t.add_column(c, justify="left" if c in ("load", "metric") else "right")
    for p in comparison.points:
        p_values = {test.sample: test.p_value for test in p.tests}
        for i, change in enumerate(p.changes):
            if change.base is None and change.new is None:
                continue
            speed = change.speedup
            colour = "" if speed is None or abs(speed - 1) < 0.02 else ("green" if speed > 1 else "red")
            speed_text = "-" if speed is None else (f"[{colour}]x{speed:.3f}[/]" if colour else f"x{speed:.3f}")
            pv = p_values.get(sample_of(change.metric)) if change.metric not in THROUGHPUTS else None
            marker = " *" if change.metric == comparison.metric else ""
            t.add_row(p.label if i == 0 else "", change.metric + marker, _num(change.base), _num(change.new), speed_text,
                      "-" if pv is None else f"{pv:.3g}")
    return t


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.2f}"
