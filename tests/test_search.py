"""The capacity search on synthetic capacity curves (pure, no I/O)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing.capacity.search import (
    SearchParams,
    bracket,
    capacity_level,
    histories_from,
    next_level,
    next_probe,
)


def search(true_capacity: float, params: SearchParams, budget: int = 50) -> tuple[float | None, list[float]]:
    history: dict[float, bool] = {}
    while (level := next_level(history, params)) is not None and len(history) < budget:
        assert level not in history, "a level is never probed twice"
        history[level] = level <= true_capacity
    return capacity_level(history), list(history)


def test_grows_geometrically_then_bisects():
    cap, probed = search(26.7, SearchParams())
    assert probed[:6] == [1, 2, 4, 8, 16, 32]
    assert cap is not None and (26.7 - cap) / 26.7 <= 0.10


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1.0, max_value=3000.0))
def test_finds_any_integer_capacity_within_tolerance(true_capacity):
    cap, probed = search(true_capacity, SearchParams(max_level=4096))
    assert cap is not None and cap <= true_capacity
    assert (true_capacity - cap) / true_capacity <= 0.10 or true_capacity - cap < 1
    assert len(probed) <= 2 * 12 + 4


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=0.2, max_value=500.0))
def test_request_rates_are_not_rounded(true_rate):
    cap, _ = search(true_rate, SearchParams(integer=False, start=1.0, min_level=0.1))
    assert cap is not None and 0.9 * true_rate <= cap <= true_rate


def test_nothing_passes_steps_down_then_gives_up():
    cap, probed = search(0.5, SearchParams())
    assert cap is None and probed == [1]
    cap, probed = search(3, SearchParams(start=16))
    assert probed[:3] == [16, 8, 4] and cap == 3


def test_resolved_at_max_level():
    assert next_level({4096.0: True}, SearchParams(max_level=4096)) is None


def test_non_monotone_history_uses_highest_pass_below_lowest_fail():
    b = bracket({1: True, 2: True, 4: False, 8: True})
    assert (b.passed, b.failed) == (2, 4)


def test_next_probe_serves_the_strictest_unresolved_tier_first():
    h = histories_from([(1, {"loose": True, "strict": True}), (2, {"loose": True, "strict": False})], ["loose", "strict"])
    assert next_level(h["strict"], SearchParams()) is None  # bracket 1..2 cannot be split
    assert next_probe(h, SearchParams()) == 4  # so the loose tier grows
    with pytest.raises(KeyError):
        _ = h["missing"]
