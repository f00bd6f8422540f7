"""Plotly HTML report: one self-contained page (plotly.js embedded once, no network) rebuilt from
price rows and probe records: latency vs throughput with SLO lines, price heatmap, pricing-tier bars,
cost vs throughput, energy and carbon, and the traffic profile's ISL/OSL histograms.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from pricing.capacity.choice import group_by_config
from pricing.cost.catalog import Catalog
from pricing.cost.price_rows import PriceRow, PricingParams
from pricing.cost.split import ASSUMED_CACHED_FRACTION
from pricing.measure.server_metrics import cache_hit_share
from pricing.results import SourcedProbe
from pricing.schema import SloTier
from pricing.units import plus_minus

Hist = tuple[list[float], list[float]]  # bin edges (n + 1), counts (n)
_DASHES = ("dash", "dot", "dashdot", "longdash")


def _with_interval(stats: Sequence[Any], scale: float) -> tuple[list, list, list]:
    """p90s and the distances to their 95% interval's ends (None where unknown or unbounded)."""
    y, plus, minus = [], [], []
    for s in stats:
        value = None if s.p90 is None else s.p90 * scale
        low, high = s.p90_ci or (None, None)
        y.append(value)
        plus.append(None if value is None or high is None else high * scale - value)
        minus.append(None if value is None or low is None else value - low * scale)
    return y, plus, minus


def fig_latency(probes: Sequence[SourcedProbe], tiers: Sequence[SloTier]) -> go.Figure | None:
    """p90 TTFT and TPOT (with 95% intervals) against output throughput, one line per config, with
    each tier's limits."""
    decode = [p for p in probes if p.record.load.kind == "decode"]
    if not decode:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("TTFT p90 (s)", "TPOT p90 (ms)"))
    palette = qualitative.Plotly
    for i, group in enumerate(group_by_config(decode).values()):
        group = sorted(group, key=lambda p: p.record.stats.output_tok_s)
        line = {"color": palette[i % len(palette)]}
        x = [p.record.stats.output_tok_s for p in group]
        name = f"{group[0].record.config.label} · {group[0].record.workload}"
        for col, metric, scale in ((1, "ttft_s", 1.0), (2, "tpot_s", 1000.0)):
            y, plus, minus = _with_interval([getattr(p.record.stats, metric) for p in group], scale)
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, legendgroup=name, line=line,
                                     showlegend=col == 1, error_y={"type": "data", "array": plus,
                                                                   "arrayminus": minus, "visible": True}),
                          row=1, col=col)
    for i, tier in enumerate(tiers):
        dash = _DASHES[i % len(_DASHES)]
        fig.add_hline(y=tier.ttft_s, line_dash=dash, line_color="gray", annotation_text=tier.name, row=1, col=1)
        fig.add_hline(y=tier.tpot_s * 1000, line_dash=dash, line_color="gray", annotation_text=tier.name, row=1, col=2)
    fig.update_xaxes(title_text="output tokens/s")
    fig.update_layout(title="Latency against throughput (decode probes; dashed: SLO limits)", height=450)
    return fig


def _price_label(row: PriceRow, attr: str) -> str:
    value = getattr(row, attr)
    if value is None:
        return "-"
    if row.capacity_lower_bound:
        text = f"≤ ${value:.3g}"
    elif row.source == "seed":
        text = f"${value:.3g}"
    else:
        text = f"${value:.3g} {plus_minus(value, getattr(row, attr + '_low'), getattr(row, attr + '_high'))}"
    return text + (" ★" if row.cheapest else "")


