"""Does an open loop of chat sessions measure the server full? Counted turn rate against offered.

    python benchmarks/session_fill.py [--rate 40] [--repeats 3] [--think-scale 0.01]

The simulated engine (sim_setup.ENGINE, with a prefix cache) takes the default profile's
sessions, lengths / 8, arriving as a Poisson process of sessions at `--rate` turns per second
(load.sessions). A server that keeps up serves the offered turn rate in the long run; a window
opened while sessions still pile up counts fewer turns, and flatters the latencies it reads. Per
probe: when the window opened, the turns per second it counted (and its 95% interval) against
the offered rate, and the TTFT and TPOT p90 it read. Run an older checkout with
PYTHONPATH=<its root> to compare. About a minute per probe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_setup import ENGINE, MAX_MODEL_LEN  # noqa: E402

from pricing.load import event_loop as aio  # noqa: E402
from pricing.load.client import ClientConfig, ProbePlan  # noqa: E402
from pricing.load.sessions import SessionTraffic  # noqa: E402
from pricing.measure.probe import run_probe  # noqa: E402
from pricing.schema import LoadSpec  # noqa: E402
from pricing.testing.mock_server import MockConfig, MockServerProcess  # noqa: E402
from pricing.workload.profile import DEFAULT_PROFILE, load_profile  # noqa: E402
from pricing.workload.sessions import SessionTurn  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=40.0, help="offered turns per second (saturation with independent "
                   "requests: about 61)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--think-scale", type=float, default=0.01)
    args = p.parse_args(argv)
    sessions = [tuple(SessionTurn(max(1, t.new_input_tokens // 8), max(1, t.output_tokens // 8), t.think_s) for t in s)
                for s in load_profile(DEFAULT_PROFILE).replay_sessions(MAX_MODEL_LEN)]
    load = LoadSpec(mode="open", request_rate_rps=args.rate, sessions=True, think_scale=args.think_scale)
    shares = []
    with MockServerProcess(MockConfig(engine=ENGINE, prefix_cache_block_tokens=16)) as mock:
        for rep in range(args.repeats):
            cfg = ClientConfig(base_url=mock.url, model="mock-model", seed=rep)
            with aio.paused_gc():
                result = aio.run(run_probe(cfg, load, SessionTraffic(sessions, seed=rep), ProbePlan()))
            s = result.stats
            low, high = s.request_rate_rps_ci or (s.request_rate_rps, s.request_rate_rps)
            opened_s = (result.window_start_ns - min(r.start_ns for r in result.records)) / 1e9
            shares.append(s.request_rate_rps / args.rate)
            print(f"probe {rep}: window opened {opened_s:.1f} s after the first arrival, {s.window_s:.0f} s long; "
                  f"counted {s.request_rate_rps:.1f} turns/s = {shares[-1]:.1%} of offered [95%: {low:.1f}, {high:.1f}]; "
                  f"TTFT p90 {s.ttft_s.p90 * 1e3:.1f} ms, TPOT p90 {s.tpot_s.p90 * 1e3:.2f} ms", flush=True)
    print(f"counted / offered: {min(shares):.1%} to {max(shares):.1%} over {len(shares)} probes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
