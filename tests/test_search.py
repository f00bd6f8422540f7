"""The capacity search and the capacity curve on synthetic latency curves (pure, no I/O).

A tier's severity at load x is S(x) = (x / x_star)^slope: the limit is crossed at x_star.
Each probe reports S with multiplicative noise and a 95% interval of +-halfwidth around it.
"""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing.capacity.curve import BIG, Point, capacity_from_points
from pricing.capacity.search import SearchParams, next_level, resolved, tier_next_level


def closed_rate(x: float) -> float:
    """A closed loop's request rate: grows with concurrency and saturates."""
    return 10 * x / (1 + x / 40)


def probe(x: float, x_star: float, slope: float, rng, noise: float, halfwidth: float, rate=closed_rate) -> Point:
    s = (x / x_star) ** slope * math.exp(rng.normal(0, noise))
    r = rate(x)
    return Point(x, s, s * (1 - halfwidth), s * (1 + halfwidth), r, r * 0.98, r * 1.02)


def search(x_star: float, params: SearchParams, slope: float = 1.5, noise: float = 0.0, halfwidth: float = 0.03,
           seed: int = 0, budget: int = 30, rate=closed_rate):
    rng = np.random.default_rng(seed)
    points: list[Point] = []
    while (level := tier_next_level(points, params, {p.level for p in points})) is not None and len(points) < budget:
        assert level not in {p.level for p in points}, "a level is never probed twice"
        points.append(probe(level, x_star, slope, rng, noise, halfwidth, rate))
    return capacity_from_points(points, params.integer), points


def test_grows_toward_the_predicted_crossing_then_resolves_it():
    cap, points = search(26.7, SearchParams())
    levels = [p.level for p in points]
    assert levels[:2] == [1, 4]  # growth is at most 4x a step
    assert cap.kind == "found" and cap.level == 26  # the highest whole concurrency within the limit
    assert resolved(cap, SearchParams()) and len(points) <= 10


@settings(max_examples=150, deadline=None)
@given(st.floats(min_value=1.5, max_value=3000.0), st.floats(min_value=0.5, max_value=4.0))
def test_any_closed_loop_capacity_within_5_percent_in_few_probes(x_star, slope):
    cap, points = search(x_star, SearchParams(max_level=4096), slope=slope)
    truth = closed_rate(math.floor(x_star))
    assert cap.kind == "found" and cap.rate_rps is not None
    assert abs(cap.rate_rps - truth) / truth <= 0.05 or cap.level == math.floor(x_star)
    assert len(points) <= 14


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=0.3, max_value=500.0))
def test_request_rates_are_found_to_the_tolerance(x_star):
    params = SearchParams(integer=False, start=1.0, min_level=0.05, growth=2.0)
    cap, points = search(x_star, params, rate=lambda x: x)
    assert cap.kind == "found" and abs(cap.rate_rps - x_star) / x_star <= 0.05
    assert cap.rate_low <= x_star <= cap.rate_high


def test_interval_covers_the_truth_with_noisy_probes():
    """Probes whose noise matches their stated intervals: the capacity's interval covers the truth."""
    covered = 0
    for seed in range(40):
        cap, _ = search(50.0, SearchParams(integer=False, growth=2.0, min_level=0.05), noise=0.015, halfwidth=0.03,
                        seed=seed, rate=lambda x: x)
        covered += cap.rate_low is not None and cap.rate_low <= 50.0 <= cap.rate_high
    assert covered >= 36


def test_never_violated_is_a_lower_bound_at_max_level():
    cap, points = search(10_000, SearchParams(max_level=256))
    assert cap.kind == "at_least" and points[-1].level == 256
    assert tier_next_level(points, SearchParams(max_level=256), {p.level for p in points}) is None