def fig_capacity(rows: Sequence[PriceRow]) -> go.Figure | None:
    """Each tier's capacity under closed and open loop, with the priced one's 95% interval."""
    priced = [r for r in rows if r.feasible and r.source == "probe" and r.capacity_rps]
    if not priced:
        return None
    x = [f"{r.label} | {r.tier.name}" for r in priced]
    fig = go.Figure()
    for model, attr in (("closed loop", "closed_capacity_rps"), ("open loop (Poisson)", "open_capacity_rps")):
        values = [getattr(r, attr) for r in priced]
        priced_here = [r.load_model == model.split()[0] for r in priced]
        plus = [(r.capacity_rps_high - r.capacity_rps) if here and r.capacity_rps_high is not None else None
                for r, here in zip(priced, priced_here, strict=True)]
        minus = [(r.capacity_rps - r.capacity_rps_low) if here and r.capacity_rps_low is not None else None
                 for r, here in zip(priced, priced_here, strict=True)]
        fig.add_trace(go.Bar(x=x, y=values, name=model,
                             error_y={"type": "data", "array": plus, "arrayminus": minus, "visible": True}))
    fig.update_yaxes(title_text="requests/s at the tier's capacity")
    fig.update_layout(barmode="group", height=450,
                      title="Capacity per tier: closed loop against Poisson arrivals (error bars: 95% interval of "
                            "the one that prices)")
    return fig


def fig_price_heatmap(rows: Sequence[PriceRow]) -> go.Figure:
    """Configs x tiers, $/1M input, cached input and output; infeasible cells empty with a cross."""
    tiers = list(dict.fromkeys(r.tier.name for r in rows))
    configs = list(dict.fromkeys(r.label for r in rows))
    cells = {(r.label, r.tier.name): r for r in rows}
    prices = [("$ per 1M input tokens", "input_usd_per_mtok"), ("$ per 1M cached input tokens", "cached_input_usd_per_mtok"),
              ("$ per 1M output tokens", "output_usd_per_mtok")]
    # One shared row axis: the labels stand once, left of the heatmaps.
    fig = make_subplots(rows=1, cols=len(prices), subplot_titles=[title for title, _ in prices],
                        shared_yaxes=True, horizontal_spacing=0.03)
    for col, (_title, attr) in enumerate(prices, start=1):
        z = [[getattr(cells[c, t], attr) if (c, t) in cells and cells[c, t].feasible else None for t in tiers]
             for c in configs]
        text = [["✗" if v is None else _price_label(cells[c, t], attr) for v, t in zip(zr, tiers, strict=True)]
                for zr, c in zip(z, configs, strict=True)]
        if attr.startswith("cached"):
            text = [[t + (" (assumed)" if (c, tier) in cells and cells[c, tier].cached_source == "assumed" else "")
                     for t, tier in zip(tr, tiers, strict=True)] for tr, c in zip(text, configs, strict=True)]
        fig.add_trace(go.Heatmap(z=z, x=tiers, y=configs, text=text, texttemplate="%{text}", colorscale="Viridis",
                                 showscale=False, hoverongaps=False), row=1, col=col)
    fig.update_layout(title="Price matrix (± 95% interval; ≤ upper bound; ★ cheapest per tier; ✗ tier not met)",
                      height=max(300, 120 + 60 * len(configs)))
    return fig


def fig_pricing_tiers(rows: Sequence[PriceRow]) -> go.Figure | None:
    """On-demand / spot / reserved variants of the output and input prices, per config and tier."""
    priced = [r for r in rows if r.feasible and r.variants]
    if not priced:
        return None
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, subplot_titles=("$ per 1M output", "$ per 1M input"))
    names = list(dict.fromkeys(k for r in priced for k in r.variants))
    x = [f"{r.label} | {r.tier.name}" for r in priced]
    for name in names:
        out = [r.variants[name].output_usd_per_mtok if name in r.variants else None for r in priced]
        inp = [r.variants[name].input_usd_per_mtok if name in r.variants else None for r in priced]
        fig.add_trace(go.Bar(x=x, y=out, name=name, legendgroup=name), row=1, col=1)
        fig.add_trace(go.Bar(x=x, y=inp, name=name, legendgroup=name, showlegend=False), row=2, col=1)
    fig.update_layout(barmode="group", title="Pricing tiers (catalog list-price snapshots; estimates marked there)",
                      height=600)
    return fig


