"""Plausibility checks of probe records: what no measurement can produce (a negative window, a
rate of 1e300/s, p90 above p99) is refused before anything is priced from it. Each failure
names its field (errors.from_validation_error turns it into file:line and the dotted path)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic_core import PydanticCustomError

from pricing.errors import IMPLAUSIBLE

# No single server streams a billion tokens a second (an H200 serving an 8B model: ~1e4), nor
# answers ten million requests a second.
MAX_TOK_S = 1e9
MAX_REQ_S = 1e7
# Float noise between two percentiles of one sample (numpy's interpolation) is not disorder.
ORDER_SLACK = 1e-9
# Schema 2's output tokens are the flow's own numerator (tokens streamed in the window), and its
# input tokens a part of the cohort's measured prompt tokens: only rounding separates them from
# their rate x window_s. Its three rates are one flow over the mean lengths (lengths_mean).
FLOW_REL_TOL = 0.01
# Schema 1 counted the tokens of requests that started and ended in the window (47-100% of the
# streamed flow in the committed H200 files), so there counts and rates need only agree within
# this factor either way.
LOOSE_FACTOR = 4.0


def implausible(field: str, reason: str) -> PydanticCustomError:
    """A plausibility failure of `field` (a path below the model that raises it)."""
    return PydanticCustomError(IMPLAUSIBLE, "{field}: {reason}", {"field": field, "reason": reason})


def check_finite(field: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise implausible(field, f"must be a finite number (got {value})")


def check_count(field: str, count: int, rate_s: float, window_s: float, rule: Literal["equal", "at_most", "loose"]
                 ) -> None:
    """`count` against `rate_s` x `window_s`: equal or at most it within FLOW_REL_TOL (and a token
    of rounding), or within LOOSE_FACTOR either way."""
    expected = rate_s * window_s
    slack = FLOW_REL_TOL * expected + 1.0
    if rule == "equal":
        ok, bound = abs(count - expected) <= slack, f"within {FLOW_REL_TOL:.0%} of"
    elif rule == "at_most":
        ok, bound = count <= expected + slack, "at most"
    else:
        ok = expected / LOOSE_FACTOR - 1.0 <= count <= expected * LOOSE_FACTOR + 1.0
        bound = f"within a factor of {LOOSE_FACTOR:g} of"
    if not ok:
        raise implausible(field, f"{count:g} is not {bound} the rate x window ({rate_s:.6g}/s x {window_s:.6g} s "
                                 f"= {expected:.6g}); the record is inconsistent")


def check_lengths(field: str, tok_s: float, rate_rps: float, tokens_per_request: float) -> None:
    expected = rate_rps * tokens_per_request
    if abs(tok_s - expected) > FLOW_REL_TOL * expected + 1e-9:
        raise implausible(field, f"{tok_s:.6g}/s is not the request rate x mean tokens per request "
                                 f"({rate_rps:.6g} x {tokens_per_request:.6g} = {expected:.6g}); the record is inconsistent")