def test_violated_at_the_lowest_load_steps_down_then_gives_up():
    cap, points = search(0.5, SearchParams())
    assert cap.kind == "none" and [p.level for p in points] == [1]
    cap, points = search(3.2, SearchParams(start=16))
    # Down from 16 by how far it is over the limit, not by a fixed factor.
    assert points[0].level == 16 and points[1].level > 16 / 4 - 1 and cap.level == 3 and len(points) <= 5


def test_a_crossing_bounded_at_neither_end_looks_higher_once_it_cannot_look_lower():
    """Two undecided probes at c=1 (under the limit) and c=4 (over it): nothing below c=1 to try,
    so the next probe bounds the crossing from above."""
    pts = [Point(1, 0.8, 0.7, BIG, 2, 2, 2), Point(4, 1.1, 0.6, BIG, 4, 4, 4)]
    assert capacity_from_points(pts, integer=True).level_low is None
    level = tier_next_level(pts, SearchParams(), {1.0, 4.0})
    assert level is not None and level > 4


def test_one_noisy_probe_does_not_set_the_capacity():
    """A lucky pass above the crossing (a winner's curse for 'highest passing probe') is pooled
    with its neighbours by the monotone fit."""
    pts = [Point(x, (x / 20) ** 2, (x / 20) ** 2 * 0.95, (x / 20) ** 2 * 1.05, x, x, x) for x in (5, 10, 15, 18, 22, 30)]
    lucky = Point(25, 0.8, 0.7, 0.9, 25, 25, 25)
    cap = capacity_from_points([*pts, lucky], integer=False)
    assert cap.kind == "found" and 18 <= cap.rate_rps <= 23


def test_a_window_that_never_filled_is_a_sure_fail():
    pts = [Point(2, 0.5, 0.45, 0.55, 2, 2, 2), Point(8, BIG, BIG, BIG, 0.1, 0.1, 0.1)]
    cap = capacity_from_points(pts, integer=True)
    assert cap.kind == "found" and 2 <= cap.level < 8
    # It says the tier fails there, not by how much: the estimate is the middle of the gap, not
    # the pass below it, and the interval spans the gap.
    cap = capacity_from_points([Point(40, 0.4, 0.38, 0.43, 40, 40, 40), Point(60, BIG, BIG, BIG, 60, 60, 60)],
                               integer=False)
    assert cap.kind == "found" and cap.level == pytest.approx(50) and (cap.level_low, cap.level_high) == (40, 60)


def _flat_strict_tier() -> list[Point]:
    """Undecided at every level between 30 and 40 (a flat curve within the noise), bracketed."""
    return [Point(8, 0.5, 0.47, 0.53, 10, 10, 10), Point(24, 0.9, 0.85, 0.95, 30, 30, 30),
            Point(52, 1.2, 1.1, 1.3, 50, 50, 50)] + [Point(c, 1.0, 0.95, 1.05, 40, 40, 40) for c in range(30, 41)]


def test_the_tiers_take_turns_so_a_flat_strict_tier_cannot_spend_the_budget():
    """Both tiers bracketed and asking: each gets every other probe."""
    strict = _flat_strict_tier()
    loose = [Point(p.level, p.severity / 1.3, p.severity_low / 1.3, p.severity_high / 1.3, 40, 40, 40) for p in strict]
    loose.append(Point(80, 2.0, 1.8, 2.2, 60, 60, 60))
    params = SearchParams(tolerance=0.15)
    tried = {p.level for p in strict} | {80.0}
    strict_wants, loose_wants = tier_next_level(strict, params, tried), tier_next_level(loose, params, tried)
    assert capacity_from_points(loose, True).kind == "found"
    assert strict_wants is not None and loose_wants is not None and strict_wants < loose_wants
    asked, turn = [], 0
    for _ in range(4):
        level, turn = next_level({"strict": strict, "loose": loose}, params, tried, turn)
        asked.append(level)
    assert asked == [strict_wants, loose_wants] * 2
    done = {"strict": strict[:1], "loose": loose}
    assert next_level(done, params, tried | {8.0}, 0)[0] == loose_wants  # a resolved or stuck tier gives its turn


