"""`trtbuild ab`: a live A/B test of two served builds, ending in ROLLOUT, HOLD or ROLLBACK.

One load generator (trtbuild.bench.loadgen, the one `trtbuild bench` uses) sends one request stream;
each request goes to B with probability `split`, drawn from a generator seeded with `seed`, so
the same seed sends the same requests to the same arms. Both arms get the same prompts, built
once with A's tokenizer, and are measured as `trtbuild bench` measures (trtbuild.bench.metrics).
Throughputs are those of each arm's share of the stream, so they are reported, not compared.

Per latency sample (TTFT, ITL, end-to-end latency):
- Welch's t-test (trtbuild.bench.compare.welch) and the Mann-Whitney U test
  (scipy.stats.mannwhitneyu, two-sided): latency distributions are skewed, the rank test does
  not assume normality, and it is the one the verdict reads;
- the p99 ratio B/A with a percentile bootstrap confidence interval (1 - alpha), seeded.

Verdict, on `metric` (default latency_p50), speedup = A's value / B's value (> 1: B is faster):
- ROLLBACK when B's error rate exceeds `max_error_rate`, when the greedy answers of the two arms
  agree on fewer than `min_agreement` of their tokens, or when B is significantly slower
  (Mann-Whitney p < alpha, speedup < 1) by more than `min_speedup` tolerates;
- ROLLOUT when the speedup reaches `min_speedup` and, where that asks for a real gain
  (`min_speedup` >= 1), the difference is significant;
- HOLD otherwise: the data do not tell the arms apart well enough to act (run longer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import numpy as np

from trtbuild.bench.compare import FAMILIES, STATS, WelchTest, welch
from trtbuild.bench.loadgen import LoadPoint, closed_loop, open_loop
from trtbuild.bench.metrics import RequestRecord, RunMetrics, samples, summarize
from trtbuild.bench.run import BenchConfig, _decode, _discover, _prepare, _prompts, _slots, _tokenizer
from trtbuild.clients.transport import make_transport
from trtbuild.errors import TrtbuildError

VERDICTS = ("ROLLOUT", "HOLD", "ROLLBACK")
EXIT_CODES = {"ROLLOUT": 0, "ROLLBACK": 1, "HOLD": 3}  # 2 is a usage error, as for every trtbuild command
METRICS = tuple(f"{f}_{s}" for f in FAMILIES for s in STATS)
SAMPLES = ("ttft_ms", "itl_ms", "latency_ms")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One side of the test: a server and the model on it."""

    url: str
    model: str | None = None

    @classmethod
    def parse(cls, text: str, option: str) -> "Arm":
        """`host:port` or `host:port/model` (a scheme is allowed and dropped)."""
        text = text.strip()
        for scheme in ("http://", "https://", "grpc://"):
            if text.startswith(scheme):
                text = text[len(scheme):]
        host, _, model = text.partition("/")
        if not host or ":" not in host:
            raise TrtbuildError(f"{option} '{text}': expected HOST:PORT[/MODEL], e.g. 127.0.0.1:8001/ensemble")
        return cls(host, model.strip("/") or None)

    @property
    def label(self) -> str:
        return f"{self.url}/{self.model}" if self.model else self.url


@dataclasses.dataclass(frozen=True)
class Thresholds:
    min_speedup: float = 1.0
    max_error_rate: float = 0.01
    alpha: float = 0.05
    min_agreement: float | None = None  # greedy token agreement of B with A

    def __post_init__(self):
        if self.min_speedup <= 0:
            raise TrtbuildError(f"--min-speedup must be positive, got {self.min_speedup}")
        if not 0 <= self.max_error_rate <= 1:
            raise TrtbuildError(f"--max-error-rate must be in [0, 1], got {self.max_error_rate}")
        if not 0 < self.alpha < 1:
            raise TrtbuildError(f"--alpha must be in (0, 1), got {self.alpha}")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise TrtbuildError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")


