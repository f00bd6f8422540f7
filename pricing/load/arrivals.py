"""When load arrives: an open loop's gaps between arrivals and a closed loop's think times, the
random draws the load generator and the offline truth (testing.sim_truth) share."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def arrival_gaps_s(rate_rps: float, burstiness: float, seed: int) -> Iterator[float]:
    """Gamma inter-arrival times with mean 1/rate; shape 1 is Poisson, smaller is burstier. One
    sequence per rate: one sequence in every probe of a sweep made them all err alike (an H200
    sweep's arrivals fell 11% short of the named rate in all seven of its open-loop probes)."""
    rng = np.random.default_rng((seed, round(rate_rps * 1e6)))
    scale = 1.0 / (rate_rps * burstiness)
    while True:
        yield from rng.gamma(burstiness, scale, size=1024)


# A think time is a fixed part plus an exponential one (mean think_s in all). The exponential part
# breaks the lockstep a closed loop of equal requests falls into; the fixed part keeps it from
# being near zero, where a client's own millisecond turnaround would decide which engine step a
# request joins (the offline truth, sim_truth, draws think times the same way).
THINK_FIXED_FRAC = 0.2


def think_time_s(rng: np.random.Generator, mean_s: float) -> float:
    return mean_s * (THINK_FIXED_FRAC + float(rng.exponential(1.0 - THINK_FIXED_FRAC)))
