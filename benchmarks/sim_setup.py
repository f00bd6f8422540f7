"""What the accuracy benchmarks share: the simulated engine, the traffic it is driven with (the same
(ISL, OSL) pairs go to the mock and to the offline truth), and the default tiers.

`--quick` shortens the work, not the method: WildChat lengths are divided by 8 (the shape of the
heavy tail stays, requests end 8x sooner), so a probe's warm-up, window and tail take seconds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from pricing.load.client import ProbePlan
from pricing.schema import DEFAULT_TIERS, ProfileSummary
from pricing.testing.sim_engine import EngineModel
from pricing.workload.profile import DEFAULT_PROFILE, fixed_profile, load_profile

CACHE = Path(__file__).resolve().parent / ".truth-cache"  # truth is deterministic: computed once
MAX_MODEL_LEN = 4096
POOL = 50_000
ENGINE = EngineModel()
TIERS = DEFAULT_TIERS
# Closed loops in these benchmarks give each client an exponential think time of this mean. With
# none, clients send at the engine's step boundaries and the client's own turnaround (2-3 ms at 4
# streams, ~10 ms for 24 in lockstep on 2 cores) decides which step a request joins, which no
# offline truth can know (sim_truth.closed_loop_truth); a think time spreads arrivals over the
# steps in the truth and in the real run alike.
THINK_S = 0.05


def probe_plan(quick: bool) -> ProbePlan:
    """bench's default plan, quick or not: what is checked is the default method."""
    return ProbePlan()


@dataclass(frozen=True)
class Traffic:
    name: str
    pairs: list[tuple[int, int]]  # the pool the client cycles through and the truth is computed on
    summary: ProfileSummary

    @property
    def lengths(self) -> tuple[float, float]:
        return self.summary.isl_mean, self.summary.osl_mean

    def cycle(self, offset: int):
        """An endless draw from the pool; probes start at different offsets (fresh requests)."""
        return itertools.islice(itertools.cycle(self.pairs), offset, None)


def _scaled_summary(summary: ProfileSummary, pairs: list[tuple[int, int]], name: str) -> ProfileSummary:
    isl = sum(i for i, _ in pairs) / len(pairs)
    osl = sum(o for _, o in pairs) / len(pairs)
    return summary.model_copy(update={"name": name, "isl_mean": isl, "osl_mean": osl, "sample_pairs": pairs[:256]})


def wildchat(quick: bool, seed: int = 0) -> Traffic:
    profile = load_profile(DEFAULT_PROFILE)
    pairs = profile.sample(POOL, seed=seed, max_model_len=MAX_MODEL_LEN)
    summary = profile.summary(seed=seed, max_model_len=MAX_MODEL_LEN)
    if not quick:
        return Traffic("wildchat", pairs, summary)
    scaled = [(max(1, i // 8), max(1, o // 8)) for i, o in pairs]
    return Traffic("wildchat/8", scaled, _scaled_summary(summary, scaled, "wildchat/8"))


def fixed(quick: bool) -> Traffic:
    isl, osl = (256, 32) if quick else (1024, 128)
    profile = fixed_profile(isl, osl)
    return Traffic(profile.name, [(isl, osl)], profile.summary())