def fig_cost_throughput(rows: Sequence[PriceRow]) -> go.Figure | None:
    """Output price against the output throughput at capacity, one marker per config and tier."""
    priced = [r for r in rows if r.feasible and r.capacity_output_tok_s]
    if not priced:
        return None
    fig = go.Figure()
    for tier in dict.fromkeys(r.tier.name for r in priced):
        sel = [r for r in priced if r.tier.name == tier]
        fig.add_trace(go.Scatter(
            x=[r.capacity_output_tok_s for r in sel], y=[r.output_usd_per_mtok for r in sel], mode="markers",
            name=tier, text=[r.label for r in sel], marker={"size": 11},
            hovertemplate="%{text}<br>%{x:,.0f} out tok/s<br>$%{y:.3g} per 1M output<extra>" + tier + "</extra>",
        ))
    fig.update_xaxes(title_text="output tokens/s at capacity (all replicas)", type="log")
    fig.update_yaxes(title_text="$ per 1M output tokens")
    fig.update_layout(title="Cost against throughput", height=450)
    return fig


def fig_energy(rows: Sequence[PriceRow]) -> go.Figure | None:
    """kWh per 1M tokens and gCO2e per 1M output tokens by region, where energy was measured."""
    measured = [r for r in rows if r.feasible and r.energy is not None]
    if not measured:
        return None
    x = [f"{r.label} | {r.tier.name}" for r in measured]
    fig = make_subplots(rows=2, cols=1, subplot_titles=("kWh per 1M tokens", "gCO2e per 1M output tokens by region"))
    fig.add_trace(go.Bar(x=x, y=[r.energy.input_kwh_per_mtok for r in measured], name="input kWh"), row=1, col=1)
    fig.add_trace(go.Bar(x=x, y=[r.energy.output_kwh_per_mtok for r in measured], name="output kWh"), row=1, col=1)
    for region in measured[0].energy.output_gco2e_per_mtok:
        fig.add_trace(go.Bar(x=x, y=[r.energy.output_gco2e_per_mtok.get(region) for r in measured], name=region),
                      row=2, col=1)
    fig.update_layout(barmode="group", title="Energy and carbon (measured GPU energy at capacity)", height=650)
    return fig


def _as_hist(value: Any) -> Hist | None:
    """(edges, counts) from a mapping, a pair, or an object with edges/counts."""
    if isinstance(value, dict) and "edges" in value and "counts" in value:
        return list(value["edges"]), list(value["counts"])
    if hasattr(value, "edges") and hasattr(value, "counts"):
        return list(value.edges), list(value.counts)
    if isinstance(value, (tuple, list)) and len(value) == 2 and len(value[0]) == len(value[1]) + 1:
        return list(value[0]), list(value[1])
    return None


def _samples_hist(values: Sequence[float]) -> Hist | None:
    arr = np.asarray([v for v in values if v and v > 0], dtype=float)
    if arr.size == 0:
        return None
    edges = np.unique(np.geomspace(max(arr.min(), 1.0), max(arr.max(), 2.0) * 1.0001, 30).round(6))
    counts, edges = np.histogram(arr, bins=edges)
    return edges.tolist(), counts.tolist()


