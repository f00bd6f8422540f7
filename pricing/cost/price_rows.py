"""Price rows, pure functions: for each config and SLO tier, the hourly cost at its capacity
turned into input, cached-input and output prices (cost.split, cost.cached), with their
variants, energy and $/request. The row is what every output (console, HTML, JSON) is built
from; which probe sets the capacity is pricing.capacity.choice's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from pydantic import Field

from pricing.capacity.choice import (
    failure_reason,
    group_by_config,
    nearest_probe,
    pick_prefill,
    prefill_rate,
    tier_capacity,
)
from pricing.capacity.curve import Capacity
from pricing.cost.cached import CachedShare, cached_share, served_share
from pricing.cost.catalog import (
    PRICING_TIERS,
    Catalog,
    PricingTier,
    gpu_rate_usd_h,
    unknown_gpu_error,
)
from pricing.cost.split import (
    MTOK,
    Split,
    SplitResult,
    cost_per_request_usd,
    effective_hourly_usd,
    recovering_split,
    request_tokens,
    split_prices,
)
from pricing.measure.server_metrics import cache_hit_share
from pricing.results import SourcedProbe, Warn
from pricing.schema import Frozen, ProbeRecord, SloTier, Strict, config_label


class PricingParams(Frozen):
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
    # open: capacity under independent (Poisson) arrivals, what a service sees; closed: under a
    # fixed number of clients in lockstep, as tools that only measure closed loops report it.
    load_model: Literal["open", "closed"] = "open"


class PricePair(Frozen):
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    cached_input_usd_per_mtok: float | None = None


class EnergyPrices(Frozen):
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


class PriceRow(Frozen):
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
    capacity_probe: str | None = None  # file:line of the probe nearest the capacity (energy, latencies shown)
    prefill_probe: str | None = None
    load_model: Literal["open", "closed"] = "closed"  # which capacity priced the row
    load_level: float | None = None  # concurrency or request rate at the capacity
    capacity_kind: str = "found"  # found / at_least (never violated up to the highest load tried)
    capacity_lower_bound: bool = False  # capacity_kind == at_least: the prices are upper bounds
    capacity_rps: float | None = None
    capacity_rps_low: float | None = None  # its 95% interval (None: not bounded by the probes)
    capacity_rps_high: float | None = None
    # d ln(latency / limit) / d ln(load) at the crossing (curve.Capacity.elasticity): below about
    # 0.5 the limit lies where latency barely rises with load, and a p90 off by 1% moves the
    # capacity by 1 / elasticity percent
    capacity_elasticity: float | None = None
    closed_capacity_rps: float | None = None  # both capacities, when measured, and open / closed
    open_capacity_rps: float | None = None
    open_over_closed: float | None = None
    capacity_probes: int | None = None  # decode probes the capacity was read from
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
    cached_input_usd_per_mtok: float | None = None  # an input token the prefix cache served
    # 95% intervals of the prices, from the capacity's, the prefill rate's and the cached share's (None: unbounded)
    input_usd_per_mtok_low: float | None = None
    input_usd_per_mtok_high: float | None = None
    output_usd_per_mtok_low: float | None = None
    output_usd_per_mtok_high: float | None = None
    cached_input_usd_per_mtok_low: float | None = None
    cached_input_usd_per_mtok_high: float | None = None
    # The cached price as a share of the input price: measured from a prefill-only session replay
    # (cached_probe) beside the fresh prefill probe, or assumed (cost.split.ASSUMED_CACHED_FRACTION).
    cached_fraction: float | None = None
    cached_fraction_low: float | None = None  # its 95% interval (None: unbounded)
    cached_fraction_high: float | None = None
    cached_source: Literal["measured", "assumed"] | None = None
    cached_probe: str | None = None
    # Per request at capacity: input tokens the prefix cache served (part of mean_isl), that share
    # as the server counted it, and the profile's share of input tokens that are history.
    mean_cached_isl: float | None = None
    cache_hit_frac: float | None = None
    history_share: float | None = None
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


# ------------------------------------------------------------------------------------ rows
def per_mtok(split: SplitResult) -> PricePair:
    return PricePair(input_usd_per_mtok=split.input_usd_per_tok * MTOK,
                     output_usd_per_mtok=split.output_usd_per_tok * MTOK,
                     cached_input_usd_per_mtok=split.cached_input_usd_per_tok * MTOK)


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


@dataclass(frozen=True)
class _Operating:
    """A server at its capacity: request rate, tokens per request (cached ones among the input),
    prefill rate, the cached token's share of a new one's price, and power."""

    rate_rps: float
    isl: float
    osl: float
    prefill_tok_s: float | None
    power_w: float | None
    gpu_count: int
    cached_isl: float = 0.0
    cached_fraction: float = 0.0


def _price_at_rate(gpu_rate_usd_h: float, op: _Operating, usd_per_kwh: float, params: PricingParams) -> _AtRate:
    """H, H_eff, c and the prices of one server (one replica) at one GPU rate."""
    energy_usd_h = op.power_w / 1000.0 * usd_per_kwh if op.power_w is not None and params.energy_cost else 0.0
    hourly = op.gpu_count * gpu_rate_usd_h + energy_usd_h
    h_eff = effective_hourly_usd(hourly, params.utilization, params.margin)
    cost = cost_per_request_usd(h_eff, op.rate_rps)
    reason = "no prefill probe (load.kind == 'prefill') for this config"
    cached = dict(mean_cached=op.cached_isl, cached_frac=op.cached_fraction)
    recovering = recovering_split(cost, h_eff, op.isl, op.osl, params.ratio, op.prefill_tok_s, reason, **cached)
    chosen = recovering if params.split == "prefill" else split_prices(
        params.split, cost, h_eff, op.isl, op.osl, params.ratio, op.prefill_tok_s, op.rate_rps * op.isl,
        op.rate_rps * op.osl, **cached)
    return _AtRate(hourly, energy_usd_h, h_eff, cost, chosen, recovering)


def _price_bounds(gpu_rate: float, op: _Operating, cap: Capacity, prefill_ci: tuple[float | None, float | None],
                  share: CachedShare, usd_per_kwh: float, params: PricingParams) -> dict[str, float]:
    """Price intervals: the prices at every corner of the capacity's interval, the prefill
    rate's and the cached share's; empty (unbounded) when any of them is."""
    prefills = prefill_ci if op.prefill_tok_s is not None else (None,)
    ends = [cap.rate_low, cap.rate_high, *prefills] if op.prefill_tok_s is not None else [cap.rate_low, cap.rate_high]
    if any(end is None or end <= 0 for end in ends) or share.low is None or share.high is None:
        return {}
    corners = [_price_at_rate(gpu_rate, replace(op, rate_rps=rate, prefill_tok_s=prefill, cached_fraction=fraction),
                              usd_per_kwh, params).chosen
               for rate in (cap.rate_low, cap.rate_high) for prefill in prefills for fraction in (share.low, share.high)]
    bounds = {}
    for name, price in (("input", lambda c: c.input_usd_per_tok), ("output", lambda c: c.output_usd_per_tok),
                        ("cached_input", lambda c: c.cached_input_usd_per_tok)):
        values = [price(c) * MTOK for c in corners]
        bounds |= {f"{name}_usd_per_mtok_low": min(values), f"{name}_usd_per_mtok_high": max(values)}
    return bounds


def _tokens_per_request(probe: SourcedProbe) -> tuple[float, float]:
    """Mean (ISL, OSL) per request of the traffic measured: the profile's population means as the
    server counted them (schema 2), else the old probe's token rates over its request rate."""
    stats = probe.record.stats
    if stats.lengths_mean is not None and stats.lengths_mean[1] > 0:
        return stats.lengths_mean
    return request_tokens(stats)


