"""Wall-clock timing that is fair on a shared machine: contenders run in interleaved rounds (the order rotates), so
slow drifts in load hit each alike; results are medians with a spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Timing:
    times: list[float]  # seconds per call

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0


def time_alternating(
    fns: dict[str, Callable[[], object]], warmup: int = 1, rounds: int = 5, calls_per_round: int = 1
) -> dict[str, Timing]:
    """Time several functions in interleaved rounds (the order rotates every round), so slow drifts
    in machine load hit every contender alike. Returns seconds per call for each round."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            for _ in range(calls_per_round):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / calls_per_round)
    return {name: Timing(t) for name, t in times.items()}
