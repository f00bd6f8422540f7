"""Each probe's error against the exact truth of a simulated continuous-batching engine.

    python benchmarks/probe_accuracy.py [--quick] [--repeats N] [--one-at-a-time]

The mock server runs `pricing.testing.sim_engine` in real time; `pricing.testing.sim_truth` computes
the same engine's steady state offline, on the same (ISL, OSL) pairs. For a fixed and a WildChat
profile at several closed-loop concurrencies (clients think 50 ms between requests: see
sim_setup.THINK_S) and one Poisson rate, every probe (default ProbePlan,
the default tiers deciding its length) prints its error in output tok/s, input tok/s, req/s, TTFT
p90 and TPOT p90 (and the window's own samples of the flows), and whether its 95% intervals
cover the truth; and one open-loop probe past saturation (`--quick`: of WildChat only), which
must not read as serving its offered rate (measure.probe.open_loop_rate). Beside them, the same p90s
against the mock's own record of the same requests (`/mock/timeline`: kernel arrival stamp and
the write of each chunk): what the client adds, apart from how far the engine, run in real time
on a shared CPU, strays from its offline model. The last line reads
`max flow error X% (input tok/s, output tok/s, req/s)`. The two profiles run side by side, each
on its own mock server (`--one-at-a-time`: one after the other): `--quick` takes about 4 min
so, 6.5 one at a time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_setup import CACHE, ENGINE, THINK_S, TIERS, Traffic, fixed, probe_plan, wildchat  # noqa: E402

from pricing.load import event_loop as aio  # noqa: E402
from pricing.load.client import ClientConfig, ProbePlan  # noqa: E402
from pricing.measure.probe import run_probe  # noqa: E402
from pricing.measure.window import tpot_s, ttft_s  # noqa: E402
from pricing.schema import Ci, LoadSpec  # noqa: E402
from pricing.testing.mock_server import MockConfig, MockServerProcess  # noqa: E402
from pricing.testing.mock_timeline import fetch_timeline, server_tpot_s, server_ttft_s  # noqa: E402
from pricing.testing.sim_truth import TruthPoint, closed_loop_truth, open_loop_truth  # noqa: E402


def _covers(ci: Ci | None, truth: float) -> bool:
    if ci is None:
        return False
    low, high = ci
    return bool((low is None or low <= truth) and (high is None or truth <= high))


def _err(measured: float | None, truth: float) -> float:
    return (measured - truth) / truth if measured is not None and truth else float("nan")


def exact_flows(traffic: Traffic, load: LoadSpec, truth: TruthPoint) -> tuple[float, float, float]:
    """(req/s, input tok/s, output tok/s) in the long run. A stable open loop serves its offered
    rate exactly (the simulated span's own count is a sample of it); a closed loop's are the truth's."""
    if load.mode == "open" and truth.stable:
        isl, osl = (sum(x) / len(traffic.pairs) for x in zip(*traffic.pairs))
        rate = load.request_rate_rps or 0.0
        return rate, rate * isl, rate * osl
    return truth.request_rate_rps, truth.input_tok_s, truth.output_tok_s


def server_p90s(url: str, result) -> tuple[tuple[float, float], tuple[float, float]]:
    """((client, server) TTFT p90, (client, server) TPOT p90) over the same requests, those whose
    first token came in the window (the probe's TTFT sample), the server's from its own record."""
    timeline = fetch_timeline(url)
    w0, w1 = result.window_start_ns, result.window_end_ns
    ttft, tpot = [], []
    for rec in result.records:
        entry = timeline.get(rec.response_id or "")
        if not rec.ok or entry is None or not rec.chunk_ns or not w0 <= rec.chunk_ns[0] <= w1:
            continue
        ttft.append((ttft_s(rec), server_ttft_s(entry)))
        client_tpot, server_tpot = tpot_s(rec), server_tpot_s(entry)
        if client_tpot is not None and server_tpot is not None:
            tpot.append((client_tpot, server_tpot))
    p90 = lambda pairs: tuple(np.percentile(np.array(pairs), 90, axis=0)) if pairs else (np.nan, np.nan)  # noqa: E731
    return p90(ttft), p90(tpot)


def realized(url: str, traffic: Traffic, load: LoadSpec, window_s: float) -> tuple[float, float]:
    """The server's own TTFT and TPOT p90 over one long window: the engine as it ran here, in
    real time on shared cores, not as modelled (sim_truth)."""
    cfg = ClientConfig(base_url=url, model="mock-model", seed=999)
    plan = ProbePlan(min_window_s=window_s / (2 if load.mode == "open" else 1), min_requests=1,
                     max_duration_s=2 * window_s + 60)
    with aio.paused_gc():
        result = aio.run(run_probe(cfg, load, traffic.cycle(500_000), plan, lengths=traffic.lengths))
    (_, ttft), (_, tpot) = server_p90s(url, result)
    return ttft, tpot


def one_probe(url: str, traffic: Traffic, load: LoadSpec, truth: TruthPoint, offset: int, plan: ProbePlan,
              real: tuple[float, float] | None = None) -> dict:
    cfg = ClientConfig(base_url=url, model="mock-model", seed=offset)
    t0 = time.perf_counter()
    with aio.paused_gc():
        result = aio.run(run_probe(cfg, load, traffic.cycle(offset), plan, tiers=TIERS, lengths=traffic.lengths))
    s = result.stats
    rps, in_tok_s, out_tok_s = exact_flows(traffic, load, truth)
    (ttft_client, ttft_server), (tpot_client, tpot_server) = server_p90s(url, result)
    return {
        "profile": traffic.name, "load": f"{load.mode} {load.level:g}", "wall_s": time.perf_counter() - t0,
        "window_s": s.window_s, "ttft_n": s.ttft_s.count,
        "out": _err(s.output_tok_s, out_tok_s), "in": _err(s.input_tok_s, in_tok_s), "rps": _err(s.request_rate_rps, rps),
        "in_measured": _err(s.measured_input_tok_s, in_tok_s),
        "out_measured": _err(s.output_tokens / s.window_s if s.window_s else None, out_tok_s),
        "served_as_offered": s.rate_source == "offered", "stable": truth.stable,
        "ttft_p90": _err(s.ttft_s.p90, truth.ttft_s.p90), "tpot_p90": _err(s.tpot_s.p90, truth.tpot_s.p90),
        "ttft_covered": _covers(s.ttft_s.p90_ci, truth.ttft_s.p90),
        "tpot_covered": _covers(s.tpot_s.p90_ci, truth.tpot_s.p90),
        "rps_covered": _covers(s.request_rate_rps_ci, rps),
        "out_covered": _covers(s.output_tok_s_ci, out_tok_s),
        "ttft_vs_server": ttft_client / ttft_server - 1, "tpot_vs_server": tpot_client / tpot_server - 1,
        "realized_ttft_covered": real is not None and _covers(s.ttft_s.p90_ci, real[0]),
        "realized_tpot_covered": real is not None and _covers(s.tpot_s.p90_ci, real[1]),
        "undecided_at_cap": result.undecided_at_cap,
    }


# Requests of the pool (sim_setup.POOL) between one probe's first and the next's: more than an open
# probe at 60% of saturation sends in its longest window (WildChat / 8: about 2,500), so probes do
# not share requests (with 1,000, neighbours shared half of theirs, and a stretch of the pool that
# reads low counted two or three times) while the pool lasts (16 probes of a profile).
STRETCH = 3000

# An open loop this far past the engine's saturation (its closed-loop throughput at max_num_seqs,
# the most it can serve) cannot keep up: the truth of the probe's kept-up judgment.
OVERLOAD = 1.1


def judged_serving_offered(url: str, traffic: Traffic, rate_rps: float, offset: int, plan: ProbePlan) -> bool:
    """Whether an open-loop probe at `rate_rps` read its server as serving that rate (rate_source offered)."""
    cfg = ClientConfig(base_url=url, model="mock-model", seed=offset)
    with aio.paused_gc():
        result = aio.run(run_probe(cfg, LoadSpec(mode="open", request_rate_rps=rate_rps), traffic.cycle(offset), plan,
                                   tiers=TIERS, lengths=traffic.lengths))
    return result.stats.rate_source == "offered"


def _truth(traffic: Traffic, load: LoadSpec) -> TruthPoint:
    if load.mode == "closed":
        return closed_loop_truth(ENGINE, traffic.pairs, load.concurrency, think_s=load.think_s, cache_dir=CACHE)
    return open_loop_truth(ENGINE, traffic.pairs, load.request_rate_rps, seed=0, cache_dir=CACHE)


def _row_line(row: dict, realized_too: bool) -> str:
    covered = ", ".join("y" if row[k] else "n" for k in ("ttft_covered", "tpot_covered", "rps_covered", "out_covered"))
    return (f"{row['profile']:<14}{row['load']:<14}{row['window_s']:>7.1f}s{row['ttft_n']:>7}"
            f"{row['out']:>+8.1%}{row['in']:>+8.1%}{row['rps']:>+8.1%}{row['in_measured']:>+9.1%}{row['out_measured']:>+9.1%}"
            f"{row['ttft_p90']:>+10.1%}{row['tpot_p90']:>+10.1%}  {covered:<32}"
            f"{row['ttft_vs_server']:>+6.1%}, {row['tpot_vs_server']:+.1%}"
            + (f"  realized covered: {'y' if row['realized_ttft_covered'] else 'n'}, "
               f"{'y' if row['realized_tpot_covered'] else 'n'}" if realized_too else ""))


def profile_rows(name: str, quick: bool, repeats: int, realized_s: float, first_offset: int, pool_seed: int = 0
                 ) -> tuple[list[dict], list[bool]]:
    """One profile's probes on its own mock server: its rows, and whether past saturation it
    was judged serving the offered rate (quick: WildChat only)."""
    traffic = fixed(quick) if name == "fixed" else wildchat(quick, seed=pool_seed)
    concurrencies = (4, 24) if quick else (4, 16, 64)
    plan = probe_plan(quick)
    rows, overloads = [], []
    saturation = closed_loop_truth(ENGINE, traffic.pairs, ENGINE.max_num_seqs, cache_dir=CACHE).request_rate_rps
    loads = [LoadSpec(mode="closed", concurrency=c, think_s=THINK_S) for c in concurrencies]
    loads.append(LoadSpec(mode="open", request_rate_rps=round(0.6 * saturation, 3)))
    with MockServerProcess(MockConfig(engine=ENGINE)) as mock:
        for load in loads:
            truth = _truth(traffic, load)
            real = realized(mock.url, traffic, load, realized_s) if realized_s else None
            if real is not None:
                print(f"{traffic.name:<14}{load.mode} {load.level:g}: the server's own p90s over {realized_s:g} s: "
                      f"TTFT {real[0] / truth.ttft_s.p90 - 1:+.1%}, TPOT {real[1] / truth.tpot_s.p90 - 1:+.1%} "
                      f"against the offline truth", flush=True)
            for r in range(repeats):
                row = one_probe(mock.url, traffic, load, truth, offset=first_offset + STRETCH * len(rows) + 7 * r,
                                plan=plan, real=real)
                rows.append(row)
                print(_row_line(row, real is not None), flush=True)
        if not (quick and traffic.name != "wildchat/8"):  # quick: past saturation on the heavy-tailed
            over = round(OVERLOAD * saturation, 3)  # profile only, whose counts vary most
            kept = judged_serving_offered(mock.url, traffic, over, offset=first_offset + STRETCH * len(rows) + 5, plan=plan)
            overloads.append(kept)
            print(f"{traffic.name:<14}open {over:g} ({OVERLOAD:g} x saturation): judged "
                  f"{'serving it (wrong)' if kept else 'not serving it'}", flush=True)
    return rows, overloads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="WildChat lengths / 8, fewer loads and repeats (about 4.5 min on 2 cores)")
    p.add_argument("--repeats", type=int, help="probes per load (default 2 quick, 4 full)")
    p.add_argument("--json", help="write every probe's errors here")
    p.add_argument("--realized-s", type=float, default=0.0, help="before each load's probes, one of this long a "
                   "window whose server-side p90s the intervals are also checked against (0: none)")
    p.add_argument("--one-at-a-time", action="store_true", help="the profiles one after the other, not side by side")
    p.add_argument("--pool-seed", type=int, default=0, help="another draw of the WildChat pool (and other client "
                   "seeds for both profiles): repeated runs with new seeds are independent samples of the probes")
    args = p.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 4)
    per_profile = STRETCH * (repeats * (3 if args.quick else 4) + 1)  # fresh requests for every probe of both
    shift = 7 * args.pool_seed  # other arrival and think-time seeds (ClientConfig.seed is the offset)
    jobs = [(name, args.quick, repeats, args.realized_s, i * per_profile + shift, args.pool_seed)
            for i, name in enumerate(("fixed", "wildchat"))]
    print(f"{'profile':<14}{'load':<14}{'window':>8}{'TTFTs':>7}{'out':>8}{'in':>8}{'req/s':>8}{'in meas':>9}{'out meas':>9}"
          f"{'TTFT p90':>10}{'TPOT p90':>10}  covered (TTFT, TPOT, req/s, out)  vs server (TTFT, TPOT)", flush=True)
    # Side by side: a probe mostly waits on its server's simulated steps (a quick run keeps about a
    # fifth of one core busy), so two profiles on their own mock servers take the time of one; the
    # client-against-server figures below show what sharing the cores adds.
    if args.one_at_a_time:
        results = [profile_rows(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(profile_rows, *zip(*jobs)))
    rows = [row for profile, _ in results for row in profile]
    overloads = [kept for _, profile in results for kept in profile]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    n = len(rows)
    for key, label in (("ttft_covered", "TTFT p90"), ("tpot_covered", "TPOT p90"), ("rps_covered", "req/s"),
                       ("out_covered", "output tok/s")):
        print(f"95% interval of {label} covers the truth in {sum(r[key] for r in rows)}/{n} probes")
    if args.realized_s:
        for key, label in (("realized_ttft_covered", "TTFT p90"), ("realized_tpot_covered", "TPOT p90")):
            print(f"95% interval of {label} covers the server's own {args.realized_s:g} s p90 in "
                  f"{sum(r[key] for r in rows)}/{n} probes")
    print(f"client against the server's record of the same requests: TTFT p90 max "
          f"{max(abs(r['ttft_vs_server']) for r in rows):.1%}, TPOT p90 max {max(abs(r['tpot_vs_server']) for r in rows):.1%}")
    worst = {k: max(abs(r[k]) for r in rows)
             for k in ("in", "out", "rps", "ttft_p90", "tpot_p90", "in_measured", "out_measured")}
    opened = [r for r in rows if r["load"].startswith("open")]
    print(f"open-loop probes read as serving the offered rate: {sum(r['served_as_offered'] for r in opened)}/"
          f"{len(opened)}, stable in the offline truth: {sum(r['stable'] for r in opened)}/{len(opened)}; "
          f"past saturation: {sum(overloads)}/{len(overloads)}")
    print(f"max latency error: TTFT p90 {worst['ttft_p90']:.1%}, TPOT p90 {worst['tpot_p90']:.1%}; "
          f"the window's own samples: prompts of first tokens in it {worst['in_measured']:.1%}, "
          f"output tokens streamed in it {worst['out_measured']:.1%}; "
          f"median probe {sorted(r['wall_s'] for r in rows)[n // 2]:.0f} s")
    print(f"max flow error {max(worst['in'], worst['out'], worst['rps']):.1%} (input tok/s {worst['in']:.1%}, "
          f"output tok/s {worst['out']:.1%}, req/s {worst['rps']:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