@dataclasses.dataclass(frozen=True)
class ABConfig:
    a: Arm
    b: Arm
    bench: BenchConfig  # the load, prompts and transport settings; its url/model are ignored
    split: float = 0.1
    metric: str = "latency_p50"
    thresholds: Thresholds = Thresholds()
    agreement_prompts: int = 8  # greedy prompts sent to both arms (0: no accuracy check)
    agreement_max_tokens: int = 16
    bootstrap: int = 2000

    def __post_init__(self):
        if not 0 < self.split < 1:
            raise TrtbuildError(f"--split must be in (0, 1), the fraction of requests sent to B; got {self.split}")
        if self.metric not in METRICS:
            raise TrtbuildError(f"--metric {self.metric} is unknown", hint=f"choose from {', '.join(METRICS)}")
        if len(self.bench.loads) != 1:
            raise TrtbuildError("an A/B test runs one load point: give one --concurrency or one --request-rate")
        if self.bench.requests is None:
            raise TrtbuildError("an A/B test needs --requests (a reproducible stream has a fixed length)")
        if self.agreement_prompts < 0:
            raise TrtbuildError(f"--agreement-prompts must be >= 0, got {self.agreement_prompts}")

    def as_dict(self) -> dict[str, Any]:
        return {"a": self.a.label, "b": self.b.label, "split": self.split, "metric": self.metric,
                "thresholds": dataclasses.asdict(self.thresholds), "agreement_prompts": self.agreement_prompts,
                "agreement_max_tokens": self.agreement_max_tokens, "bootstrap": self.bootstrap,
                "bench": {k: v for k, v in self.bench.as_dict().items() if k not in ("url", "model")}}


def assignment(n: int, split: float, seed: int) -> np.ndarray:
    """True where request `i` of the stream goes to B: the same seed gives the same stream split."""
    return np.random.default_rng([seed, 0xAB]).random(n) < split


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MannWhitney:
    sample: str
    u: float | None
    p_value: float | None


def mann_whitney(sample: str, a: list[float], b: list[float]) -> MannWhitney:
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return MannWhitney(sample, None, None)
    if np.ptp(np.concatenate([a, b])) == 0:  # every value equal: no difference to rank
        return MannWhitney(sample, float(len(a) * len(b) / 2), 1.0)
    r = stats.mannwhitneyu(b, a, alternative="two-sided")
    return MannWhitney(sample, float(r.statistic), float(r.pvalue))


@dataclasses.dataclass(frozen=True)
class RatioInterval:
    """p`q` of B / p`q` of A with a percentile bootstrap interval."""

    q: float
    ratio: float | None
    low: float | None
    high: float | None
    confidence: float


def bootstrap_ratio(a: list[float], b: list[float], *, q: float = 99, resamples: int = 2000, confidence: float = 0.95,
                    seed: int = 0) -> RatioInterval:
    if len(a) < 2 or len(b) < 2:
        return RatioInterval(q, None, None, None, confidence)
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    qa = np.percentile(x[rng.integers(0, x.size, (resamples, x.size))], q, axis=1)
    qb = np.percentile(y[rng.integers(0, y.size, (resamples, y.size))], q, axis=1)
    ratios = qb / np.where(qa > 0, qa, np.nan)
    tail = (1 - confidence) / 2 * 100
    low, high = np.nanpercentile(ratios, [tail, 100 - tail])
    point = float(np.percentile(y, q) / np.percentile(x, q)) if np.percentile(x, q) > 0 else None
    return RatioInterval(q, point, float(low), float(high), confidence)


@dataclasses.dataclass(frozen=True)
class SampleTests:
    sample: str
    a_n: int
    b_n: int
    welch: WelchTest
    mann_whitney: MannWhitney
    p99_ratio: RatioInterval


@dataclasses.dataclass(frozen=True)
class Verdict:
    decision: str
    speedup: float | None
    reasons: tuple[str, ...]

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.decision]


def metric_value(metrics: RunMetrics, metric: str) -> float | None:
    family, _, stat = metric.rpartition("_")
    stats = getattr(metrics, f"{family}_ms")
    return None if stats is None else getattr(stats, stat)


