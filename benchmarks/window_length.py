"""How long an open-loop window must be for its TPOT p90 to mean the long run's, offline.

    python benchmarks/window_length.py [--seeds N] [--horizon-s S]

The simulated engine (sim_setup.ENGINE) takes Poisson arrivals of the quick WildChat traffic at
60% of its saturation, from an empty engine, for `--horizon-s` per seed; every window of W seconds
after the first 30 s gives the p90 of its cohort's TPOT (requests whose first token came in it,
followed to their end, as a probe measures) and that p90's 95% interval (measure.intervals).
Printed per W: the median and sd of the windows' p90 error against the long-run truth
(sim_truth.open_loop_truth), and the share of intervals that hold the truth. Short windows err
low: each window sees its own stretch of load, and the long run's p90 is over the mixture of them.
No server runs; a few seconds of CPU per seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_setup import CACHE, ENGINE, wildchat  # noqa: E402

from pricing.measure.intervals import percentile_interval  # noqa: E402
from pricing.testing.sim_truth import closed_loop_truth, open_loop_requests, open_loop_truth  # noqa: E402

SETTLE_S = 30.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--horizon-s", type=float, default=1200.0)
    p.add_argument("--windows", default="10,20,40", help="window lengths in seconds")
    args = p.parse_args(argv)
    traffic = wildchat(True)
    saturation = closed_loop_truth(ENGINE, traffic.pairs, ENGINE.max_num_seqs, cache_dir=CACHE).request_rate_rps
    rate = round(0.6 * saturation, 3)
    truth = open_loop_truth(ENGINE, traffic.pairs, rate, seed=0, cache_dir=CACHE).tpot_s.p90
    runs = []
    for seed in range(args.seeds):
        offset = 5000 * seed + 3  # each seed its own stretch of the pool, as probes take
        pairs = traffic.pairs[offset:] + traffic.pairs[:offset]
        runs.append(open_loop_requests(ENGINE, pairs, rate, seed=100 + seed, horizon_requests=int(rate * args.horizon_s)))
    print(f"{traffic.name}, Poisson {rate:g} req/s (60% of saturation), long-run TPOT p90 {truth * 1e3:.2f} ms, "
          f"{args.seeds} runs of {args.horizon_s:g} s")
    print(f"{'window':>8}{'windows':>9}{'median err':>12}{'sd':>7}{'covered':>9}")
    for width in (float(w) for w in args.windows.split(",")):
        errors, covered = [], 0
        for r in runs:
            multi = r["osl"] >= 2
            for start in np.arange(SETTLE_S, r["first_s"].max() - width, width):
                inside = multi & (r["first_s"] >= start) & (r["first_s"] <= start + width)
                order = np.argsort(r["first_s"][inside])  # in time order, as the interval needs
                tpot = ((r["end_s"] - r["first_s"])[inside] / (r["osl"][inside] - 1))[order]
                low, high = percentile_interval(tpot, 90)
                errors.append(np.percentile(tpot, 90) / truth - 1)
                covered += low <= truth <= high
        print(f"{width:>7g}s{len(errors):>9}{np.median(errors):>+12.1%}{np.std(errors):>7.1%}{covered / len(errors):>9.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