def _capacities(probes: Sequence[SourcedProbe], tier: SloTier, params: PricingParams, warn: Warn | None = None
                ) -> tuple[Capacity, Capacity, Capacity, str, list[str]]:
    """The closed- and open-loop capacities, and which one prices the tier (with why)."""
    closed, opened = tier_capacity(probes, tier, "closed", warn), tier_capacity(probes, tier, "open", warn)
    warnings: list[str] = []
    if params.load_model == "closed" or opened.probes == 0:
        if params.load_model == "open":
            warnings.append("no open-loop probes: priced on the closed-loop capacity, which can overstate what "
                            "independent arrivals sustain; sweep again (it resumes) to add the open-loop step")
        return closed, opened, closed, "closed", warnings
    return closed, opened, opened, "open", warnings


def _interval_warnings(cap: Capacity, mode: str) -> list[str]:
    if cap.kind == "at_least":
        return [f"capacity is a lower bound: no {mode}-loop probe up to load {cap.highest_level:g} violated the tier, "
                "so the prices are upper bounds; sweep with a higher --max-level"]
    if cap.half_width is None:
        return [f"the capacity's 95% interval is not bounded by the {mode}-loop probes so far: rerun the sweep "
                f"(it resumes) to resolve it{_flat(cap)}"]
    if cap.half_width > 0.05:
        return [f"capacity known to +-{cap.half_width:.0%} only (95%); rerun the sweep (it resumes) to narrow it{_flat(cap)}"]
    return []


