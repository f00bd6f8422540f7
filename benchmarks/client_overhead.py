"""How much does the load client itself add to TTFT and TPOT, and how many chunks/s can it take?

Drives the mock server (its own process) at rising concurrency and compares, per request, what
the client measured with what the server did (its `/mock/timeline`: arrival of the request and
the write time of every chunk, same monotonic clock). Prints p50/p99 of
  TTFT error = client TTFT - (server first write - server arrival)
  TPOT error = client TPOT - server TPOT
plus the chunk rate received and the client's CPU cost per chunk (chunks per CPU-second = what
one core sustains). Run on a quiet machine: `python benchmarks/client_overhead.py`.
"""

from __future__ import annotations

import argparse
import itertools
import resource

import numpy as np

from pricing.load import event_loop as aio
from pricing.load.client import ClientConfig, ProbePlan
from pricing.measure.probe import run_probe
from pricing.measure.window import tpot_s, ttft_s
from pricing.schema import LoadSpec
from pricing.testing.mock_server import LatencyModel, MockConfig, MockServerProcess
from pricing.testing.mock_timeline import fetch_timeline, server_tpot_s, server_ttft_s


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(url: str, streams: int, osl: int, window_s: float, loop: aio.LoopChoice) -> dict:
    cfg = ClientConfig(base_url=url, model="mock-model")
    plan = ProbePlan(min_window_s=window_s, min_requests=streams, ramp_up_s=1.0 if streams > 1 else 0.0)
    cpu0 = cpu_s()
    with aio.paused_gc():
        result = aio.run(run_probe(cfg, LoadSpec(mode="closed", concurrency=streams), itertools.repeat((64, osl)), plan), loop)
    cpu = cpu_s() - cpu0
    timeline = fetch_timeline(url)
    ttft_err, tpot_err = [], []
    w0, w1 = result.window_start_ns, result.window_end_ns
    for rec in result.records:
        server = timeline.get(rec.response_id or "")
        if not rec.ok or server is None or not (w0 <= rec.start_ns and rec.end_ns <= w1):
            continue
        ttft_err.append(ttft_s(rec) - server_ttft_s(server))
        tpot_err.append(tpot_s(rec) - server_tpot_s(server))
    total_chunks = sum(len(r.chunk_ns) for r in result.records)
    wall_s = (max(r.end_ns for r in result.records) - min(r.start_ns for r in result.records)) / 1e9
    ms = lambda xs, q: float(np.percentile(np.array(xs) * 1e3, q))  # noqa: E731
    return {
        "streams": streams,
        "requests": len(ttft_err),
        "chunks_per_s": result.stats.output_tok_s,
        "ttft_err_p50_ms": ms(ttft_err, 50),
        "ttft_err_p99_ms": ms(ttft_err, 99),
        "tpot_err_p50_ms": ms(tpot_err, 50),
        "tpot_err_p99_ms": ms(tpot_err, 99),
        "client_chunks_per_cpu_s": total_chunks / cpu if cpu else float("nan"),
        "client_cpu_frac": cpu / wall_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64, 128, 256, 512, 1024])
    p.add_argument("--tpot-ms", type=float, default=25.0, help="mock TPOT; chunk rate = streams / TPOT")
    p.add_argument("--osl", type=int, default=40)
    p.add_argument("--window-s", type=float, default=4.0)
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                   help="event loop (auto: asyncio with kernel receive stamps on Linux, else uvloop)")
    args = p.parse_args()
    mock = MockConfig(latency=LatencyModel(ttft_base_s=0.050, tpot_base_s=args.tpot_ms / 1e3))
    rows = []
    with MockServerProcess(mock) as server:
        for n in args.streams:
            rows.append(measure(server.url, n, args.osl, args.window_s, args.loop))
            r = rows[-1]
            print(
                f"streams {n:5d}  {r['chunks_per_s']:8.0f} chunks/s  "
                f"TTFT err p50 {r['ttft_err_p50_ms']:6.3f} p99 {r['ttft_err_p99_ms']:7.3f} ms  "
                f"TPOT err p50 {r['tpot_err_p50_ms']:6.3f} p99 {r['tpot_err_p99_ms']:6.3f} ms  "
                f"client {r['client_chunks_per_cpu_s']:8.0f} chunks/CPU-s ({r['client_cpu_frac']:.0%} of a core)",
                flush=True,
            )
    ok = [r for r in rows if r["ttft_err_p99_ms"] <= 1.0]
    best = max(ok, key=lambda r: r["chunks_per_s"]) if ok else None
    print(
        "highest chunk rate with TTFT error p99 <= 1 ms: "
        + (f"{best['chunks_per_s']:.0f} chunks/s at {best['streams']} streams" if best else "none")
    )
    print(f"median client capacity: {np.median([r['client_chunks_per_cpu_s'] for r in rows]):.0f} chunks per CPU-second")


if __name__ == "__main__":
    main()
