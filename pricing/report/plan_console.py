"""Console output of a cost plan (rich tables); prints only, computes nothing new."""

from __future__ import annotations

from datetime import datetime, timedelta

from rich.console import Console
from rich.table import Table

from pricing.planning.choices import ESTIMATE_FORMULA, SizedConfig
from pricing.planning.fleet import HOURS_PER_MONTH
from pricing.planning.plan import PlanFile


def usd(value: float) -> str:
    if value >= 100:
        return f"${value:,.0f}"
    return f"${value:.2f}" if value >= 1 else f"${value:.3g}"


def pct(value: float) -> str:
    return f"{value:.2%}" if value < 0.1 else f"{value:.1%}"


def day_names(week_start_utc: str | None) -> list[str]:
    """Labels of the week's 7 days: weekday and date when the start is known, else day 1..7."""
    try:
        start = datetime.fromisoformat(week_start_utc) if week_start_utc else None
    except ValueError:
        start = None
    if start is None:
        return [f"day {d + 1}" for d in range(7)]
    return [(start + timedelta(days=d)).strftime("%a") for d in range(7)]


def render_fleet(plan: PlanFile, console: Console) -> None:
    f, p = plan.fleet, plan.fleet.policy
    console.print(f"[bold]Fleet[/] for tier {plan.tier.name} at peak {plan.options.peak_rps:g} req/s: {f.label}, "
                  f"{f.capacity_rps:.3g} req/s per replica, {usd(f.replica_usd_h)}/h per replica "
                  f"({plan.options.pricing_tier}); traffic pattern {plan.profile}")
    week = Table(title="Replicas needed, ceil(rate / capacity), by hour of the week (UTC)", show_edge=False)
    week.add_column("day")
    week.add_column("hours 00 .. 23")
    week.add_column("req/s min-max", justify="right")
    names = day_names(plan.week_start_utc)
    for d in range(len(f.needed_replicas) // 24):
        hours = f.needed_replicas[d * 24:(d + 1) * 24]
        rates = f.rates_rps[d * 24:(d + 1) * 24]
        week.add_row(names[d], " ".join(f"{n:>2}" for n in hours), f"{min(rates):.3g}-{max(rates):.3g}")
    console.print(week)
    table = Table(title="Monthly cost (730 h) and SLO risk", show_lines=False)
    for col in ("fleet", "replicas", "$/month", "vs static", "requests arriving short of capacity"):
        table.add_column(col, justify="left" if col in ("fleet", "requests arriving short of capacity") else "right")
    static = f.static_monthly_usd
    vs = lambda x: f"{x / static - 1:+.0%}" if static else "-"  # noqa: E731
    table.add_row("static, sized for the peak hour", str(f.static_replicas), usd(static), "-", "0 (by construction)")
    table.add_row("ideal hourly (no delays, no headroom)", f"{min(f.needed_replicas)}-{max(f.needed_replicas)}",
                  usd(f.ideal_monthly_usd), vs(f.ideal_monthly_usd), "0 (lower bound of cost)")
    table.add_row(
        f"autoscaled (up >{p.scale_up_util:g} after {p.scale_up_delay_min}+{p.cold_start_min} min, "
        f"down <{p.scale_down_util:g} after {p.scale_down_delay_min} min"
        f"{', to zero' if p.scale_to_zero else ''})",
        f"{min(f.autoscaled_replicas):.3g}-{max(f.autoscaled_replicas):.3g}", usd(f.autoscaled_monthly_usd),
        vs(f.autoscaled_monthly_usd),
        f"{pct(f.short_request_fraction)} ({f.short_requests_per_month:,.0f}/month; "
        f"fleet short {f.short_fleet_h_per_week:.2f} h/week)")
    if (s := plan.spot) is not None:
        table.add_row(
            f"spot mix: {s.baseline_replicas} on-demand + spot (preempt {s.policy.spot_preempt_per_h:g}/h, "
            f"replace {s.policy.spot_replace_min:g} min, spare {s.policy.spot_spare})",
            f"{s.baseline_replicas}+{min(s.spot_replicas)}-{max(s.spot_replicas)}", usd(s.monthly_usd),
            vs(s.monthly_usd),
            f"{pct(s.short_request_fraction)} expected (spot slot down {pct(s.spot_unavailability)})")
    console.print(table)


def render_cascade(plan: PlanFile, console: Console) -> None:
    c = plan.cascade
    if c is None:
        return
    table = Table(title=f"Cascade: {c.policy.router_small_frac:.0%} routed to small, {c.policy.escalate_frac:.0%} "
                        f"of those escalate; {c.large_share:.0%} of requests run on large")
    for col in ("model", "$/1M in", "$/1M out"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row(f"small: {c.small_label}", usd(c.small_usd_per_mtok[0]), usd(c.small_usd_per_mtok[1]))
    large = c.large_label if c.large_source == "measured" else f"[yellow]{c.large_label}[/]"
    table.add_row(f"large: {large}", usd(c.large_usd_per_mtok[0]), usd(c.large_usd_per_mtok[1]))
    table.add_row("[bold]blended[/]", usd(c.blended_usd_per_mtok[0]), usd(c.blended_usd_per_mtok[1]))
    table.add_row("savings vs all on large", f"{c.savings_input:.0%}", f"{c.savings_output:.0%}")
    console.print(table)


def _estimate_cell(est: SizedConfig | None, measured: SizedConfig) -> str:
    if est is None:
        return "-"
    star = " [green]<[/]" if est.cost_usd_per_request < measured.cost_usd_per_request else ""
    return f"${est.cost_usd_per_request * 1000:.3g}{star}\n{est.capacity_rps:.3g} req/s"


def render_sizing(plan: PlanFile, console: Console) -> None:
    """Tiers x (cheapest measured config, then one column per unmeasured GPU type: the estimate)."""
    gpus = list(dict.fromkeys(e.gpu_name for s in plan.right_sizing for e in s.estimates))
    table = Table(title=f"Right-sizing ({plan.options.pricing_tier}): cheapest measured config per tier; "
                        "[yellow]ESTIMATES[/] for unmeasured GPU types ($ per 1k requests, req/s per replica; "
                        "< cheaper than measured)", show_lines=True)
    for col in ("tier", "cheapest measured", "$ per 1k req", "req/s", "$/1M in · out", *gpus):
        table.add_column(col if col not in gpus else f"{col}\n[yellow]estimate[/]", overflow="fold",
                         min_width=28 if col == "cheapest measured" else None)
    bases: dict[str, str] = {}
    for s in plan.right_sizing:
        if s.cheapest is None:
            table.add_row(s.tier, f"[red]✗ {s.reason}[/]", *[""] * (3 + len(gpus)))
            continue
        m, by_gpu = s.cheapest, {e.gpu_name: e for e in s.estimates}
        table.add_row(s.tier, m.label, f"${m.cost_usd_per_request * 1000:.3g}", f"{m.capacity_rps:.3g}",
                      f"{usd(m.input_usd_per_mtok)} · {usd(m.output_usd_per_mtok)}",
                      *[_estimate_cell(by_gpu.get(g), m) for g in gpus])
        bases.setdefault(m.label, "; ".join(f"{e.gpu_name} {e.basis.split(': ', 1)[-1]}" for e in s.estimates))
    console.print(table)
    for label, basis in bases.items():
        console.print(f"Estimated from {label}: {basis}", style="dim")
    skipped = sorted({k for s in plan.right_sizing for k in s.skipped})
    if skipped:
        console.print(f"Not estimated: {'; '.join(skipped)}", style="dim")
    console.print(f"Estimates: {ESTIMATE_FORMULA}. They ignore whether the model fits the GPU's memory and "
                  "whether the GPU supports the scheme natively (e.g. FP8 on A100).", style="dim")


def render_budget(plan: PlanFile, console: Console) -> None:
    if not plan.budgets:
        console.print("Budget: pass --budget-usd to project alert days.", style="dim")
        return
    budget = plan.budgets[0].budget_usd
    table = Table(title=f"Budget {usd(budget)}/month: day of the month each alert fires (month of "
                        f"{HOURS_PER_MONTH:g} h starting on the week's first hour)")
    table.add_column("fleet")
    table.add_column("projected month", justify="right")
    for alert in plan.budgets[0].alerts:
        table.add_column(f"{alert.pct:g}% ({usd(alert.threshold_usd)})", justify="right")
    for b in plan.budgets:
        cells = [f"day {a.day}" if a.day is not None else "not reached" for a in b.alerts]
        table.add_row(b.fleet, f"{usd(b.monthly_usd)} ({b.monthly_usd / budget:.0%})", *cells)
    console.print(table)


def render_plan(plan: PlanFile, console: Console) -> None:
    render_fleet(plan, console)
    render_cascade(plan, console)
    render_sizing(plan, console)
    render_budget(plan, console)
    console.print(
        "Definitions: rates = the profile's hourly arrivals on a 168-h week (tiled if shorter, averaged by hour of "
        "week if longer) scaled so the busiest hour is --peak-rps; capacity = the tier's measured capacity of one "
        "replica; monthly = 730 h. Autoscaler simulated per minute (rate constant within an hour; billed while "
        "booting); a request 'arrives short' when ready replicas x capacity < rate. Spot: on-demand baseline + spot "
        "slots billed all the time, each down lambda x m/60 / (1 + lambda x m/60) of the time, independently; "
        "sized hour by hour without scaling delays. Cascade: blended = f x p_small + (1 - f + f x e) x p_large "
        "(escalations pay for both attempts).", style="dim")
