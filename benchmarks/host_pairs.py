"""How much faster one server is than another, request by request: the same seeded probe run on
each (same prompts in the same order), compared on the requests both sent.

    python benchmarks/host_pairs.py REFERENCE.requests.jsonl OTHER.requests.jsonl... [--skip-s 20]

A probe's p90 on each host is read over its own window, which differs in length and so in which
requests it holds; pairing the same requests removes that, and the workload's own noise with it.
For TPOT and TTFT it prints the median over paired requests of other / reference with a 95%
interval (a block bootstrap over runs of 50 requests in issue order: neighbours share batches),
and each host's p50 and p90 over the same requests. Requests sent in the first `--skip-s`
seconds (the ramp-up) are left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pricing.measure.requests import NONE, RequestTable  # noqa: E402

BLOCK = 50


def first_table(path: Path) -> RequestTable:
    with path.open() as f:
        return RequestTable.model_validate_json(f.readline())


def per_request(table: RequestTable, n: int) -> dict[str, np.ndarray]:
    """TPOT and TTFT (ms) of the first n requests, nan where failed or a single token."""
    col = {k: np.array(getattr(table, k)[:n], dtype=float) for k in ("start_us", "first_us", "last_us", "out_tokens", "error")}
    ok = col["error"] == NONE
    many = ok & (col["out_tokens"] > 1)
    return {"TPOT": np.where(many, (col["last_us"] - col["first_us"]) / np.maximum(col["out_tokens"] - 1, 1) / 1e3, np.nan),
            "TTFT": np.where(ok, (col["first_us"] - col["start_us"]) / 1e3, np.nan)}


def median_ratio(ref: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float, int]:
    logs = np.log(other / ref)
    logs = logs[np.isfinite(logs)]
    blocks = [logs[i:i + BLOCK] for i in range(0, logs.size, BLOCK)]
    boot = [np.median(np.concatenate([blocks[j] for j in rng.integers(0, len(blocks), len(blocks))])) for _ in range(2000)]
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(np.exp(np.median(logs)) - 1), float(np.exp(low) - 1), float(np.exp(high) - 1), int(logs.size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path, help="per-request files, the reference first")
    p.add_argument("--skip-s", type=float, default=20.0, help="leave out requests sent this early in the run")
    args = p.parse_args(argv)
    if len(args.files) < 2:
        p.error("give the reference and at least one other per-request file")
    tables = [first_table(f) for f in args.files]
    n = min(len(t) for t in tables)
    if any(t.in_tokens[:n] != tables[0].in_tokens[:n] for t in tables[1:]):
        print("error: the files' prompts differ (in_tokens): run the same probe with the same --seed on each host",
              file=sys.stderr)
        return 2
    # The first request sent after skip_s on every host.
    skip = max(int(np.searchsorted(np.array(t.start_us[:n]) - t.start_us[0], args.skip_s * 1e6)) for t in tables)
    values = [per_request(t, n) for t in tables]
    rng = np.random.default_rng(0)
    print(f"{n} requests sent by every host, the same prompts; compared from request {skip} on")
    for metric in ("TPOT", "TTFT"):
        ref = values[0][metric][skip:]
        p50, p90 = np.nanpercentile(ref, [50, 90])
        print(f"{metric} {args.files[0].name}: p50 {p50:.2f} ms, p90 {p90:.2f} ms")
        for path, vals in zip(args.files[1:], values[1:]):
            other = vals[metric][skip:]
            mid, low, high, pairs = median_ratio(ref, other, rng)
            p50, p90 = np.nanpercentile(other, [50, 90])
            print(f"{metric} {path.name}: p50 {p50:.2f} ms, p90 {p90:.2f} ms; per request {mid:+.1%} "
                  f"[{low:+.1%}, {high:+.1%}] (median of {pairs} pairs, 95%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
