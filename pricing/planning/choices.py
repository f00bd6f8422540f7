"""Choices around a fleet, pure functions: model cascades (blended price of a small/large split),
right-sizing (cheapest measured config per SLO tier, catalog estimates for unmeasured GPU types)
and budget alerts (the day of the month a monthly spend crosses each threshold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from pricing.cost.catalog import Catalog, PricingTier, gpu_rate_usd_h
from pricing.cost.price_rows import PriceRow
from pricing.planning.fleet import HOURS_PER_MONTH
from pricing.schema import Frozen

ESTIMATE_FORMULA = (
    "capacity_est = capacity x 1 / (s / (TFLOPS_new / TFLOPS_meas) + (1 - s) / (BW_new / BW_meas)), "
    "s = prefill share of GPU time = capacity_rps x mean_ISL / prefill_tok_s (0 when no prefill probe: "
    "pure decode-bound); same GPU count and scheme; ESTIMATE, not measured"
)


# ------------------------------------------------------------------------------------ cascades
class CascadePolicy(Frozen):
    router_small_frac: float = Field(default=0.7, ge=0, le=1)  # share of requests the router sends to small
    escalate_frac: float = Field(default=0.1, ge=0, le=1)  # share of those that must escalate to large


class CascadePlan(Frozen):
    """Per-token prices of a small/large cascade, USD per 1M tokens.

    blended = f x p_small + (1 - f + f x e) x p_large: escalated requests pay for the small
    attempt and then run again on the large model.
    """

    policy: CascadePolicy
    small_label: str
    large_label: str
    large_source: Literal["measured", "command line"]
    small_usd_per_mtok: tuple[float, float]  # (input, output)
    large_usd_per_mtok: tuple[float, float]
    blended_usd_per_mtok: tuple[float, float]
    large_share: float  # share of requests that run on the large model (routed + escalated)
    savings_input: float  # 1 - blended / large
    savings_output: float


def blended_price(small: float, large: float, policy: CascadePolicy) -> float:
    f, e = policy.router_small_frac, policy.escalate_frac
    return f * small + (1.0 - f + f * e) * large


def plan_cascade(small_in_out: tuple[float, float], large_in_out: tuple[float, float], policy: CascadePolicy,
                 small_label: str, large_label: str, large_source: Literal["measured", "command line"]) -> CascadePlan:
    blended = tuple(blended_price(s, g, policy) for s, g in zip(small_in_out, large_in_out, strict=True))
    saving = [1.0 - b / g if g > 0 else 0.0 for b, g in zip(blended, large_in_out, strict=True)]
    f, e = policy.router_small_frac, policy.escalate_frac
    return CascadePlan(
        policy=policy, small_label=small_label, large_label=large_label, large_source=large_source,
        small_usd_per_mtok=small_in_out, large_usd_per_mtok=large_in_out,
        blended_usd_per_mtok=(blended[0], blended[1]), large_share=1.0 - f + f * e,
        savings_input=saving[0], savings_output=saving[1],
    )


# ------------------------------------------------------------------------------------ right-sizing
class SizedConfig(Frozen):
    """One way to serve a tier: a measured price row, or a catalog estimate from one."""

    gpu_name: str
    label: str
    estimate: bool
    capacity_rps: float  # per replica
    replica_usd_h: float
    cost_usd_per_request: float
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    basis: str = ""  # measured: the capacity probe; estimate: the measured config and the ratios used


class TierSizing(Frozen):
    tier: str
    cheapest: SizedConfig | None  # None: no measured config meets the tier
    reason: str | None = None
    estimates: list[SizedConfig] = Field(default_factory=list)  # cheapest first
    skipped: list[str] = Field(default_factory=list)  # GPU types not estimated, and why


def prefill_share(capacity_rps: float, mean_isl: float, prefill_tok_s: float | None) -> float:
    """Share of GPU time spent in prefill at capacity, clamped to [0, 1]; 0 when unknown."""
    if not prefill_tok_s or prefill_tok_s <= 0:
        return 0.0
    return min(1.0, max(0.0, capacity_rps * mean_isl / prefill_tok_s))


def scaled_capacity_rps(capacity_rps: float, share_prefill: float, flops_ratio: float, bw_ratio: float) -> float:
    """Time per request splits into prefill (scales with FLOPS) and decode (scales with bandwidth)."""
    return capacity_rps / (share_prefill / flops_ratio + (1.0 - share_prefill) / bw_ratio)


def replica_usd_h(row: PriceRow, gpu_rate: float, with_energy: bool) -> float:
    """GPUs x rate, plus the measured energy cost when asked (rows are priced with replicas = 1)."""
    return row.gpu_count * gpu_rate + ((row.energy_usd_h or 0.0) if with_energy else 0.0)


def measured_sizing(row: PriceRow, usd_h: float) -> SizedConfig:
    cap = row.capacity_rps or 0.0
    return SizedConfig(
        gpu_name=row.gpu_name, label=row.label, estimate=False, capacity_rps=cap, replica_usd_h=usd_h,
        cost_usd_per_request=usd_h / (3600.0 * cap), input_usd_per_mtok=row.input_usd_per_mtok or 0.0,
        output_usd_per_mtok=row.output_usd_per_mtok or 0.0, basis=f"measured: {row.capacity_probe}",
    )


def estimate_on(base: SizedConfig, row: PriceRow, gpu: str, catalog: Catalog, tier: PricingTier) -> SizedConfig | str:
    """`row` (measured) moved to GPU type `gpu`, or the reason it cannot be estimated."""
    rate = gpu_rate_usd_h(catalog, gpu, tier)
    if rate is None:
        return f"{gpu}: no {tier} rate in the catalog"
    meas, new = catalog.gpus[catalog.find_gpu(row.gpu_name) or row.gpu_name], catalog.gpus[gpu]
    flops = new.peak_bf16_dense_tflops / meas.peak_bf16_dense_tflops
    bw = new.mem_bandwidth_gb_s / meas.mem_bandwidth_gb_s
    share = prefill_share(base.capacity_rps, row.mean_isl or 0.0, row.prefill_tok_s)
    cap = scaled_capacity_rps(base.capacity_rps, share, flops, bw)
    usd_h = row.gpu_count * rate
    cost = usd_h / (3600.0 * cap)
    scale = cost / base.cost_usd_per_request  # the measured split's proportions, scaled to the new cost
    return SizedConfig(
        gpu_name=gpu, label=f"{row.model} · {row.scheme} · TP{row.tp} · {row.gpu_count}x{gpu} (estimate)",
        estimate=True, capacity_rps=cap, replica_usd_h=usd_h, cost_usd_per_request=cost,
        input_usd_per_mtok=base.input_usd_per_mtok * scale, output_usd_per_mtok=base.output_usd_per_mtok * scale,
        basis=f"from {row.gpu_name}: s={share:.2f}, TFLOPS x{flops:.2f}, BW x{bw:.2f}",
    )


def size_tier(tier_name: str, rows: Sequence[PriceRow], catalog: Catalog, pricing_tier: PricingTier,
              with_energy: bool = False) -> TierSizing:
    """The cheapest measured row of one tier (by cost per request) and estimates on unmeasured GPU types."""
    feasible = [r for r in rows if r.feasible and r.capacity_rps and r.gpu_rate_usd_h is not None]
    if not feasible:
        reasons = sorted({r.reason or "" for r in rows if not r.feasible})
        return TierSizing(tier=tier_name, cheapest=None, reason="; ".join(reasons) or "no measured config")
    sized = [(measured_sizing(r, replica_usd_h(r, r.gpu_rate_usd_h or 0.0, with_energy)), r) for r in feasible]
    best, best_row = min(sized, key=lambda pair: pair[0].cost_usd_per_request)
    measured_gpus = {catalog.find_gpu(r.gpu_name) or r.gpu_name for r in rows}
    estimates, skipped = [], []
    for gpu in catalog.known_gpus():
        if gpu in measured_gpus:
            continue
        if (gpu == "cpu") != (best_row.gpu_name == "cpu"):
            skipped.append(f"{gpu}: a different device class (CPU vs GPU) from the measured {best_row.gpu_name}")
            continue
        result = estimate_on(best, best_row, gpu, catalog, pricing_tier)
        (skipped.append if isinstance(result, str) else estimates.append)(result)
    estimates.sort(key=lambda s: s.cost_usd_per_request)
    return TierSizing(tier=tier_name, cheapest=best, estimates=estimates, skipped=skipped)


# ------------------------------------------------------------------------------------ budgets
class BudgetAlert(Frozen):
    pct: float
    threshold_usd: float
    day: int | None  # day of the month (1-based) whose spend crosses the threshold; None: not crossed


class BudgetPlan(Frozen):
    fleet: str
    budget_usd: float
    monthly_usd: float
    alerts: list[BudgetAlert]


def crossing_day(hourly_usd: Sequence[float], threshold_usd: float,
                 hours: float = HOURS_PER_MONTH) -> int | None:
    """Day of the month (1-based) in which cumulative spend first reaches `threshold_usd`, repeating the
    weekly hourly spend from the month's first hour; None when a month of `hours` hours stays below."""
    total = 0.0
    tolerance = 1e-9 * max(1.0, threshold_usd)
    for h in range(math.ceil(hours)):
        part = min(1.0, hours - h)  # the month's last hour may be partial (730 h)
        total += hourly_usd[h % len(hourly_usd)] * part
        if total >= threshold_usd - tolerance:
            return h // 24 + 1
    return None


def plan_budget(fleet: str, hourly_usd: Sequence[float], budget_usd: float,
                alert_pcts: Sequence[float] = (70.0, 90.0, 100.0)) -> BudgetPlan:
    monthly = sum(hourly_usd[h % len(hourly_usd)] for h in range(int(HOURS_PER_MONTH)))
    monthly += hourly_usd[int(HOURS_PER_MONTH) % len(hourly_usd)] * (HOURS_PER_MONTH % 1)
    alerts = [BudgetAlert(pct=p, threshold_usd=budget_usd * p / 100.0,
                          day=crossing_day(hourly_usd, budget_usd * p / 100.0)) for p in alert_pcts]
    return BudgetPlan(fleet=fleet, budget_usd=budget_usd, monthly_usd=monthly, alerts=alerts)
