"""What the cached-input price rests on, for one config: the share of the input price a cached
token costs (measured from a prefill-only replay of sessions beside the fresh prefill probe, or
assumed), and the share of a session workload's input tokens the prefix cache served at capacity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pricing.capacity.choice import pick_prefill, prefill_rate
from pricing.cost.split import ASSUMED_CACHED_FRACTION, cached_fraction
from pricing.measure.server_metrics import cache_hit_share
from pricing.results import SourcedProbe

Bound = float | None


@dataclass(frozen=True)
class CachedShare:
    """p_cached / p_in, its 95% interval (from the two prefill rates' intervals), and its footing."""

    fraction: float
    low: Bound
    high: Bound
    source: Literal["measured", "assumed"]
    probe: str | None = None  # file:line of the prefill-only session replay
    warning: str | None = None


def cached_share(probes: Sequence[SourcedProbe]) -> CachedShare:
    """From the `prefill_cached` probe at the highest closed-loop load and the fresh prefill probe
    nearest it (split.cached_fraction); assumed where either is missing or the server reported no
    cache hits. What a cached token costs beside a new one is the engine's, one figure for every
    tier, and measured only where the replay keeps the server busy: short cached prompts at a low
    load leave it waiting for its clients. On an H200 (FP8 8B) the replay at c=88 ran 84k prompt
    tok/s and read a cached token at 71% of a new one; at c=167 and c=522 (124k, 114k tok/s), 5%
    and 2%."""
    replays = [p for p in probes if p.record.load.kind == "prefill_cached" and p.record.load.mode == "closed"
               and p.record.stats.input_tok_s > 0]
    replay = max(replays, key=lambda p: p.record.load.level) if replays else None
    prefill = pick_prefill(probes, replay.record.load.level) if replay is not None else None
    hit = cache_hit_share(replay.record.server_metrics) if replay is not None else None
    if replay is None or prefill is None or not hit:
        why = ("no prefill-only session replay (load.kind prefill_cached) for this config" if replay is None else
               "no fresh prefill probe to compare it with" if prefill is None else
               f"the server reported no prefix-cache hits for {replay.where}")
        assumed = ASSUMED_CACHED_FRACTION
        return CachedShare(assumed, assumed, assumed, "assumed",
                           warning=f"cached-input price assumed at {assumed:.0%} of the input price: {why}")
    (fresh, (fresh_low, fresh_high)), (cached, (cached_low, cached_high)) = prefill_rate(prefill), prefill_rate(replay)
    fraction = cached_fraction(fresh, cached, hit)
    assert fraction is not None  # rates > 0 (pick_prefill) and hit > 0
    # f grows with the fresh rate and falls with the cached one
    low = cached_fraction(fresh_low, cached_high, hit) if fresh_low and cached_high else None
    high = cached_fraction(fresh_high, cached_low, hit) if fresh_high and cached_low else None
    return CachedShare(fraction, low, high, "measured", replay.where)


def served_share(capacity_probe: SourcedProbe) -> tuple[float, str | None]:
    """The share of input tokens the prefix cache served at capacity (the server's count over the
    capacity probe's window) for a probe that replayed sessions; 0 for independent requests,
    whose prompts are fresh. Unscraped: the profile's history share, with a warning."""
    record = capacity_probe.record
    if not record.load.replays_sessions:
        return 0.0, None
    hit = cache_hit_share(record.server_metrics)
    if hit is not None:
        return hit, None
    history = record.profile.history_share or 0.0
    return history, (f"the server's prefix-cache hits were not scraped at capacity ({capacity_probe.where}): cached "
                     f"input taken as the profile's history share, {history:.0%} of input tokens (an upper bound)")
