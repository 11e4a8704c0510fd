"""Timing helpers: warm up, repeat, report median and p99 (never asserted, only printed)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Stats:
    """Seconds per run: median, p99 and how many runs they came from."""

    median: float
    p99: float
    runs: int

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        """Summarise samples (p99 is the nearest-rank 99th percentile)."""
        ordered = sorted(samples)
        rank = max(0, min(len(ordered) - 1, round(0.99 * len(ordered) + 0.5) - 1))
        return cls(statistics.median(ordered), ordered[rank], len(ordered))


def timed(fn: Callable[[], Any], runs: int, warmup: int = 3) -> Stats:
    """Run `fn` `warmup` times unmeasured, then `runs` times measured."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return Stats.of(samples)


@dataclass
class Row:
    """One line of the results table and of bench/results.json."""

    scenario: str
    variant: str
    value: Stats | None = None
    floor_name: str = ""
    floor: Stats | None = None
    unit: str = "ms"
    figure: float | None = None  # throughputs and counts, when not a duration
    target: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """The measured median over its floor's median."""
        if self.value is None or self.floor is None or self.floor.median == 0:
            return None
        return self.value.median / self.floor.median

    def to_json(self) -> dict[str, Any]:
        """The row as plain data."""
        data = asdict(self)
        data["ratio"] = self.ratio
        return data
