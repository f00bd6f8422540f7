"""Pricing the seed calculator's result files (read by pricing.results: one line per server,
`{"id": "<quant>_<tp>", "measurements": [{batch_size, input_tps, output_tps, avg_ttft, avg_tpot}, ...]}`,
billed at one hourly rate C) by its own convention, and cost-recovering beside it.
"""

from __future__ import annotations

from typing import Any

from pricing.cost.price_rows import PricePair, PriceRow, PricingParams, per_mtok
from pricing.cost.split import effective_hourly_usd, ratio_split, seed_split
from pricing.results import SeedServer
from pricing.schema import SloTier
from pricing.units import fmt_ms, fmt_s

DEFAULT_SEED_HOURLY_USD = 5.0  # the seed calculator's server rate C


def _seed_failure(server: SeedServer, tier: SloTier) -> str:
    ms = server.line_model.measurements
    if not any(m.avg_ttft <= tier.ttft_s for m in ms):
        return f"no measurement meets mean TTFT <= {fmt_s(tier.ttft_s)}; best {fmt_s(min(m.avg_ttft for m in ms))}"
    if not any(m.avg_tpot <= tier.tpot_s for m in ms):
        return f"no measurement meets mean TPOT <= {fmt_ms(tier.tpot_s)}; best {fmt_ms(min(m.avg_tpot for m in ms))}"
    return "no measurement meets mean TTFT and mean TPOT at once"


def price_seed_server(server: SeedServer, tier: SloTier, params: PricingParams) -> PriceRow:
    """Prices of one seed line for one tier.

    Seed convention (split "seed"): among measurements whose mean TTFT and mean TPOT meet the
    tier, the one with the highest output_tps; p_in = C/3600/input_tps, p_out = C/3600/output_tps.
    Both prices each collect the whole hourly cost, so together they collect 2 x C: not
    cost-recovering. Tier checks use means (seed files carry no percentiles).
    """
    hourly_usd = params.hourly_rate_usd if params.hourly_rate_usd is not None else DEFAULT_SEED_HOURLY_USD
    h_eff = effective_hourly_usd(hourly_usd, params.utilization, params.margin)
    base: dict[str, Any] = dict(
        source="seed", config_key=f"seed:{server.name}|{server.line_model.id}", model=server.name,
        scheme=server.quant, tp=server.tp, gpu_name="server", gpu_count=1, replicas=params.replicas,
        tier=tier, split=params.split, gpu_rate_usd_h=hourly_usd,
    )
    passing = [m for m in server.line_model.measurements if m.avg_ttft <= tier.ttft_s and m.avg_tpot <= tier.tpot_s]
    if not passing:
        return PriceRow(**base, feasible=False, reason=_seed_failure(server, tier))
    m = max(passing, key=lambda x: x.output_tps)
    # Cost-recovering version of the same data. Seed files count no requests, so take one second of
    # server time as the unit ("request-equivalent"): it costs H_eff/3600 and serves input_tps input and
    # output_tps output tokens, so input_tps x p_in + output_tps x p_out = H_eff/3600 recovers cost.
    # No prefill-only measurement exists, so the default (prefill) split falls back to the ratio split.
    recovering = ratio_split(h_eff / 3600.0, m.input_tps, m.output_tps, params.ratio)
    warnings = [f"seed files have no prefill probe; cost-recovering prices use the ratio split "
                f"(p_out/p_in = {params.ratio:g})"]
    if params.split == "seed":
        chosen = seed_split(h_eff, m.input_tps, m.output_tps)
        warnings.insert(0, "seed convention: NOT cost-recovering (input and output prices each collect the "
                           "full hourly cost, 2x in total); 'recovering' holds the cost-recovering prices")
    else:
        chosen = recovering
        if params.split == "prefill":
            warnings[0] = "FALLBACK to the ratio split: " + warnings[0]
    prices = per_mtok(chosen)
    return PriceRow(
        **base, feasible=True, split_used=chosen.split_used, cost_recovering=chosen.cost_recovering,
        capacity_probe=f"{server.file}:{server.line} batch_size={m.batch_size}", load_level=float(m.batch_size),
        capacity_input_tok_s=m.input_tps * params.replicas, capacity_output_tok_s=m.output_tps * params.replicas,
        ttft_s=m.avg_ttft, tpot_s=m.avg_tpot,
        hourly_cost_usd=hourly_usd * params.replicas, effective_hourly_cost_usd=h_eff * params.replicas,
        input_usd_per_mtok=prices.input_usd_per_mtok, output_usd_per_mtok=prices.output_usd_per_mtok,
        recovering=per_mtok(recovering) if params.split == "seed" else None,
        tok_s_per_usd_h=(m.input_tps + m.output_tps) / h_eff if h_eff > 0 else None,
        warnings=warnings,
    )


def price_seed(servers: list[SeedServer], tiers: tuple[SloTier, ...] | list[SloTier],
               params: PricingParams) -> list[PriceRow]:
    """One row per seed line and tier (cheapest is marked later, with all rows)."""
    return [price_seed_server(s, t, params) for s in servers for t in tiers]


def seed_revenue_usd_s(prices: PricePair, input_tps: float, output_tps: float) -> float:
    """USD collected per second at the measured token rates (2 x C/3600 under the seed convention)."""
    return (input_tps * prices.input_usd_per_mtok + output_tps * prices.output_usd_per_mtok) / 1e6
