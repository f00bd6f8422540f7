"""The cost-recovering split, pure functions: hourly cost, cost per request, and input/output
per-token prices that recover it (prefill-measured, fixed ratio), beside the seed's 2x convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pricing.schema import WindowStats

Split = Literal["prefill", "ratio", "seed"]
MTOK = 1_000_000


def request_tokens(stats: WindowStats) -> tuple[float, float]:
    """Mean (input, output) tokens per request behind the window's throughput of a capacity probe
    (request rate > 0, see pick_capacity): token rates over request rate, so that input and
    output prices at these rates recover exactly the hourly cost. (Requests wholly inside a
    short window are not used: they over-represent short requests.)"""
    return stats.input_tok_s / stats.request_rate_rps, stats.output_tok_s / stats.request_rate_rps


def effective_hourly_usd(hourly_usd: float, utilization: float, margin: float) -> float:
    """H_eff = H / utilization x (1 + margin)."""
    return hourly_usd / utilization * (1.0 + margin)


def cost_per_request_usd(effective_hourly_cost_usd: float, capacity_rps: float) -> float:
    """c = H_eff / (3600 x capacity)."""
    return effective_hourly_cost_usd / (3600.0 * capacity_rps)


@dataclass(frozen=True)
class SplitResult:
    """Per-token prices (USD per token) and how they were split."""

    input_usd_per_tok: float
    output_usd_per_tok: float
    split_used: Split
    cost_recovering: bool
    warnings: tuple[str, ...] = ()


def ratio_split(cost_usd: float, mean_isl: float, mean_osl: float, ratio: float) -> SplitResult:
    """p_out = ratio x p_in, and mean_ISL x p_in + mean_OSL x p_out = c."""
    denominator = mean_isl + ratio * mean_osl
    if denominator <= 0:
        raise ValueError("mean ISL and OSL are both zero: nothing to price")
    p_in = cost_usd / denominator
    return SplitResult(p_in, ratio * p_in, "ratio", True)


def prefill_split(cost_usd: float, effective_hourly_cost_usd: float, mean_isl: float, mean_osl: float,
                  prefill_tok_s: float) -> SplitResult:
    """p_in = H_eff / 3600 / prefill_tok_s; output takes the rest of c.

    If the input alone would exceed c, p_out is clamped to 0 and p_in set to c / mean_ISL
    (which lowers it) so the prices still recover exactly c.
    """
    p_in = effective_hourly_cost_usd / 3600.0 / prefill_tok_s
    rest = cost_usd - mean_isl * p_in
    if mean_osl <= 0 or rest < 0:
        if mean_isl <= 0:
            raise ValueError("mean ISL and OSL are both zero: nothing to price")
        warning = (
            f"prefill-priced input ({mean_isl * p_in:.3g} USD/request) exceeds the cost per request "
            f"({cost_usd:.3g} USD): output price clamped to 0 and input price set to c / mean ISL"
        ) if rest < 0 else "no output tokens at capacity: the input price carries the whole cost"
        return SplitResult(cost_usd / mean_isl, 0.0, "prefill", True, (warning,))
    return SplitResult(p_in, rest / mean_osl, "prefill", True)


def seed_split(effective_hourly_cost_usd: float, input_tok_s: float, output_tok_s: float) -> SplitResult:
    """The seed calculator's convention: the full hourly cost charged to input and again to output.

    p_in = H / 3600 / input_tok_s and p_out = H / 3600 / output_tok_s, so at that load the two
    prices together collect 2 x H: NOT cost-recovering, kept only to reproduce the seed's numbers.
    """
    per_s = effective_hourly_cost_usd / 3600.0
    return SplitResult(per_s / input_tok_s, per_s / output_tok_s, "seed", False)


def recovering_split(cost_usd: float, effective_hourly_cost_usd: float, mean_isl: float, mean_osl: float,
                     ratio: float, prefill_tok_s: float | None, prefill_reason: str) -> SplitResult:
    """The default cost-recovering split: prefill when a prefill throughput is known, else ratio (warned)."""
    if prefill_tok_s is not None and prefill_tok_s > 0:
        return prefill_split(cost_usd, effective_hourly_cost_usd, mean_isl, mean_osl, prefill_tok_s)
    result = ratio_split(cost_usd, mean_isl, mean_osl, ratio)
    warning = f"FALLBACK to the ratio split (p_out/p_in = {ratio:g}): {prefill_reason}"
    return SplitResult(result.input_usd_per_tok, result.output_usd_per_tok, "ratio", True, (warning,))


def split_prices(split: Split, cost_usd: float, effective_hourly_cost_usd: float, mean_isl: float,
                 mean_osl: float, ratio: float = 4.0, prefill_tok_s: float | None = None,
                 input_tok_s: float | None = None, output_tok_s: float | None = None,
                 prefill_reason: str = "no prefill probe for this config") -> SplitResult:
    """Dispatch on the split method. `prefill` and `ratio` satisfy mean_ISL x p_in + mean_OSL x p_out = c."""
    if split == "ratio":
        return ratio_split(cost_usd, mean_isl, mean_osl, ratio)
    if split == "seed":
        if not input_tok_s or not output_tok_s:
            raise ValueError("the seed split needs input and output tokens/s at capacity")
        return seed_split(effective_hourly_cost_usd, input_tok_s, output_tok_s)
    return recovering_split(cost_usd, effective_hourly_cost_usd, mean_isl, mean_osl, ratio, prefill_tok_s,
                            prefill_reason)