def decide(a: RunMetrics, b: RunMetrics, tests: dict[str, SampleTests], metric: str, thresholds: Thresholds,
           agreement: float | None) -> Verdict:
    """ROLLOUT / HOLD / ROLLBACK from the measurements and the user's thresholds (module docstring)."""
    t = thresholds
    reasons: list[str] = []
    va, vb = metric_value(a, metric), metric_value(b, metric)
    speedup = va / vb if va and vb else None
    test = tests.get(f"{metric.rpartition('_')[0]}_ms")
    p = test.mann_whitney.p_value if test else None
    significant = p is not None and p < t.alpha
    described = (f"{metric} A {va:.2f} ms, B {vb:.2f} ms: B x{speedup:.3f} as fast" if speedup is not None
                 else f"{metric} unavailable for one arm")
    described += f" (Mann-Whitney p={p:.3g})" if p is not None else " (too few requests for a test)"
    failing = []
    if b.error_rate > t.max_error_rate:
        failing.append(f"B error rate {b.error_rate:.1%} > --max-error-rate {t.max_error_rate:.1%}")
    if agreement is not None and t.min_agreement is not None and agreement < t.min_agreement:
        failing.append(f"greedy token agreement {agreement:.1%} < --min-agreement {t.min_agreement:.1%}")
    if speedup is not None and significant and speedup < 1 and speedup < t.min_speedup:
        failing.append(f"B is significantly slower: {described}")
    if failing:
        return Verdict("ROLLBACK", speedup, tuple(failing))
    if b.completed == 0:
        return Verdict("HOLD", speedup, ("B completed no request",))
    if speedup is not None and speedup >= t.min_speedup and (significant or t.min_speedup < 1):
        reasons.append(f"{described} >= --min-speedup {t.min_speedup:g}")
        reasons.append(f"B error rate {b.error_rate:.1%} <= {t.max_error_rate:.1%}")
        return Verdict("ROLLOUT", speedup, tuple(reasons))
    if speedup is not None and speedup < t.min_speedup:
        reasons.append(f"{described} < --min-speedup {t.min_speedup:g}" + ("" if significant else ", and not significant"))
    else:
        reasons.append(f"{described}: not significant at --alpha {t.alpha:g}; send more requests or a larger --split")
    return Verdict("HOLD", speedup, tuple(reasons))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ArmResult:
    arm: Arm
    model: str
    metrics: RunMetrics
    records: list[RequestRecord]


@dataclasses.dataclass
class ABResult:
    config: ABConfig
    streaming: bool
    a: ArmResult
    b: ArmResult
    tests: dict[str, SampleTests]
    agreement: dict[str, Any] | None
    verdict: Verdict
    notes: list[str]
    duration_s: float

    def to_json(self) -> dict[str, Any]:
        def arm(r: ArmResult) -> dict[str, Any]:
            return {"target": r.arm.url, "model": r.model, "metrics": dataclasses.asdict(r.metrics),
                    "request_indices": [x.index for x in r.records],
                    "samples": samples(r.records, streaming=self.streaming)}

        return {"tool": "trtbuild ab", "config": self.config.as_dict(), "streaming": self.streaming,
                "duration_s": self.duration_s, "a": arm(self.a), "b": arm(self.b),
                "tests": {k: dataclasses.asdict(v) for k, v in self.tests.items()},
                "agreement": self.agreement, "notes": self.notes,
                "verdict": {"decision": self.verdict.decision, "speedup": self.verdict.speedup,
                            "reasons": list(self.verdict.reasons), "exit_code": self.verdict.exit_code}}


async def _pick_model(transport, arm: Arm, option: str) -> str:
    """The arm's model: the one named, or the server's only LLM-interface model."""
    if arm.model:
        return arm.model
    from trtbuild.clients.target import interface_from

    names = await transport.models()
    llm = []
    for name in names:
        try:
            iface = interface_from(name, await transport.model_metadata(name), await transport.model_config(name))
        except Exception:  # noqa: BLE001 - a model that does not answer is not a candidate
            continue
        if iface.is_llm:
            llm.append(name)
    if len(llm) != 1:
        raise TrtbuildError(f"{option} {arm.url}: name the model as {arm.url}/MODEL",
                            hint=f"LLM models served there: {', '.join(llm) or 'none'} (a repository's trtbuild.json "
                                 "lists its entry points)")
    return llm[0]


