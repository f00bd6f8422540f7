"""Capacity search as a small pure state machine: probe history in, next load level out.

Per SLO tier: grow the load geometrically until a probe fails, then bisect between the
highest pass below the lowest fail and that fail until the bracket is within `tolerance`.
Every probe informs every tier, so one sweep serves all tiers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from pricing.schema import Frozen


class SearchParams(Frozen):
    start: float = Field(default=1.0, gt=0)
    growth: float = Field(default=2.0, gt=1)
    tolerance: float = Field(default=0.10, gt=0)  # stop when (fail - pass) / pass <= this
    min_level: float = Field(default=1.0, gt=0)
    max_level: float = Field(default=4096.0, gt=0)
    integer: bool = True  # concurrency levels are whole numbers; request rates are not


class Bracket(BaseModel):
    """What the history says about one tier: highest pass below the lowest fail, and that fail."""

    model_config = ConfigDict(frozen=True)

    passed: float | None
    failed: float | None


def bracket(history: Mapping[float, bool]) -> Bracket:
    fails = [level for level, ok in history.items() if not ok]
    lowest_fail = min(fails) if fails else None
    passes = [level for level, ok in history.items() if ok and (lowest_fail is None or level < lowest_fail)]
    return Bracket(passed=max(passes) if passes else None, failed=lowest_fail)


def _round(level: float, params: SearchParams) -> float:
    level = min(max(level, params.min_level), params.max_level)
    return float(round(level)) if params.integer else level


def next_level(history: Mapping[float, bool], params: SearchParams) -> float | None:
    """The next level to probe for one tier, or None when its capacity is known well enough."""
    b = bracket(history)
    if b.failed is None:  # still growing
        if b.passed is None:
            return _round(params.start, params)
        if b.passed >= params.max_level:
            return None
        return _round(b.passed * params.growth, params)
    if b.passed is None:  # even the lowest probe failed: step down
        if b.failed <= params.min_level:
            return None
        return _round(b.failed / params.growth, params)
    if (b.failed - b.passed) / b.passed <= params.tolerance:
        return None
    mid = (b.passed + b.failed) / 2
    mid = float(math.floor(mid)) if params.integer else mid
    return None if mid in (b.passed, b.failed) else mid


def next_probe(histories: Mapping[str, Mapping[float, bool]], params: SearchParams) -> float | None:
    """Across tiers, the lowest level any unresolved tier asks for (low probes are cheap and
    settle the strict tiers first); None when every tier is resolved."""
    wanted = [lvl for h in histories.values() if (lvl := next_level(h, params)) is not None]
    return min(wanted) if wanted else None


def histories_from(verdicts: Sequence[tuple[float, Mapping[str, bool]]], tiers: Sequence[str]) -> dict[str, dict[float, bool]]:
    """Per-tier pass/fail maps from (level, {tier: passed}) pairs; a level probed twice keeps its last verdict."""
    out: dict[str, dict[float, bool]] = {t: {} for t in tiers}
    for level, passed in verdicts:
        for tier in tiers:
            if tier in passed:
                out[tier][level] = passed[tier]
    return out


def capacity_level(history: Mapping[float, bool]) -> float | None:
    return bracket(history).passed
