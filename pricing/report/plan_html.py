"""A cost plan as an HTML section of plain tables (no scripts, no network), for `plan --html`."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from pricing.planning.plan import PlanFile


def _plan_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='plan'><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def plan_section_html(plan: PlanFile) -> str:
    """A cost plan  as an HTML section of plain tables: no scripts, no network."""
    f, money = plan.fleet, (lambda x: f"${x:,.2f}")
    fleets = [("static, sized for the peak hour", f.static_replicas, money(f.static_monthly_usd), "0"),
              ("ideal hourly (no delays, no headroom)", f"{min(f.needed_replicas)}-{max(f.needed_replicas)}",
               money(f.ideal_monthly_usd), "0"),
              ("autoscaled", f"{min(f.autoscaled_replicas):.3g}-{max(f.autoscaled_replicas):.3g}",
               money(f.autoscaled_monthly_usd), f"{f.short_request_fraction:.2%}")]
    if plan.spot is not None:
        s = plan.spot
        fleets.append((f"spot mix ({s.baseline_replicas} on-demand)", f"{s.baseline_replicas}+{max(s.spot_replicas)}",
                       money(s.monthly_usd), f"{s.short_request_fraction:.2%} expected"))
    parts = [
        "<section class='plan'><h2>Cost plan</h2>",
        f"<p>Tier {html.escape(plan.tier.name)}, peak {plan.options.peak_rps:g} req/s, traffic pattern "
        f"{html.escape(plan.profile)}; config {html.escape(f.label)}: {f.capacity_rps:.3g} req/s and "
        f"{money(f.replica_usd_h)}/h per replica.</p>",
        _plan_table(["fleet", "replicas", "$/month (730 h)", "requests arriving short"], fleets),
        "<h3>Replicas needed by hour of the week</h3>",
        _plan_table(["day", *[f"{h:02d}" for h in range(24)]],
                    [[d + 1, *f.needed_replicas[d * 24:(d + 1) * 24]] for d in range(len(f.needed_replicas) // 24)]),
    ]
    if (c := plan.cascade) is not None:
        parts += ["<h3>Cascade</h3>", _plan_table(["model", "$/1M in", "$/1M out"], [
            [f"small: {c.small_label}", *[money(v) for v in c.small_usd_per_mtok]],
            [f"large: {c.large_label} ({c.large_source})", *[money(v) for v in c.large_usd_per_mtok]],
            ["blended", *[money(v) for v in c.blended_usd_per_mtok]],
            ["savings vs all on large", f"{c.savings_input:.0%}", f"{c.savings_output:.0%}"]])]
    sizing = []
    for t in plan.right_sizing:
        for s in ([t.cheapest] if t.cheapest is not None else []) + list(t.estimates):
            sizing.append([t.tier, s.label, "ESTIMATE" if s.estimate else "measured", f"{s.capacity_rps:.3g}",
                           f"${s.cost_usd_per_request * 1000:.3g}", s.basis])
    parts += ["<h3>Right-sizing</h3>",
              _plan_table(["tier", "config", "kind", "req/s per replica", "$ per 1k requests", "basis"], sizing)]
    if plan.budgets:
        head = ["fleet", "projected month", *[f"{a.pct:g}%" for a in plan.budgets[0].alerts]]
        parts += [f"<h3>Budget {money(plan.budgets[0].budget_usd)}/month: day each alert fires</h3>",
                  _plan_table(head, [[b.fleet, money(b.monthly_usd),
                                      *[f"day {a.day}" if a.day else "not reached" for a in b.alerts]]
                                     for b in plan.budgets])]
    if plan.warnings:
        parts.append("<ul class='note'>" + "".join(f"<li>{html.escape(w)}</li>" for w in plan.warnings) + "</ul>")
    parts.append("</section>")
    return "\n".join(parts)