def _flat(cap: Capacity) -> str:
    """Why more probes may not narrow the interval: the tier's limit lies where latency barely
    rises with load (a tier just above the server's unloaded latency)."""
    if not cap.flat:
        return ""
    e = cap.elasticity
    assert e is not None
    return (f". Near the crossing latency rises only {e:.2f}% per 1% of load, so a p90 off by 1% moves the "
            f"capacity {1 / e:.0f}%: longer probes (--min-window-s) narrow it, more probes hardly; a limit 1% looser "
            f"would serve about {1 / e:.0f}% more")


def price_config(probes: Sequence[SourcedProbe], tier: SloTier, catalog: Catalog, params: PricingParams,
                 warn: Warn | None = None) -> PriceRow:
    """The price row of one config (all `probes` share config.key and profile) for one tier.
    `warn` hears about per-request records that are missing (a tier's percentile not stored)."""
    cfg = probes[0].record.config
    n = params.replicas
    base = dict(config_key=cfg.key, profile=probes[0].record.workload, model=cfg.model, scheme=cfg.scheme, tp=cfg.tp,
                gpu_name=cfg.gpu_name, gpu_count=cfg.gpu_count, replicas=n, tier=tier, split=params.split)
    closed, opened, cap, mode, warnings = _capacities(probes, tier, params, warn)
    if cap.kind == "none" or cap.rate_rps is None or cap.rate_rps <= 0:
        return PriceRow(**base, feasible=False, load_model=mode, reason=failure_reason(probes, tier, mode))  # type: ignore[arg-type]
    rates = ({"hourly_rate": params.hourly_rate_usd} if params.hourly_rate_usd is not None else
             {t: r for t in PRICING_TIERS if (r := gpu_rate_usd_h(catalog, cfg.gpu_name, t)) is not None})
    rate = params.hourly_rate_usd if params.hourly_rate_usd is not None else rates.get(params.pricing_tier)
    if rate is None:
        return PriceRow(**base, feasible=False, reason=f"the catalog has no {params.pricing_tier} rate for "
                        f"{cfg.gpu_name}; pass --catalog FILE or --hourly-rate USD")
    near = nearest_probe(probes, mode, cap.level or 0.0)  # type: ignore[arg-type]
    assert near is not None  # a capacity was read from this mode's probes
    stats = near.record.stats
    isl, osl = _tokens_per_request(near)
    prefill = pick_prefill(probes, closed.level if closed.kind != "none" else None)
    region = params.region or catalog.meta.default_region
    energy = near.record.energy
    power_w = energy.energy_j / stats.window_s if energy is not None and stats.window_s > 0 else None
    usd_per_kwh = catalog.regions[region].usd_per_kwh
    prefill_tok_s, prefill_ci = prefill_rate(prefill, warn) if prefill is not None else (None, (None, None))
    share = cached_share(probes)
    hit, hit_warning = served_share(near)
    op = _Operating(cap.rate_rps, isl, osl, prefill_tok_s, power_w, cfg.gpu_count, hit * isl, share.fraction)
    at = _price_at_rate(rate, op, usd_per_kwh, params)
    variants = {t: per_mtok(_price_at_rate(r, op, usd_per_kwh, params).chosen) for t, r in rates.items()}
    bounds = _price_bounds(rate, op, cap, prefill_ci, share, usd_per_kwh, params) if cap.kind == "found" else {}
    pairs = near.record.profile.sample_pairs or [(isl, osl)]
    p_in, p_out, p_cached = at.chosen.input_usd_per_tok, at.chosen.output_usd_per_tok, at.chosen.cached_input_usd_per_tok
    # A request's cached input is taken as the capacity probe's share of its prompt.
    per_request = np.percentile(np.array([i * (1.0 - hit) * p_in + i * hit * p_cached + o * p_out for i, o in pairs]),
                                [50, 90, 99])
    warnings = [*at.chosen.warnings, *warnings, *_interval_warnings(cap, mode)]
    if near.record.load.replays_sessions:
        warnings += [w for w in (share.warning, hit_warning) if w]
    if params.split == "seed":
        warnings.insert(0, "seed convention: NOT cost-recovering (input and output prices each collect the full "
                           "hourly cost, 2x in total); 'recovering' holds the default cost-recovering prices")
        warnings.extend(at.recovering.warnings)
    both = closed.kind == "found" and opened.kind == "found" and closed.rate_rps and opened.rate_rps
    prices = per_mtok(at.chosen)
    scaled = lambda v: v * n if v is not None else None  # noqa: E731
    return PriceRow(
        **base, feasible=True, split_used=at.chosen.split_used, cost_recovering=at.chosen.cost_recovering,
        capacity_probe=near.where, prefill_probe=prefill.where if prefill is not None else None, load_model=mode,
        load_level=cap.level, capacity_kind=cap.kind, capacity_lower_bound=cap.kind == "at_least",
        capacity_rps=cap.rate_rps * n, capacity_rps_low=scaled(cap.rate_low), capacity_rps_high=scaled(cap.rate_high),
        capacity_elasticity=cap.elasticity,
        closed_capacity_rps=scaled(closed.rate_rps) if closed.kind == "found" else None,
        open_capacity_rps=scaled(opened.rate_rps) if opened.kind == "found" else None,
        open_over_closed=opened.rate_rps / closed.rate_rps if both else None,  # type: ignore[operator]
        capacity_probes=cap.probes,
        capacity_input_tok_s=cap.rate_rps * isl * n, capacity_output_tok_s=cap.rate_rps * osl * n,
        ttft_s=stats.latency("ttft", tier.percentile), tpot_s=stats.latency("tpot", tier.percentile),
        error_rate=stats.error_rate, mean_isl=isl, mean_osl=osl, prefill_tok_s=prefill_tok_s,
        gpu_rate_usd_h=rate, hourly_cost_usd=at.hourly_usd * n,
        energy_usd_h=at.energy_usd_h * n if power_w is not None else None,
        effective_hourly_cost_usd=at.effective_usd_h * n, cost_usd_per_request=at.cost_usd,
        input_usd_per_mtok=prices.input_usd_per_mtok, output_usd_per_mtok=prices.output_usd_per_mtok,
        cached_input_usd_per_mtok=prices.cached_input_usd_per_mtok, **bounds,
        cached_fraction=share.fraction, cached_fraction_low=share.low, cached_fraction_high=share.high,
        cached_source=share.source, cached_probe=share.probe,
        mean_cached_isl=hit * isl, cache_hit_frac=cache_hit_share(near.record.server_metrics),
        history_share=near.record.profile.history_share,
        recovering=per_mtok(at.recovering) if params.split == "seed" else None,
        usd_per_request_p50=float(per_request[0]), usd_per_request_p90=float(per_request[1]),
        usd_per_request_p99=float(per_request[2]),
        tok_s_per_usd_h=cap.rate_rps * (isl + osl) / at.effective_usd_h if at.effective_usd_h > 0 else None,
        variants=variants,
        energy=_energy_prices(power_w, cap.rate_rps, at.recovering, at.cost_usd, catalog, region)
        if power_w is not None else None,
        warnings=warnings,
    )


def price_records(records: Sequence[SourcedProbe | ProbeRecord], tiers: Sequence[SloTier], catalog: Catalog,
                  params: PricingParams | None = None, warn: Warn | None = None) -> list[PriceRow]:
    """Price rows for every config (grouped by config.key) and tier, cheapest marked per tier.

    Raises InputError for a probe whose GPU the catalog does not know.
    """
    params = params or PricingParams()
    probes = [r if isinstance(r, SourcedProbe) else SourcedProbe(r, "<memory>", i + 1) for i, r in enumerate(records)]
    for probe in probes:
        if catalog.find_gpu(probe.record.config.gpu_name) is None:
            raise unknown_gpu_error(catalog, probe.record.config.gpu_name, probe.file, probe.line)
    rows = [price_config(group, tier, catalog, params, warn) for group in group_by_config(probes).values()
            for tier in tiers]
    return mark_cheapest(rows)


class PricesFile(Strict):
    """What --json writes: every price row, and the knobs and tiers they were computed with."""

    generated_utc: str
    params: PricingParams
    tiers: list[SloTier]
    catalog_note: str
    errors: list[str]
    rows: list[PriceRow]
