"""Capacity search as a small pure state machine: probe points in, next load level out.

Every probe informs every tier (capacity.curve reads all of them as one monotone curve per
tier). Per tier: with no violation yet, grow the load toward where the curve, extended as a
line through its two highest probes, is predicted to cross the limit (at least 1.25x, at most
`growth` times per step); with every probe violating, step down; once bracketed, probe just
inside the wider side of the interval around the predicted crossing, where a probe is likely to
be decided and to narrow it, until the tier's capacity is known to `tolerance` at 95% (closed
loop: or the exact whole concurrency). The tiers take turns asking for the next probe, those
not yet bracketed first.
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


def resolved(cap: Capacity, params: SearchParams, tried: Collection[float] = ()) -> bool:
    """Known well enough: within the tolerance, or (closed loop) to one whole concurrency, or to
    two neighbours of which the upper was probed and left undecided: the finest a concurrency
    scale gives (at c=5 one step is 20%; the open-loop step, on a continuous rate, goes further)."""
    if cap.kind != "found":
        return False
    if params.integer and cap.level_low is not None and cap.level_high is not None:
        if cap.level_high == cap.level_low or (cap.level_high - cap.level_low == 1 and cap.level_high in tried):
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


def _extrapolate_up(points: Sequence[Point]) -> float | None:
    """Where a line through the highest probe and one well below it (at most 2/3 its load, for a
    slope that noise does not swamp) reaches severity 1; None when it does not rise."""
    ordered = sorted((p for p in points if p.severity < BIG), key=lambda p: p.level)
    if len(ordered) < 2:
        return None
    top = ordered[-1]
    partner = next((p for p in reversed(ordered) if p.level <= top.level / 1.5), ordered[0])
    if not partner.severity < top.severity < 1:
        return None
    slope = (top.severity - partner.severity) / (top.level - partner.level)
    return top.level + (1 - top.severity) / slope


def _extrapolate_down(points: Sequence[Point]) -> float | None:
    """Below the lowest probe, where severity falls to 1: along the line through the two lowest
    probes, or (one probe) as if latency were as elastic as load."""
    ordered = sorted((p for p in points if 0 < p.severity < BIG), key=lambda p: p.level)
    if not ordered or ordered[0].severity <= 1:
        return None
    low = ordered[0]
    above = next((p for p in ordered[1:] if p.severity > low.severity), None)
    if above is None:
        return low.level / low.severity
    slope = (above.severity - low.severity) / (above.level - low.level)
    return max(low.level - (low.severity - 1) / slope, low.level / low.severity / 2)


def _decisive_step(points: Sequence[Point], x: float) -> float:
    """How far from a crossing at load x, as a fraction of it, a probe is likely to be decided: the
    nearest probe's interval (half-width over severity) over the curve's elasticity there (from
    the two probes nearest x)."""
    measured = sorted((p for p in points if 0 < p.severity < BIG), key=lambda p: abs(math.log(p.level / x)))
    if not measured:
        return 0.05
    near = measured[0]
    half = (near.severity_high - near.severity_low) / 2 / near.severity
    elasticity = 1.0
    other = next((p for p in measured[1:] if p.level != near.level and p.severity != near.severity), None)
    if other is not None:
        elasticity = abs(math.log(other.severity / near.severity) / math.log(other.level / near.level))
    return min(0.5, max(0.01, 1.25 * min(half, 0.5) / max(elasticity, 0.05)))


def _inside(points: Sequence[Point], cap: Capacity, params: SearchParams) -> list[float]:
    """Levels inside the interval on its wider side, where a probe is likely decided: a step
    from the crossing, then two steps, then (whole concurrencies) the levels nearer it."""
    x, low, high = cap.crossing or cap.level or 0.0, cap.level_low, cap.level_high
    assert low is not None and high is not None
    step = _decisive_step(points, x)
    if params.integer:
        high += 1  # level_high is the highest whole concurrency below the lowest sure fail
        below = [min(round(x * (1 - step * k)), math.floor(x)) for k in (1, 2)] + list(range(math.floor(x), int(low), -1))
        above = [max(round(x * (1 + step * k)), math.floor(x) + 1) for k in (1, 2)] + list(range(math.floor(x) + 1, int(high)))
        below = [float(v) for v in dict.fromkeys(below) if low < v < high]
        above = [float(v) for v in dict.fromkeys(above) if low < v < high]
    else:
        below = [x * (1 - step * k) for k in (1, 2, 4) if x * (1 - step * k) > low]
        above = [x * (1 + step * k) for k in (1, 2, 4) if x * (1 + step * k) < high]
    return below + above if x - low >= high - x else above + below


def tier_next_level(points: Sequence[Point], params: SearchParams, tried: Collection[float]) -> float | None:
    """The next level one tier asks for, or None when it is resolved (or cannot be served better)."""
    if not points:
        return _untried([params.start], tried, params)
    cap = capacity_from_points(points, params.integer)
    levels = sorted(p.level for p in points)
    if cap.kind == "none":
        if levels[0] <= params.min_level:
            return None
        guess = _extrapolate_down(points)
        return _untried([max(guess * (1 - _decisive_step(points, guess)) if guess else 0.0,
                             levels[0] / params.growth)], tried, params)
    if cap.kind == "at_least":
        if levels[-1] >= params.max_level:
            return None
        top = levels[-1]
        guess = _extrapolate_up(points)
        if guess is None or guess > top * params.growth:
            return _untried([top * params.growth], tried, params)
        # Just past the predicted crossing, where a probe is likely a sure fail: then one just
        # below it often resolves the tier.
        past = guess * (1 + _decisive_step(points, guess))
        if params.integer:
            past = max(round(past), math.floor(guess) + 1)
        return _untried([past, top * params.growth], tried, params)
    if resolved(cap, params, tried):
        return None
    x = cap.crossing or cap.level or levels[0]
    step = _decisive_step(points, x)
    if cap.level_low is None:  # nothing surely within the limit below the crossing: look lower
        below = x * (1 - step)
        below = min(round(below), math.floor(x)) if params.integer else below
        lower = _untried([below, x / 2, levels[0] / 2], tried, params)
        # At the lowest level already, the other end may still be open: bound that instead (the
        # demo's tiny server on 2 cores: c=1 and c=4 both undecided, Baseline left at "c=2 ± ?").
        if lower is not None or cap.level_high is not None:
            return lower
    if cap.level_high is None:  # nothing surely beyond it above: look higher
        above = x * (1 + step)
        above = max(round(above), math.floor(x) + 1) if params.integer else above
        return _untried([above, max(x, levels[-1]) * 1.25], tried, params)
    if (cap.level_high - cap.level_low) > 4 * params.tolerance * x:
        # A wide gap: the line between far-apart probes is a guess (latency bends up near
        # saturation), so halve the gap, leaning toward the guess.
        middle = (cap.level_low + cap.level_high) / 2
        return _untried([(middle + x) / 2, middle, *_inside(points, cap, params)], tried, params)
    return _untried(_inside(points, cap, params), tried, params)


def next_level(points: Mapping[str, Sequence[Point]], params: SearchParams, tried: Collection[float],
               turn: int = 0) -> tuple[float | None, int]:
    """The tiers take turns: from tier `turn` (mod their number) on, the first unresolved tier's
    level, and the turn after it; None when all are resolved. In a rate search a flat tier
    (curve.FLAT_ELASTICITY) waits until the others are resolved. A tier not yet bracketed (no pass
    below a fail) goes first: it has no price at all, where a bracketed one has a price with an
    interval, and it is bracketed in a few steps (each at least 1.25x up or `growth` down). Turns,
    not the lowest level asked for: near a strict tier's capacity the curve can be flat within the
    probes' noise (TPOT p90 at 9.4-10.4 ms from c=31 to 39 against a 10 ms limit on an H200), and
    that tier alone would then spend every probe of the budget."""
    names = list(points)
    asks = []
    for i in range(len(names)):
        tier = points[names[(turn + i) % len(names)]]
        level = tier_next_level(tier, params, tried)
        if level is not None:
            cap = capacity_from_points(tier, params.integer) if tier else None
            bracketed = cap is not None and cap.kind == "found"
            # A rate search asks for a flat tier last: where latency barely rises with load, a
            # probe barely narrows the capacity (its p90's noise over the elasticity), and the
            # probe is better spent elsewhere (search_accuracy --quick --mode open: Instant, at
            # elasticity 0.15, took 3 of 8 open-loop probes, one of them looking lower for a
            # sure pass no 60 s window could give, while Baseline's gap stayed 36-79 req/s).
            flat = not params.integer and cap is not None and cap.flat
            asks.append((bracketed, flat, i, level))
    if not asks:
        return None, turn
    _, _, i, level = min(asks)  # unbracketed first, then steep before flat, then in turn
    return level, turn + i + 1
