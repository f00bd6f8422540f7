"""Pricing math, pure functions: hourly cost, the cost-recovering input/output price split, and
the price-row model every output (console, HTML, JSON) is built from. Which probe sets the
capacity is pricing.capacity's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pricing.catalog import PRICING_TIERS, Catalog, PricingTier, gpu_rate_usd_h, unknown_gpu_error
from pricing.capacity import (
    SourcedProbe,
    capacity_is_lower_bound,
    failure_reason,
    group_by_config,
    pick_capacity,
    pick_prefill,
)
from pricing.schema import ProbeRecord, SloTier, WindowStats, config_label

Split = Literal["prefill", "ratio", "seed"]
MTOK = 1_000_000


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PricingParams(_Frozen):
    """Knobs of one pricing run (CLI flags)."""

    split: Split = "prefill"
    ratio: float = Field(default=4.0, gt=0)  # p_out / p_in for the ratio split (and fallbacks)
    utilization: float = Field(default=1.0, gt=0, le=1)  # share of capacity sold on average
    margin: float = Field(default=0.0, ge=0)  # markup over cost
    pricing_tier: PricingTier = "on_demand"
    hourly_rate_usd: float | None = Field(default=None, ge=0)  # per GPU for probes, per server for seed files
    replicas: int = Field(default=1, ge=1)
    region: str | None = None  # energy price and carbon region; the catalog's default when None
    energy_cost: bool = False  # self-hosted: add measured energy x $/kWh (cloud rates include power)


class PricePair(_Frozen):
    input_usd_per_mtok: float
    output_usd_per_mtok: float


class EnergyPrices(_Frozen):
    """Measured energy at capacity, split between input and output tokens like the cost is."""

    power_w: float  # mean over the capacity probe's window, whole server
    kwh_per_request: float
    input_kwh_per_mtok: float
    output_kwh_per_mtok: float
    region: str
    usd_per_kwh: float
    input_energy_usd_per_mtok: float
    output_energy_usd_per_mtok: float
    input_gco2e_per_mtok: dict[str, float]  # by region
    output_gco2e_per_mtok: dict[str, float]


class PriceRow(_Frozen):
    """Prices of one config for one SLO tier (or why it cannot meet the tier). Rates cover all replicas."""

    source: Literal["probe", "seed"] = "probe"
    config_key: str
    profile: str = ""  # traffic profile the capacity was measured with: prices differ per profile
    model: str
    scheme: str
    tp: int
    gpu_name: str
    gpu_count: int
    replicas: int = 1
    tier: SloTier
    feasible: bool
    reason: str | None = None
    split: Split
    split_used: Split | None = None
    cost_recovering: bool = True
    capacity_probe: str | None = None  # file:line
    prefill_probe: str | None = None
    load_level: float | None = None
    capacity_lower_bound: bool = False  # no higher-load probe failed the tier: the real capacity may be higher
    capacity_rps: float | None = None
    capacity_input_tok_s: float | None = None
    capacity_output_tok_s: float | None = None
    ttft_s: float | None = None  # at the tier's percentile (seed files: mean)
    tpot_s: float | None = None
    error_rate: float | None = None
    mean_isl: float | None = None
    mean_osl: float | None = None
    prefill_tok_s: float | None = None
    gpu_rate_usd_h: float | None = None  # per GPU (seed files: per server)
    hourly_cost_usd: float | None = None  # H
    energy_usd_h: float | None = None  # part of H
    effective_hourly_cost_usd: float | None = None  # H_eff = H / utilization x (1 + margin)
    cost_usd_per_request: float | None = None
    input_usd_per_mtok: float | None = None
    output_usd_per_mtok: float | None = None
    recovering: PricePair | None = None  # split == "seed": the cost-recovering prices for the same data
    usd_per_request_p50: float | None = None
    usd_per_request_p90: float | None = None
    usd_per_request_p99: float | None = None
    tok_s_per_usd_h: float | None = None  # (input + output tok/s) per $/h of H_eff
    variants: dict[str, PricePair] = Field(default_factory=dict)  # by pricing tier
    energy: EnergyPrices | None = None
    cheapest: bool = False
    warnings: list[str] = Field(default_factory=list)

    @property
    def label(self) -> str:
        where = f" · {self.profile}" if self.profile else ""
        return config_label(self.model, self.scheme, self.tp, self.gpu_count, self.gpu_name) + where


# ------------------------------------------------------------------------------------ money
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


def per_mtok(split: SplitResult) -> PricePair:
    return PricePair(input_usd_per_mtok=split.input_usd_per_tok * MTOK,
                     output_usd_per_mtok=split.output_usd_per_tok * MTOK)


def mark_cheapest(rows: Sequence[PriceRow]) -> list[PriceRow]:
    """Mark the cheapest feasible row per (source, tier, traffic profile).

    Probe rows compare cost per request at capacity; seed rows (no request counts) compare the
    output price, which the seed calculator ranked by.
    """
    best: dict[tuple[str, str], tuple[float, int]] = {}
    for i, row in enumerate(rows):
        if not row.feasible:
            continue
        value = row.cost_usd_per_request if row.source == "probe" else row.output_usd_per_mtok
        if value is None:
            continue
        key = (row.source, row.tier.name, row.profile)
        if key not in best or value < best[key][0]:
            best[key] = (value, i)
    winners = {i for _, i in best.values()}
    return [row.model_copy(update={"cheapest": i in winners}) for i, row in enumerate(rows)]


# ------------------------------------------------------------------------------------ rows
def _energy_prices(power_w: float, capacity_rps: float, recovering: SplitResult, cost_usd: float,
                   catalog: Catalog, region: str) -> EnergyPrices:
    """Energy per request at capacity, split between input and output in the cost's proportions."""
    kwh_per_request = power_w / 1000.0 / (3600.0 * capacity_rps)
    share_in = recovering.input_usd_per_tok / cost_usd if cost_usd > 0 else 0.0
    share_out = recovering.output_usd_per_tok / cost_usd if cost_usd > 0 else 0.0
    kwh_in, kwh_out = kwh_per_request * share_in * MTOK, kwh_per_request * share_out * MTOK
    usd_per_kwh = catalog.regions[region].usd_per_kwh
    return EnergyPrices(
        power_w=power_w, kwh_per_request=kwh_per_request, input_kwh_per_mtok=kwh_in, output_kwh_per_mtok=kwh_out,
        region=region, usd_per_kwh=usd_per_kwh,
        input_energy_usd_per_mtok=kwh_in * usd_per_kwh, output_energy_usd_per_mtok=kwh_out * usd_per_kwh,
        input_gco2e_per_mtok={n: kwh_in * r.gco2e_per_kwh for n, r in catalog.regions.items()},
        output_gco2e_per_mtok={n: kwh_out * r.gco2e_per_kwh for n, r in catalog.regions.items()},
    )


