"""The one capacity definition: where a tier's latency limits are crossed as load grows, with a
95% interval, and the request rate there. Bench's summary, the search, the pricer, the planner
and the report all take capacity from here. Pure functions over probe points.

Every probe says, for each tier, how far its TTFT and TPOT sit from the limits: the tier's
severity S = max(value / limit) (> 1 violates), with an interval from the values' intervals.
Severity grows with load, so the probes are read as one monotone curve:

- the estimate is where an isotonic fit of S, interpolated linearly in load between probes,
  crosses 1 (decode step time, and with it TPOT, grows about linearly with the batch); where the
  probe above the crossing could not be measured (a sure fail of unknown size), the middle of the gap;
- the interval needs nothing but monotonicity: it runs from the highest load that surely meets
  the tier (its interval entirely within the limits, or a higher load's is) to the lowest load
  that surely violates it. No single noisy probe sets the capacity, and never the best of noisy
  passes; an estimate between two far-apart probes says so by its wide interval.

Closed loop (concurrency): the capacity is the highest whole concurrency at or below the
crossing, as a server runs whole requests. Open loop (request rate): the crossing itself.

The curve's elasticity at the crossing (percent of severity per percent of load, from the probes
either side of it) says how well any probe can place it: where latency barely rises with load,
1% of noise in a p90 moves the crossing by 1/elasticity percent (the simulated engine's Instant
tier in open loop: 0.15, so 5% in capacity takes its TPOT p90 to 0.75%).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import isotonic_regression

from pricing.schema import Frozen

# Found: the curve crosses 1 among the probes; at_least: no probe violates the tier up to the highest
# load tried; none: the lowest load tried surely violates it.
CapacityKind = Literal["found", "at_least", "none"]
BIG = 1e6  # severity of a probe that could not be measured at all (window never filled): a sure fail
# Below this elasticity at the crossing, a p90 off by 1% moves the capacity by more than 2%: more
# probes hardly narrow it, longer ones do (the pricer says so; an open-loop search asks for such a
# tier last).
FLAT_ELASTICITY = 0.5
ELASTICITY_SPAN = 1.5  # the probes either side of a crossing read its slope when this close (load ratio)


@dataclass(frozen=True)
class Point:
    """What one probe says about one tier, on one load scale."""

    level: float  # concurrency or request rate
    severity: float  # max over the tier's limits of value / limit (BIG: failed outright)
    severity_low: float  # the same from the lower ends of the intervals (0 when unbounded)
    severity_high: float  # from the upper ends (BIG when unbounded)
    rate_rps: float  # the probe's request rate
    rate_low: float
    rate_high: float


class Capacity(Frozen):
    """A tier's capacity on one load scale, with its 95% interval."""

    kind: CapacityKind
    level: float | None = None  # load at the crossing (closed loop: whole concurrency)
    crossing: float | None = None  # the crossing itself, between whole concurrencies too
    level_low: float | None = None  # the interval on the load scale; None: not bounded by the probes
    level_high: float | None = None
    rate_rps: float | None = None  # request rate there
    rate_low: float | None = None
    rate_high: float | None = None
    probes: int = 0  # probes the curve was read from
    highest_level: float | None = None  # the highest load tried (for 'at_least')
    lowest_level: float | None = None  # the lowest load tried (for 'none')
    # d ln(severity) / d ln(load) between the measured probes either side of the crossing (None:
    # no such pair within ELASTICITY_SPAN, or the probe above it could not be measured)
    elasticity: float | None = None

    @property
    def flat(self) -> bool:
        """Found on a curve that barely rises with load there (FLAT_ELASTICITY)."""
        return self.kind == "found" and self.elasticity is not None and 0 < self.elasticity < FLAT_ELASTICITY

    @property
    def half_width(self) -> float | None:
        """Half the rate interval's width over the rate (0.05: known to +-5%); None if unbounded."""
        if self.rate_rps is None or self.rate_low is None or self.rate_high is None or self.rate_rps <= 0:
            return None
        return (self.rate_high - self.rate_low) / 2 / self.rate_rps


def _merge_levels(points: Sequence[Point]) -> list[Point]:
    """One point per load level: repeated probes of a level are pooled."""
    by_level: dict[float, list[Point]] = {}
    for p in points:
        by_level.setdefault(p.level, []).append(p)
    merged = []
    for level in sorted(by_level):
        group = by_level[level]
        if len(group) == 1:
            merged.append(group[0])
            continue
        mean = lambda name: float(np.mean([getattr(g, name) for g in group]))  # noqa: E731
        merged.append(Point(level, mean("severity"), max(g.severity_low for g in group),
                            min(g.severity_high for g in group), mean("rate_rps"),
                            max(g.rate_low for g in group), min(g.rate_high for g in group)))
    return merged