def test_a_tier_not_yet_bracketed_goes_before_refining_one_that_is():
    """The loose tier passes everywhere (no price yet, only a bound); on the strict tier's turn
    it is still asked first. On the simulated engine an open-loop search (search_accuracy --quick
    --mode open, seed 1) spent its 8 probes refining Fast and Baseline while Instant, failed at
    both of its probes, stayed unpriced."""
    strict = _flat_strict_tier()
    loose = [Point(p.level, p.severity / 5, p.severity_low / 5, p.severity_high / 5, 40, 40, 40) for p in strict]
    params = SearchParams(tolerance=0.15)
    tried = {p.level for p in strict}
    loose_wants = tier_next_level(loose, params, tried)
    assert capacity_from_points(loose, True).kind == "at_least" and loose_wants is not None
    assert next_level({"strict": strict, "loose": loose}, params, tried, 0)[0] == loose_wants
    assert next_level({"loose": loose, "strict": strict}, params, tried, 1)[0] == loose_wants


def test_a_rate_search_asks_for_a_flat_tier_last():
    """Two bracketed, unresolved tiers of a rate search: one whose curve barely rises (elasticity
    0.15: a probe hardly narrows it), one steep with a wide gap. The steep one is asked first
    even on the flat one's turn; alone, the flat one still gets its probes. A concurrency search
    keeps plain turns."""
    flat = [probe(x, 8.0, 0.15, np.random.default_rng(0), 0.0, 0.03, rate=lambda x: x) for x in (4.0, 7.0, 9.9)]
    steep = [Point(36.0, 0.6, 0.57, 0.63, 36, 36, 36), Point(79.0, BIG, BIG, BIG, 79, 79, 79)]
    params = SearchParams(tolerance=0.05, integer=False, min_level=0.1, max_level=200)
    tried = {p.level for p in flat} | {36.0, 79.0}
    assert capacity_from_points(flat, False).flat and not capacity_from_points(steep, False).flat
    flat_wants, steep_wants = tier_next_level(flat, params, tried), tier_next_level(steep, params, tried)
    assert flat_wants is not None and steep_wants is not None
    assert next_level({"flat": flat, "steep": steep}, params, tried, 0)[0] == steep_wants
    assert next_level({"flat": flat}, params, tried, 0)[0] == flat_wants
    plain = SearchParams(tolerance=0.05, min_level=1, max_level=200)
    whole = {"flat": [dataclasses.replace(p, level=p.level * 10) for p in flat], "steep": steep}
    assert next_level(whole, plain, {p.level for p in whole["flat"]} | {36.0, 79.0}, 0)[0] == tier_next_level(
        whole["flat"], plain, {p.level for p in whole["flat"]} | {36.0, 79.0})


@pytest.mark.parametrize("slope", [0.15, 1.5])
def test_the_curve_says_how_steep_it_is_at_the_crossing(slope):
    """Elasticity at the crossing, from the probes either side: how far 1% of noise in a p90
    moves the capacity (the simulated engine's Instant tier in open loop: 0.15)."""
    pts = [probe(x, 30.0, slope, np.random.default_rng(0), 0.0, 0.03, rate=lambda x: x) for x in (10.0, 20.0, 27.0, 33.0, 45.0)]
    cap = capacity_from_points(pts, integer=False)
    assert cap.elasticity == pytest.approx(slope)
    # Probes far apart either side: their chord is not the slope at the crossing.
    apart = [probe(x, 30.0, slope, np.random.default_rng(0), 0.0, 0.03, rate=lambda x: x) for x in (10.0, 20.0, 45.0)]
    assert capacity_from_points(apart, integer=False).elasticity is None
    # The probe above could not be measured (a fall-behind): no slope to tell.
    cap = capacity_from_points([Point(40, 0.4, 0.38, 0.43, 40, 40, 40), Point(60, BIG, BIG, BIG, 60, 60, 60)], integer=False)
    assert cap.kind == "found" and cap.elasticity is None
