"""`python -m pricing.price` (`vllm-price`): price vLLM configs from benchmark_results/*.jsonl
(and seed calculator files) per SLO tier.

`python -m pricing.price benchmark_results/*.jsonl [--split prefill|ratio|seed] [--html F] [--json F]`
prints a rich matrix (configs x tiers); the money is pricing.cost, the pages pricing.report.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from pydantic import ValidationError
from rich.console import Console

from pricing.cost.catalog import PRICING_TIERS, Catalog, load_catalog
from pricing.cost.price_rows import (
    PricesFile,
    PricingParams,
    mark_cheapest,
    price_records,
)
from pricing.cost.seed_prices import price_seed
from pricing.errors import (
    EXIT_INPUT_ERROR,
    InputError,
    format_error,
    from_validation_error,
    write_output,
)
from pricing.measure.slo import parse_tiers
from pricing.report.console import render_matrix, row_warnings
from pricing.results import SeedServer, SourcedProbe, load_records


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pricing.price", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="benchmark_results/*.jsonl probe records, or seed calculator files")
    p.add_argument("--catalog", help="TOML file merged over the packaged hardware catalog (key by key)")
    p.add_argument("--tier", action="extend", nargs="+", metavar="NAME",
                   help="SLO tiers: Baseline, Fast, Instant, or NAME:TTFT_S:TPOT_S[:PERCENTILE[:MAX_ERROR_RATE]]")
    p.add_argument("--split", choices=["prefill", "ratio", "seed"], default="prefill")
    p.add_argument("--load-model", choices=["open", "closed"], default="open",
                   help="capacity under open-loop (Poisson) arrivals, what a service sees (default), or under a "
                        "closed loop of fixed concurrency, as tools that only measure closed loops report it")
    p.add_argument("--ratio", type=float, default=4.0, help="p_out / p_in for the ratio split (default 4)")
    p.add_argument("--utilization", type=float, default=1.0, help="share of capacity sold, 0 < U <= 1 (default 1)")
    p.add_argument("--margin", type=float, default=0.0, help="markup over cost, e.g. 0.2 for 20%% (default 0)")
    p.add_argument("--pricing-tier", choices=list(PRICING_TIERS), default="on_demand")
    p.add_argument("--hourly-rate", type=float, metavar="USD",
                   help="USD per GPU-hour replacing the catalog rate (seed files: per server-hour C, default 5)")
    p.add_argument("--replicas", type=int, default=1, help="servers behind one endpoint (scales capacity and cost)")
    p.add_argument("--region", help="region for energy price and carbon (catalog default when omitted)")
    p.add_argument("--energy-cost", action="store_true",
                   help="self-hosted: add measured energy x $/kWh to the hourly cost (cloud rates already include power)")
    p.add_argument("--profile", help="traffic profile name for the ISL/OSL histograms of the HTML report")
    p.add_argument("--html", help="write a self-contained Plotly HTML report here")
    p.add_argument("--json", help="write every price row here (PricesFile)")
    p.add_argument("--keep-going", action="store_true", help="skip each bad record (one line naming file:line and "
                   "the field) or unreadable file and price the rest; the exit code is still 2")
    return p


def _params(args: argparse.Namespace, catalog: Catalog) -> PricingParams:
    if args.region is not None and args.region not in catalog.regions:
        raise InputError("--region", None, args.region, f"unknown region; known: {', '.join(sorted(catalog.regions))}")
    values = dict(split=args.split, ratio=args.ratio, utilization=args.utilization, margin=args.margin,
                  pricing_tier=args.pricing_tier, hourly_rate_usd=args.hourly_rate, replicas=args.replicas,
                  region=args.region, energy_cost=args.energy_cost, load_model=args.load_model)
    try:
        return PricingParams.model_validate(values)
    except ValidationError as exc:
        err = from_validation_error("command line", None, exc)
        err.field = "--" + err.field.replace("_usd", "").replace("_", "-")
        raise err from None


def _load_profile(name: str | None, err: Console) -> object | None:
    if not name:
        return None
    try:
        from pricing.workload.profile import load_profile
    except ImportError as exc:
        err.print(f"warning: --profile ignored: pricing.profile is not available ({exc})")
        return None
    try:
        return load_profile(name)
    except Exception as exc:  # noqa: BLE001 - any failure here only drops the histograms
        err.print(f"warning: --profile {name}: {exc}; the report omits the ISL/OSL histograms")
        return None


def main(argv: Sequence[str] | None = None, out: Console | None = None, err: Console | None = None) -> int:
    """Run the CLI; returns the exit code (2 on bad input). Prints; never raises for bad input."""
    args = _parser().parse_args(argv)
    out = out or (Console() if sys.stdout.isatty() else Console(width=150))
    err = err or Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        catalog = load_catalog(args.catalog)
        params = _params(args, catalog)
        tiers = parse_tiers(args.tier)
    except InputError as exc:
        err.print(format_error(exc), markup=False)
        return EXIT_INPUT_ERROR
    said: set[str] = set()

    def warn(message: str) -> None:  # once each: the same file can be asked about per tier and config
        if message not in said:
            said.add(message)
            err.print(f"warning: {message}", markup=False)

    records, errors = load_records(args.files, catalog, warn=warn, keep_going=args.keep_going)
    for exc in errors:
        err.print(format_error(exc), markup=False)
    if errors and not args.keep_going:
        err.print(f"{len(errors)} file(s) with errors; nothing priced (--keep-going skips the bad records and "
                  "prices the rest)", markup=False)
        return EXIT_INPUT_ERROR
    probes = [r for r in records if isinstance(r, SourcedProbe)]
    seeds = [r for r in records if isinstance(r, SeedServer)]
    rows = mark_cheapest(price_records(probes, tiers, catalog, params, warn) + price_seed(seeds, tiers, params))
    if not rows:
        err.print("error: nothing to price", markup=False)
        return EXIT_INPUT_ERROR
    render_matrix(rows, params, out)
    for warning in row_warnings(rows):
        err.print(f"warning: {warning}", markup=False)
    try:
        if args.json:
            document = PricesFile(generated_utc=datetime.now(UTC).isoformat(timespec="seconds"), params=params,
                                  tiers=list(tiers), catalog_note=catalog.meta.note, errors=[str(e) for e in errors],
                                  rows=rows)
            write_output(args.json, "--json", document.model_dump_json(indent=2))
        if args.html:
            from pricing.report.html import build_report_html

            profile = _load_profile(args.profile, err)
            write_output(args.html, "--html", build_report_html(rows, probes, tiers, params, catalog, profile=profile))
    except InputError as exc:
        err.print(format_error(exc), markup=False)
        return EXIT_INPUT_ERROR
    return EXIT_INPUT_ERROR if errors else 0


if __name__ == "__main__":
    sys.exit(main())
