"""Fleet sizing over a week, pure functions: hourly arrival rates from a profile's pattern, replicas
needed per hour, a static fleet against a minute-by-minute autoscaler simulation, and a spot mix.

Model (minute resolution; the rate is constant within each hour of the week):
- needed(h) = ceil(rate(h) / capacity_rps): the smallest fleet that meets the SLO tier that hour.
- autoscaler, checked every minute, with P = ready + booting replicas:
  up:   when rate > scale_up_util x P x capacity for scale_up_delay_min minutes in a row, it launches
        replicas up to target = ceil(rate / (capacity x scale_up_util)); they serve cold_start_min later.
  down: when nothing is booting and rate < scale_down_util x ready x capacity for
        scale_down_delay_min minutes in a row, it stops replicas down to target (at once).
  target is at least 1 (0 with scale_to_zero). Billing counts booting replicas. The week is run
  twice from target(rate of hour 0) and the second week is reported (the cycle's steady state).
- short: a minute where ready x capacity < rate; its requests arrive while the fleet is too small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field, model_validator

from pricing.schema import Frozen

HOURS_PER_WEEK = 168
HOURS_PER_MONTH = 730.0
WEEKS_PER_MONTH = HOURS_PER_MONTH / HOURS_PER_WEEK
_EPS = 1e-9


# ------------------------------------------------------------------------------ traffic over a week
def week_pattern(hourly_counts: Sequence[float]) -> list[float]:
    """168 values: hour i of the week is counts[i]; fewer hours are tiled, more are averaged by i mod 168."""
    if not hourly_counts:
        raise ValueError("the arrival pattern has no hours")
    if len(hourly_counts) <= HOURS_PER_WEEK:
        return [float(hourly_counts[i % len(hourly_counts)]) for i in range(HOURS_PER_WEEK)]
    sums, ns = [0.0] * HOURS_PER_WEEK, [0] * HOURS_PER_WEEK
    for i, count in enumerate(hourly_counts):
        sums[i % HOURS_PER_WEEK] += float(count)
        ns[i % HOURS_PER_WEEK] += 1
    return [s / n for s, n in zip(sums, ns, strict=True)]


def week_rates_rps(hourly_counts: Sequence[float], peak_rps: float) -> list[float]:
    """The week's pattern scaled so its busiest hour arrives at `peak_rps` requests per second."""
    pattern = week_pattern(hourly_counts)
    top = max(pattern)
    if top <= 0:
        raise ValueError("the arrival pattern has no requests")
    return [peak_rps * v / top for v in pattern]


def replicas_needed(rates_rps: Sequence[float], capacity_rps: float) -> list[int]:
    """ceil(rate / capacity) per hour (0 for an hour without requests)."""
    return [max(0, math.ceil(r / capacity_rps - _EPS)) for r in rates_rps]


def requests_per_hour(rates_rps: Sequence[float]) -> list[float]:
    return [r * 3600.0 for r in rates_rps]


# ------------------------------------------------------------------------------------ autoscaler
class AutoscalePolicy(Frozen):
    """Thresholds are utilization fractions of the ready (or provisioned) capacity."""

    scale_up_util: float = Field(default=0.8, gt=0, le=1)
    scale_down_util: float = Field(default=0.5, ge=0, lt=1)
    scale_up_delay_min: int = Field(default=5, ge=0)
    cold_start_min: int = Field(default=3, ge=0)
    scale_down_delay_min: int = Field(default=15, ge=0)
    scale_to_zero: bool = False

    @model_validator(mode="after")
    def _down_below_up(self) -> AutoscalePolicy:
        if self.scale_down_util >= self.scale_up_util:
            raise ValueError("scale_down_util must be below scale_up_util (else the fleet flaps)")
        return self


@dataclass(frozen=True)
class AutoscaleWeek:
    """Per hour of the reported week: billed replica-hours, short minutes and requests arriving short."""

    billed_replica_h: list[float]
    short_min: list[int]
    short_requests: list[float]
    max_replicas: int


