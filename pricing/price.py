"""CLI: price vLLM configs from benchmark_results/*.jsonl (and seed calculator files) per SLO tier.

`python -m pricing.price benchmark_results/*.jsonl [--split prefill|ratio|seed] [--html F] [--json F]`
prints a rich matrix (configs x tiers); the math lives in pricing_math.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError
from rich.console import Console
from rich.table import Table

from pricing.catalog import PRICING_TIERS, Catalog, load_catalog, unknown_gpu_error
from pricing.errors import EXIT_INPUT_ERROR, InputError, format_error, from_validation_error, write_output
from pricing.capacity import SourcedProbe, fmt_ms, fmt_s
from pricing.pricing_math import PriceRow, PricingParams, mark_cheapest, price_records
from pricing.schema import DEFAULT_TIERS, SCHEMA_VERSION, ProbeRecord, SloTier
from pricing.seed_format import SeedServer, looks_like_seed, parse_seed_line, price_seed

__all__ = ["PricesFile", "load_records", "main", "parse_tiers", "price_records", "read_result_file", "render_matrix"]

Loaded = SourcedProbe | SeedServer


class PricesFile(BaseModel):
    """What --json writes: every price row, and the knobs and tiers they were computed with."""

    model_config = ConfigDict(extra="forbid")

    generated_utc: str
    params: PricingParams
    tiers: list[SloTier]
    catalog_note: str
    errors: list[str]
    rows: list[PriceRow]


# ------------------------------------------------------------------------------------ reading
def read_result_file(path: str | Path, catalog: Catalog | None = None) -> list[Loaded]:
    """Every record of one result file (ours or the seed's, by shape); the first problem raises InputError."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(file, None, "", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(file, None, "", f"cannot read the file: {exc}") from None
    items: list[Loaded] = []
    first: tuple[int, str, object] | None = None  # line, kind, schema_version of the first record
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(file, number, "", f"malformed JSON at column {exc.colno}: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise InputError(file, number, "", f"expected one JSON object per line, got {type(obj).__name__}")
        kind = "seed" if looks_like_seed(obj) else "probe"
        if kind == "probe" and "schema_version" not in obj:
            raise InputError(file, number, "schema_version", "required field is missing (probe records carry "
                             "schema_version; seed calculator files carry id and measurements)")
        version = obj.get("schema_version")
        if first is None:
            first = (number, kind, version)
        elif kind != first[1]:
            raise InputError(file, number, "schema_version" if first[1] == "probe" else "measurements",
                             f"mixed formats in one file: line {first[0]} is a {first[1]} record, "
                             f"this line a {kind} record")
        elif version != first[2]:
            raise InputError(file, number, "schema_version", f"mixed schema versions in one file: line {first[0]} "
                             f"has {first[2]!r}, this line {version!r}; price each version from its own file")
        if kind == "seed":
            items.append(parse_seed_line(obj, file, number))
            continue
        if version != SCHEMA_VERSION:
            raise InputError(file, number, "schema_version",
                             f"unsupported schema version {version!r}; this pricer reads version {SCHEMA_VERSION}")
        try:
            record = ProbeRecord.model_validate(obj)
        except ValidationError as exc:
            raise from_validation_error(file, number, exc) from None
        if catalog is not None and catalog.find_gpu(record.config.gpu_name) is None:
            raise unknown_gpu_error(catalog, record.config.gpu_name, file, number)
        items.append(SourcedProbe(record, file, number))
    if not items:
        raise InputError(file, 1, "", "empty file: no records (expected one JSON object per line)")
    return items


def load_records(paths: Sequence[str | Path], catalog: Catalog | None = None) -> tuple[list[Loaded], list[InputError]]:
    """Records of every readable file, and one InputError per file that could not be read whole."""
    records: list[Loaded] = []
    errors: list[InputError] = []
    for path in paths:
        try:
            records.extend(read_result_file(path, catalog))
        except InputError as err:
            errors.append(err)
    return records, errors


def parse_tiers(specs: Sequence[str] | None) -> tuple[SloTier, ...]:
    """`--tier` values: a default tier name, or NAME:TTFT_S:TPOT_S[:PERCENTILE[:MAX_ERROR_RATE]]."""
    if not specs:
        return DEFAULT_TIERS
    known = {t.name.casefold(): t for t in DEFAULT_TIERS}
    tiers = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) == 1:
            if spec.casefold() not in known:
                names = ", ".join(t.name for t in DEFAULT_TIERS)
                raise InputError("--tier", None, spec,
                                 f"unknown tier; known: {names}, or give NAME:TTFT_S:TPOT_S[:P[:ERR]]")
            tiers.append(known[spec.casefold()])
            continue
        fields = ["name", "ttft_s", "tpot_s", "percentile", "max_error_rate"]
        values: dict[str, object] = dict(zip(fields, parts, strict=False))
        if str(values.get("percentile", "")).isdigit():
            values["percentile"] = int(str(values["percentile"]))
        try:
            tiers.append(SloTier.model_validate(values))
        except ValidationError as exc:
            raise from_validation_error(f"--tier {spec}", None, exc) from None
    return tuple(tiers)


# ------------------------------------------------------------------------------------ console
def _usd(value: float) -> str:
    if value >= 100:
        return f"${value:,.0f}"
    return f"${value:.2f}" if value >= 1 else f"${value:.3g}"


def _cell(row: PriceRow) -> str:
    if not row.feasible:
        return f"[red]✗ {row.reason}[/red]"
    star = " [bold yellow]★ cheapest[/]" if row.cheapest else ""
    lines = [f"in {_usd(row.input_usd_per_mtok or 0)} · out {_usd(row.output_usd_per_mtok or 0)} /1M{star}"]
    if row.capacity_rps is not None:
        at_least = "≥ " if row.capacity_lower_bound else ""
        lines.append(f"{at_least}{row.capacity_rps:.3g} req/s · {row.capacity_output_tok_s or 0:,.0f} out tok/s")
    else:
        lines.append(f"{row.capacity_output_tok_s or 0:,.0f} out tok/s (batch {row.load_level:g})")
    if row.recovering is not None:
        recovering = row.recovering
        lines.append(f"[magenta]not cost-recovering (collects 2x); recovering: in {_usd(recovering.input_usd_per_mtok)}"
                     f" · out {_usd(recovering.output_usd_per_mtok)}[/]")
    if row.split_used != row.split:
        lines.append(f"[yellow]split: {row.split_used} (FALLBACK: no prefill probe)[/]")
    if row.energy is not None:
        lines.append(f"{row.energy.output_kwh_per_mtok:.3g} kWh/1M out")
    return "\n".join(lines)


def _tier_header(tier: SloTier, seed_only: bool) -> str:
    pct = "mean" if seed_only else f"p{tier.percentile}"
    return f"{tier.name}\nTTFT {pct} ≤ {fmt_s(tier.ttft_s)}\nTPOT {pct} ≤ {fmt_ms(tier.tpot_s)}"


def render_matrix(rows: Sequence[PriceRow], params: PricingParams, console: Console) -> None:
    """The configs x tiers table, then the definitions line and the warnings."""
    tiers = list({r.tier.name: r.tier for r in rows}.values())
    configs = list({(r.config_key, r.profile): r for r in rows}.values())
    seed_only = all(r.source == "seed" for r in rows)
    table = Table(title="$ per 1M tokens (input · output) at SLO capacity", show_lines=True)
    table.add_column("config (model · scheme · TP · GPUs)", overflow="fold")
    for tier in tiers:
        table.add_column(_tier_header(tier, seed_only), overflow="fold")
    cells = {(r.config_key, r.profile, r.tier.name): r for r in rows}
    for config in configs:
        label = config.label + (" [dim](seed file)[/]" if config.source == "seed" else "")
        table.add_row(label, *[_cell(cells[config.config_key, config.profile, t.name]) for t in tiers])
    console.print(table)
    rate = (f"--hourly-rate ${params.hourly_rate_usd:g}/h per GPU (per server for seed files)"
            if params.hourly_rate_usd is not None
            else f"pricing tier {params.pricing_tier} (catalog list-price snapshots)")
    split = {"prefill": "prefill (p_in = H_eff/3600/prefill tok/s; output takes the rest)",
             "ratio": f"ratio (p_out = {params.ratio:g} x p_in)",
             "seed": "seed (p_in = H_eff/3600/input tok/s, p_out = H_eff/3600/output tok/s: "
                     "collects 2x, NOT cost-recovering)"}
    console.print(
        f"Definitions: split {split[params.split]}; utilization {params.utilization:g}; margin {params.margin:.0%}; "
        f"{rate}; replicas {params.replicas}. H = GPUs x rate (+ measured energy x $/kWh), "
        "H_eff = H / utilization x (1 + margin); capacity = the highest decode request rate meeting the tier "
        "(TTFT and TPOT at the tier's percentile, error rate); prices recover c = H_eff / (3600 x capacity) at the "
        "capacity probe's tokens per request (token rates / request rate). ≥ = lower bound: no probe above it "
        "failed the tier. ★ = cheapest config per tier (cost per request; seed files: output price).",
        style="dim",
    )


def _warnings(rows: Sequence[PriceRow]) -> list[str]:
    """Each distinct warning once per config, with the tiers it applies to."""
    tiers_of: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        for warning in row.warnings:
            if warning.startswith("seed convention"):
                continue  # the definitions line says it once
            tiers_of.setdefault((row.label, warning), []).append(row.tier.name)
    return [f"{label} [{', '.join(tiers)}]: {warning}" for (label, warning), tiers in tiers_of.items()]


# ------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pricing.price", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="benchmark_results/*.jsonl probe records, or seed calculator files")
    p.add_argument("--catalog", help="TOML file merged over the packaged hardware catalog (key by key)")
    p.add_argument("--tier", action="extend", nargs="+", metavar="NAME",
                   help="SLO tiers: Baseline, Fast, Instant, or NAME:TTFT_S:TPOT_S[:PERCENTILE[:MAX_ERROR_RATE]]")
    p.add_argument("--split", choices=["prefill", "ratio", "seed"], default="prefill")
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
    p.add_argument("--keep-going", action="store_true", help="price the readable files when others have errors")
    return p


def _params(args: argparse.Namespace, catalog: Catalog) -> PricingParams:
    if args.region is not None and args.region not in catalog.regions:
        raise InputError("--region", None, args.region, f"unknown region; known: {', '.join(sorted(catalog.regions))}")
    values = dict(split=args.split, ratio=args.ratio, utilization=args.utilization, margin=args.margin,
                  pricing_tier=args.pricing_tier, hourly_rate_usd=args.hourly_rate, replicas=args.replicas,
                  region=args.region, energy_cost=args.energy_cost)
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
        from pricing.profile import load_profile
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
    records, errors = load_records(args.files, catalog)
    for exc in errors:
        err.print(format_error(exc), markup=False)
    if errors and not args.keep_going:
        err.print(f"{len(errors)} file(s) with errors; nothing priced (--keep-going prices the other files)",
                  markup=False)
        return EXIT_INPUT_ERROR
    probes = [r for r in records if isinstance(r, SourcedProbe)]
    seeds = [r for r in records if isinstance(r, SeedServer)]
    rows = mark_cheapest(price_records(probes, tiers, catalog, params) + price_seed(seeds, tiers, params))
    if not rows:
        err.print("error: nothing to price", markup=False)
        return EXIT_INPUT_ERROR
    render_matrix(rows, params, out)
    for warning in _warnings(rows):
        err.print(f"warning: {warning}", markup=False)
    try:
        if args.json:
            document = PricesFile(generated_utc=datetime.now(UTC).isoformat(timespec="seconds"), params=params,
                                  tiers=list(tiers), catalog_note=catalog.meta.note, errors=[str(e) for e in errors],
                                  rows=rows)
            write_output(args.json, "--json", document.model_dump_json(indent=2))
        if args.html:
            from pricing.report import build_report_html

            profile = _load_profile(args.profile, err)
            write_output(args.html, "--html", build_report_html(rows, probes, tiers, params, catalog, profile=profile))
    except InputError as exc:
        err.print(format_error(exc), markup=False)
        return EXIT_INPUT_ERROR
    return EXIT_INPUT_ERROR if errors else 0


if __name__ == "__main__":
    sys.exit(main())
