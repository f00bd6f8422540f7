"""Cost planner: fleet decisions from priced configs and a traffic profile's weekly arrivals.

Priced configs (price rows) and the profile's hourly arrival pattern in; static vs autoscaled
fleet, spot mix, cascades, right-sizing and budget alerts out, as one PlanFile. The math lives
in planning.fleet and planning.choices; `python -m pricing.plan` reads files and prints.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from pricing.cost.catalog import Catalog, PricingTier, gpu_rate_usd_h
from pricing.cost.price_rows import PriceRow
from pricing.errors import InputError
from pricing.planning.choices import (
    BudgetPlan,
    CascadePlan,
    CascadePolicy,
    TierSizing,
    plan_budget,
    plan_cascade,
    replica_usd_h,
    size_tier,
)
from pricing.planning.fleet import (
    AutoscalePolicy,
    FleetPlan,
    SpotPlan,
    SpotPolicy,
    plan_fleet,
    plan_spot,
    week_rates_rps,
)
from pricing.schema import Frozen, SloTier


class PlanOptions(Frozen):
    """Knobs of one plan (CLI flags; nested policies carry their own)."""

    peak_rps: float = Field(gt=0)
    pricing_tier: PricingTier = "on_demand"
    energy_cost: bool = False  # cloud rates include power; True adds measured energy x $/kWh like pricing.price
    config: str | None = None  # config key or label substring; None: the cheapest per request for the tier
    autoscale: AutoscalePolicy = AutoscalePolicy()
    spot: SpotPolicy = SpotPolicy()
    cascade: CascadePolicy = CascadePolicy()
    cascade_small: str | None = None  # None: the fleet's config
    cascade_large: str | None = None
    large_price_in_usd_per_mtok: float | None = Field(default=None, ge=0)
    large_price_out_usd_per_mtok: float | None = Field(default=None, ge=0)
    budget_usd: float | None = Field(default=None, gt=0)
    alert_pcts: list[float] = Field(default_factory=lambda: [70.0, 90.0, 100.0])


class PlanFile(BaseModel):
    """What --json writes (and plan_section_html renders)."""

    model_config = ConfigDict(extra="forbid")

    generated_utc: str = ""
    files: list[str] = Field(default_factory=list)
    tier: SloTier
    profile: str
    week_start_utc: str | None = None  # hour 0 of the week
    options: PlanOptions
    fleet: FleetPlan
    spot: SpotPlan | None = None
    cascade: CascadePlan | None = None
    right_sizing: list[TierSizing]
    budgets: list[BudgetPlan] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------------------ choosing rows
def tier_rows(rows: Sequence[PriceRow], tier: str, profile: str) -> tuple[list[PriceRow], list[str]]:
    """Rows of one tier measured with the planned traffic profile; all of the tier's rows (warned) if none are."""
    of_tier = [r for r in rows if r.tier.name == tier]
    same = [r for r in of_tier if r.profile == profile]
    if same or not of_tier:
        return same, []
    measured = ", ".join(sorted({r.profile for r in of_tier}))
    return of_tier, [f"no config was measured with profile {profile}; capacities come from profile(s) {measured}, "
                     f"so prices and fleet sizes assume that traffic mix"]


def match_config(rows: Sequence[PriceRow], spec: str, option: str) -> PriceRow:
    """The one row whose config key equals `spec`, else whose key or label contains it (case-insensitive)."""
    exact = [r for r in rows if r.config_key == spec]
    found = exact or [r for r in rows if spec.casefold() in r.config_key.casefold()
                      or spec.casefold() in r.label.casefold()]
    keys = sorted({r.config_key for r in found})
    if len(keys) != 1:
        known = ", ".join(sorted({r.config_key for r in rows}))
        what = f"matches {len(keys)} configs ({', '.join(keys)})" if keys else "matches no config"
        raise InputError(option, None, spec, f"{what}; give a config key: {known}")
    return next(r for r in found if r.config_key == keys[0])


def feasible_or_error(row: PriceRow, option: str, spec: str) -> PriceRow:
    if not row.feasible or not row.capacity_rps:
        raise InputError(option, None, spec, f"{row.config_key} does not meet tier {row.tier.name}: {row.reason}")
    return row


def choose_config(rows: Sequence[PriceRow], tier: SloTier, spec: str | None) -> PriceRow:
    """`--config` when given, else the feasible row with the lowest cost per request."""
    if spec is not None:
        return feasible_or_error(match_config(rows, spec, "--config"), "--config", spec)
    feasible = [r for r in rows if r.feasible and r.capacity_rps and r.cost_usd_per_request is not None]
    if not feasible:
        reasons = "; ".join(sorted({f"{r.config_key}: {r.reason}" for r in rows})) or "no measured config"
        raise InputError("--tier", None, tier.name, f"no measured config meets this tier ({reasons})")
    return min(feasible, key=lambda r: r.cost_usd_per_request or 0.0)


