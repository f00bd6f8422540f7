"""The client against the mock server, whose latency truth is known."""

import itertools
import json
import urllib.request

import numpy as np
import pytest

from pricing.load.client import ClientConfig, ProbePlan
from pricing.load.event_loop import paused_gc
from pricing.measure.probe import run_probe
from pricing.measure.window import tpot_s, ttft_s
from pricing.schema import LoadSpec
from pricing.testing.mock_server import Faults, LatencyModel, MockConfig

TTFT_S, TPOT_S = 0.040, 0.020
TOLERANCE_MS = 1.0  # the bound, on the median


def closed(n: int) -> LoadSpec:
    return LoadSpec(mode="closed", concurrency=n)


def _timeline(url: str) -> dict:
    return json.load(urllib.request.urlopen(f"{url}/mock/timeline"))


@pytest.mark.parametrize("streams", [1, 64, 512])
async def test_measured_ttft_and_tpot_match_the_truth(mock_server, streams):
    """Two checks, because the truth has two layers: the client against what the mock did (its
    timeline: request arrival, each chunk written), and the mock against its configuration (its
    timers wake on whole milliseconds, biased to centre the error). With kernel receive stamps
    on both sides the client's error is tens of microseconds either way (the mock stamps a chunk
    just after writing it, so the client can see it a little "before"): p50 0.01-0.04 ms at
    1-512 streams on the 2-core VM; the mock's first token is late by 0.7 ms at 1 stream (an
    idle loop's first wake-up), 0.1 ms at 64 (benchmarks/client_overhead.py)."""
    # TPOT grows with the stream count so the mock's own core is not the bottleneck.
    tpot = TPOT_S if streams < 512 else 0.100
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=TTFT_S, tpot_base_s=tpot)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    # The window must outlast a request several times over, or the requests inside it are only
    # those issued at its opening (the last workers' herd), a biased sample.
    plan = ProbePlan(min_window_s=3.0, min_requests=15, ramp_up_s=1.0 if streams > 1 else 0)
    with paused_gc():
        result = await run_probe(cfg, closed(streams), itertools.repeat((64, 12)), plan)
    # The latency sample: requests whose first token came in the window, followed to their end.
    inside = [r for r in result.records if r.ok and result.window_start_ns <= r.chunk_ns[0] <= result.window_end_ns]
    assert len(inside) == result.stats.completed >= 15
    assert result.stats.failed == 0 and result.aborted is None
    assert all(r.completion_tokens == 12 and r.prompt_tokens == 64 for r in inside)

    did = [_timeline(mock.url)[r.response_id] for r in inside]
    served_ttft_ms = np.array([(d["chunk_ns"][0] - d["recv_ns"]) / 1e6 for d in did])
    served_tpot_ms = np.array([(d["chunk_ns"][-1] - d["chunk_ns"][0]) / 1e6 / 11 for d in did])
    client_ttft_err = np.array([ttft_s(r) * 1e3 for r in inside]) - served_ttft_ms
    client_tpot_err = np.array([tpot_s(r) * 1e3 for r in inside]) - served_tpot_ms
    assert abs(np.median(client_ttft_err)) <= TOLERANCE_MS, f"client TTFT error p50 {np.median(client_ttft_err):.3f} ms"
    assert abs(np.median(client_tpot_err)) <= TOLERANCE_MS, f"client TPOT error p50 {np.median(client_tpot_err):.3f} ms"
    mock_ttft_err, mock_tpot_err = served_ttft_ms - TTFT_S * 1e3, served_tpot_ms - tpot * 1e3
    assert abs(np.median(mock_ttft_err)) <= TOLERANCE_MS, f"mock TTFT error p50 {np.median(mock_ttft_err):.3f} ms"
    assert abs(np.median(mock_tpot_err)) <= TOLERANCE_MS, f"mock TPOT error p50 {np.median(mock_tpot_err):.3f} ms"


@pytest.mark.parametrize(
    ("faults", "kind"),
    [
        (Faults(http500_every=4), "http_500"),
        (Faults(disconnect_every=4), "disconnect"),
        (Faults(stall_every=4, stall_s=3.0), "timeout"),
    ],
)
async def test_each_fault_is_counted_as_its_kind_and_the_run_goes_on(mock_server, faults, kind):
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.005, tpot_base_s=0.005), faults=faults))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", stall_timeout_s=0.5)
    result = await run_probe(cfg, closed(4), itertools.repeat((8, 8)), ProbePlan(min_window_s=1.5, min_requests=8))
    errors = [r.error for r in result.records if r.error not in (None, "cancelled")]
    assert errors and set(errors) == {kind}
    ok = sum(r.ok for r in result.records)
    assert ok >= 2 * len(errors)  # every 4th request fails, the others go on
    assert result.stats.errors_by_kind.get(kind, 0) == result.stats.failed > 0
    assert result.aborted is None


