"""The cost-recovering split, pure functions: hourly cost, cost per request, and input, cached
input and output per-token prices that recover it (prefill-measured, fixed ratio), beside the
seed's 2x convention.

A request of new_ISL fresh input tokens, cached_ISL input tokens served by the prefix cache and
OSL output tokens pays new_ISL x p_in + cached_ISL x p_cached + OSL x p_out = c. The cached
price is a share f of the input price: measured (`cached_fraction`, from a prefill-only replay of
sessions beside the fresh prefill probe) or, without one, ASSUMED_CACHED_FRACTION.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from pricing.schema import WindowStats

Split = Literal["prefill", "ratio", "seed"]
MTOK = 1_000_000
# Where no probe measured it, a cached input token is taken to cost this share of a new one's
# prefill. A cached token skips its projections, MLP and attention as a query, the bulk of
# prefill; what is left is its key and value being read by the new tokens' attention (for an 8B
# Llama at 2k context, attention is about 6% of a token's prefill FLOPs). Providers charge 10-50%
# of the input price for cached input; this is the low end, a little above the FLOP share.
ASSUMED_CACHED_FRACTION = 0.1


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
    cached_input_usd_per_tok: float = 0.0


def cached_fraction(prefill_tok_s: float, cached_prefill_tok_s: float, hit_frac: float) -> float | None:
    """p_cached / p_in measured: a fresh prefill probe runs P prompt tokens/s, every one new; a
    prefill-only replay of sessions at the same load runs T, a share h of them cache hits. Time
    per token is 1/T = (1 - h)/P + h x t_cached, so f = t_cached x P = (P/T - (1 - h)) / h,
    clamped to [0, 1] (noise can push it past either end). None where nothing was cached."""
    if hit_frac <= 0 or prefill_tok_s <= 0 or cached_prefill_tok_s <= 0:
        return None
    return min(1.0, max(0.0, (prefill_tok_s / cached_prefill_tok_s - (1.0 - hit_frac)) / hit_frac))


def ratio_split(cost_usd: float, mean_isl: float, mean_osl: float, ratio: float, mean_cached: float = 0.0,
                cached_frac: float = ASSUMED_CACHED_FRACTION) -> SplitResult:
    """p_out = ratio x p_in, p_cached = cached_frac x p_in, and (mean_ISL - mean_cached) x p_in +
    mean_cached x p_cached + mean_OSL x p_out = c (mean_ISL counts every input token, cached or not)."""
    denominator = _input_weight(mean_isl, mean_cached, cached_frac) + ratio * mean_osl
    if denominator <= 0:
        raise ValueError("mean ISL and OSL are both zero: nothing to price")
    p_in = cost_usd / denominator
    return SplitResult(p_in, ratio * p_in, "ratio", True, cached_input_usd_per_tok=cached_frac * p_in)


def _input_weight(mean_isl: float, mean_cached: float, cached_frac: float) -> float:
    """Input tokens per request in new-token equivalents: what p_in multiplies."""
    return (mean_isl - mean_cached) + cached_frac * mean_cached


def prefill_split(cost_usd: float, effective_hourly_cost_usd: float, mean_isl: float, mean_osl: float,
                  prefill_tok_s: float, mean_cached: float = 0.0,
                  cached_frac: float = ASSUMED_CACHED_FRACTION) -> SplitResult:
    """p_in = H_eff / 3600 / prefill_tok_s, p_cached = cached_frac x p_in; output takes the rest of c.

    If the input alone would exceed c, p_out is clamped to 0 and p_in (and p_cached with it)
    lowered so that the input recovers exactly c.
    """
    p_in = effective_hourly_cost_usd / 3600.0 / prefill_tok_s
    p_cached = cached_frac * p_in
    rest = cost_usd - (mean_isl - mean_cached) * p_in - mean_cached * p_cached
    if mean_osl <= 0 or rest < 0:
        weight = _input_weight(mean_isl, mean_cached, cached_frac)
        if weight <= 0:
            raise ValueError("mean ISL and OSL are both zero: nothing to price")
        warning = (
            f"prefill-priced input ({cost_usd - rest:.3g} USD/request) exceeds the cost per request "
            f"({cost_usd:.3g} USD): output price clamped to 0 and input prices lowered to recover c"
        ) if rest < 0 else "no output tokens at capacity: the input price carries the whole cost"
        p_in = cost_usd / weight
        return SplitResult(p_in, 0.0, "prefill", True, (warning,), cached_input_usd_per_tok=cached_frac * p_in)
    return SplitResult(p_in, rest / mean_osl, "prefill", True, cached_input_usd_per_tok=p_cached)


def seed_split(effective_hourly_cost_usd: float, input_tok_s: float, output_tok_s: float,
               cached_frac: float = ASSUMED_CACHED_FRACTION) -> SplitResult:
    """The seed calculator's convention: the full hourly cost charged to input and again to output.

    p_in = H / 3600 / input_tok_s and p_out = H / 3600 / output_tok_s, so at that load the two
    prices together collect 2 x H: NOT cost-recovering, kept only to reproduce the seed's numbers.
    """
    per_s = effective_hourly_cost_usd / 3600.0
    p_in = per_s / input_tok_s
    return SplitResult(p_in, per_s / output_tok_s, "seed", False, cached_input_usd_per_tok=cached_frac * p_in)


def recovering_split(cost_usd: float, effective_hourly_cost_usd: float, mean_isl: float, mean_osl: float,
                     ratio: float, prefill_tok_s: float | None, prefill_reason: str, mean_cached: float = 0.0,
                     cached_frac: float = ASSUMED_CACHED_FRACTION) -> SplitResult:
    """The default cost-recovering split: prefill when a prefill throughput is known, else ratio (warned)."""
    if prefill_tok_s is not None and prefill_tok_s > 0:
        return prefill_split(cost_usd, effective_hourly_cost_usd, mean_isl, mean_osl, prefill_tok_s, mean_cached,
                             cached_frac)
    result = ratio_split(cost_usd, mean_isl, mean_osl, ratio, mean_cached, cached_frac)
    warning = f"FALLBACK to the ratio split (p_out/p_in = {ratio:g}): {prefill_reason}"
    return replace(result, warnings=(warning,))


def split_prices(split: Split, cost_usd: float, effective_hourly_cost_usd: float, mean_isl: float,
                 mean_osl: float, ratio: float = 4.0, prefill_tok_s: float | None = None,
                 input_tok_s: float | None = None, output_tok_s: float | None = None,
                 prefill_reason: str = "no prefill probe for this config", mean_cached: float = 0.0,
                 cached_frac: float = ASSUMED_CACHED_FRACTION) -> SplitResult:
    """Dispatch on the split method. `prefill` and `ratio` satisfy
    (mean_ISL - mean_cached) x p_in + mean_cached x p_cached + mean_OSL x p_out = c."""
    if split == "ratio":
        return ratio_split(cost_usd, mean_isl, mean_osl, ratio, mean_cached, cached_frac)
    if split == "seed":
        if not input_tok_s or not output_tok_s:
            raise ValueError("the seed split needs input and output tokens/s at capacity")
        return seed_split(effective_hourly_cost_usd, input_tok_s, output_tok_s, cached_frac)
    return recovering_split(cost_usd, effective_hourly_cost_usd, mean_isl, mean_osl, ratio, prefill_tok_s,
                            prefill_reason, mean_cached, cached_frac)
