"""`trtbuild select`: which measured build to ship, by a stated objective under stated constraints.

Every number comes from results the user measured: a `trtbuild bench run` result (results.json)
and, for accuracy, a `trtbuild validate` report (report.json). There is no built-in catalogue of
expected speed-ups. A build is one RESULT argument, `[NAME=]PATH`:
- a folder: the bench results.json and the validate report.json found in it (searched below it);
- a bench results.json: plus the validate report.json in the same folder, if there is one.
A report holding several variants names this build's by the build's NAME. NAME defaults to the folder's name.

Objectives (at the build's operating point, below): `throughput` (output tokens/s, highest),
`p99` (end-to-end latency p99, lowest), `cost` (USD per 1M output tokens, lowest: the bench
result's cost columns, or `--gpu-hourly-cost` over its measured throughput).
Constraints, each disqualifying a build that fails it or did not measure it:
`max_ppl_delta` (validate's ppl_delta_rel, a fraction), `min_token_agreement` (validate's served
greedy token agreement), `max_memory_gib` (the GPU memory bench read from the server's metrics),
and an SLO on the run's p99 TTFT / ITL / latency (ms).
Operating point: with `load` the run of that load point (`c4`, `r10-poisson`: bench's keys);
without it, for throughput and cost the run with the best objective that meets the SLO (the most a
build delivers within it), for p99 the load point every build measured (it must be one).

The Pareto front is over (objective, accuracy delta = ppl_delta_rel, else 1 - token agreement)
among the builds that meet the constraints: a build is on it when no other is at least as good on
both and better on one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from trtbuild.bench.metrics import SLO
from trtbuild.errors import TrtbuildError

OBJECTIVES = {  # name -> (label, unit, higher is better)
    "throughput": ("output tokens/s", "tok/s", True),
    "p99": ("latency p99", "ms", False),
    "cost": ("USD per 1M output tokens", "$/1M tok", False),
}


@dataclasses.dataclass(frozen=True)
class Constraints:
    max_ppl_delta: float | None = None
    min_token_agreement: float | None = None
    max_memory_gib: float | None = None
    slo: SLO = SLO()


@dataclasses.dataclass
class Build:
    """What was measured of one build."""

    name: str
    bench_path: Path
    bench: dict[str, Any]
    validate_path: Path | None = None
    accuracy: dict[str, Any] | None = None  # the validate variant's metrics

    @property
    def memory_gib(self) -> float | None:
        return ((self.bench.get("memory") or {}).get("gpu_memory_used_gib"))

    @property
    def ppl_delta(self) -> float | None:
        return None if self.accuracy is None else self.accuracy.get("ppl_delta_rel")

    @property
    def token_agreement(self) -> float | None:
        return None if self.accuracy is None else self.accuracy.get("token_agreement")

    @property
    def accuracy_delta(self) -> float | None:
        """How far from the reference: relative perplexity rise, else the share of greedy tokens that differ."""
        if self.ppl_delta is not None:
            return self.ppl_delta
        return None if self.token_agreement is None else 1 - self.token_agreement


@dataclasses.dataclass
class Candidate:
    build: Build
    run: dict[str, Any] | None  # the operating point
    value: float | None  # of the objective
    failures: list[str]
    on_front: bool = False
    why_lost: str | None = None

    @property
    def eligible(self) -> bool:
        return not self.failures and self.value is not None


@dataclasses.dataclass
class Selection:
    objective: str
    constraints: Constraints
    load: str | None
    candidates: list[Candidate]
    chosen: Candidate | None

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": "trtbuild select", "objective": self.objective, "load": self.load,
            "constraints": {**{k: v for k, v in dataclasses.asdict(self.constraints).items() if k != "slo"},
                            "slo": self.constraints.slo.as_dict()},
            "chosen": self.chosen.build.name if self.chosen else None,
            "builds": [{"name": c.build.name, "bench": str(c.build.bench_path),
                        "validate": str(c.build.validate_path) if c.build.validate_path else None,
                        "load": c.run.get("key") if c.run else None, "objective": c.value,
                        "ppl_delta_rel": c.build.ppl_delta, "token_agreement": c.build.token_agreement,
                        "memory_gib": c.build.memory_gib, "eligible": c.eligible, "pareto": c.on_front,
                        "failures": c.failures, "why_lost": c.why_lost} for c in self.candidates],
        }


# ---------------------------------------------------------------------------------------------
# Reading results
# ---------------------------------------------------------------------------------------------
def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise TrtbuildError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise TrtbuildError(f"{path} is not JSON (line {e.lineno}: {e.msg})") from None
    return data if isinstance(data, dict) else {}


def _is_bench(data: dict) -> bool:
    return isinstance(data.get("runs"), list) and data.get("tool", "trtbuild bench") == "trtbuild bench"


def _is_validate(data: dict) -> bool:
    return isinstance(data.get("variants"), list) and "version" in data


def load_build(argument: str) -> Build:
    """One RESULT argument: `[NAME=]PATH` (module docstring)."""
    name, sep, text = argument.partition("=")
    if not sep:
        name, text = "", argument
    path = Path(text)
    if not path.exists():
        raise TrtbuildError(f"RESULT {path} does not exist", hint="pass a folder or the results.json of `trtbuild bench run`")
    folder = path if path.is_dir() else path.parent
    files = sorted(folder.rglob("*.json")) if path.is_dir() else [path, *sorted(p for p in folder.glob("*.json") if p != path)]
    benches, reports = [], []
    for f in files:
        data = _read(f) if f.stat().st_size < 200 * 2**20 else {}
        if _is_bench(data):
            benches.append((f, data))
        elif _is_validate(data):
            reports.append((f, data))
    if path.is_file() and not (benches and benches[0][0] == path):
        raise TrtbuildError(f"{path} is not a `trtbuild bench run` result (no 'runs' list)")
    if not benches:
        raise TrtbuildError(f"{path}: no `trtbuild bench run` results.json in it", hint="run `trtbuild bench run --out DIR` first")
    if len(benches) > 1 and path.is_dir():
        raise TrtbuildError(f"{path} holds {len(benches)} bench results ({', '.join(str(b[0]) for b in benches)})",
                            hint="pass the results.json of this build itself")
    name = name or (folder.name if path.is_dir() else path.parent.name)
    build = Build(name, benches[0][0], benches[0][1])
    if len(reports) > 1:
        raise TrtbuildError(f"{folder} holds {len(reports)} validate reports", hint="keep one report.json per build")
    if reports:
        report_path, report = reports[0]
        variants = report["variants"]
        chosen = variants[0] if len(variants) == 1 else next((v for v in variants if v.get("name") == name), None)
        if chosen is None:
            raise TrtbuildError(f"{report_path} holds variants {', '.join(v.get('name', '?') for v in variants)}, none named {name}",
                                hint="name the build after its variant: NAME=PATH")
        build.validate_path, build.accuracy = report_path, dict(chosen.get("metrics") or {})
    return build


# ---------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------
def objective_value(run: dict[str, Any], objective: str, gpu_hourly_cost: float | None) -> float | None:
    m = run.get("metrics") or {}
    if objective == "throughput":
        return m.get("output_tokens_per_s") or None
    if objective == "p99":
        return (m.get("latency_ms") or {}).get("p99")
    if gpu_hourly_cost is not None:
        tokens = m.get("output_tokens_per_s") or 0
        return gpu_hourly_cost / 3600 / tokens * 1e6 if tokens > 0 else None
    return (m.get("cost") or {}).get("usd_per_1m_output_tokens")


def slo_failures(run: dict[str, Any], slo: SLO) -> list[str]:
    m = run.get("metrics") or {}
    out = []
    for key, limit in slo.as_dict().items():
        p99 = (m.get(key) or {}).get("p99")
        if p99 is None:
            out.append(f"{key} p99 not measured (SLO {key}={limit:g})")
        elif p99 > limit:
            out.append(f"{key} p99 {p99:.1f} > SLO {limit:g}")
    return out


def _better(a: float, b: float, objective: str) -> bool:
    return a > b if OBJECTIVES[objective][2] else a < b


def _operating_point(build: Build, objective: str, constraints: Constraints, load: str | None,
                     gpu_hourly_cost: float | None) -> tuple[dict | None, list[str]]:
    runs = [r for r in build.bench["runs"] if not r.get("aborted")]
    if load is not None:
        runs = [r for r in runs if r.get("key") == load]
        if not runs:
            return None, [f"no complete run at load {load} (has {', '.join(r.get('key', '?') for r in build.bench['runs'])})"]
    meeting = [r for r in runs if not slo_failures(r, constraints.slo) and objective_value(r, objective, gpu_hourly_cost) is not None]
    if meeting:
        best = meeting[0]
        for r in meeting[1:]:
            if _better(objective_value(r, objective, gpu_hourly_cost), objective_value(best, objective, gpu_hourly_cost), objective):
                best = r
        return best, []
    if not runs:
        return None, ["no complete run"]
    if any(objective_value(r, objective, gpu_hourly_cost) is None for r in runs) and objective == "cost":
        return runs[0], ["cost not measured: pass --gpu-hourly-cost (or bench with it)"]
    return runs[0], [f"{r.get('key')}: {'; '.join(slo_failures(r, constraints.slo))}" for r in runs]


def _constraint_failures(build: Build, c: Constraints) -> list[str]:
    out = []
    if c.max_ppl_delta is not None:
        if build.ppl_delta is None:
            out.append("perplexity delta not measured (no validate report with ppl_delta_rel)")
        elif build.ppl_delta > c.max_ppl_delta:
            out.append(f"ppl delta {build.ppl_delta:+.2%} > --max-ppl-delta {c.max_ppl_delta:.2%}")
    if c.min_token_agreement is not None:
        if build.token_agreement is None:
            out.append("token agreement not measured (no validate report with token_agreement)")
        elif build.token_agreement < c.min_token_agreement:
            out.append(f"token agreement {build.token_agreement:.1%} < --min-token-agreement {c.min_token_agreement:.1%}")
    if c.max_memory_gib is not None:
        if build.memory_gib is None:
            out.append("memory not measured (bench run with --metrics-url reads it from the server)")
        elif build.memory_gib > c.max_memory_gib:
            out.append(f"memory {build.memory_gib:.2f} GiB > --max-memory-gib {c.max_memory_gib:g}")
    return out


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[bool]:
    """(objective, accuracy delta) pairs: True where no other point is as good on both and better on one."""
    sign = 1 if higher_is_better else -1
    out = []
    for i, (v, d) in enumerate(points):
        dominated = any(sign * w >= sign * v and e <= d and (sign * w > sign * v or e < d)
                        for j, (w, e) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def select(builds: list[Build], objective: str = "throughput", constraints: Constraints = Constraints(),
           load: str | None = None, gpu_hourly_cost: float | None = None) -> Selection:
    if objective not in OBJECTIVES:
        raise TrtbuildError(f"--objective {objective} is unknown", hint=f"choose from {', '.join(OBJECTIVES)}")
    if not builds:
        raise TrtbuildError("give at least one RESULT")
    names = [b.name for b in builds]
    if len(set(names)) != len(names):
        raise TrtbuildError(f"two builds have the same name ({', '.join(names)})", hint="name them: NAME=PATH")
    if objective == "p99" and load is None:
        common = set.intersection(*({r.get("key") for r in b.bench["runs"]} for b in builds))
        if len(common) != 1:
            raise TrtbuildError("p99 latency compares builds at one load point",
                                hint=f"pass --load with one of {', '.join(sorted(common)) or '(none shared)'}")
        load = common.pop()
    candidates = []
    for b in builds:
        run, failures = _operating_point(b, objective, constraints, load, gpu_hourly_cost)
        value = objective_value(run, objective, gpu_hourly_cost) if run else None
        candidates.append(Candidate(b, run, value, failures + _constraint_failures(b, constraints)))
    eligible = [c for c in candidates if c.eligible]
    higher = OBJECTIVES[objective][2]
    chosen = None
    for c in eligible:  # ties go to the more accurate build, then to the order given
        if chosen is None or _better(c.value, chosen.value, objective) or (
                c.value == chosen.value and (c.build.accuracy_delta or 0) < (chosen.build.accuracy_delta or 0)):
            chosen = c
    plotted = [c for c in eligible if c.build.accuracy_delta is not None]
    for c, front in zip(plotted, pareto_front([(c.value, c.build.accuracy_delta) for c in plotted], higher)):
        c.on_front = front
    unit = OBJECTIVES[objective][1]
    for c in candidates:
        if c is chosen:
            continue
        if c.failures:
            c.why_lost = "; ".join(c.failures)
        else:
            change = (c.value - chosen.value) / chosen.value if chosen and chosen.value else math.nan
            c.why_lost = (f"{OBJECTIVES[objective][0]} {c.value:,.2f} {unit} vs {chosen.value:,.2f} {unit} for {chosen.build.name} "
                          f"({change:+.1%})")
            if c.on_front:
                c.why_lost += "; on the Pareto front: more accurate" if (c.build.accuracy_delta or 0) < (
                    chosen.build.accuracy_delta or 0) else "; on the Pareto front"
    return Selection(objective, constraints, load, candidates, chosen)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def table(selection: Selection):
    from rich.table import Table

    label, unit, higher = OBJECTIVES[selection.objective]
    t = Table(title=f"trtbuild select: {label} ({'highest' if higher else 'lowest'})"
                    + (f" at {selection.load}" if selection.load else ""))
    for c in ("build", "load", unit, "ppl Δ", "token agree", "GiB", "Pareto", "verdict"):
        t.add_column(c, justify="left" if c in ("build", "verdict", "load") else "right")
    for c in selection.candidates:
        pct = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
        verdict = "[bold green]chosen[/]" if c is selection.chosen else (c.why_lost or "")
        t.add_row(c.build.name, c.run.get("key", "-") if c.run else "-", pct(c.value, "{:,.2f}"),
                  pct(c.build.ppl_delta, "{:+.2%}"), pct(c.build.token_agreement, "{:.1%}"), pct(c.build.memory_gib, "{:.2f}"),
                  "*" if c.on_front else "", verdict)
    return t


def plot(selection: Selection, path: Path) -> Path | None:
    """Objective against accuracy delta, the Pareto front joined, the chosen build circled."""
    points = [c for c in selection.candidates if c.value is not None and c.build.accuracy_delta is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, unit, higher = OBJECTIVES[selection.objective]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in points:
        ok = c.eligible
        ax.scatter(c.build.accuracy_delta * 100, c.value, color="tab:blue" if ok else "tab:gray", marker="o" if ok else "x", zorder=3)
        ax.annotate(c.build.name, (c.build.accuracy_delta * 100, c.value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = sorted((c for c in points if c.on_front), key=lambda c: c.build.accuracy_delta)
    if len(front) > 1:
        ax.plot([c.build.accuracy_delta * 100 for c in front], [c.value for c in front], color="tab:blue", lw=1, label="Pareto front")
    if selection.chosen and selection.chosen in points:
        c = selection.chosen
        ax.scatter(c.build.accuracy_delta * 100, c.value, s=250, facecolors="none", edgecolors="tab:green", lw=2, label="chosen", zorder=4)
    ax.set_xlabel("accuracy delta (% perplexity rise, else % greedy tokens differing)")
    ax.set_ylabel(f"{label} ({unit})")
    ax.set_title(f"trtbuild select: {label} vs accuracy (x: fails a constraint)")
    ax.grid(alpha=0.3)
    if front or selection.chosen:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