async def test_unreachable_server_aborts_quickly_with_connect_errors():
    cfg = ClientConfig(base_url="http://127.0.0.1:9", model="m")
    result = await run_probe(cfg, closed(2), itertools.repeat((8, 8)), ProbePlan(min_window_s=1, max_duration_s=20))
    assert result.aborted and "connect" in result.aborted
    assert result.stats.completed == 0


async def test_open_loop_poisson_rate_and_in_flight_cap(mock_server):
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.01, tpot_base_s=0.01)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", seed=3)
    load = LoadSpec(mode="open", request_rate_rps=40.0, concurrency=64)
    result = await run_probe(cfg, load, itertools.repeat((16, 10)), ProbePlan(min_window_s=4, min_requests=50))
    assert result.stats.request_rate_rps == pytest.approx(40.0, rel=0.25)
    starts = np.array(sorted(r.start_ns for r in result.records)) / 1e9
    gaps = np.diff(starts)
    # Poisson arrivals: coefficient of variation of the gaps near 1 (a fixed ladder would give ~0)
    assert 0.7 < gaps.std() / gaps.mean() < 1.3


async def test_chat_endpoint_ttft_waits_for_content_and_api_key_is_sent_not_stored(mock_server):
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.030, tpot_base_s=0.005), api_key="s3cret"))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", endpoint="chat", api_key="s3cret")
    seen = []
    result = await run_probe(cfg, closed(2), itertools.repeat((20, 5)), ProbePlan(min_window_s=0.5, min_requests=3), on_record=seen.append)
    assert result.stats.completed >= 3 and result.stats.failed == 0
    # The role-only first chunk leaves at once; counting it would give a TTFT near 0. The content
    # leaves 30 ms after the mock's kernel arrival stamp, which maps to the client's clock within
    # tens of microseconds either way (the ±1 ms tolerance of the accuracy tests).
    assert result.stats.ttft_s.p50 >= 0.030 - 0.001
    assert len(seen) == len(result.records)
    assert "s3cret" not in repr(cfg) and "s3cret" not in cfg.model_dump_json()
    assert "s3cret" not in "".join(r.model_dump_json() for r in result.records)

    wrong = ClientConfig(base_url=mock.url, model="mock-model", api_key="nope")
    bad = await run_probe(wrong, closed(1), itertools.repeat((4, 2)), ProbePlan(min_window_s=1, max_duration_s=10, fail_fast_after=5))
    assert bad.aborted and "http_401" in bad.aborted


async def test_prefill_probe_asks_for_one_token(mock_server):
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.005, tpot_base_s=0.005)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    load = LoadSpec(mode="closed", concurrency=4, kind="prefill")
    result = await run_probe(cfg, load, itertools.repeat((300, 50)), ProbePlan(min_window_s=0.5, min_requests=10))
    assert all(r.completion_tokens == 1 for r in result.records if r.ok)
    assert result.stats.input_tok_s == pytest.approx(300 * result.stats.request_rate_rps, rel=0.2)


async def test_probes_on_one_server_never_repeat_a_prompt(mock_server):
    """Each probe draws new token ids: a replayed prompt would be a prefix-cache hit in vLLM
    (the same seed every probe once made 50-99% of an H200 sweep's prompt tokens cache hits)."""
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.002, tpot_base_s=0.002)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", seed=7)
    for _ in range(2):
        await run_probe(cfg, closed(4), itertools.repeat((64, 4)), ProbePlan(min_window_s=0.3, min_requests=10))
    heads = [t["head"] for t in _timeline(mock.url).values()]
    assert len(heads) >= 20 and len(set(heads)) == len(heads)


async def test_streamed_token_rate_matches_what_the_server_wrote_including_cut_requests(mock_server):
    """Requests cut at the drain keep the arrival time of each chunk they got; stamping them all
    at the cut once dropped ~12% of the window's tokens at 8 streams."""
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.010, tpot_base_s=0.010)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    plan = ProbePlan(min_window_s=2.0, min_requests=8, ramp_up_s=0.4)
    result = await run_probe(cfg, closed(8), itertools.repeat((64, 40)), plan)
    w0, w1 = result.window_start_ns, result.window_end_ns
    written = sum(1 for d in _timeline(mock.url).values() for t in d["chunk_ns"] if w0 <= t <= w1)
    assert result.stats.output_tok_s == pytest.approx(written / ((w1 - w0) / 1e9), rel=0.02)
    cut = [r for r in result.records if r.error == "cancelled" and len(r.chunk_ns) >= 5]
    assert cut and all(r.chunk_ns[-1] - r.chunk_ns[0] >= 0.005 * 1e9 * (len(r.chunk_ns) - 1) for r in cut)
