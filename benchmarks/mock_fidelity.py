"""How faithfully the mock server runs its simulated engine in real time, at one open-loop rate.

    python benchmarks/mock_fidelity.py [--rate 7.44] [--window-s 90]

The accuracy benchmarks check the client against the engine's offline truth, so the mock must be
the engine. Poisson arrivals (WildChat lengths / 8, as `--quick`) go to the mock for one long
probe; its own record of them (`/mock/timeline`: kernel arrival stamps, chunk writes) is replayed
through the same engine offline (`sim_engine.replay`, on the arrivals as they came). It prints
how late the mock wrote each first token against the replay, and the TTFT / TPOT p90 of the mock,
the replay, the long-run offline truth (other arrivals of the same process) and the client.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_setup import CACHE, ENGINE, wildchat  # noqa: E402

from pricing.load import event_loop as aio  # noqa: E402
from pricing.load.client import ClientConfig, ProbePlan  # noqa: E402
from pricing.measure.probe import run_probe  # noqa: E402
from pricing.schema import LoadSpec  # noqa: E402
from pricing.testing.mock_server import MockConfig, MockServerProcess  # noqa: E402
from pricing.testing.mock_timeline import fetch_timeline, server_tpot_s, server_ttft_s  # noqa: E402
from pricing.testing.sim_engine import replay  # noqa: E402
from pricing.testing.sim_truth import open_loop_truth  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=7.44, help="Poisson arrivals, req/s")
    p.add_argument("--window-s", type=float, default=90.0)
    args = p.parse_args(argv)
    traffic = wildchat(True)
    truth = open_loop_truth(ENGINE, traffic.pairs, args.rate, seed=0, cache_dir=CACHE)
    with MockServerProcess(MockConfig(engine=ENGINE)) as mock:
        cfg = ClientConfig(base_url=mock.url, model="mock-model", seed=7)
        plan = ProbePlan(min_window_s=args.window_s, min_requests=1, max_duration_s=2 * args.window_s + 60)
        with aio.paused_gc():
            result = aio.run(run_probe(cfg, LoadSpec(mode="open", request_rate_rps=args.rate), traffic.cycle(12_345),
                                       plan, lengths=traffic.lengths))
        timeline = fetch_timeline(mock.url)
    done = {rid: e for rid, e in timeline.items() if len(e["chunk_ns"]) == e["osl"] > 0}
    t0 = min(e["recv_ns"] for e in done.values())
    arrival_s = {rid: (e["recv_ns"] - t0) / 1e9 for rid, e in done.items()}
    replayed = replay(ENGINE, [(rid, arrival_s[rid], e["isl"], e["osl"]) for rid, e in done.items()])
    late_ms = np.array([((e["chunk_ns"][0] - t0) / 1e9 - replayed[rid][0]) * 1e3 for rid, e in done.items()])
    # The steady part: the first and last 15% of arrivals out (filling, draining).
    ids = sorted(done, key=arrival_s.__getitem__)
    ids = ids[len(ids) * 15 // 100: len(ids) * 85 // 100]
    p90 = lambda xs: float(np.percentile([x for x in xs if x is not None], 90)) * 1e3  # noqa: E731
    mock_ttft, mock_tpot = p90(server_ttft_s(done[r]) for r in ids), p90(server_tpot_s(done[r]) for r in ids)
    replay_ttft = p90(replayed[r][0] - arrival_s[r] for r in ids)
    replay_tpot = p90((replayed[r][-1] - replayed[r][0]) / (len(replayed[r]) - 1) for r in ids if len(replayed[r]) > 1)
    print(f"{args.rate:g} req/s, {len(done)} requests: first token written {np.median(late_ms):+.2f} ms (median) / "
          f"{np.percentile(late_ms, 90):+.2f} ms (p90) after the replay's; {np.mean(late_ms > 5):.1%} more than 5 ms late")
    print(f"TTFT p90: mock {mock_ttft:.2f}, replay {replay_ttft:.2f} ({mock_ttft / replay_ttft - 1:+.1%}), "
          f"offline truth {truth.ttft_s.p90 * 1e3:.2f}, client {result.stats.ttft_s.p90 * 1e3:.2f} ms")
    print(f"TPOT p90: mock {mock_tpot:.3f}, replay {replay_tpot:.3f} ({mock_tpot / replay_tpot - 1:+.1%}), "
          f"offline truth {truth.tpot_s.p90 * 1e3:.3f}, client {result.stats.tpot_s.p90 * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
