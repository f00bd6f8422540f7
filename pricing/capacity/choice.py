"""Which probe sets a config's capacity for an SLO tier, which prefill probe goes with it, and,
when no probe meets the tier, why. Pure functions over probe records.
"""

from __future__ import annotations

from collections.abc import Sequence

from pricing.measure.slo import meets, slo_verdicts
from pricing.results import SourcedProbe
from pricing.schema import SloTier
from pricing.units import fmt_ms, fmt_s


def group_by_config(probes: Sequence[SourcedProbe]) -> dict[tuple[str, str], list[SourcedProbe]]:
    """Probes of one config under one workload (traffic profile and prompt kind): capacity is only comparable within."""
    groups: dict[tuple[str, str], list[SourcedProbe]] = {}
    for probe in probes:
        groups.setdefault((probe.record.config.key, probe.record.workload), []).append(probe)
    return groups


def capacity_is_lower_bound(probes: Sequence[SourcedProbe], tier: SloTier, cap: SourcedProbe) -> bool:
    """True when no decode probe at a higher load failed `tier`: the search stopped (probe budget,
    max level) before finding the limit, so the real capacity may be higher."""
    return not any(p.record.load.kind == "decode" and p.record.load.level > cap.record.load.level
                   and not meets(p.record.stats, tier) for p in probes)


def pick_capacity(probes: Sequence[SourcedProbe], tier: SloTier) -> SourcedProbe | None:
    """The decode probe with the highest request rate among those meeting `tier` (None if none)."""
    passing = [
        p for p in probes
        if p.record.load.kind == "decode" and p.record.stats.request_rate_rps > 0 and p.record.stats.completed > 0
        and meets(p.record.stats, tier)
    ]
    if not passing:
        return None
    return max(passing, key=lambda p: (p.record.stats.request_rate_rps, p.record.stats.output_tok_s))


def failure_reason(probes: Sequence[SourcedProbe], tier: SloTier) -> str:
    """Why no probe of a config meets `tier`, with the best value seen for the binding limit."""
    decode = [p for p in probes if p.record.load.kind == "decode"]
    if not decode:
        return "no decode probes for this config (only prefill probes)"
    pct = f"p{tier.percentile}"
    table = [slo_verdicts(p.record.stats, tier) for p in decode]
    names = {"ttft": f"TTFT {pct}", "tpot": f"TPOT {pct}", "error_rate": "error rate"}
    shown = {"ttft": fmt_s, "tpot": fmt_ms, "error_rate": lambda x: f"{x:.1%}"}
    for i, metric in enumerate(("ttft", "tpot", "error_rate")):
        if not any(row[i].passed for row in table):
            values = [row[i].value for row in table if row[i].value is not None]
            limit = shown[metric](table[0][i].limit)
            if not values:
                return f"no probe has a {names[metric]} sample (no request completed)"
            return f"no probe meets {names[metric]} <= {limit}; best {shown[metric](min(values))}"
    if any(all(v.passed for v in row) for row in table):
        return "the probes that meet this tier completed no requests"
    nearest = min(range(len(table)), key=lambda j: sum(not v.passed for v in table[j]))
    misses = ", ".join(
        f"{names[v.metric]} {shown[v.metric](v.value)} > {shown[v.metric](v.limit)}"
        for v in table[nearest] if not v.passed and v.value is not None
    )
    level = decode[nearest].record.load
    return f"no probe meets TTFT, TPOT and errors at once; nearest ({level.mode} load {level.level:g}): {misses}"


def pick_prefill(probes: Sequence[SourcedProbe], capacity: SourcedProbe) -> SourcedProbe | None:
    """The prefill probe whose load level is closest to the capacity probe's (same load mode first)."""
    prefill = [p for p in probes if p.record.load.kind == "prefill" and p.record.stats.input_tok_s > 0]
    if not prefill:
        return None
    load = capacity.record.load
    return min(
        prefill,
        key=lambda p: (p.record.load.mode != load.mode, abs(p.record.load.level - load.level), -p.record.load.level),
    )
