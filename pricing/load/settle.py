"""When an open loop's window may open: once the server holds about as many requests as it will.

Started empty, a server under Poisson arrivals fills for as long as its longest answers last (the
requests in it grow like rate x E[min(E2E, t)]) and, near saturation, longer: a fuller batch slows
every answer, which fills it further. A window opened while it still fills flatters the server.
On the simulated engine (WildChat / 8, 16 runs per load: benchmarks/window_length.py --warmup)
windows opened when the first 16 arrivals had ended (1.5 s) read TPOT p90 15% (90% of
saturation) and 12% (95%) under the long run's; opened by this rule (3 estimated E2E p90s after
the first arrival), 9.5% and 7.0%, near what windows read after a minute (the rest is each
window seeing its own stretch of load). On an H200 (FP8 8B, 16.5 req/s, near saturation) a
window opened as the first arrivals ended held 23-47 requests in the server; by this rule, 99.

A unit is one request or one chat session (load.sessions): a session fills the server for as long
as all its turns and the think times between them last, so its duration is estimated the same way,
turn by turn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from pricing.load.client import ProbePlan
from pricing.schema import RequestRecord

# The window opens once this many estimated steady E2E p90s have passed since the first arrival.
SETTLE_E2E_P90S = 3.0
# ... or this share of the probe's max_duration_s, so that the window still fits, or this many of
# its shortest windows: a server past its capacity never settles, and tests with 1 s windows
# waited 120 s for each such probe.
SETTLE_CAP_SHARE, SETTLE_CAP_WINDOWS = 0.4, 4.0
RECENT = 64  # the latest answers stand for the server as it is now
# A server whose requests grew by more than OVERFLOW_SHARE of the arrivals since the first units
# ended completes under a third of what arrives: it overflows. On H200s (FP8 8B, WildChat, 37 open
# probes, 4.4-25.8 req/s, saturation about 17.5) the first 100 arrivals after the first units
# ended grew the count by at most 69% (at 24.8 req/s), 54% for the loads that kept up.
OVERFLOW_SHARE, OVERFLOW_MIN_ARRIVALS = 0.7, 100
FEWEST = 4  # answers to estimate from


class UnitShape(NamedTuple):
    """What a unit sent asks of the server: its requests, their output tokens after the first (in
    all), and the think time between its requests (s). One request of OSL n: (1, n - 1, 0)."""

    requests: int
    later_tokens: int
    think_s: float = 0.0


def request_shapes(osl: Sequence[int]) -> list[UnitShape]:
    return [UnitShape(1, max(0, n - 1)) for n in osl]


def e2e_p90_estimate_s(ttft_s: Sequence[float], per_token_s: Sequence[float], sent: Sequence[UnitShape]) -> float | None:
    """The p90 of how long the units sent so far would last at the pace of the latest answers:
    per request their median TTFT, per later token their median time per token after the first,
    plus the unit's think time. The answers' own E2E would say too little early on: the short
    ones end first."""
    if len(ttft_s) < FEWEST or not len(per_token_s) or not len(sent):
        return None
    ttft, per_token = float(np.median(ttft_s)), float(np.median(per_token_s))
    return float(np.percentile([u.requests * ttft + u.later_tokens * per_token + u.think_s for u in sent], 90))


def grew_beyond_noise(before: int, after: int, by: float = 0.0) -> bool:
    """A count of requests grew by more than `by`, beyond noise: 3 x the sd of the difference of
    two Poisson counts (the requests in a server that keeps up are about Poisson, as in M/G/inf).
    The window of an open loop whose requests in the server grow this way is extended (the
    server still fills: load.loops), and no pass of it is sure (capacity.choice)."""
    return after - before - 3 * math.sqrt(before + after + 1) > by


def settle_cap_s(plan: ProbePlan) -> float:
    """The longest an open loop waits for its server to fill (SETTLE_CAP_SHARE, SETTLE_CAP_WINDOWS)."""
    return min(SETTLE_CAP_SHARE * plan.max_duration_s, SETTLE_CAP_WINDOWS * plan.min_window_s * plan.open_window_multiple)


def overflowing(grew: int, arrived: int) -> bool:
    """Whether the requests in the server grew by more than OVERFLOW_SHARE of the arrivals since the
    first units ended: waiting for it to fill only makes its answers slower (a mock whose batch has
    no cap never settled, each probe above it waiting out its cap). The window then opens at once;
    capacity.choice.fell_behind judges it."""
    return arrived >= OVERFLOW_MIN_ARRIVALS and grew > OVERFLOW_SHARE * arrived


def has_settled(ttft_s: Sequence[float], per_token_s: Sequence[float], sent: Sequence[UnitShape], elapsed_s: float,
                cap_s: float, grew: int, arrived: int) -> bool:
    """Whether an open loop `elapsed_s` after its first arrival has filled its server
    (SETTLE_E2E_P90S of the units `sent`, from the latest answers' TTFT and time per token), given up
    (`cap_s`), or overflows (`grew` requests in the server more than when the first units had ended,
    `arrived` requests sent since). benchmarks/window_length.py replays it on simulated runs."""
    if elapsed_s >= cap_s or overflowing(grew, arrived):
        return True
    estimate = e2e_p90_estimate_s(ttft_s, per_token_s, sent)
    return estimate is not None and elapsed_s >= SETTLE_E2E_P90S * estimate


def settled(records: Sequence[RequestRecord], sent: Sequence[UnitShape], elapsed_s: float, cap_s: float,
            grew: int = 0, arrived: int = 0) -> bool:
    """has_settled, read from the probe's latest RECENT records."""
    recent = [r for r in records[-RECENT:] if r.ok and r.chunk_ns]
    ttft = [(r.chunk_ns[0] - r.start_ns) / 1e9 for r in recent]
    per_token = [(r.end_ns - r.chunk_ns[0]) / 1e9 / (r.target_output_tokens - 1) for r in recent if r.target_output_tokens >= 2]
    return has_settled(ttft, per_token, sent, elapsed_s, cap_s, grew, arrived)
