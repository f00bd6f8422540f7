"""When an open loop's window may open: once the server holds about as many requests as it will.

Started empty, a server under Poisson arrivals fills for as long as its longest answers last (the
requests in it grow like rate x E[min(E2E, t)]) and, near saturation, longer: a fuller batch slows
every answer, which fills it further. A window opened while it still fills flatters the server.
On the simulated engine (WildChat / 8, 16 runs per load: benchmarks/window_length.py --warmup) windows opened when the first 16 arrivals had ended (1.5 s) read TPOT p90 15% (90% of
saturation) and 12% (95%) under the long run's; opened 2-4 steady E2E p90s later, 7-9%, about
what windows read after a minute of settling (the rest is each window seeing its own stretch of
load). On an H200 (FP8 8B, 92% of saturation) the requests in the server grew 23 -> 129 within
one window that opened as the first arrivals ended.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pricing.schema import RequestRecord

# The window opens once this many estimated steady E2E p90s have passed since the first arrival.
SETTLE_E2E_P90S = 3.0
# ... or this share of the probe's max_duration_s, so that the window still fits.
SETTLE_CAP_SHARE = 0.4
RECENT = 64  # the latest answers stand for the server as it is now
FEWEST = 4


def e2e_p90_estimate_s(ttft_s: Sequence[float], per_token_s: Sequence[float], sent_osl: Sequence[int]) -> float | None:
    """The E2E p90 the requests sent so far (`sent_osl`) would have at the pace of the latest answers
    (their TTFT, and their time per output token after the first): median TTFT plus median time per
    token times the p90 of the OSLs. The answers' own E2E would say too little early on: the short
    ones end first."""
    if len(ttft_s) < FEWEST or not len(per_token_s) or not len(sent_osl):
        return None
    return float(np.median(ttft_s)) + float(np.median(per_token_s)) * max(0.0, float(np.percentile(sent_osl, 90)) - 1)


def settled(records: Sequence[RequestRecord], sent_osl: Sequence[int], elapsed_s: float, cap_s: float) -> bool:
    """Whether an open loop `elapsed_s` after its first arrival has filled its server (SETTLE_E2E_P90S)."""
    if elapsed_s >= cap_s:
        return True
    recent = [r for r in records[-RECENT:] if r.ok and r.chunk_ns]
    ttft = [(r.chunk_ns[0] - r.start_ns) / 1e9 for r in recent]
    per_token = [(r.end_ns - r.chunk_ns[0]) / 1e9 / (r.target_output_tokens - 1) for r in recent if r.target_output_tokens >= 2]
    estimate = e2e_p90_estimate_s(ttft, per_token, sent_osl)
    return estimate is not None and elapsed_s >= SETTLE_E2E_P90S * estimate
