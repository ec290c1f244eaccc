"""Latency statistics: decision times per note, summarised as p50/p99/max."""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field

import numpy as np


def summary(ms: list[float]) -> dict[str, float]:
    """p50, p99 and max of durations in milliseconds (NaN for none)."""
    if not ms:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}


@dataclass
class LatencyStats:
    """Collects durations in nanoseconds; ``summary()`` reports milliseconds.

    Every sample is kept, for exact percentiles over a whole run, as 8-byte
    integers (an :class:`array.array`; a list of ints took 36 bytes a note)."""

    budget_ms: float | None = None
    samples_ns: array = field(default_factory=lambda: array("q"))
    misses: int = 0

    def add(self, ns: int) -> None:
        self.samples_ns.append(ns)
        if self.budget_ms is not None and ns > self.budget_ms * 1e6:
            self.misses += 1

    def summary(self) -> dict[str, float]:
        if not self.samples_ns:
            return {"count": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "misses": self.misses}
        ms = np.asarray(self.samples_ns, dtype=np.float64) / 1e6
        return {
            "count": int(ms.size),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()),
            "misses": self.misses,
        }

    def line(self) -> str:
        s = self.summary()
        budget = f" (budget {self.budget_ms:g} ms, {s['misses']} over)" if self.budget_ms is not None else ""
        return (f"{s['count']} notes: p50 {s['p50_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms, "
                f"max {s['max_ms']:.3f} ms{budget}")


class Timed:
    """Wraps an object so that every call of one method is timed into a LatencyStats."""

    def __init__(self, inner, method: str, stats: LatencyStats):
        self._inner, self._method, self.stats = inner, method, stats

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        def timed(*args, **kwargs):
            start = time.perf_counter_ns()
            try:
                return attr(*args, **kwargs)
            finally:
                self.stats.add(time.perf_counter_ns() - start)

        return timed