def scale_target(rate_rps: float, capacity_rps: float, policy: AutoscalePolicy) -> int:
    """Replicas the autoscaler aims for: utilization at most scale_up_util."""
    floor = 0 if policy.scale_to_zero else 1
    return max(floor, math.ceil(rate_rps / (capacity_rps * policy.scale_up_util) - _EPS))


@dataclass
class _State:
    ready: int
    booting: list[int]  # minute each booting replica starts serving
    over_since: int | None = None
    under_since: int | None = None

    def promote(self, t: int) -> None:
        done = sum(1 for at in self.booting if at <= t)
        if done:
            self.ready += done
            self.booting = [at for at in self.booting if at > t]


def _step(s: _State, t: int, rate: float, cap: float, p: AutoscalePolicy) -> None:
    """One minute of the autoscaler's decisions (see the module docstring)."""
    s.promote(t)
    target = scale_target(rate, cap, p)
    provisioned = s.ready + len(s.booting)
    if rate > p.scale_up_util * provisioned * cap + _EPS:
        s.over_since = t if s.over_since is None else s.over_since
        if t - s.over_since >= p.scale_up_delay_min and target > provisioned:
            s.booting += [t + p.cold_start_min] * (target - provisioned)
            s.over_since = None
    else:
        s.over_since = None
    if not s.booting and s.ready > target and rate < p.scale_down_util * s.ready * cap - _EPS:
        s.under_since = t if s.under_since is None else s.under_since
        if t - s.under_since >= p.scale_down_delay_min:
            s.ready, s.under_since = target, None
    else:
        s.under_since = None
    s.promote(t)


