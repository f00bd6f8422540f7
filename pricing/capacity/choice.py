"""A config's capacity for an SLO tier, read from its probe records through the one capacity
definition (capacity.curve), the prefill probe that goes with it, and, when no probe meets the
tier, why. Pure functions over probe records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pricing.capacity.curve import BIG, Capacity, Point, capacity_from_points
from pricing.measure.requests import (
    RequestTable,
    arrival_rate,
    cohort,
    fell_behind_arrivals,
    latest_part,
    prompt_token_flow,
    still_filling,
)
from pricing.measure.slo import Figures, slo_verdicts, stored_figures
from pricing.measure.window import latency_at
from pricing.results import SourcedProbe, Warn
from pricing.schema import SERVER_ABORTS, STORED_PERCENTILES, ProbeRecord, SloTier
from pricing.units import fmt_ms, fmt_s

LoadMode = Literal["closed", "open"]


def group_by_config(probes: Sequence[SourcedProbe]) -> dict[tuple[str, str], list[SourcedProbe]]:
    """Probes of one config under one workload (traffic profile and prompt kind): capacity is only comparable within."""
    groups: dict[tuple[str, str], list[SourcedProbe]] = {}
    for probe in probes:
        groups.setdefault((probe.record.config.key, probe.record.workload), []).append(probe)
    return groups


def _figures_of(table: RequestTable, tier: SloTier) -> Figures:
    sample = cohort(table)
    return {"ttft": latency_at(sample.ttft_s, tier.percentile), "tpot": latency_at(sample.tpot_s, tier.percentile)}


def tier_figures(probe: SourcedProbe, tier: SloTier, warn: Warn | None = None) -> Figures:
    """TTFT and TPOT at the tier's percentile, computed from the probe's per-request records where
    it has them (so records measured before a change to the intervals are judged by today's),
    else as stored on the probe line for p50/p90/p99 ((None, None) for another percentile)."""
    table = probe.table(warn)
    if table is not None and table.window_us > 0:
        return _figures_of(table, tier)
    if tier.percentile in STORED_PERCENTILES:
        return stored_figures(probe.record.stats, tier)
    return {"ttft": (None, None), "tpot": (None, None)}


# An open loop whose output flow's 95% interval stays below this share of what its arrivals ask
# for fell behind: its queue grows, and a short window only hides what a longer one would show.
# The slack covers the window arrivals' own mean OSL (5% at 300 requests). Used only where the
# per-request records are missing: at 4 req/s of WildChat on an H200 (75 arrivals) the window's
# flow was 30% below the population's mean OSL x arrivals while the server kept up.
KEPT_UP_SHARE = 0.9
# With per-request records, measure.requests.fell_behind_arrivals decides.


def fell_behind(rec: ProbeRecord, arrival_rps: float, table: RequestTable | None = None) -> bool:
    """An open-loop probe above what the server can serve (on an H200, 24 req/s sent against a
    19 req/s closed-loop saturation still met a 1 s TTFT p90 in a 28 s window: the requests in the
    server grew from 5 to 367). Read from the requests in the server and those queued for their
    first token (measure.requests.fell_behind_arrivals) where the per-request records are at hand,
    else from the output flow against what the arrivals ask for (rate x mean OSL). Older records
    (rate_source "flow") opened their window with the first completion, while the server still
    filled, so only the flow can say, less that ramp (about E2E p90 / (2 x window), which matched
    8 of 9 stable H200 probes within 6%). Records whose flows were set to the offered rate
    (rate_source "offered") kept up: their probe judged so, by a stricter rule where it had the
    per-request records (measure.requests.kept_up_with_arrivals), by the flow in older records."""
    stats = rec.stats
    if rec.load.mode != "open" or stats.rate_source == "offered":
        return False
    if table is not None and stats.rate_source == "arrivals":
        return fell_behind_arrivals(table)
    if stats.lengths_mean is None or stats.output_tok_s_ci is None or stats.output_tok_s_ci[1] is None:
        return False
    ramp = 1.0
    if stats.rate_source == "flow" and stats.window_s > 0:
        ramp -= min(0.5, (stats.e2e_s.p90 or 0.0) / (2 * stats.window_s))
    return stats.output_tok_s_ci[1] < KEPT_UP_SHARE * ramp * arrival_rps * stats.lengths_mean[1]


def _short_of_arrivals(rec: ProbeRecord, table: RequestTable | None) -> bool:
    """An open-loop window that did not fill because few requests arrived, not because the server
    was slow (it did not fall behind): at 2 req/s a 15-request window takes 8 s. It is judged on
    what it holds, its intervals saying how little that is. Read as a sure fail, such a probe at
    the bottom of a rate search made the tier 'violated at the lowest load' on a mock server that
    met it at every rate below 134 req/s. A closed loop's unfilled window is a slow server."""
    return rec.load.mode == "open" and table is not None and table.window_us > 0 and rec.stats.window_s > 0


def tier_point(probe: SourcedProbe, tier: SloTier, warn: Warn | None = None) -> Point | None:
    """What one decode probe says about a tier (None: it says nothing, the server failed, went
    away or hung during it)."""
    rec: ProbeRecord = probe.record
    if rec.abort in SERVER_ABORTS or rec.sessions_too_few:
        return None  # a session replay that did not fill its window: too few requests (sweep.sessions_stop)
    stats = rec.stats
    table = probe.table(warn) if rec.load.mode == "open" else None
    if rec.load.independent_arrivals:
        # Independent arrivals at the offered rate, uncapped: a server that keeps up serves that
        # rate in the long run, and the window's count of them is it plus Poisson noise (+5% in
        # 20 s at 61 req/s put a simulated engine's open Baseline 9.6% above the truth; the
        # crossing's offered rate, 4.6%). Session turns follow their sessions, not the rate.
        rate = rate_low = rate_high = rec.load.level
    else:
        rate = stats.request_rate_rps
        rate_low, rate_high = stats.request_rate_rps_ci or (rate, rate)
        if table is not None and stats.rate_source in ("flow", "offered"):
            rate = rate_low = rate_high = arrival_rate(table)  # a record from before open loops counted arrivals
        rate_low = rate if rate_low is None else rate_low
        rate_high = rate if rate_high is None else rate_high
    if rec.abort == "window_not_filled" and not _short_of_arrivals(rec, table):
        return Point(rec.load.level, BIG, BIG, BIG, rate, rate_low, rate_high)  # a sure fail of every tier
    verdicts = slo_verdicts(stats, tier, tier_figures(probe, tier, warn))
    # A server still filling when the window closed, or whose window opened at the warm-up's cap
    # before it had filled: no pass is sure (the steady state is worse than any part of the
    # window), and a window that meets the tier is judged on its latest part, nearest the steady
    # state. On an H200 near saturation, windows of 20-30 s after a 30 s warm-up met Baseline with
    # TPOT p90 26-33 ms at 17.6-18.8 req/s, where windows of 2-4 minutes read 46 and 85 ms
    # (benchmark_results/open_saturation_h200_2026-12-01). One that already fails keeps its whole
    # window's figures: in a queue that grows, its latest third overstates by how much (on the
    # simulated engine, TTFT p90 in seconds where the window's was 1.1 s, which moved Baseline's
    # crossing from +1% to -7% of the truth).
    filling = table is not None and rec.load.kind == "decode" and table.window_us > 0 and (
        rec.warmup_capped or still_filling(table))
    if filling and all(v.passed for v in verdicts):
        verdicts = slo_verdicts(stats, tier, _figures_of(latest_part(table), tier))  # type: ignore[arg-type]
    if fell_behind(rec, rate, table):
        # A sure fail of every tier. Where its window already violates the tier, by how much
        # places the crossing (curve); where the growing queue still hid it, nothing does.
        measured = max((v.value / v.limit for v in verdicts if v.metric != "error_rate" and v.value is not None),
                       default=0.0)
        return Point(rec.load.level, measured if measured > 1 else BIG, BIG, BIG, rate, rate_low, rate_high)
    severity, low, high = 0.0, 0.0, 0.0
    for v in verdicts:
        if v.metric == "error_rate":
            if v.outcome == "fail":
                severity, low, high = BIG, BIG, BIG
            continue
        if v.value is None:
            return Point(rec.load.level, BIG, BIG, BIG, rate, rate_low, rate_high)
        # Without an interval (schema 1 probes) the value bounds nothing: the capacity's interval
        # stays open and says so, rather than pretending the point is exact.
        ci_low, ci_high = v.ci if v.ci is not None else (None, None)
        severity = max(severity, v.value / v.limit)
        low = max(low, (ci_low if ci_low is not None else 0.0) / v.limit)
        high = max(high, (ci_high if ci_high is not None else BIG * v.limit) / v.limit)
    return Point(rec.load.level, severity, low, BIG if filling else high, rate, rate_low, rate_high)


def decode_probes(probes: Sequence[SourcedProbe], mode: LoadMode) -> list[SourcedProbe]:
    return [p for p in probes if p.record.load.kind == "decode" and p.record.load.mode == mode]


def tier_capacity(probes: Sequence[SourcedProbe], tier: SloTier, mode: LoadMode, warn: Warn | None = None) -> Capacity:
    """The tier's capacity from the config's decode probes of one load mode."""
    points = [pt for p in decode_probes(probes, mode) if (pt := tier_point(p, tier, warn)) is not None]
    return capacity_from_points(points, integer=mode == "closed")


def nearest_probe(probes: Sequence[SourcedProbe], mode: LoadMode, level: float) -> SourcedProbe | None:
    """The decode probe of `mode` whose load is closest to `level` (for its energy and lengths),
    one that measured something before one whose window never filled (on an H200 such a probe at
    c=596, 0 J and no requests, priced Baseline at 0 kWh per 1M output tokens)."""
    decode = decode_probes(probes, mode)
    return min(decode, key=lambda p: (p.record.stats.completed == 0, abs(p.record.load.level - level)), default=None)


def failure_reason(probes: Sequence[SourcedProbe], tier: SloTier, mode: LoadMode) -> str:
    """Why no probe of a config meets `tier`, with the best value seen for the binding limit."""
    decode = decode_probes(probes, mode)
    if not decode:
        kinds = sorted({f"{p.record.load.mode} {p.record.load.kind}" for p in probes})
        return f"no {mode}-loop decode probes for this config (it has: {', '.join(kinds) or 'none'})"
    pct = f"p{tier.percentile:g}"
    table = [slo_verdicts(p.record.stats, tier, tier_figures(p, tier)) for p in decode]
    names = {"ttft": f"TTFT {pct}", "tpot": f"TPOT {pct}", "error_rate": "error rate"}
    shown = {"ttft": fmt_s, "tpot": fmt_ms, "error_rate": lambda x: f"{x:.1%}"}
    for i, metric in enumerate(("ttft", "tpot", "error_rate")):
        if not any(row[i].passed for row in table):
            values = [row[i].value for row in table if row[i].value is not None]
            limit = shown[metric](table[0][i].limit)
            if not values:
                return f"no probe has a {names[metric]} sample (no request completed, or no per-request records)"
            return f"no probe meets {names[metric]} <= {limit}; best {shown[metric](min(values))}"
    lowest = min(p.record.load.level for p in decode)
    nearest = min(range(len(table)), key=lambda j: sum(not v.passed for v in table[j]))
    misses = ", ".join(
        f"{names[v.metric]} {shown[v.metric](v.value)} > {shown[v.metric](v.limit)}"
        for v in table[nearest] if not v.passed and v.value is not None
    )
    if not misses:
        return f"the tier is violated already at the lowest {mode}-loop load tried ({lowest:g})"
    level = decode[nearest].record.load
    return f"no probe meets TTFT, TPOT and errors at once; nearest ({level.mode} load {level.level:g}): {misses}"


def pick_prefill(probes: Sequence[SourcedProbe], closed_level: float | None,
                 kind: Literal["prefill", "prefill_cached"] = "prefill") -> SourcedProbe | None:
    """The prefill probe (of `kind`) whose concurrency is closest to the tier's closed-loop
    capacity (the sweep runs one there), else the highest."""
    prefill = [p for p in probes if p.record.load.kind == kind and p.record.stats.input_tok_s > 0]
    if not prefill:
        return None
    target = closed_level if closed_level is not None else max(p.record.load.level for p in prefill)
    return min(prefill, key=lambda p: (p.record.load.mode != "closed", abs(p.record.load.level - target),
                                       -p.record.load.level))


def prefill_rate(probe: SourcedProbe, warn: Warn | None = None) -> tuple[float, tuple[float, float]]:
    """A prefill probe's prompt tokens per second and its 95% interval, counted from its
    per-request records (measure.requests.prompt_token_flow). Records priced without them give
    their counted rate with the stored interval scaled to it, else the stored input flow (until
    2026-11-30 a prefill probe's input flow was its request rate x the population's mean ISL,
    which follows the window's own ISLs)."""
    stats = probe.record.stats
    table = probe.table(warn)
    if table is not None and table.window_us > 0:
        return prompt_token_flow(table)
    low, high = stats.input_tok_s_ci or (stats.input_tok_s, stats.input_tok_s)
    rate = stats.measured_input_tok_s or stats.input_tok_s
    scale = rate / stats.input_tok_s if stats.input_tok_s > 0 else 1.0
    return rate, ((low or rate) * scale, (high or rate) * scale)
