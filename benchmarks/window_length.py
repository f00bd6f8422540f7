"""How long an open-loop window must be for its TPOT p90 to mean the long run's, offline.

    python benchmarks/window_length.py [--seeds N] [--horizon-s S] [--loads 0.6,0.9] [--windows 10,20,40]
    python benchmarks/window_length.py --warmup [--seeds N] [--loads 0.8,0.9,0.95]
    python benchmarks/window_length.py --closed 4,24 [--profile fixed] [--windows 10,20]
    python benchmarks/window_length.py --stopping [--seeds 32] [--loads 0.6]

The simulated engine (sim_setup.ENGINE) takes Poisson arrivals of the quick WildChat traffic at
each `--loads` share of its saturation, from an empty engine, for `--horizon-s` per seed; every
window of W seconds after the first 30 s gives the p90 of its cohort's TPOT and TTFT (requests
whose first token came in it, followed to their end, as a probe measures) and each p90's 95%
interval (measure.intervals). Printed per load and W: the median (and, for TPOT, the sd) of the
windows' p90 error against the long-run truth (sim_truth.open_loop_truth), the share of
intervals that hold the truth, and the share with no upper end (too few effective samples: such
a window cannot show a tier met, and a probe runs on). Short windows err low: each window sees its own stretch of load,
and the long run's p90 is over the mixture of them; near saturation that stretch is long.
With `--warmup`, one 20 s window per run, opened as a probe would open it: when the first 16
arrivals have ended (the rule before load.settle), once the server has settled (load.settle's rule,
replayed on the run's requests), or after a minute (for reference); printed per load: the median
opening time and the windows' p90 errors against the long run.
With `--closed`, the same for closed loops of those concurrencies (clients think sim_setup.THINK_S
between requests, as probe_accuracy's do), on the quick WildChat or (`--profile fixed`) the
quick fixed traffic.
With `--stopping`, windows that stop as a probe's do (from 20 s, looked at every second, once
every default tier's TTFT and TPOT verdicts on the requests finished so far are decided, else at
60 s) beside fixed windows of 20, 40 and 60 s, one every 61 s of each run: stopping on the data
selects windows whose intervals happen to be narrow.
No server runs; a few seconds of CPU per seed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_setup import CACHE, ENGINE, THINK_S, TIERS, fixed, wildchat  # noqa: E402

from pricing.load.settle import RECENT, has_settled, request_shapes  # noqa: E402
from pricing.measure.intervals import percentile_interval  # noqa: E402
from pricing.measure.slo import outcome  # noqa: E402
from pricing.measure.window import latency_at  # noqa: E402
from pricing.testing.sim_truth import (  # noqa: E402
    closed_loop_requests,
    closed_loop_truth,
    open_loop_requests,
    open_loop_truth,
)

SETTLE_S = 30.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--horizon-s", type=float, default=1200.0)
    p.add_argument("--windows", default="10,20,40", help="window lengths in seconds")
    p.add_argument("--loads", default="0.6,0.9", help="arrival rates as shares of the closed-loop saturation")
    p.add_argument("--warmup", action="store_true", help="windows opened by the warm-up rules instead")
    p.add_argument("--closed", help="closed loops of these concurrencies (comma-separated) instead")
    p.add_argument("--profile", choices=["wildchat", "fixed"], default="wildchat", help="the quick traffic of sim_setup")
    p.add_argument("--stopping", action="store_true", help="windows stopped once decided, beside fixed ones")
    args = p.parse_args(argv)
    if args.stopping:
        return stopping_table(args.seeds, [float(x) for x in args.loads.split(",")], args.horizon_s)
    if args.warmup:
        return warmup_table(args.seeds, [float(x) for x in args.loads.split(",")])
    traffic = wildchat(True) if args.profile == "wildchat" else fixed(True)
    saturation = closed_loop_truth(ENGINE, traffic.pairs, ENGINE.max_num_seqs, cache_dir=CACHE).request_rate_rps
    print(f"{traffic.name}, {'closed loops' if args.closed else 'Poisson arrivals'}, {args.seeds} runs of "
          f"{args.horizon_s:g} s per load; saturation {saturation:.1f} req/s")
    print(f"{'load':>6}{'window':>8}{'windows':>9}{'TPOT p90 err':>14}{'sd':>7}{'covered':>9}{'open above':>12}"
          f"{'TTFT p90 err':>14}{'covered':>9}{'open above':>12}")
    loads = ([("closed", float(c)) for c in args.closed.split(",")] if args.closed
             else [("open", float(x)) for x in args.loads.split(",")])
    for mode, share in loads:
        if mode == "closed":
            truth = closed_loop_truth(ENGINE, traffic.pairs, int(share), think_s=THINK_S, cache_dir=CACHE)
        else:
            rate = round(share * saturation, 3)
            truth = open_loop_truth(ENGINE, traffic.pairs, rate, seed=0, cache_dir=CACHE)
        runs = []
        for seed in range(args.seeds):
            offset = 5000 * seed + 3  # each seed its own stretch of the pool, as probes take
            pairs = traffic.pairs[offset:] + traffic.pairs[:offset]
            # Open: the offered rate's arrivals; closed: the truth's throughput at that concurrency.
            horizon = int((truth.request_rate_rps if mode == "closed" else rate) * args.horizon_s)
            runs.append(closed_loop_requests(ENGINE, pairs, int(share), THINK_S, seed=100 + seed, horizon_requests=horizon)
                        if mode == "closed" else
                        open_loop_requests(ENGINE, pairs, rate, seed=100 + seed, horizon_requests=horizon))
        for width in (float(w) for w in args.windows.split(",")):
            errors: dict[str, list[float]] = {"tpot": [], "ttft": []}
            covered, unbounded = {"tpot": 0, "ttft": 0}, {"tpot": 0, "ttft": 0}
            for r in runs:
                for start in np.arange(SETTLE_S, r["first_s"].max() - width, width):
                    ttft, tpot = _cohort(r, start, start + width)
                    for name, values, true in (("tpot", tpot, truth.tpot_s.p90), ("ttft", ttft, truth.ttft_s.p90)):
                        low, high = percentile_interval(values, 90)
                        errors[name].append(np.percentile(values, 90) / true - 1)
                        covered[name] += low <= true <= high
                        unbounded[name] += not np.isfinite(high)  # the window cannot show the tier met
            n = len(errors["tpot"])
            print(f"{f'c={share:g}' if mode == 'closed' else f'{share:.0%}':>6}{width:>7g}s{n:>9}{np.median(errors['tpot']):>+14.1%}{np.std(errors['tpot']):>7.1%}"
                  f"{covered['tpot'] / n:>9.0%}{unbounded['tpot'] / n:>12.0%}{np.median(errors['ttft']):>+14.1%}"
                  f"{covered['ttft'] / n:>9.0%}{unbounded['ttft'] / n:>12.0%}")
    return 0


def _cohort(r: dict, start: float, end: float, finished_by: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """TTFT and TPOT of the requests whose first token came in [start, end] (those finished by
    `finished_by`, if given: what a probe's stop rule sees), each in time order (as the intervals
    need it), as a probe measures its window."""
    inside = (r["first_s"] >= start) & (r["first_s"] <= end)
    if finished_by is not None:
        inside &= r["end_s"] <= finished_by
    multi = inside & (r["osl"] >= 2)
    tpot = ((r["end_s"] - r["first_s"])[multi] / (r["osl"][multi] - 1))[np.argsort(r["first_s"][multi])]
    ttft = (r["first_s"] - r["arrive_s"])[inside][np.argsort(r["first_s"][inside])]
    return ttft, tpot


def _decided(ttft: np.ndarray, tpot: np.ndarray) -> bool:
    """measure.probe.decided_rule on an offline sample: every default tier passes surely, fails
    surely, or fails one limit surely."""
    for tier in TIERS:
        outcomes = [outcome(*latency_at(values, tier.percentile), limit)
                    for values, limit in ((ttft, tier.ttft_s), (tpot, tier.tpot_s))]
        if "fail" not in outcomes and "undecided" in outcomes:
            return False
    return True


def stopping_table(seeds: int, loads: list[float], horizon_s: float) -> int:
    traffic = wildchat(True)
    saturation = closed_loop_truth(ENGINE, traffic.pairs, ENGINE.max_num_seqs, cache_dir=CACHE).request_rate_rps
    print(f"{traffic.name}, Poisson arrivals, {seeds} runs of {horizon_s:g} s per load; saturation {saturation:.1f} req/s")
    print(f"{'load':>6}  {'window':<10}{'windows':>8}{'median s':>9}{'TTFT p90 err':>14}{'covered':>9}"
          f"{'TPOT p90 err':>14}{'covered':>9}")
    for share in loads:
        rate = round(share * saturation, 3)
        truth = open_loop_truth(ENGINE, traffic.pairs, rate, seed=0, cache_dir=CACHE)
        rows: dict[str, list[tuple[float, float, bool, float, bool]]] = {}
        for seed in range(seeds):
            offset = 5000 * seed + 3
            pairs = traffic.pairs[offset:] + traffic.pairs[:offset]
            r = open_loop_requests(ENGINE, pairs, rate, seed=100 + seed, horizon_requests=int(rate * horizon_s))
            for start in np.arange(SETTLE_S, r["first_s"].max() - 70, 61.0):
                stop = next((t for t in np.arange(20.0, 60.0, 1.0)
                             if _decided(*_cohort(r, start, start + t, finished_by=start + t))), 60.0)
                for name, width in (("20 s", 20.0), ("stopped", stop), ("40 s", 40.0), ("60 s", 60.0)):
                    ttft, tpot = _cohort(r, start, start + width)
                    row = [width]
                    for values, true in ((ttft, truth.ttft_s.p90), (tpot, truth.tpot_s.p90)):
                        low, high = percentile_interval(values, 90)
                        row += [np.percentile(values, 90) / true - 1, low <= true <= high]
                    rows.setdefault(name, []).append(tuple(row))
        for name, values in rows.items():
            a = np.asarray(values, dtype=float)
            print(f"{share:>6.0%}  {name:<10}{len(a):>8}{np.median(a[:, 0]):>9.1f}{np.median(a[:, 1]):>+14.1%}"
                  f"{a[:, 2].mean():>9.0%}{np.median(a[:, 3]):>+14.1%}{a[:, 4].mean():>9.0%}")
    return 0


def settle_time_s(r: dict, first_units: int = 16, step_s: float = 0.1) -> float:
    """When load.settle's rule opens the window of this run (the first units ended, then at least
    SETTLE_E2E_P90S estimated E2E p90s since the first arrival, or at once if it overflows),
    replayed on its requests."""
    t = float(r["end_s"][:first_units].max())  # arrival order
    by_end = np.argsort(r["end_s"])
    ends = r["end_s"][by_end]

    def counts(at: float) -> tuple[int, int]:  # (in the server, arrived) at `at`
        arrived = int(np.searchsorted(r["arrive_s"], at, "right"))
        return arrived - int(np.searchsorted(ends, at, "right")), arrived

    warmed = counts(t)
    while True:
        now = counts(t)
        latest = by_end[max(0, np.searchsorted(ends, t, "right") - RECENT):np.searchsorted(ends, t, "right")]
        multi = latest[r["osl"][latest] >= 2]
        if has_settled((r["first_s"] - r["arrive_s"])[latest],
                       ((r["end_s"] - r["first_s"]) / np.maximum(1, r["osl"] - 1))[multi],
                       request_shapes(r["osl"][r["arrive_s"] <= t]), t - r["arrive_s"][0], math.inf,
                       now[0] - warmed[0], now[1] - warmed[1]):
            return t
        t += step_s


def warmup_table(seeds: int, loads: list[float], width: float = 20.0) -> int:
    traffic = wildchat(True)
    saturation = closed_loop_truth(ENGINE, traffic.pairs, ENGINE.max_num_seqs, cache_dir=CACHE).request_rate_rps
    print(f"{traffic.name}, Poisson arrivals from an empty engine, {seeds} runs per load, {width:g} s windows; "
          f"saturation {saturation:.1f} req/s")
    print(f"{'load':>6}  {'window opens':<22}{'at (median)':>12}{'TPOT p90 err':>14}{'TTFT p90 err':>14}")
    for share in loads:
        rate = round(share * saturation, 3)
        truth = open_loop_truth(ENGINE, traffic.pairs, rate, seed=0, cache_dir=CACHE)
        rows: dict[str, list[tuple[float, float, float]]] = {}
        for seed in range(seeds):
            offset = 5000 * seed + 3
            pairs = traffic.pairs[offset:] + traffic.pairs[:offset]
            r = open_loop_requests(ENGINE, pairs, rate, seed=100 + seed, horizon_requests=int(rate * 100))
            for name, start in (("first 16 ended", float(r["end_s"][:16].max())), ("settled (load.settle)", settle_time_s(r)),
                                ("after 60 s", 60.0)):
                ttft, tpot = _cohort(r, start, start + width)
                rows.setdefault(name, []).append((start, np.percentile(tpot, 90) / truth.tpot_s.p90 - 1,
                                                  np.percentile(ttft, 90) / truth.ttft_s.p90 - 1))
        for name, values in rows.items():
            a = np.asarray(values)
            print(f"{share:>6.0%}  {name:<22}{np.median(a[:, 0]):>11.1f}s{np.median(a[:, 1]):>+14.1%}{np.median(a[:, 2]):>+14.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