@dataclass(frozen=True)
class _AtRate:
    hourly_usd: float
    energy_usd_h: float
    effective_usd_h: float
    cost_usd: float
    chosen: SplitResult
    recovering: SplitResult


def _price_at_rate(gpu_rate_usd_h: float, cap: SourcedProbe, prefill: SourcedProbe | None, power_w: float | None,
                   usd_per_kwh: float, params: PricingParams) -> _AtRate:
    """H, H_eff, c and the prices of one server (one replica) at one GPU rate."""
    rec, stats = cap.record, cap.record.stats
    energy_usd_h = power_w / 1000.0 * usd_per_kwh if power_w is not None and params.energy_cost else 0.0
    hourly = rec.config.gpu_count * gpu_rate_usd_h + energy_usd_h
    h_eff = effective_hourly_usd(hourly, params.utilization, params.margin)
    cost = cost_per_request_usd(h_eff, stats.request_rate_rps)
    isl, osl = request_tokens(stats)
    prefill_tok_s = prefill.record.stats.input_tok_s if prefill is not None else None
    reason = "no prefill probe (load.kind == 'prefill') for this config"
    recovering = recovering_split(cost, h_eff, isl, osl, params.ratio, prefill_tok_s, reason)
    chosen = recovering if params.split == "prefill" else split_prices(
        params.split, cost, h_eff, isl, osl, params.ratio, prefill_tok_s, stats.input_tok_s, stats.output_tok_s)
    return _AtRate(hourly, energy_usd_h, h_eff, cost, chosen, recovering)


