"""benchmarks/host_pairs.py: two servers compared on the same requests, against a known speed-up."""

import importlib.util
from pathlib import Path

import numpy as np

from pricing.measure.requests import RequestTable

spec = importlib.util.spec_from_file_location("host_pairs", Path(__file__).parents[1] / "benchmarks" / "host_pairs.py")
host_pairs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_pairs)


def table(slow: float, seed: int, n: int = 600, in_tokens: list[int] | None = None) -> RequestTable:
    """n requests, one every 0.1 s, each with its own TPOT and TTFT (the same across hosts but for
    `slow`, times a little per-request noise of its own)."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(0)
    tpot_us = base.uniform(8_000, 20_000, n) * slow * rng.lognormal(0, 0.02, n)
    ttft_us = base.uniform(40_000, 200_000, n) * slow * rng.lognormal(0, 0.05, n)
    out = base.integers(2, 400, n)
    start = (np.arange(n) * 100_000 - 10_000_000).astype(int)
    first = start + ttft_us.astype(int)
    last = first + (tpot_us * (out - 1)).astype(int)
    return RequestTable(run_id="t", probe_index=0, window_us=30_000_000, start_us=start.tolist(), first_us=first.tolist(),
                        last_us=last.tolist(), end_us=(last + 100).tolist(), chunks=out.tolist(), out_tokens=out.tolist(),
                        in_tokens=in_tokens or base.integers(10, 3000, n).tolist(), error=[-1] * n)


def test_a_server_3_percent_slower_reads_3_percent_slower_request_by_request(tmp_path, capsys):
    ref, slow = tmp_path / "a.requests.jsonl", tmp_path / "b.requests.jsonl"
    ref.write_text(table(1.0, seed=1).model_dump_json() + "\n")
    slow.write_text(table(1.03, seed=2).model_dump_json() + "\n")
    assert host_pairs.main([str(ref), str(slow)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for metric in ("TPOT", "TTFT"):
        line = next(x for x in lines if x.startswith(f"{metric} b."))
        mid, low, high = (float(v.strip("[]%,")) for v in line.split("per request ")[1].split()[:3])
        assert low <= 3.0 <= high and abs(mid - 3.0) < 1.0, line


def test_different_prompts_are_refused(tmp_path, capsys):
    ref, other = tmp_path / "a.requests.jsonl", tmp_path / "b.requests.jsonl"
    ref.write_text(table(1.0, seed=1).model_dump_json() + "\n")
    other.write_text(table(1.0, seed=2, in_tokens=[7] * 600).model_dump_json() + "\n")
    assert host_pairs.main([str(ref), str(other)]) == 2
    assert "--seed" in capsys.readouterr().err
