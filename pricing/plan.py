"""`python -m pricing.plan` (`vllm-price-plan`): a cost plan from benchmark_results/*.jsonl and a
traffic profile's weekly arrivals, printed as rich tables (the plan itself is pricing.planning).

`python -m pricing.plan benchmark_results/*.jsonl --tier Baseline --peak-rps 100 [--json plan.json]`
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError
from rich.console import Console

from pricing.cost.catalog import PRICING_TIERS, Catalog, load_catalog
from pricing.cost.price_rows import PricingParams, price_records
from pricing.errors import (
    EXIT_INPUT_ERROR,
    InputError,
    format_error,
    from_validation_error,
    write_output,
)
from pricing.measure.slo import parse_tiers
from pricing.planning.choices import CascadePolicy
from pricing.planning.fleet import AutoscalePolicy, SpotPolicy
from pricing.planning.plan import PlanFile, PlanOptions, build_plan
from pricing.report.plan_console import render_plan
from pricing.results import SourcedProbe, Warn, load_records
from pricing.schema import DEFAULT_TIERS
from pricing.workload.profile import DEFAULT_PROFILE, load_profile


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pricing.plan", description="Plan a fleet from priced configs and a profile's weekly arrivals.")
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


def _probes(files: Sequence[str], catalog: Catalog, warn: Warn | None
            ) -> tuple[list[SourcedProbe], list[InputError], list[str]]:
    records, errors = load_records(files, catalog, warn)
    probes = [r for r in records if isinstance(r, SourcedProbe)]
    skipped = len(records) - len(probes)
    notes = [f"{skipped} seed-calculator record(s) skipped: they carry no request rate"] if skipped else []
    return probes, errors, notes


def run(args: argparse.Namespace, warn: Warn | None = None) -> PlanFile:
    """The plan for parsed flags; every bad input raises InputError. `warn` is told of what was
    read past (a torn last line)."""
    catalog = load_catalog(args.catalog)
    opts = options_from_args(args)
    (tier,) = parse_tiers([args.tier])
    profile, counts, week_start = _arrivals(args.profile)
    probes, errors, notes = _probes(args.files, catalog, warn)
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
    args = _parser().parse_args(argv)
    out = out or (Console() if sys.stdout.isatty() else Console(width=150))
    err = err or Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        plan = run(args, warn=lambda w: err.print(f"warning: {w}", markup=False))
        render_plan(plan, out)
        for warning in plan.warnings:
            err.print(f"warning: {warning}", markup=False)
        if args.json:
            write_output(args.json, "--json", plan.model_dump_json(indent=2))
        if args.html:
            from pricing.report.plan_html import plan_section_html

            page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>vLLM cost plan</title></head><body>"
                    f"{plan_section_html(plan)}</body></html>")
            write_output(args.html, "--html", page)
    except InputError as exc:
        err.print(format_error(exc), markup=False)
        return EXIT_INPUT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