def profile_histograms(profile: Any) -> dict[str, Hist] | None:
    """ISL and OSL histograms from a profile-like object, duck-typed: `isl_hist`/`osl_hist`; a joint
    `histogram` (isl_edges, osl_edges, counts[i][j]); raw `pool_isl`/`pool_osl`; or `sample_pairs`."""
    if profile is None:
        return None
    if hasattr(profile, "isl_hist") and hasattr(profile, "osl_hist"):
        isl, osl = _as_hist(profile.isl_hist), _as_hist(profile.osl_hist)
        if isl and osl:
            return {"ISL": isl, "OSL": osl}
    joint = getattr(profile, "histogram", None)
    if joint is not None and hasattr(joint, "isl_edges") and hasattr(joint, "counts"):
        counts = np.asarray(joint.counts, dtype=float)
        if counts.ndim == 2 and counts.size:
            return {"ISL": (list(joint.isl_edges), counts.sum(axis=1).tolist()),
                    "OSL": (list(joint.osl_edges), counts.sum(axis=0).tolist())}
    for isl_name, osl_name in (("pool_isl", "pool_osl"), ("isl_samples", "osl_samples")):
        if hasattr(profile, isl_name) and hasattr(profile, osl_name):
            isl, osl = _samples_hist(getattr(profile, isl_name)), _samples_hist(getattr(profile, osl_name))
            if isl and osl:
                return {"ISL": isl, "OSL": osl}
    pairs = getattr(profile, "sample_pairs", None)
    if pairs:
        isl, osl = _samples_hist([p[0] for p in pairs]), _samples_hist([p[1] for p in pairs])
        if isl and osl:
            return {"ISL": isl, "OSL": osl}
    return None


def fig_profile(hists: dict[str, Hist], title: str) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("input length (ISL, tokens)", "output length (OSL, tokens)"))
    for col, key in ((1, "ISL"), (2, "OSL")):
        edges, counts = hists[key]
        fig.add_trace(go.Scatter(x=edges, y=list(counts) + [counts[-1] if counts else 0], line_shape="hv",
                                 fill="tozeroy", name=key), row=1, col=col)
    fig.update_xaxes(type="log")
    fig.update_yaxes(title_text="turns")
    fig.update_layout(title=title, height=380, showlegend=False)
    return fig


def fig_prefix_cache(probes: Sequence[SourcedProbe]) -> go.Figure | None:
    """Session replays: the share of prompt tokens vLLM's prefix cache served in each probe's window,
    against the load, beside the profile's share of prompt tokens that are history (its ceiling)."""
    replays = [p for p in probes if p.record.load.replays_sessions and cache_hit_share(p.record.server_metrics)
               is not None]
    if not replays:
        return None
    fig = go.Figure()
    for i, group in enumerate(group_by_config(replays).values()):
        group = sorted(group, key=lambda p: (p.record.load.kind, p.record.load.mode, p.record.load.level))
        color = qualitative.Plotly[i % len(qualitative.Plotly)]
        name = f"{group[0].record.config.label} · {group[0].record.workload}"
        x = [f"{p.record.load.kind} {p.record.load.mode} {p.record.load.level:g}" for p in group]
        fig.add_trace(go.Bar(x=x, y=[cache_hit_share(p.record.server_metrics) for p in group], name=f"{name}: served",
                             marker_color=color))
        fig.add_trace(go.Scatter(x=x, y=[p.record.profile.history_share for p in group], mode="lines+markers",
                                 name=f"{name}: history (profile)", line={"color": color, "dash": "dot"}))
    fig.update_yaxes(title_text="share of prompt tokens", range=[0, 1])
    fig.update_layout(title="Prefix cache: what the server served against the history the sessions hold", height=420)
    return fig