async def _ab_async(config: ABConfig) -> tuple[ABResult, tuple[str, str], str | None]:
    base = config.bench
    ta = make_transport(base.protocol, config.a.url, base.request_timeout, base.http_binary)
    tb = make_transport(base.protocol, config.b.url, base.request_timeout, base.http_binary)
    await ta.open()
    await tb.open()
    try:
        ca = dataclasses.replace(base, url=config.a.url, model=await _pick_model(ta, config.a, "--a"))
        cb = dataclasses.replace(base, url=config.b.url, model=await _pick_model(tb, config.b, "--b"))
        ia, _ = await _discover(ta, ca)
        ib, _ = await _discover(tb, cb)
        if not (ia.is_llm and ib.is_llm):
            raise TrtbuildError("trtbuild ab compares LLM models (text in, text out)",
                                hint=f"A is {ia.kind}, B is {ib.kind}")
        streaming = base.stream
        for name, iface in (("A", ia), ("B", ib)):
            if streaming and not iface.decoupled:
                raise TrtbuildError(f"{name}: model '{iface.name}' is not decoupled, so it cannot stream", hint="pass --no-stream")
        notes: list[str] = []
        tok_a, tokenizer_path = await _tokenizer(ta, ia, ca, notes)
        tok_b, _ = await _tokenizer(tb, ib, cb, notes)
        prompts = _prompts(ca, ia, tok_a)
        requests = {"A": _prepare(ta, ca, ia, streaming, prompts), "B": _prepare(tb, cb, ib, streaming, prompts)}
        transports, ifaces = {"A": ta, "B": tb}, {"A": ia, "B": ib}
        warm_slots, (first_slot, slots) = _slots(len(prompts), base.warmup)
        to_b = assignment(base.requests, config.split, base.seed)
        arm_of: dict[int, str] = {}

        async def send_to(name: str, index: int, slot: int) -> RequestRecord:
            record = RequestRecord(index=index, send=0.0, prompt_index=slot, input_tokens=prompts[slot].input_tokens,
                                   requested_output_tokens=prompts[slot].output_tokens or None)
            record.send = time.perf_counter()
            await transports[name].send(ifaces[name], requests[name][slot], record)
            return record

        for name in ("A", "B"):  # both arms warm up on the same requests, left out of every statistic
            for k in range(base.warmup):
                r = await send_to(name, -1 - k, warm_slots[0] + k % warm_slots[1])
                if r.error:  # a failing arm is measured all the same: its error rate decides
                    notes.append(f"{name}: a warm-up request failed: {r.error.splitlines()[0][:200]}")

        async def send(index: int) -> RequestRecord:
            name = "B" if to_b[index] else "A"
            arm_of[index] = name
            return await send_to(name, index, first_slot + index % slots)

        point: LoadPoint = base.loads[0]
        bounds = dict(requests=base.requests, max_errors=base.max_errors)
        started = time.perf_counter()
        if point.concurrency is not None:
            run = await closed_loop(send, point.concurrency, **bounds)
        else:
            run = await open_loop(send, point.request_rate, arrival=point.arrival, max_concurrency=point.max_concurrency,
                                  seed=base.seed, **bounds)
        duration = time.perf_counter() - started
        if run.aborted:
            notes.append(f"the run stopped early: {run.aborted}")
        records = {"A": [], "B": []}
        for r in sorted(run.records, key=lambda r: r.index):
            records[arm_of[r.index]].append(r)
        tokenizers = {"A": tok_a, "B": tok_b}
        results = {}
        for name in ("A", "B"):
            _decode(transports[name], ifaces[name], records[name], tokenizers[name])
            metrics = summarize(records[name], streaming=streaming)
            arm = config.a if name == "A" else config.b
            results[name] = ArmResult(arm, ifaces[name].name, metrics, records[name])
    finally:
        await ta.close()
        await tb.close()
    tests = _tests(results["A"].records, results["B"].records, streaming, config)
    partial = ABResult(config, streaming, results["A"], results["B"], tests, None,
                       Verdict("HOLD", None, ()), notes, duration)
    return partial, (ca.model, cb.model), tokenizer_path


def _tests(a: list[RequestRecord], b: list[RequestRecord], streaming: bool, config: ABConfig) -> dict[str, SampleTests]:
    sa, sb = samples(a, streaming=streaming), samples(b, streaming=streaming)
    out = {}
    for k, name in enumerate(s for s in SAMPLES if s in sa):
        x, y = sa[name], sb.get(name, [])
        out[name] = SampleTests(name, len(x), len(y), welch(name, x, y), mann_whitney(name, x, y),
                                bootstrap_ratio(x, y, resamples=config.bootstrap, confidence=1 - config.thresholds.alpha,
                                                seed=config.bench.seed + k))
    return out


