"""The pricing matrix on the console (configs x SLO tiers, rich), its definitions line, and the
row warnings gathered once per config."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from pricing.capacity.curve import Capacity
from pricing.cost.price_rows import PriceRow, PricingParams
from pricing.cost.split import ASSUMED_CACHED_FRACTION
from pricing.schema import SloTier
from pricing.units import fmt_ms, fmt_s, fmt_usd, plus_minus


def price_text(value: float | None, low: float | None, high: float | None, row: PriceRow) -> str:
    """A price with its interval ('$0.078 ± 3%'); an upper bound where the capacity is a lower bound."""
    if value is None:
        return "-"
    if row.source == "seed":
        return fmt_usd(value)
    if row.capacity_lower_bound:
        return f"≤ {fmt_usd(value)}"
    return f"{fmt_usd(value)} {plus_minus(value, low, high)}"


def describe_capacity(cap: Capacity, mode: str) -> str:
    """One capacity for people: its request rate with the interval, and the load it was found at."""
    if cap.probes == 0:
        return "not measured"
    if cap.kind == "none":
        return f"none: violated already at the lowest load tried ({cap.lowest_level:g})"
    if cap.kind == "at_least":
        return f"≥ {cap.rate_rps:.3g} req/s: never violated up to {'c=' if mode == 'closed' else ''}{cap.highest_level:g}"
    load = f"c={cap.level:g}" if mode == "closed" else f"{cap.level:.3g} req/s offered"
    return f"{cap.rate_rps:.3g} req/s {plus_minus(cap.rate_rps or 0, cap.rate_low, cap.rate_high)} ({load}, {cap.probes} probes)"


def _cell(row: PriceRow) -> str:
    if not row.feasible:
        return f"[red]✗ {row.reason}[/red]"
    star = " [bold yellow]★ cheapest[/]" if row.cheapest else ""
    cached = ""
    if row.cached_input_usd_per_mtok is not None:
        cached = (f" · cached {price_text(row.cached_input_usd_per_mtok, row.cached_input_usd_per_mtok_low, row.cached_input_usd_per_mtok_high, row)}"
                  + (" (assumed)" if row.cached_source == "assumed" else ""))
    lines = [f"in {price_text(row.input_usd_per_mtok, row.input_usd_per_mtok_low, row.input_usd_per_mtok_high, row)}"
             f"{cached} · out {price_text(row.output_usd_per_mtok, row.output_usd_per_mtok_low, row.output_usd_per_mtok_high, row)}"
             f" /1M{star}"]
    if row.history_share is not None and row.mean_isl:
        served = (row.mean_cached_isl or 0.0) / row.mean_isl
        fraction = f"{row.cached_fraction or 0:.0%}"
        if row.cached_source == "measured":
            low, high = row.cached_fraction_low, row.cached_fraction_high
            fraction += f" [{'?' if low is None else f'{low:.0%}'}, {'?' if high is None else f'{high:.0%}'}]"
        lines.append(f"prefix cache served {served:.0%} of input (history {row.history_share:.0%}) · cached = "
                     f"{fraction} of input price ({row.cached_source})")
    if row.capacity_rps is not None:
        at_least = "≥ " if row.capacity_lower_bound else ""
        interval = "" if row.capacity_lower_bound else " " + plus_minus(row.capacity_rps, row.capacity_rps_low,
                                                                         row.capacity_rps_high)
        lines.append(f"{at_least}{row.capacity_rps:.3g} req/s{interval} ({row.load_model} loop) · "
                     f"{row.capacity_output_tok_s or 0:,.0f} out tok/s")
        if row.open_over_closed is not None:
            lines.append(f"open / closed loop {row.open_over_closed:.2f}")
    else:
        lines.append(f"{row.capacity_output_tok_s or 0:,.0f} out tok/s (batch {row.load_level:g})")
    if row.recovering is not None:
        recovering = row.recovering
        lines.append(f"[magenta]not cost-recovering (collects 2x); recovering: in {fmt_usd(recovering.input_usd_per_mtok)}"
                     f" · out {fmt_usd(recovering.output_usd_per_mtok)}[/]")
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
    table = Table(title="$ per 1M tokens (input · cached input · output) at SLO capacity", show_lines=True)
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
        "H_eff = H / utilization x (1 + margin); capacity = the request rate where the tier's TTFT and TPOT (at its "
        f"percentile) cross their limits, read from all probes as one monotone curve, under "
        f"{'open-loop (Poisson) arrivals' if params.load_model == 'open' else 'a closed loop of fixed concurrency'}"
        "; prices recover c = H_eff / (3600 x capacity) at the traffic's mean tokens per request: new input x in + "
        "cached input x cached + output x out = c, cached input being what vLLM's prefix cache served at capacity "
        "(0 for independent requests). cached = in x the cost of a cached token over a new one's prefill: measured "
        "where a prefill-only replay of sessions ran beside the fresh prefill probe, else assumed at "
        f"{ASSUMED_CACHED_FRACTION:.0%}. ± = 95% interval (capacity, prefill rates); ≥ capacity / ≤ price: no probe up "
        "to the highest load tried violated the tier. ★ = cheapest config per tier (cost per request; seed files: "
        "output price).",
        style="dim",
    )


def row_warnings(rows: Sequence[PriceRow]) -> list[str]:
    """Each distinct warning once per config, with the tiers it applies to."""
    tiers_of: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        for warning in row.warnings:
            if warning.startswith("seed convention"):
                continue  # the definitions line says it once
            tiers_of.setdefault((row.label, warning), []).append(row.tier.name)
    return [f"{label} [{', '.join(tiers)}]: {warning}" for (label, warning), tiers in tiers_of.items()]