def price_config(probes: Sequence[SourcedProbe], tier: SloTier, catalog: Catalog, params: PricingParams) -> PriceRow:
    """The price row of one config (all `probes` share config.key and profile) for one tier."""
    cfg = probes[0].record.config
    n = params.replicas
    base = dict(config_key=cfg.key, profile=probes[0].record.workload, model=cfg.model, scheme=cfg.scheme, tp=cfg.tp, gpu_name=cfg.gpu_name,
                gpu_count=cfg.gpu_count, replicas=n, tier=tier, split=params.split)
    cap = pick_capacity(probes, tier)
    if cap is None:
        return PriceRow(**base, feasible=False, reason=failure_reason(probes, tier))
    rates = ({"hourly_rate": params.hourly_rate_usd} if params.hourly_rate_usd is not None else
             {t: r for t in PRICING_TIERS if (r := gpu_rate_usd_h(catalog, cfg.gpu_name, t)) is not None})
    rate = params.hourly_rate_usd if params.hourly_rate_usd is not None else rates.get(params.pricing_tier)
    if rate is None:
        return PriceRow(**base, feasible=False, reason=f"the catalog has no {params.pricing_tier} rate for "
                        f"{cfg.gpu_name}; pass --catalog FILE or --hourly-rate USD")
    stats = cap.record.stats
    prefill = pick_prefill(probes, cap)
    region = params.region or catalog.meta.default_region
    energy = cap.record.energy
    power_w = energy.energy_j / stats.window_s if energy is not None and stats.window_s > 0 else None
    usd_per_kwh = catalog.regions[region].usd_per_kwh
    at = _price_at_rate(rate, cap, prefill, power_w, usd_per_kwh, params)
    variants = {t: per_mtok(_price_at_rate(r, cap, prefill, power_w, usd_per_kwh, params).chosen)
                for t, r in rates.items()}
    isl, osl = request_tokens(stats)
    pairs = cap.record.profile.sample_pairs or [(isl, osl)]
    p_in, p_out = at.chosen.input_usd_per_tok, at.chosen.output_usd_per_tok
    per_request = np.percentile(np.array([i * p_in + o * p_out for i, o in pairs]), [50, 90, 99])
    warnings = list(at.chosen.warnings)
    lower_bound = capacity_is_lower_bound(probes, tier, cap)
    if lower_bound:
        warnings.append(f"capacity is a lower bound: no probe at a load above {cap.record.load.level:g} failed the "
                        "tier, so the prices are upper bounds; rerun the sweep (it resumes) with a larger --max-probes")
    if params.split == "seed":
        warnings.insert(0, "seed convention: NOT cost-recovering (input and output prices each collect the full "
                           "hourly cost, 2x in total); 'recovering' holds the default cost-recovering prices")
        warnings.extend(at.recovering.warnings)
    prices = per_mtok(at.chosen)
    return PriceRow(
        **base, feasible=True, split_used=at.chosen.split_used, cost_recovering=at.chosen.cost_recovering,
        capacity_probe=cap.where, prefill_probe=prefill.where if prefill is not None else None,
        load_level=cap.record.load.level, capacity_lower_bound=lower_bound, capacity_rps=stats.request_rate_rps * n,
        capacity_input_tok_s=stats.input_tok_s * n, capacity_output_tok_s=stats.output_tok_s * n,
        ttft_s=stats.latency("ttft", tier.percentile), tpot_s=stats.latency("tpot", tier.percentile),
        error_rate=stats.error_rate, mean_isl=isl, mean_osl=osl,
        prefill_tok_s=prefill.record.stats.input_tok_s if prefill is not None else None,
        gpu_rate_usd_h=rate, hourly_cost_usd=at.hourly_usd * n,
        energy_usd_h=at.energy_usd_h * n if power_w is not None else None,
        effective_hourly_cost_usd=at.effective_usd_h * n, cost_usd_per_request=at.cost_usd,
        input_usd_per_mtok=prices.input_usd_per_mtok, output_usd_per_mtok=prices.output_usd_per_mtok,
        recovering=per_mtok(at.recovering) if params.split == "seed" else None,
        usd_per_request_p50=float(per_request[0]), usd_per_request_p90=float(per_request[1]),
        usd_per_request_p99=float(per_request[2]),
        tok_s_per_usd_h=(stats.input_tok_s + stats.output_tok_s) / at.effective_usd_h
        if at.effective_usd_h > 0 else None,
        variants=variants,
        energy=_energy_prices(power_w, stats.request_rate_rps, at.recovering, at.cost_usd, catalog, region)
        if power_w is not None else None,
        warnings=warnings,
    )


def price_records(records: Sequence[SourcedProbe | ProbeRecord], tiers: Sequence[SloTier], catalog: Catalog,
                  params: PricingParams | None = None) -> list[PriceRow]:
    """Price rows for every config (grouped by config.key) and tier, cheapest marked per tier.

    Raises InputError for a probe whose GPU the catalog does not know.
    """
    params = params or PricingParams()
    probes = [r if isinstance(r, SourcedProbe) else SourcedProbe(r, "<memory>", i + 1) for i, r in enumerate(records)]
    for probe in probes:
        if catalog.find_gpu(probe.record.config.gpu_name) is None:
            raise unknown_gpu_error(catalog, probe.record.config.gpu_name, probe.file, probe.line)
    rows = [price_config(group, tier, catalog, params) for group in group_by_config(probes).values() for tier in tiers]
    return mark_cheapest(rows)