def _agreement(config: ABConfig, models: tuple[str, str], tokenizer_path: str | None) -> dict[str, Any] | None:
    """The same greedy prompts to both arms; B's answers compared with A's, token by token."""
    if not config.agreement_prompts:
        return None
    from trtbuild.clients.prompts import load_tokenizer
    from trtbuild.quality.accuracy import compare, load_prompts, served_generations
    from trtbuild.resources import DATA_DIR

    prompts = load_prompts(DATA_DIR / "prompts.jsonl", max_tokens=config.agreement_max_tokens, limit=config.agreement_prompts)
    protocol = config.bench.protocol
    a = served_generations(config.a.url, prompts, protocol=protocol, model=models[0], log_probs=False)
    b = served_generations(config.b.url, prompts, protocol=protocol, model=models[1], log_probs=False)
    if tokenizer_path is None:
        return {"prompts": len(prompts), "exact_match_rate": sum(x.text == y.text for x, y in zip(a, b)) / len(prompts),
                "token_agreement": None, "prefix_agreement": None}
    metrics = compare(prompts, a, b, load_tokenizer(tokenizer_path), log_probs_requested=False).as_metrics()
    return {k: metrics[k] for k in ("prompts", "exact_match_rate", "token_agreement", "prefix_agreement")}


def run_ab(config: ABConfig) -> ABResult:
    """Run the A/B test, then the greedy agreement check, then decide."""
    result, models, tokenizer_path = asyncio.run(_ab_async(config))
    result.agreement = _agreement(config, models, tokenizer_path)
    agreement = (result.agreement or {}).get("token_agreement")
    result.verdict = decide(result.a.metrics, result.b.metrics, result.tests, config.metric, config.thresholds, agreement)
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def tables(result: ABResult) -> list:
    """The per-arm measurements and the tests, as two rich tables."""
    from rich.table import Table

    arms = Table(title=f"trtbuild ab: {result.config.split:.0%} of {result.config.bench.requests} requests to B "
                       f"({result.config.bench.loads[0].label}, seed {result.config.bench.seed})")
    for c in ("arm", "target", "ok", "err", "err %", "req/s", "tok/s", "TTFT p50", "p99", "ITL p50", "p99", "lat p50", "p90", "p99"):
        arms.add_column(c, justify="left" if c in ("arm", "target") else "right")
    arms.caption = "latencies in ms; req/s and tok/s are each arm's share of the stream"
    for name, r in (("A", result.a), ("B", result.b)):
        m = r.metrics
        pair = lambda s: ["-", "-"] if s is None else [_f(s.p50), _f(s.p99)]  # noqa: E731
        lat = ["-"] * 3 if m.latency_ms is None else [_f(m.latency_ms.p50), _f(m.latency_ms.p90), _f(m.latency_ms.p99)]
        arms.add_row(name, f"{r.arm.url}/{r.model}", str(m.completed), str(m.failed), f"{m.error_rate:.1%}",
                     _f(m.requests_per_s, 2), _f(m.output_tokens_per_s, 0), *pair(m.ttft_ms), *pair(m.itl_ms), *lat)
    tests = Table(title="B vs A")
    ci = f"{1 - result.config.thresholds.alpha:.0%} CI (bootstrap)"
    for c in ("sample", "n A", "n B", "mean A", "mean B", "Welch p", "Mann-Whitney p", "p99 B/A", ci):
        tests.add_column(c, justify="left" if c == "sample" else "right")
    for t in result.tests.values():
        r = t.p99_ratio
        tests.add_row(t.sample, str(t.a_n), str(t.b_n), _f(t.welch.base_mean, 2), _f(t.welch.new_mean, 2),
                      "-" if t.welch.p_value is None else f"{t.welch.p_value:.3g}",
                      "-" if t.mann_whitney.p_value is None else f"{t.mann_whitney.p_value:.3g}",
                      "-" if r.ratio is None else f"{r.ratio:.3f}",
                      "-" if r.low is None else f"[{r.low:.3f}, {r.high:.3f}]")
    return [arms, tests]


def verdict_lines(result: ABResult) -> list[str]:
    lines = []
    if result.agreement:
        g = result.agreement
        token = "-" if g.get("token_agreement") is None else f"{g['token_agreement']:.1%}"
        lines.append(f"greedy agreement on {g['prompts']} prompts: exact {g['exact_match_rate']:.1%}, tokens {token}")
    lines.append(f"verdict: {result.verdict.decision}")
    lines += [f"  - {r}" for r in result.verdict.reasons]
    return lines