# ------------------------------------------------------------------------------------ the plan
def _cascade(rows: Sequence[PriceRow], fleet_row: PriceRow, opts: PlanOptions) -> CascadePlan | None:
    prices = (opts.large_price_in_usd_per_mtok, opts.large_price_out_usd_per_mtok)
    if opts.cascade_large is None and prices == (None, None):
        return None
    if opts.cascade_large is not None and prices != (None, None):
        raise InputError("--cascade-large", None, opts.cascade_large,
                         "give either a measured large config or --large-price-in/--large-price-out, not both")
    if opts.cascade_large is None and None in prices:
        missing = "--large-price-out" if prices[1] is None else "--large-price-in"
        raise InputError(missing, None, "", "both --large-price-in and --large-price-out are needed (USD per 1M)")
    small = fleet_row if opts.cascade_small is None else feasible_or_error(
        match_config(rows, opts.cascade_small, "--cascade-small"), "--cascade-small", opts.cascade_small)
    small_prices = (small.input_usd_per_mtok or 0.0, small.output_usd_per_mtok or 0.0)
    if opts.cascade_large is None:
        return plan_cascade(small_prices, (prices[0] or 0.0, prices[1] or 0.0), opts.cascade, small.label,
                            "large model priced on the command line (not measured)", "command line")
    large = feasible_or_error(match_config(rows, opts.cascade_large, "--cascade-large"), "--cascade-large",
                              opts.cascade_large)
    large_prices = (large.input_usd_per_mtok or 0.0, large.output_usd_per_mtok or 0.0)
    return plan_cascade(small_prices, large_prices, opts.cascade, small.label, large.label, "measured")


def _budgets(fleet: FleetPlan, spot: SpotPlan | None, opts: PlanOptions) -> list[BudgetPlan]:
    if opts.budget_usd is None:
        return []
    series = {
        "static": [fleet.static_replicas * fleet.replica_usd_h] * len(fleet.rates_rps),
        "autoscaled": [n * fleet.replica_usd_h for n in fleet.autoscaled_replicas],
    }
    if spot is not None:
        series["spot mix"] = spot.hourly_usd
    return [plan_budget(name, hourly, opts.budget_usd, opts.alert_pcts) for name, hourly in series.items()]


def build_plan(rows: Sequence[PriceRow], tier: SloTier, profile: str, hourly_counts: Sequence[float],
               catalog: Catalog, opts: PlanOptions, sizing_tiers: Sequence[str] = ()) -> PlanFile:
    """Every part of the plan from price rows (priced with replicas = 1) and an hourly arrival pattern."""
    rows_t, warnings = tier_rows(rows, tier.name, profile)
    row = choose_config(rows_t, tier, opts.config)
    rate = gpu_rate_usd_h(catalog, row.gpu_name, opts.pricing_tier)
    if rate is None:
        raise InputError("--pricing-tier", None, opts.pricing_tier, f"the catalog has no such rate for {row.gpu_name}; "
                         "pass --catalog FILE with one")
    usd_h = replica_usd_h(row, rate, opts.energy_cost)
    rates = week_rates_rps(hourly_counts, opts.peak_rps)
    fleet = plan_fleet(rates, row.capacity_rps or 0.0, usd_h, opts.autoscale, row.config_key, row.label)
    on_demand = gpu_rate_usd_h(catalog, row.gpu_name, "on_demand")
    spot_rate = gpu_rate_usd_h(catalog, row.gpu_name, "spot")
    spot = None
    if on_demand is None or spot_rate is None:
        warnings.append(f"spot mix skipped: the catalog lacks an on_demand or spot rate for {row.gpu_name}")
    else:
        spot = plan_spot(rates, fleet.needed_replicas, opts.spot, replica_usd_h(row, on_demand, opts.energy_cost),
                         replica_usd_h(row, spot_rate, opts.energy_cost))
    cascade = _cascade(rows_t, row, opts)
    sizing = []
    for name in dict.fromkeys([*sizing_tiers, tier.name]):
        of_tier, _ = tier_rows(rows, name, profile)
        sizing.append(size_tier(name, of_tier, catalog, opts.pricing_tier, opts.energy_cost))
    return PlanFile(tier=tier, profile=profile, options=opts, fleet=fleet, spot=spot, cascade=cascade,
                    right_sizing=sizing, budgets=_budgets(fleet, spot, opts), warnings=warnings)
