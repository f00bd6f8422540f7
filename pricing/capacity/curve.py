"""The one capacity definition: where a tier's latency limits are crossed as load grows, with a
95% interval, and the request rate there. Bench's summary, the search, the pricer, the planner
and the report all take capacity from here. Pure functions over probe points.

Every probe says, for each tier, how far its TTFT and TPOT sit from the limits: the tier's
severity S = max(value / limit) (> 1 violates), with an interval from the values' intervals.
Severity grows with load, so the probes are read as one monotone curve: its point estimate is
an isotonic fit of log S, its bounds are monotone envelopes of the probes' interval ends (a
probe at a higher load that is surely within the limit bounds every lower load too). The
capacity is where the curve crosses 1 (log-log interpolation between probes); its interval is
where the envelopes cross. No single noisy probe sets it, and never the best of noisy passes.

Closed loop (concurrency): the capacity is the highest whole concurrency at or below the
crossing, as a server runs whole requests. Open loop (request rate): the crossing itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import isotonic_regression

from pricing.schema import Frozen

# Found: bracketed by probes; at_least: no probe violates the tier up to the highest load tried;
# none: every probe violates it, down to the lowest load tried.
CapacityKind = Literal["found", "at_least", "none"]
BIG = 1e6  # severity of a probe that could not be measured at all (window never filled): a sure fail


@dataclass(frozen=True)
class Point:
    """What one probe says about one tier, on one load scale."""

    level: float  # concurrency or request rate
    severity: float  # max over the tier's limits of value / limit (inf: failed outright)
    severity_low: float  # the same from the lower ends of the intervals (0 when unbounded)
    severity_high: float  # from the upper ends (inf when unbounded)
    rate_rps: float  # the probe's request rate
    rate_low: float
    rate_high: float


class Capacity(Frozen):
    """A tier's capacity on one load scale, with its 95% interval."""

    kind: CapacityKind
    level: float | None = None  # load at the crossing (closed loop: whole concurrency)
    crossing: float | None = None  # the crossing itself, between whole concurrencies too
    level_low: float | None = None  # None: not bounded by the probes so far
    level_high: float | None = None
    rate_rps: float | None = None  # request rate there
    rate_low: float | None = None
    rate_high: float | None = None
    probes: int = 0  # probes the curve was read from
    highest_level: float | None = None  # the highest load tried (for 'at_least')
    lowest_level: float | None = None  # the lowest load tried (for 'none')

    @property
    def half_width(self) -> float | None:
        """Half the rate interval's width over the rate (0.05: known to +-5%); None if unbounded."""
        if self.rate_rps is None or self.rate_low is None or self.rate_high is None or self.rate_rps <= 0:
            return None
        return (self.rate_high - self.rate_low) / 2 / self.rate_rps


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.clip(x, 1e-12, BIG))


def _crossing(levels: np.ndarray, log_s: np.ndarray) -> float | None:
    """First load where a nondecreasing piecewise-linear log S (over log load) reaches 0; None
    when it never does; -inf when it is already above at the first level."""
    if log_s[0] > 0:
        return -math.inf
    for i in range(1, len(levels)):
        if log_s[i] > 0:
            lx0, lx1 = math.log(levels[i - 1]), math.log(levels[i])
            frac = (0 - log_s[i - 1]) / (log_s[i] - log_s[i - 1])
            return math.exp(lx0 + frac * (lx1 - lx0))
    return None


def _interp_log(levels: np.ndarray, values: np.ndarray, at: float) -> float:
    """log-log interpolation of a positive monotone series (clamped at the ends; exact at a level)."""
    exact = np.flatnonzero(levels == at)
    if exact.size:
        return float(values[exact[0]])
    x, v = np.log(levels), np.log(np.clip(values, 1e-12, None))
    return float(np.exp(np.interp(math.log(at), x, v)))


def _merge_levels(points: Sequence[Point]) -> list[Point]:
    """One point per load level: repeated probes of a level are pooled (means of their figures)."""
    by_level: dict[float, list[Point]] = {}
    for p in points:
        by_level.setdefault(p.level, []).append(p)
    merged = []
    for level in sorted(by_level):
        group = by_level[level]
        if len(group) == 1:
            merged.append(group[0])
            continue
        mean = lambda name: float(np.exp(np.mean(_log(np.array([getattr(g, name) for g in group])))))  # noqa: E731
        merged.append(Point(level, mean("severity"), max(g.severity_low for g in group),
                            min(g.severity_high for g in group), float(np.mean([g.rate_rps for g in group])),
                            max(g.rate_low for g in group), min(g.rate_high for g in group)))
    return merged


def capacity_from_points(points: Sequence[Point], integer: bool) -> Capacity:
    """The crossing of S = 1 along the probes' monotone curve, with its interval (see module doc)."""
    pts = _merge_levels([p for p in points if p.level > 0])
    if not pts:
        return Capacity(kind="none", probes=0)
    levels = np.array([p.level for p in pts])
    log_s = _log(np.array([p.severity for p in pts]))
    widths = _log(np.array([p.severity_high for p in pts])) - _log(np.array([p.severity_low for p in pts]))
    weights = 1.0 / np.clip(widths, 0.02, 10.0) ** 2
    fit = isotonic_regression(log_s, weights=weights).x
    # Monotone bounds: a sure pass at a higher load bounds every lower one, a sure fail every higher one.
    upper = np.minimum.accumulate(_log(np.array([p.severity_high for p in pts]))[::-1])[::-1]
    lower = np.maximum.accumulate(_log(np.array([p.severity_low for p in pts])))
    rates = np.maximum.accumulate(np.array([max(p.rate_rps, 1e-9) for p in pts]))
    rate_lows = np.maximum.accumulate(np.array([max(p.rate_low, 1e-9) for p in pts]))
    rate_highs = np.minimum.accumulate(np.array([max(p.rate_high, 1e-9) for p in pts])[::-1])[::-1]
    base = dict(probes=len(pts), highest_level=float(levels[-1]), lowest_level=float(levels[0]))

    crossing = _crossing(levels, fit)
    if crossing is None:
        return Capacity(kind="at_least", level=float(levels[-1]), rate_rps=float(rates[-1]), **base)
    if crossing == -math.inf:
        return Capacity(kind="none", **base)
    lo_cross, hi_cross = _crossing(levels, upper), _crossing(levels, lower)
    level_low = None if lo_cross is None or lo_cross == -math.inf else lo_cross
    level_high = None if hi_cross is None or hi_cross == -math.inf else hi_cross
    if lo_cross is None:  # even the pessimistic bound never crosses: it does not bound from below
        level_low = None
    exact = crossing
    if integer:
        crossing = float(math.floor(crossing + 1e-9))
        level_low = None if level_low is None else float(math.floor(level_low + 1e-9))
        level_high = None if level_high is None else float(math.floor(level_high + 1e-9))
        if crossing < levels[0]:  # below the lowest probe: a whole concurrency there is not measured
            crossing = float(levels[0]) if crossing >= 1 else 0.0
        if crossing < 1:
            return Capacity(kind="none", **base)
    rate = _interp_log(levels, rates, crossing)
    rate_low = _interp_log(levels, rate_lows, level_low) if level_low is not None and level_low > 0 else None
    rate_high = _interp_log(levels, rate_highs, level_high) if level_high is not None else None
    if rate_low is not None:
        rate_low = min(rate_low, rate)
    if rate_high is not None:
        rate_high = max(rate_high, rate)
    return Capacity(kind="found", level=crossing, crossing=exact, level_low=level_low, level_high=level_high, rate_rps=rate,
                    rate_low=rate_low, rate_high=rate_high, **base)
