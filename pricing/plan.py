"""Cost planner: fleet decisions from priced configs and a traffic profile's weekly arrivals.

Priced configs (price_records) and the profile's hourly arrival pattern in; static vs autoscaled
fleet, spot mix, cascades, right-sizing and budget alerts out.

`python -m pricing.plan benchmark_results/*.jsonl --tier Baseline --peak-rps 100 [--json plan.json]`
prints rich tables (plan_render.py); the math lives in plan_fleet.py and plan_choices.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console

from pricing.catalog import PRICING_TIERS, Catalog, PricingTier, gpu_rate_usd_h, load_catalog
from pricing.errors import EXIT_INPUT_ERROR, InputError, format_error, from_validation_error, write_output
from pricing.plan_choices import (
    ESTIMATE_FORMULA,
    BudgetPlan,
    CascadePlan,
    CascadePolicy,
    TierSizing,
    plan_budget,
    plan_cascade,
    replica_usd_h,
    size_tier,
)
from pricing.plan_fleet import AutoscalePolicy, FleetPlan, SpotPlan, SpotPolicy, plan_fleet, plan_spot, week_rates_rps
from pricing.capacity import SourcedProbe
from pricing.pricing_math import PriceRow, PricingParams, price_records
from pricing.profile import DEFAULT_PROFILE, load_profile
from pricing.schema import DEFAULT_TIERS, SloTier


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlanOptions(_Frozen):
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


# ------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pricing.plan", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="benchmark_results/*.jsonl probe records")
    p.add_argument("--tier", required=True, help="SLO tier: Baseline, Fast, Instant, or NAME:TTFT_S:TPOT_S[:P[:ERR]]")
    p.add_argument("--peak-rps", type=float, required=True, help="request rate of the busiest hour")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"traffic profile with arrivals (default {DEFAULT_PROFILE})")
    p.add_argument("--catalog", help="TOML file merged over the packaged hardware catalog")
    p.add_argument("--pricing-tier", choices=list(PRICING_TIERS), default="on_demand", help="rate of the fleet")
    p.add_argument("--energy-cost", action="store_true", help="add measured energy x $/kWh (self-hosted)")
    p.add_argument("--config", help="config key or label substring to plan (default: cheapest for the tier)")
    g = p.add_argument_group("autoscaling")
    g.add_argument("--scale-up-util", type=float, default=0.8, help="scale up above this utilization (0.8)")
    g.add_argument("--scale-down-util", type=float, default=0.5, help="scale down below this utilization (0.5)")
    g.add_argument("--scale-up-delay-min", type=int, default=5, help="minutes over threshold before acting (5)")
    g.add_argument("--cold-start-min", type=int, default=3, help="minutes from launch to serving (3)")
    g.add_argument("--scale-down-delay-min", type=int, default=15, help="minutes under threshold before (15)")
    g.add_argument("--scale-to-zero", action="store_true", help="stop the last replica when idle")
    g = p.add_argument_group("spot mix")
    g.add_argument("--spot-baseline", type=int, help="on-demand replicas (default: the week's minimum needed)")
    g.add_argument("--spot-preempt-per-h", type=float, default=0.05, help="preemptions per spot replica-hour")
    g.add_argument("--spot-replace-min", type=float, default=10.0,
                   help="minutes from preemption to a serving replacement")
    g.add_argument("--spot-spare", type=int, default=0, help="spot replicas beyond the needed size")
    g = p.add_argument_group("cascade")
    g.add_argument("--cascade-small", help="small model config (default: the planned config)")
    g.add_argument("--cascade-large", help="large model config, measured")
    g.add_argument("--large-price-in", type=float, metavar="USD", help="large model $/1M input (not measured)")
    g.add_argument("--large-price-out", type=float, metavar="USD", help="large model $/1M output (not measured)")
    g.add_argument("--router-small-frac", type=float, default=0.7, help="share of requests routed to small")
    g.add_argument("--escalate-frac", type=float, default=0.1, help="share of small-routed requests escalated")
    g = p.add_argument_group("budget")
    g.add_argument("--budget-usd", type=float, help="monthly budget; alerts at --alert-pcts")
    g.add_argument("--alert-pcts", type=float, nargs="+", default=[70.0, 90.0, 100.0])
    p.add_argument("--json", help="write the plan here (PlanFile)")
    p.add_argument("--html", help="write a self-contained HTML page with the plan here")
    return p


def _flag(field: str) -> str:
    return "--" + field.replace("_usd_per_mtok", "").replace("_", "-")


def _validated(cls: type[BaseModel], values: dict[str, Any], default_flag: str) -> Any:
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        err = from_validation_error("command line", None, exc)
        err.field = _flag(err.field.split(".")[-1]) if err.field else default_flag
        raise err from None


def options_from_args(args: argparse.Namespace) -> PlanOptions:
    """PlanOptions from parsed flags; a bad value raises InputError naming its flag."""
    v = vars(args)
    pick = lambda cls: {k: v[k] for k in cls.model_fields if k in v}  # noqa: E731
    autoscale = _validated(AutoscalePolicy, pick(AutoscalePolicy), "--scale-down-util")
    spot = _validated(SpotPolicy, pick(SpotPolicy), "--spot-baseline")
    cascade = _validated(CascadePolicy, pick(CascadePolicy), "--router-small-frac")
    if any(p <= 0 for p in args.alert_pcts):
        raise InputError("command line", None, "--alert-pcts", f"percentages must be > 0 (got {args.alert_pcts})")
    return _validated(PlanOptions, dict(
        peak_rps=args.peak_rps, pricing_tier=args.pricing_tier, energy_cost=args.energy_cost, config=args.config,
        autoscale=autoscale, spot=spot, cascade=cascade, cascade_small=args.cascade_small,
        cascade_large=args.cascade_large, large_price_in_usd_per_mtok=args.large_price_in,
        large_price_out_usd_per_mtok=args.large_price_out, budget_usd=args.budget_usd, alert_pcts=args.alert_pcts,
    ), "--peak-rps")


def _arrivals(spec: str) -> tuple[str, list[int], str | None]:
    profile = load_profile(spec)
    if profile.arrivals is None or not any(profile.arrivals.hourly_counts):
        raise InputError(spec, None, "arrivals", f"profile {profile.name} has no hourly arrivals (fixed profiles have "
                         "none); pass --profile with a profile built from timestamped traffic")
    return profile.name, profile.arrivals.hourly_counts, profile.arrivals.window_start_utc


def _probes(files: Sequence[str], catalog: Catalog) -> tuple[list[SourcedProbe], list[InputError], list[str]]:
    from pricing.price import load_records

    records, errors = load_records(files, catalog)
    probes = [r for r in records if isinstance(r, SourcedProbe)]
    skipped = len(records) - len(probes)
    notes = [f"{skipped} seed-calculator record(s) skipped: they carry no request rate"] if skipped else []
    return probes, errors, notes


def run(args: argparse.Namespace) -> PlanFile:
    """The plan for parsed flags; every bad input raises InputError."""
    from pricing.price import parse_tiers

    catalog = load_catalog(args.catalog)
    opts = options_from_args(args)
    (tier,) = parse_tiers([args.tier])
    profile, counts, week_start = _arrivals(args.profile)
    probes, errors, notes = _probes(args.files, catalog)
    if errors:
        raise errors[0]
    if not probes:
        raise InputError(args.files[0], None, "", "no probe records to plan from")
    tiers = [*DEFAULT_TIERS, *([tier] if tier.name not in {t.name for t in DEFAULT_TIERS} else [])]
    params = PricingParams(pricing_tier=opts.pricing_tier, energy_cost=opts.energy_cost)
    rows = price_records(probes, tiers, catalog, params)
    plan = build_plan(rows, tier, profile, counts, catalog, opts, [t.name for t in tiers])
    return plan.model_copy(update={
        "generated_utc": datetime.now(UTC).isoformat(timespec="seconds"), "files": [str(f) for f in args.files],
        "week_start_utc": week_start, "warnings": [*notes, *plan.warnings],
    })


def main(argv: Sequence[str] | None = None, out: Console | None = None, err: Console | None = None) -> int:
    """Run the CLI; returns the exit code (2 on bad input). Prints; never raises for bad input."""
    from pricing.plan_render import render_plan

    args = _parser().parse_args(argv)
    out = out or (Console() if sys.stdout.isatty() else Console(width=150))
    err = err or Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        plan = run(args)
        render_plan(plan, out)
        for warning in plan.warnings:
            err.print(f"warning: {warning}", markup=False)
        if args.json:
            write_output(args.json, "--json", plan.model_dump_json(indent=2))
        if args.html:
            from pricing.report import plan_section_html

            page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>vLLM cost plan</title></head><body>"
                    f"{plan_section_html(plan)}</body></html>")
            write_output(args.html, "--html", page)
    except InputError as exc:
        err.print(format_error(exc), markup=False)
        return EXIT_INPUT_ERROR
    return 0


__all__ = ["ESTIMATE_FORMULA", "PlanFile", "PlanOptions", "build_plan", "choose_config", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
