"""Kernel time on the GPU without launch overhead: the benchmarks' one way of timing a call."""

from __future__ import annotations

import torch


def graph_time_us(fn, n: int = 50) -> float:
    """Microseconds per call: n calls captured in a CUDA graph, replayed once to warm, then timed."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3
