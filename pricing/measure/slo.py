"""SLO tiers as data, and the verdicts of a probe's window against them: pure functions.

`--tier` values are parsed here for every command: a default tier name, or
NAME:TTFT_S:TPOT_S[:PERCENTILE[:MAX_ERROR_RATE]].
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from pricing.errors import InputError, from_validation_error
from pricing.schema import DEFAULT_TIERS, SloTier, SloVerdict, WindowStats


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


def slo_verdicts(stats: WindowStats, tier: SloTier) -> list[SloVerdict]:
    """One verdict per limit; a missing latency sample fails (no evidence is not a pass)."""
    verdicts = []
    for metric, limit in (("ttft", tier.ttft_s), ("tpot", tier.tpot_s)):
        value = stats.latency(metric, tier.percentile)  # type: ignore[arg-type]
        verdicts.append(SloVerdict(metric=metric, value=value, limit=limit, passed=value is not None and value <= limit))
    verdicts.append(
        SloVerdict(
            metric="error_rate",
            value=stats.error_rate,
            limit=tier.max_error_rate,
            passed=stats.error_rate <= tier.max_error_rate and stats.completed > 0,
        )
    )
    return verdicts


def meets(stats: WindowStats, tier: SloTier) -> bool:
    return all(v.passed for v in slo_verdicts(stats, tier))