def _linear_crossing(levels: np.ndarray, values: np.ndarray) -> float | None:
    """First load where a nondecreasing piecewise-linear curve exceeds 1; None if it never does,
    -inf if it already does at the first level."""
    if values[0] > 1:
        return -math.inf
    for i in range(1, len(levels)):
        if values[i] > 1:
            frac = (1 - values[i - 1]) / (values[i] - values[i - 1])
            return float(levels[i - 1] + frac * (levels[i] - levels[i - 1]))
    return None


def _interp(levels: np.ndarray, values: np.ndarray, at: float) -> float:
    return float(np.interp(at, levels, values))


def _elasticity(pts: Sequence[Point], crossing: float) -> float | None:
    below = [p for p in pts if p.level <= crossing and 0 < p.severity < BIG]
    above = [p for p in pts if p.level > crossing and 0 < p.severity < BIG]
    if not below or not above:
        return None
    low, high = below[-1], above[0]  # pts are sorted by level
    if high.level > ELASTICITY_SPAN * low.level:
        # A chord across a wide gap is not the slope at the crossing: on a curve that bends up
        # (latency near saturation) it reads flatter (Fast on the simulated engine: 0.48 from
        # probes at 13.3 and 36.2 req/s, 0.81 at its crossing), and the gap is the reason its
        # interval is wide.
        return None
    return math.log(high.severity / low.severity) / math.log(high.level / low.level)


def capacity_from_points(points: Sequence[Point], integer: bool) -> Capacity:
    """The crossing of S = 1 along the probes' monotone curve, with its interval (see module doc)."""
    pts = _merge_levels([p for p in points if p.level > 0])
    if not pts:
        return Capacity(kind="none", probes=0)
    levels = np.array([p.level for p in pts])
    sev = np.clip(np.array([p.severity for p in pts]), 0, BIG)
    widths = np.clip(np.array([p.severity_high for p in pts]) - np.array([p.severity_low for p in pts]), 1e-3, BIG)
    fit = isotonic_regression(sev, weights=1.0 / widths**2).x
    # Monotone bounds: a sure pass at a higher load bounds every lower one, a sure fail every higher one.
    upper = np.minimum.accumulate(np.array([p.severity_high for p in pts])[::-1])[::-1]
    lower = np.maximum.accumulate(np.array([p.severity_low for p in pts]))
    sure_pass = levels[upper <= 1]
    sure_fail = levels[lower > 1]
    low = float(sure_pass.max()) if sure_pass.size else None
    high = float(sure_fail.min()) if sure_fail.size else None
    rates = np.maximum.accumulate(np.array([p.rate_rps for p in pts]))
    rate_lows = np.maximum.accumulate(np.array([p.rate_low for p in pts]))
    rate_highs = np.minimum.accumulate(np.array([p.rate_high for p in pts])[::-1])[::-1]
    base = dict(probes=len(pts), highest_level=float(levels[-1]), lowest_level=float(levels[0]))

    crossing = _linear_crossing(levels, fit)
    if crossing is not None and crossing > levels[0]:
        i = int(np.searchsorted(levels, crossing))  # the segment (levels[i-1], levels[i]] holding it
        if i < len(levels) and sev[i] >= BIG:
            # A load that could not be measured (a window that never filled, errors, an open loop
            # that fell behind while its window still met the tier) says the tier fails there,
            # not by how much: interpolating towards BIG put the crossing at the pass below it
            # (open loop, simulated engine: Baseline 41.9 req/s between a pass at 41.9 and a
            # fall-behind at 62.3, truth 57.5). Without a slope, the middle of the gap; its
            # interval still spans the whole gap.
            crossing = float((levels[i - 1] + levels[i]) / 2)
    if crossing is None and high is None:
        return Capacity(kind="at_least", level=float(levels[-1]), rate_rps=float(rates[-1]), level_low=low,
                        rate_low=_interp(levels, rate_lows, low) if low is not None else None, **base)
    if crossing == -math.inf or (high is not None and high <= levels[0]):  # violated at the lowest load
        return Capacity(kind="none", **base)
    if crossing is None:  # a sure fail the fit smoothed over: trust the bound
        crossing = high
    if low is not None:
        crossing = max(crossing, low)
    if high is not None:
        crossing = min(crossing, high)
    if integer:
        # The whole concurrencies below a sure fail: at most high - 1.
        top = None if high is None else high - 1
        level = float(math.floor(crossing))
        level = min(level, top) if top is not None else level
        level = max(level, low) if low is not None else level
        if level < 1:
            return Capacity(kind="none", **base)
        high_level = top
    else:
        level, high_level = crossing, high
    rate = _interp(levels, rates, level)
    rate_low = min(_interp(levels, rate_lows, low), rate) if low is not None else None
    rate_high = max(_interp(levels, rate_highs, high_level), rate) if high_level is not None else None
    return Capacity(kind="found", level=level, crossing=crossing, level_low=low, level_high=high_level,
                    rate_rps=rate, rate_low=rate_low, rate_high=rate_high, elasticity=_elasticity(pts, crossing),
                    **base)
