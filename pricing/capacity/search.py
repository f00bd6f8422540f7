"""Capacity search as a small pure state machine: probe points in, next load level out.

Every probe informs every tier (capacity.curve reads all of them as one monotone curve per
tier). Per tier: with no violation yet, grow the load toward where the curve, extended from its
last two probes, is predicted to cross the limit (at most `growth` times per step); with every
probe violating, step down; once bracketed, probe at the predicted crossing until the tier's
capacity is known to `tolerance` at 95% (closed loop: the exact whole concurrency), or the
crossing sits on a level already probed. Across tiers, the lowest level asked for goes first.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

from pydantic import Field

from pricing.capacity.curve import BIG, Capacity, Point, capacity_from_points
from pricing.schema import Frozen


class SearchParams(Frozen):
    start: float = Field(default=1.0, gt=0)
    growth: float = Field(default=4.0, gt=1)  # the most one step up multiplies the load by
    tolerance: float = Field(default=0.05, gt=0)  # resolved: capacity's rate known to +- this at 95%
    min_level: float = Field(default=1.0, gt=0)
    max_level: float = Field(default=4096.0, gt=0)
    integer: bool = True  # concurrency levels are whole numbers; request rates are not


def resolved(cap: Capacity, params: SearchParams) -> bool:
    """Known well enough: the interval pins one whole concurrency, or is within the tolerance."""
    if cap.kind != "found":
        return False
    if params.integer and cap.level_low is not None and cap.level_high is not None and cap.level_low == cap.level_high:
        return True
    return cap.half_width is not None and cap.half_width <= params.tolerance


def _clamp(level: float, params: SearchParams) -> float:
    level = min(max(level, params.min_level), params.max_level)
    return float(round(level)) if params.integer else level


def _untried(candidates: Sequence[float], tried: Collection[float], params: SearchParams) -> float | None:
    """The first candidate, rounded, that is not a level already probed (2% apart for rates)."""
    for level in candidates:
        level = _clamp(level, params)
        if params.integer and level in tried:
            continue
        if not params.integer and any(abs(level - t) <= 0.02 * t for t in tried):
            continue
        return level
    return None


def _extrapolate_up(points: Sequence[Point], params: SearchParams) -> float:
    """Where the two highest probes' log severity over log load reaches 0, within [1.25x, growth x]."""
    top = sorted(points, key=lambda p: p.level)[-2:]
    last = top[-1]
    guess = last.level * params.growth
    if len(top) == 2 and 0 < top[0].severity < last.severity < 1 and top[0].level < last.level:
        slope = (math.log(last.severity) - math.log(top[0].severity)) / (math.log(last.level) - math.log(top[0].level))
        guess = last.level * math.exp(-math.log(last.severity) / slope)
    return min(max(guess, last.level * 1.25), last.level * params.growth)


def tier_next_level(points: Sequence[Point], params: SearchParams, tried: Collection[float]) -> float | None:
    """The next level one tier asks for, or None when it is resolved (or cannot be served better)."""
    if not points:
        return _untried([params.start], tried, params)
    cap = capacity_from_points(points, params.integer)
    levels = sorted(p.level for p in points)
    if cap.kind == "none":
        return None if levels[0] <= params.min_level else _untried([levels[0] / params.growth], tried, params)
    if cap.kind == "at_least":
        if levels[-1] >= params.max_level:
            return None
        sure = [p for p in points if p.severity < BIG]
        return _untried([_extrapolate_up(sure or points, params)], tried, params)
    if resolved(cap, params):
        return None
    if cap.level_low is None:  # nothing surely within the limit below the crossing: look lower
        return _untried([min(cap.crossing or levels[0], levels[0]) / 2, (levels[0] + (cap.crossing or 0)) / 2],
                        tried, params)
    if cap.level_high is None:  # nothing surely beyond it above: look higher
        return _untried([max(cap.crossing or 0, levels[-1]) * 1.25], tried, params)
    x = cap.crossing or cap.level or levels[0]
    candidates = [math.floor(x), math.ceil(x)] if params.integer else [x]
    # Beside a crossing already probed, the interval's wider side.
    candidates += [(x + cap.level_high + (1 if params.integer else 0)) / 2, (x + cap.level_low) / 2]
    return _untried(candidates, tried, params)


def next_level(points: Mapping[str, Sequence[Point]], params: SearchParams, tried: Collection[float]) -> float | None:
    """Across tiers, the lowest level any unresolved tier asks for; None when all are resolved."""
    wanted = [lvl for pts in points.values() if (lvl := tier_next_level(pts, params, tried)) is not None]
    return min(wanted) if wanted else None
