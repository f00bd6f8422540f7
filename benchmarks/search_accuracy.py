"""The default capacity search against the exact truth of a simulated continuous-batching engine.

    python benchmarks/search_accuracy.py [--quick] [--mode closed|open] [--seeds N]

For a fixed and a WildChat profile over several seeds, the default sweep (bench's defaults:
ProbePlan, SearchParams, 10 decode probes) runs against the mock serving `sim_engine` in real
time, and each default tier's capacity (request rate) is compared with `sim_truth`'s: closed
loop (`--mode closed`: the highest whole concurrency meeting the tier; clients think 50 ms between
requests, sim_setup.THINK_S says why) or Poisson arrivals
(`--mode open`: the closed-loop search, then the open-loop step; the highest rate meeting it).
Per tier it prints the error, whether the 95% interval covers the truth (and which end, if any,
the probes could not bound), the truth curve's elasticity at the capacity (percent of the tier's
severity per percent of load, from the truth 15% either side) with the error times it (the
latency error that would have moved a crossing that far: where latency barely rises with load,
the simulated engine's Instant tier in open loop, 0.15, a capacity to 5% needs p90s to 0.75%),
and the probes and wall time used. The last line reads `max tier error X% in N probes` (N: the median over runs of
the decode probes of the mode's search).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_setup import CACHE, ENGINE, THINK_S, TIERS, Traffic, fixed, probe_plan, wildchat  # noqa: E402

from pricing.capacity.search import SearchParams  # noqa: E402
from pricing.capacity.sweep import SweepSpec, run_sweep  # noqa: E402
from pricing.load import event_loop as aio  # noqa: E402
from pricing.load.client import ClientConfig, ProbePlan  # noqa: E402
from pricing.measure.probe import run_probe  # noqa: E402
from pricing.schema import DeploymentConfig  # noqa: E402
from pricing.testing.mock_server import MockConfig, MockServerProcess  # noqa: E402
from pricing.testing.sim_truth import CapacityTruth, capacity_truth, closed_loop_truth, open_loop_truth  # noqa: E402


def truth_elasticity(traffic: Traffic, tier, truth: CapacityTruth, mode: str) -> float:
    """d ln(severity) / d ln(request rate) of the truth curve between 15% below and above the
    capacity (closed loop: the nearest whole concurrencies); nan where the upper one is unstable."""
    def at(level: float):
        if mode == "open":
            return open_loop_truth(ENGINE, traffic.pairs, level, 0, cache_dir=CACHE)
        return closed_loop_truth(ENGINE, traffic.pairs, int(level), think_s=THINK_S, cache_dir=CACHE)

    low, high = truth.level * 0.85, truth.level * 1.15
    if mode == "closed":
        low, high = max(1, round(low)), max(round(high), round(low) + 1)
    points = [at(low), at(high)]
    if not all(p.stable for p in points):
        return float("nan")
    sev = [max(p.latency("ttft", tier.percentile) / tier.ttft_s, (p.latency("tpot", tier.percentile) or 0) / tier.tpot_s)
           for p in points]
    return math.log(sev[1] / sev[0]) / math.log(points[1].request_rate_rps / points[0].request_rate_rps)


def one_sweep(traffic: Traffic, seed: int, mode: str, out: Path, plan: ProbePlan) -> tuple[dict, float]:
    spec = SweepSpec(config=DeploymentConfig(model="sim-engine", gpu_name="cpu"), profile=traffic.summary,
                     tiers=list(TIERS), search=SearchParams(max_level=1024), plan=plan, prefill_probes=False,
                     open_loop=mode == "open", think_s=THINK_S, run_id=f"seed{seed}")
    with MockServerProcess(MockConfig(engine=ENGINE)) as mock:
        offset = iter(range(10**6))

        async def probe(load, index):
            cfg = ClientConfig(base_url=mock.url, model="mock-model", seed=seed * 1000 + index)
            with aio.paused_gc():
                return await run_probe(cfg, load, traffic.cycle(seed * 100_003 + 5_000 * next(offset)), plan,
                                       tiers=TIERS, lengths=traffic.lengths)

        t0 = time.perf_counter()
        outcome = asyncio.run(run_sweep(spec, probe, out))
        return outcome, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="WildChat lengths / 8, one profile and seed (< 5 min)")
    p.add_argument("--mode", choices=["closed", "open"], default="closed")
    p.add_argument("--seeds", type=int, help="sweeps per profile (default 1 quick, 5 full)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--keep", type=Path, help="keep each sweep's results here (PROFILE-MODE-seedN.jsonl)")
    args = p.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 5)
    traffics = [wildchat(args.quick)] if args.quick else [fixed(False), wildchat(False)]
    errors, probes, walls = [], [], []
    print(f"{'profile':<14}{'seed':>5}  {'tier':<9}{'truth':>16}{'found':>22}{'error':>8}{'elast.':>7}{'x err':>7}  covered",
          flush=True)
    for traffic in traffics:
        truths = {t.name: capacity_truth(ENGINE, traffic.pairs, t.ttft_s, t.tpot_s, t.percentile, mode=args.mode,
                                         think_s=THINK_S, cache_dir=CACHE) for t in TIERS}
        slopes = {t.name: truth_elasticity(traffic, t, truths[t.name], args.mode) for t in TIERS}
        for seed in range(args.first_seed, args.first_seed + seeds):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(args.keep or tmp) / f"{traffic.name.replace('/', '-')}-{args.mode}-seed{seed}.jsonl"
                out.parent.mkdir(parents=True, exist_ok=True)
                outcome, wall = one_sweep(traffic, seed, args.mode, out, probe_plan(args.quick))
            found = outcome.open if args.mode == "open" else outcome.closed
            for tier in TIERS:
                truth, cap = truths[tier.name], found[tier.name]
                rate = cap.rate_rps if cap.kind == "found" else None
                error = abs(rate - truth.request_rate_rps) / truth.request_rate_rps if rate else float("inf")
                # An interval open at one end holds the truth when its other end does, and says so:
                # it is the pricer's "not bounded" (a warning), not a miss.
                low_ok = cap.rate_low is None or cap.rate_low <= truth.request_rate_rps
                high_ok = cap.rate_high is None or truth.request_rate_rps <= cap.rate_high
                open_end = " (open below)" if cap.rate_low is None else " (open above)" if cap.rate_high is None else ""
                covered = "y" + open_end if low_ok and high_ok else "n" + open_end
                errors.append(error)
                where = f"c={cap.level:g}" if args.mode == "closed" and cap.level is not None else ""
                print(f"{traffic.name:<14}{seed:>5}  {tier.name:<9}{truth.request_rate_rps:>9.3f} req/s"
                      f"{'' if args.mode == 'open' else f' c={truth.level:g}':>7}"
                      f"{(f'{rate:.3f} req/s ' if rate else cap.kind):>16}{where:>6}{error:>8.1%}"
                      + (f"{slope:>7.2f}{error * slope:>7.1%}" if math.isfinite(slope := slopes[tier.name]) else f"{'-':>7}{'-':>7}")
                      + f"  {covered}", flush=True)
            used = outcome.open_probes_run if args.mode == "open" else outcome.probes_run
            probes.append(used)
            walls.append(wall)
            order = [f"{r.load.level:.3g}" for r in outcome.records if r.load.kind == "decode"]
            print(f"{traffic.name:<14}{seed:>5}  {used} {args.mode}-loop decode probes ({', '.join(order)})"
                  + (f" after {outcome.probes_run} closed-loop ones" if args.mode == "open" else "")
                  + f", {wall / 60:.1f} min" + (f"; stopped: {outcome.stopped}" if outcome.stopped else ""), flush=True)
    print(f"median wall time per sweep {statistics.median(walls) / 60:.1f} min over {len(walls)} sweep(s)")
    print(f"max tier error {max(errors):.1%} in {statistics.median(probes):g} probes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