def fig_ttft_client_vs_server(probes: Sequence[SourcedProbe]) -> go.Figure | None:
    """Client-side p90 TTFT against vLLM's own (its /metrics histogram over the same probe): the
    gap is queueing before the engine plus the network and client; the diagonal is agreement."""
    points = [(p, p.record.server_metrics["server_ttft_p90_s"]) for p in probes
              if p.record.load.kind == "decode" and p.record.stats.ttft_s.p90 is not None
              and p.record.server_metrics and "server_ttft_p90_s" in p.record.server_metrics]
    if not points:
        return None
    fig = go.Figure()
    for i, group in enumerate(group_by_config([p for p, _ in points]).values()):
        server = {id(p): v for p, v in points}
        name = f"{group[0].record.config.label} · {group[0].record.workload}"
        fig.add_trace(go.Scatter(
            x=[server[id(p)] for p in group], y=[p.record.stats.ttft_s.p90 for p in group], mode="markers",
            name=name, marker={"color": qualitative.Plotly[i % len(qualitative.Plotly)], "size": 9},
            text=[f"load {p.record.load.level:g}" for p in group]))
    top = max(max(v, p.record.stats.ttft_s.p90) for p, v in points)
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", line={"dash": "dot", "color": "gray"},
                             name="client = server"))
    fig.update_layout(title="TTFT p90: client-side against server-side (vLLM /metrics, bucketed)",
                      xaxis_title="server TTFT p90 (s)", yaxis_title="client TTFT p90 (s)", height=420)
    return fig


def build_figures(rows: Sequence[PriceRow], probes: Sequence[SourcedProbe], tiers: Sequence[SloTier],
                  profile: Any = None) -> list[go.Figure]:
    """Every figure that has data, in page order."""
    figures = [fig_latency(probes, tiers), fig_price_heatmap(rows), fig_capacity(rows), fig_pricing_tiers(rows),
               fig_cost_throughput(rows), fig_energy(rows), fig_prefix_cache(probes), fig_ttft_client_vs_server(probes)]
    hists = profile_histograms(profile)
    title = f"Traffic profile {getattr(profile, 'name', '')}".strip()
    if hists is None and probes:
        summary = probes[0].record.profile
        hists = profile_histograms(summary)
        title = f"Traffic profile {summary.name} (from the sample pairs stored in the probe records)"
    if hists is not None:
        figures.append(fig_profile(hists, title))
    return [f for f in figures if f is not None]


def build_report_html(rows: Sequence[PriceRow], probes: Sequence[SourcedProbe], tiers: Sequence[SloTier],
                      params: PricingParams, catalog: Catalog, profile: Any = None) -> str:
    """One HTML page; plotly.js is inlined with the first figure only, so it opens offline."""
    divs = [fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"plot-{i}",
                        config={"displaylogo": False, "responsive": True})
            for i, fig in enumerate(build_figures(rows, probes, tiers, profile))]
    notes = sorted({f"{r.label} · {r.tier.name}: {w}" for r in rows for w in r.warnings})
    rate = (f"--hourly-rate ${params.hourly_rate_usd:g}/h" if params.hourly_rate_usd is not None
            else f"pricing tier {params.pricing_tier}")
    definitions = (
        f"Split: {params.split} (ratio {params.ratio:g} where used); utilization {params.utilization:g}; "
        f"margin {params.margin:.0%}; {rate}; replicas {params.replicas}. "
        "H = GPUs × rate (+ measured energy × $/kWh); "
        "H_eff = H / utilization × (1 + margin); capacity = highest decode request rate meeting the tier; "
        "prices recover c = H_eff / (3600 × capacity) at the capacity probe's tokens per request (its token rates / request rate), except the seed split: "
        "new input × input price + cached input × cached price + output × output price = c, cached input being what the "
        "prefix cache served at capacity (none for independent requests). The cached price is the input price × a "
        "cached token's cost over a new one's, measured by a prefill-only replay of sessions beside the fresh prefill "
        f"probe, else assumed at {ASSUMED_CACHED_FRACTION:.0%}."
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>vLLM SLO prices</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px} .note{color:#555;font-size:90%}</style>",
        "</head><body><h1>SLO-driven prices</h1>",
        f"<p>{html.escape(definitions)}</p>",
        f"<p class='note'>Catalog: {html.escape(catalog.meta.note)}</p>",
        *(f"<section class='figure'>{div}</section>" for div in divs),
    ]
    if notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        parts.append(f"<h2>Warnings</h2><ul class='note'>{items}</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