def simulate_autoscale(rates_rps: Sequence[float], capacity_rps: float, policy: AutoscalePolicy) -> AutoscaleWeek:
    """Run the autoscaler over the hours twice (minute steps); report the second pass."""
    n_h = len(rates_rps)
    state = _State(ready=scale_target(rates_rps[0], capacity_rps, policy), booting=[])
    billed, short_min, short_req = [0.0] * n_h, [0] * n_h, [0.0] * n_h
    top = 0
    for t in range(2 * n_h * 60):
        h = (t // 60) % n_h
        rate = rates_rps[h]
        _step(state, t, rate, capacity_rps, policy)
        if t < n_h * 60:
            continue
        billed[h] += (state.ready + len(state.booting)) / 60.0
        top = max(top, state.ready + len(state.booting))
        if state.ready * capacity_rps < rate - _EPS:
            short_min[h] += 1
            short_req[h] += rate * 60.0
    return AutoscaleWeek(billed, short_min, short_req, top)


# ------------------------------------------------------------------------------------ fleet plan
class FleetPlan(Frozen):
    """Hour-of-week fleet sizes and monthly (730 h) costs of three fleets for one config and tier."""

    config_key: str
    label: str
    capacity_rps: float  # per replica, at the SLO tier
    replica_usd_h: float  # one replica at the pricing tier
    rates_rps: list[float]  # 168 hours
    needed_replicas: list[int]
    autoscaled_replicas: list[float]  # mean billed replicas per hour (booting included)
    static_replicas: int
    static_monthly_usd: float
    ideal_monthly_usd: float  # exactly needed(h) each hour: no delays, no headroom
    autoscaled_monthly_usd: float
    policy: AutoscalePolicy
    short_fleet_h_per_week: float  # hours in which the ready fleet was below the needed size
    short_request_fraction: float  # share of requests that arrive while the fleet is short
    short_requests_per_month: float


def monthly_usd(replica_h_per_week: float, replica_usd_h: float) -> float:
    return replica_h_per_week * WEEKS_PER_MONTH * replica_usd_h


def plan_fleet(rates_rps: Sequence[float], capacity_rps: float, replica_usd_h: float, policy: AutoscalePolicy,
               config_key: str = "", label: str = "") -> FleetPlan:
    """Static (sized for the peak hour), ideal and autoscaled fleets over one week of hourly rates."""
    needed = replicas_needed(rates_rps, capacity_rps)
    sim = simulate_autoscale(rates_rps, capacity_rps, policy)
    total_requests = sum(requests_per_hour(rates_rps))
    static = max(needed)
    return FleetPlan(
        config_key=config_key, label=label, capacity_rps=capacity_rps, replica_usd_h=replica_usd_h,
        rates_rps=list(rates_rps), needed_replicas=needed, autoscaled_replicas=sim.billed_replica_h,
        static_replicas=static,
        static_monthly_usd=monthly_usd(static * len(rates_rps), replica_usd_h),
        ideal_monthly_usd=monthly_usd(sum(needed), replica_usd_h),
        autoscaled_monthly_usd=monthly_usd(sum(sim.billed_replica_h), replica_usd_h),
        policy=policy,
        short_fleet_h_per_week=sum(sim.short_min) / 60.0,
        short_request_fraction=sum(sim.short_requests) / total_requests if total_requests > 0 else 0.0,
        short_requests_per_month=sum(sim.short_requests) * WEEKS_PER_MONTH,
    )


# ------------------------------------------------------------------------------------ spot mix
class SpotPolicy(Frozen):
    """B on-demand replicas always on; spot replicas cover needed(h) - B, plus `spot_spare` extra."""

    spot_baseline: int | None = Field(default=None, ge=0)  # None: the week's minimum needed
    spot_preempt_per_h: float = Field(default=0.05, ge=0)  # preemptions per spot replica-hour
    spot_replace_min: float = Field(default=10.0, ge=0)  # preemption to replacement serving
    spot_spare: int = Field(default=0, ge=0)


class SpotPlan(Frozen):
    policy: SpotPolicy
    baseline_replicas: int
    spot_replicas: list[int]  # per hour of the week
    on_demand_replica_usd_h: float
    spot_replica_usd_h: float
    spot_unavailability: float  # expected share of time a spot slot is not serving
    monthly_usd: float
    all_on_demand_monthly_usd: float  # needed(h) on demand, same fleet without spot
    short_request_fraction: float  # expected share of requests served while short of capacity
    hourly_usd: list[float]


def spot_unavailability(preempt_per_h: float, replace_min: float) -> float:
    """Steady-state down share of a slot that runs 1/preempt_per_h hours, then is down replace_min:
    q = (lambda x m/60) / (1 + lambda x m/60)."""
    down = preempt_per_h * replace_min / 60.0
    return down / (1.0 + down)


def short_probability(spot_replicas: int, slack: int, q: float) -> float:
    """P(more than `slack` of `spot_replicas` independent spot slots are down), each down with prob q."""
    if slack < 0:
        return 1.0
    ok = sum(math.comb(spot_replicas, k) * q**k * (1 - q) ** (spot_replicas - k)
             for k in range(min(slack, spot_replicas) + 1))
    return max(0.0, 1.0 - ok)


def plan_spot(rates_rps: Sequence[float], needed: Sequence[int], policy: SpotPolicy, on_demand_usd_h: float,
              spot_usd_h: float) -> SpotPlan:
    """Expected cost and SLO shortfall of B on-demand + spot replicas sized hour by hour (no scaling delays)."""
    base = min(needed) if policy.spot_baseline is None else policy.spot_baseline
    spot = [max(0, n - base) + policy.spot_spare for n in needed]
    q = spot_unavailability(policy.spot_preempt_per_h, policy.spot_replace_min)
    p_short = [short_probability(s, base + s - n, q) for s, n in zip(spot, needed, strict=True)]
    requests = requests_per_hour(rates_rps)
    total = sum(requests)
    hourly = [base * on_demand_usd_h + s * spot_usd_h for s in spot]
    return SpotPlan(
        policy=policy, baseline_replicas=base, spot_replicas=spot, on_demand_replica_usd_h=on_demand_usd_h,
        spot_replica_usd_h=spot_usd_h, spot_unavailability=q,
        monthly_usd=sum(hourly) * WEEKS_PER_MONTH,
        all_on_demand_monthly_usd=monthly_usd(sum(needed), on_demand_usd_h),
        short_request_fraction=sum(r * p for r, p in zip(requests, p_short, strict=True)) / total if total else 0.0,
        hourly_usd=hourly,
    )
