"""Load generation: closed loop at a fixed concurrency, or open loop at a request rate.

Closed loop: N workers, each sends its next request as soon as its previous one ends.
Open loop: requests start at the times of an arrival process (Poisson: exponential gaps; constant:
equal gaps), whether or not earlier ones have finished, up to `max_concurrency` in flight (a
request that finds no free slot waits for one; its `scheduled` time keeps the delay visible).
A run ends after `requests` measured requests or `duration` seconds of sending, whichever comes
first, or early when `max_errors` requests have failed or the run is interrupted; whatever has
been measured by then is kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from typing import Awaitable, Callable, Iterator

import numpy as np

from trtbuild.bench.metrics import RequestRecord

Send = Callable[[int], Awaitable[RequestRecord]]
Progress = Callable[[int, int, float], None]  # (finished, failed, elapsed seconds)


@dataclasses.dataclass(frozen=True)
class LoadPoint:
    """One point of a sweep: a concurrency (closed loop) or a request rate (open loop)."""

    concurrency: int | None = None
    request_rate: float | None = None
    arrival: str = "poisson"
    max_concurrency: int | None = None

    def __post_init__(self):
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("a load point has either a concurrency or a request rate")
        if self.arrival not in ("poisson", "constant"):
            raise ValueError(f"arrival must be poisson or constant, got {self.arrival!r}")

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"concurrency {self.concurrency}"
        cap = f", max {self.max_concurrency} in flight" if self.max_concurrency else ""
        return f"{self.request_rate:g} req/s {self.arrival}{cap}"

    @property
    def short(self) -> str:
        if self.concurrency is not None:
            return f"c={self.concurrency}"
        return f"{self.request_rate:g}/s {self.arrival[:4]}" + (f" ≤{self.max_concurrency}" if self.max_concurrency else "")

    @property
    def key(self) -> str:
        """Stable identifier used to match runs across two result files."""
        return f"c{self.concurrency}" if self.concurrency is not None else f"r{self.request_rate:g}-{self.arrival}"

    @property
    def warmup_concurrency(self) -> int:
        return self.concurrency or self.max_concurrency or 1


@dataclasses.dataclass
class LoadResult:
    records: list[RequestRecord]
    started: float
    stopped: float
    aborted: str | None = None


def arrival_gaps(rate: float, arrival: str, rng: np.random.Generator) -> Iterator[float]:
    """Seconds between consecutive request starts."""
    if rate <= 0:
        raise ValueError(f"request rate must be positive, got {rate}")
    if arrival == "constant":
        return itertools.repeat(1.0 / rate)
    if arrival == "poisson":
        return _exponential(rate, rng)
    raise ValueError(f"arrival must be poisson or constant, got {arrival!r}")


def _exponential(rate: float, rng: np.random.Generator) -> Iterator[float]:
    while True:
        yield from rng.exponential(1.0 / rate, 1024).tolist()


def arrival_offsets(n: int, rate: float, arrival: str = "poisson", seed: int = 0) -> np.ndarray:
    """Start offsets (s) of the first n requests: the first at 0, then cumulative gaps."""
    gaps = list(itertools.islice(arrival_gaps(rate, arrival, np.random.default_rng(seed)), max(n - 1, 0)))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:n]


class _Run:
    """Shared state of one run: bounds, records, error budget."""

    def __init__(self, send: Send, requests: int | None, duration: float | None, max_errors: int | None,
                 progress: Progress | None, first_index: int):
        if requests is None and duration is None:
            raise ValueError("a run needs a request count or a duration")
        self.send = send
        self.requests = requests
        self.duration = duration
        self.max_errors = max_errors
        self.progress = progress
        self.records: list[RequestRecord] = []
        self.failed = 0
        self.issued = 0
        self.next_index = first_index
        self.aborted: str | None = None
        self.started = time.perf_counter()

    def may_issue(self) -> bool:
        if self.aborted:
            return False
        if self.requests is not None and self.issued >= self.requests:
            return False
        if self.duration is not None and time.perf_counter() - self.started >= self.duration:
            return False
        return True

    def claim(self) -> int:
        self.issued += 1
        index = self.next_index
        self.next_index += 1
        return index

    def done(self, record: RequestRecord) -> None:
        self.records.append(record)
        if record.error is not None:  # responses are decoded after the run; transport errors are known now
            self.failed += 1
            if self.max_errors is not None and self.failed >= self.max_errors and not self.aborted:
                self.aborted = f"stopped after {self.failed} failed requests"
        if self.progress:
            self.progress(len(self.records), self.failed, time.perf_counter() - self.started)


async def closed_loop(send: Send, concurrency: int, *, requests: int | None = None, duration: float | None = None,
                      max_errors: int | None = None, progress: Progress | None = None, first_index: int = 0) -> LoadResult:
    run = _Run(send, requests, duration, max_errors, progress, first_index)

    async def worker() -> None:
        while run.may_issue():
            run.done(await send(run.claim()))

    return await _finish(run, [asyncio.ensure_future(worker()) for _ in range(concurrency)])


async def open_loop(send: Send, rate: float, *, arrival: str = "poisson", max_concurrency: int | None = None,
                    requests: int | None = None, duration: float | None = None, seed: int = 0,
                    max_errors: int | None = None, progress: Progress | None = None, first_index: int = 0) -> LoadResult:
    run = _Run(send, requests, duration, max_errors, progress, first_index)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    gaps = arrival_gaps(rate, arrival, np.random.default_rng(seed))
    tasks: set[asyncio.Future] = set()

    async def one(index: int, scheduled: float) -> None:
        try:
            record = await send(index)
        finally:
            if slots:
                slots.release()
        record.scheduled = scheduled
        run.done(record)

    async def schedule() -> None:
        due = run.started
        while run.may_issue():
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if not run.may_issue():
                break
            if slots:
                await slots.acquire()
            task = asyncio.ensure_future(one(run.claim(), due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            due += next(gaps)

    scheduler = asyncio.ensure_future(schedule())
    try:
        await scheduler
    except asyncio.CancelledError:
        scheduler.cancel()
        run.aborted = "interrupted"
    return await _finish(run, list(tasks))


async def _finish(run: _Run, tasks: list[asyncio.Future]) -> LoadResult:
    """Wait for the requests in flight; on interruption cancel them and keep what has finished."""
    try:
        if tasks:
            await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        run.aborted = "interrupted"
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if run.aborted == "interrupted":
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()  # the interruption is handled: the caller goes on with what was measured
    return LoadResult(run.records, run.started, time.perf_counter(), run.aborted)
