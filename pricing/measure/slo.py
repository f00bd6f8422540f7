"""SLO tiers as data, and the verdicts of a probe's window against them: pure functions.

`--tier` values are parsed here for every command: a default tier name, or
NAME:TTFT_S:TPOT_S[:PERCENTILE[:MAX_ERROR_RATE]].
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from pricing.errors import InputError, from_validation_error
from pricing.measure.intervals import proportion_interval
from pricing.schema import DEFAULT_TIERS, Ci, Outcome, SloTier, SloVerdict, WindowStats


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


Figures = dict[str, tuple[float | None, Ci | None]]  # metric -> (value, 95% interval)


def stored_figures(stats: WindowStats, tier: SloTier) -> Figures:
    """TTFT and TPOT at the tier's percentile as the probe line stores them (p50, p90, p99)."""
    return {metric: getattr(stats, f"{metric}_s").at(tier.percentile) for metric in ("ttft", "tpot")}


def outcome(value: float | None, ci: Ci | None, limit: float) -> Outcome:
    """pass/fail by the interval; without one (schema 1 records) by the value alone."""
    if value is None:
        return "fail"
    if ci is None:
        return "pass" if value <= limit else "fail"
    low, high = ci
    if high is not None and high <= limit:
        return "pass"
    if low is not None and low > limit:
        return "fail"
    return "undecided"


def _error_outcome(stats: WindowStats, tier: SloTier) -> tuple[Outcome, Ci | None]:
    """Errors fail a tier when even the interval's low end is over the budget: a 1% budget cannot
    be shown met by a few hundred requests, so no errors (or few) pass."""
    total = stats.issued if stats.issued is not None else stats.completed + stats.failed
    if stats.completed <= 0:
        return "fail", None
    if stats.issued is None or total <= 0:
        return ("pass" if stats.error_rate <= tier.max_error_rate else "fail"), None
    low, high = proportion_interval(stats.failed, total)
    return ("fail" if low > tier.max_error_rate else "pass"), (low, high)


def slo_verdicts(stats: WindowStats, tier: SloTier, figures: Figures | None = None) -> list[SloVerdict]:
    """One verdict per limit, from the stored figures or `figures` computed elsewhere (e.g. from
    the probe's per-request records for a percentile the line does not store). A missing latency
    sample fails: no evidence is not a pass."""
    figures = figures if figures is not None else stored_figures(stats, tier)
    verdicts = []
    for metric, limit in (("ttft", tier.ttft_s), ("tpot", tier.tpot_s)):
        value, ci = figures[metric]
        verdicts.append(SloVerdict(metric=metric, value=value, limit=limit, passed=value is not None and value <= limit,
                                   ci=ci, outcome=outcome(value, ci, limit)))
    errors, ci = _error_outcome(stats, tier)
    verdicts.append(SloVerdict(metric="error_rate", value=stats.error_rate, limit=tier.max_error_rate,
                               passed=stats.error_rate <= tier.max_error_rate and stats.completed > 0, ci=ci,
                               outcome=errors))
    return verdicts


def tier_outcome(verdicts: list[SloVerdict]) -> Outcome:
    """A tier fails if any limit fails, passes if all pass, and is undecided otherwise."""
    outcomes = {v.outcome for v in verdicts}
    if "fail" in outcomes:
        return "fail"
    return "pass" if outcomes == {"pass"} else "undecided"


def meets(stats: WindowStats, tier: SloTier, figures: Figures | None = None) -> bool:
    """The point estimates meet every limit (the interval may still straddle one)."""
    return all(v.passed for v in slo_verdicts(stats, tier, figures))
