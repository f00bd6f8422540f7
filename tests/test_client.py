"""The client against the mock server, whose latency truth is known."""

import asyncio
import itertools
import time

import numpy as np
import pytest

from pricing.load.client import ClientConfig, ProbePlan
from pricing.load.event_loop import paused_gc
from pricing.load import settle
from pricing.load.loops import OPEN_WARMUP_UNITS
from pricing.load.settle import SETTLE_E2E_P90S, UnitShape, e2e_p90_estimate_s, request_shapes, settled
from pricing.measure.probe import run_probe
from pricing.measure.requests import served_share
from pricing.measure.window import tpot_s, ttft_s
from pricing.schema import LoadSpec
from pricing.testing.mock_server import Faults, LatencyModel, MockConfig
from pricing.testing.mock_timeline import fetch_timeline, server_ttft_s

TTFT_S, TPOT_S = 0.040, 0.020
TOLERANCE_MS = 1.0  # the bound, on the median


def closed(n: int) -> LoadSpec:
    return LoadSpec(mode="closed", concurrency=n)


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

    timeline = fetch_timeline(mock.url)  # once: each fetch is every request the mock served
    did = [timeline[r.response_id] for r in inside]
    served_ttft_ms = np.array([server_ttft_s(d) for d in did]) * 1e3
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


async def test_an_open_loops_window_opens_once_its_first_arrivals_have_all_ended(mock_server):
    """The third arrival asks for 150 tokens (1.5 s), every other for 5 (50 ms): the window opens
    when the sixteenth first arrival has ended and the long one has too, not with the first
    completion (50 ms in), when the server still holds far fewer requests than it will."""

    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.01, tpot_base_s=0.01)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", seed=5)
    pairs = itertools.chain([(16, 5), (16, 5), (16, 150)], itertools.repeat((16, 5)))
    result = await run_probe(cfg, LoadSpec(mode="open", request_rate_rps=40.0), pairs,
                             ProbePlan(min_window_s=2, min_requests=20))
    first = sorted(result.records, key=lambda r: r.start_ns)[:OPEN_WARMUP_UNITS]
    assert max(r.completion_tokens or 0 for r in first) == 150
    # The server had long settled (load.settle: 3 x 50 ms): the controller's next tick opens it.
    assert 0 <= result.window_start_ns - max(r.end_ns for r in first) < 0.2e9
    in_window = [r for r in result.records if result.window_start_ns <= r.start_ns <= result.window_end_ns]
    # The server kept up: it serves the offered rate where it served 97% of it in the window, else
    # the window's count says what it served.
    window_s = (result.window_end_ns - result.window_start_ns) / 1e9
    offered = served_share(result.table, 40.0) >= 0.97
    assert result.stats.request_rate_rps == pytest.approx(40.0 if offered else len(in_window) / window_s, rel=0.02)
    assert result.stats.rate_source == ("offered" if offered else "arrivals")


async def test_an_open_loops_window_waits_until_the_server_has_filled(mock_server):
    """Every answer takes 10 ms + 49 x 10 ms: the first 16 arrivals at 40 req/s have ended ~0.9 s
    in, but the server fills for longer (load.settle): the window opens 3 E2E p90s (1.5 s) after
    the first arrival."""
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.01, tpot_base_s=0.01)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", seed=5)
    result = await run_probe(cfg, LoadSpec(mode="open", request_rate_rps=40.0), itertools.repeat((16, 50)),
                             ProbePlan(min_window_s=1, min_requests=20))
    records = sorted(result.records, key=lambda r: r.start_ns)
    e2e_s = float(np.median([(r.end_ns - r.start_ns) / 1e9 for r in records]))
    assert 0.5 <= e2e_s < 0.6
    opened_s = (result.window_start_ns - records[0].start_ns) / 1e9
    first_ended_s = (max(r.end_ns for r in records[:OPEN_WARMUP_UNITS]) - records[0].start_ns) / 1e9
    assert opened_s > first_ended_s + 0.3
    assert SETTLE_E2E_P90S * 0.5 * 0.95 <= opened_s <= SETTLE_E2E_P90S * e2e_s + 0.3


def test_settling_needs_answers_to_estimate_from_and_gives_up_at_its_cap():
    one = request_shapes([100])
    assert e2e_p90_estimate_s([0.1] * 3, [0.01], one) is None  # too few answers yet
    assert e2e_p90_estimate_s([0.1] * 4, [0.01, 0.03, 0.02], request_shapes([11] * 9 + [1])) == pytest.approx(0.1 + 0.02 * 10)
    # A chat session lasts all its turns and think times: 3 x 0.1 + 30 x 0.02 + 4 s.
    assert e2e_p90_estimate_s([0.1] * 4, [0.02], [UnitShape(3, 30, 4.0)]) == pytest.approx(4.9)
    assert not settled([], one, elapsed_s=5.0, cap_s=10.0)
    assert settled([], one, elapsed_s=10.0, cap_s=10.0)
    # 80 more requests in the server over 100 arrivals (more than 70%): it overflows, do not wait
    assert settled([], one, elapsed_s=1.0, cap_s=10.0, grew=80, arrived=100)
    assert not settled([], one, elapsed_s=1.0, cap_s=10.0, grew=60, arrived=100)  # still filling, maybe
    assert not settled([], one, elapsed_s=1.0, cap_s=10.0, grew=80, arrived=90)  # too few to tell


async def test_an_overloaded_open_loop_opens_its_window_without_waiting_to_settle(mock_server, monkeypatch):
    """A batch without a cap slows every answer as it swells (4 ms + 1 ms per running request per
    token): at 200 req/s of 20-token answers, 4x what it can serve, the E2E p90 estimate grows as
    fast as time, so the settle rule alone would wait for its cap (all of max_duration_s here).
    The requests in the server grow by most of the arrivals: the window opens soon after the
    first units end."""
    monkeypatch.setattr(settle, "SETTLE_CAP_SHARE", 1.0)
    latency = LatencyModel(ttft_base_s=0.005, tpot_base_s=0.004, tpot_per_seq_s=0.001)
    mock = mock_server(MockConfig(latency=latency))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", seed=5)
    result = await run_probe(cfg, LoadSpec(mode="open", request_rate_rps=200.0), itertools.repeat((16, 20)),
                             ProbePlan(min_window_s=1, min_requests=20, max_duration_s=12))
    records = sorted(result.records, key=lambda r: r.start_ns)
    first_ended_ns = max(r.end_ns for r in records[:OPEN_WARMUP_UNITS])
    assert result.window_start_ns - first_ended_ns < 1e9  # the cap: 8 s after the first arrival (4 windows)
    assert result.window_start_ns - records[0].start_ns < 9e9


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
    # The population's mean ISL is said to be 1,000 while the window's prompts hold 300 tokens:
    # a prefill probe's input flow is the prompt tokens counted, not its request rate x 1,000.
    result = await run_probe(cfg, load, itertools.repeat((300, 50)), ProbePlan(min_window_s=0.5, min_requests=10),
                             lengths=(1000.0, 50.0))
    assert all(r.completion_tokens == 1 for r in result.records if r.ok)
    stats = result.stats
    assert stats.input_tok_s == pytest.approx(300 * stats.request_rate_rps, rel=0.2)
    assert stats.input_tok_s == pytest.approx(stats.measured_input_tok_s, rel=1e-5)
    assert stats.input_tok_s_ci[0] <= stats.input_tok_s <= stats.input_tok_s_ci[1]


async def test_probes_on_one_server_never_repeat_a_prompt(mock_server):
    """Each probe draws new token ids: a replayed prompt would be a prefix-cache hit in vLLM
    (the same seed every probe once made 50-99% of an H200 sweep's prompt tokens cache hits)."""
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.002, tpot_base_s=0.002)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", seed=7)
    for _ in range(2):
        await run_probe(cfg, closed(4), itertools.repeat((64, 4)), ProbePlan(min_window_s=0.3, min_requests=10))
    heads = [t["head"] for t in fetch_timeline(mock.url).values()]
    assert len(heads) >= 20 and len(set(heads)) == len(heads)


async def test_streamed_token_rate_matches_what_the_server_wrote_including_cut_requests(mock_server):
    """Requests cut at the drain keep the arrival time of each chunk they got; stamping them all
    at the cut once dropped ~12% of the window's tokens at 8 streams."""
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.010, tpot_base_s=0.010)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    plan = ProbePlan(min_window_s=2.0, min_requests=8, ramp_up_s=0.4)
    result = await run_probe(cfg, closed(8), itertools.repeat((64, 40)), plan)
    w0, w1 = result.window_start_ns, result.window_end_ns
    written = sum(1 for d in fetch_timeline(mock.url).values() for t in d["chunk_ns"] if w0 <= t <= w1)
    assert result.stats.output_tok_s == pytest.approx(written / ((w1 - w0) / 1e9), rel=0.02)
    cut = [r for r in result.records if r.error == "cancelled" and len(r.chunk_ns) >= 5]
    assert cut and all(r.chunk_ns[-1] - r.chunk_ns[0] >= 0.005 * 1e9 * (len(r.chunk_ns) - 1) for r in cut)


async def _kill_after(proc, delay_s: float) -> float:
    await asyncio.sleep(delay_s)
    proc.kill()
    return time.monotonic()


async def test_a_server_killed_mid_probe_stops_it_in_seconds_with_failures_counted_not_kept(mock_server):
    """The issue's crash: 128 streams, the server SIGKILLed a second into the window. Before, the
    closed loop spun through refused connections for the probe's whole max_duration_s, keeping
    every failed record (gigabytes); now it stops in about unreachable_after_s."""
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.005, tpot_base_s=0.005)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    plan = ProbePlan(min_window_s=60, min_requests=10**6, max_duration_s=120, ramp_up_s=0.3, max_kept_failures=100)
    killer = asyncio.create_task(_kill_after(mock.proc, 1.5))
    result = await run_probe(cfg, closed(128), itertools.repeat((16, 20)), plan)
    detect_s = time.monotonic() - await killer
    assert result.abort == "server_unreachable" and result.aborted.startswith(f"server {mock.url} unreachable: ")
    assert "connection refused" in result.aborted
    assert plan.unreachable_after_s <= detect_s < plan.unreachable_after_s + 5, detect_s
    kept = [r for r in result.records if r.error not in (None, "cancelled")]
    assert len(kept) <= plan.max_kept_failures
    stats = result.stats
    assert stats.failed > 3 * plan.max_kept_failures  # the rest were counted
    assert stats.failed == sum(stats.errors_by_kind.values()) <= stats.issued
    assert set(stats.errors_by_kind) == {"connect", "disconnect"}


async def test_a_hung_server_stops_the_probe_as_stalled(mock_server):
    mock = mock_server(MockConfig(faults=Faults(hang_every=1)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    plan = ProbePlan(min_window_s=5, max_duration_s=60, server_stall_s=1.5)
    started = time.monotonic()
    result = await run_probe(cfg, closed(64), itertools.repeat((16, 8)), plan)
    assert result.abort == "server_stalled" and f"server {mock.url} stalled: 64 request(s) in flight" in result.aborted
    assert time.monotonic() - started < plan.server_stall_s + 3


async def test_requests_that_hang_time_out_and_count_in_the_error_rate_at_high_concurrency(mock_server):
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.005, tpot_base_s=0.005),
                                  faults=Faults(hang_every=7)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", stall_timeout_s=0.5)
    plan = ProbePlan(min_window_s=2.0, min_requests=50, ramp_up_s=0.3, server_stall_s=5)
    result = await run_probe(cfg, closed(128), itertools.repeat((16, 8)), plan)
    assert result.aborted is None and result.stats.completed >= 50
    assert set(result.stats.errors_by_kind) == {"timeout"}
    assert 0.03 < result.stats.error_rate < 0.3, result.stats.error_rate  # one request in 7 hangs


async def test_bursts_of_503_count_in_the_error_rate_and_the_probe_ends(mock_server):
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.005, tpot_base_s=0.005),
                                  faults=Faults(burst_every_s=1.0, burst_s=0.25)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    plan = ProbePlan(min_window_s=3.0, min_requests=50, ramp_up_s=0.3, fail_fast_after=10**6)
    result = await run_probe(cfg, closed(128), itertools.repeat((16, 8)), plan)
    assert result.aborted is None and result.stats.completed >= 50
    assert set(result.stats.errors_by_kind) == {"http_503"}
    # A quarter of the time every request fails; workers back off while they do.
    assert 0.02 < result.stats.error_rate < 0.5, result.stats.error_rate


async def test_a_server_that_dies_in_the_probes_tail_gets_the_probe_measured_again(mock_server):
    """The window closed, then the server died while the window's requests finished: their
    failures would count against the load, so the probe is marked as the server's failure."""
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.005, tpot_base_s=0.01)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")

    def kill_at_close(what: str, _at_ns: int) -> None:
        if what == "close":
            mock.proc.kill()

    plan = ProbePlan(min_window_s=1.0, min_requests=5, tail_frac=5.0, ramp_up_s=0.2)
    result = await run_probe(cfg, closed(8), itertools.repeat((16, 100)), plan, mark=kill_at_close)
    assert result.abort == "server_unreachable" and result.aborted.endswith("and it does not answer")
    assert result.stats.errors_by_kind.get("disconnect", 0) > 0


async def test_an_open_loops_window_runs_on_while_the_server_still_fills(mock_server):
    """A batch without a cap (4 ms + 1 ms per running request per token): 20 req/s of 20-token
    answers it serves steadily, and the window closes once full (4 s); at 60 req/s its requests
    grow all window (about 40 -> 90 in 4 s), so the window runs on to its cap (max_extension
    times its length), and the probe says the server was still filling."""
    latency = LatencyModel(ttft_base_s=0.005, tpot_base_s=0.004, tpot_per_seq_s=0.001)
    mock = mock_server(MockConfig(latency=latency))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", seed=5)
    plan = ProbePlan(min_window_s=2, window_e2e_multiple=0, min_requests=5, max_duration_s=30, max_extension=2,
                     tail_frac=0.2)
    steady = await run_probe(cfg, LoadSpec(mode="open", request_rate_rps=20.0), itertools.repeat((16, 20)), plan)
    swelling = await run_probe(cfg, LoadSpec(mode="open", request_rate_rps=60.0), itertools.repeat((16, 20)), plan)
    assert steady.stats.window_s < 5 and not any("still filling" in w for w in steady.warnings)
    assert swelling.stats.window_s >= 7.9 and any("still filling" in w for w in swelling.warnings)


async def test_an_open_loops_window_that_opened_at_the_warm_ups_cap_says_so(mock_server):
    """2 s answers need 6 s of warm-up to fill the server (3 E2E p90s, load.settle); max_duration_s
    10 caps it at 4 s, so the window opens there and the probe says so. 0.2 s answers settle first."""
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.005, tpot_base_s=0.010)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", seed=5)
    plan = ProbePlan(min_window_s=1, min_requests=5, max_duration_s=10, tail_frac=0.2)
    slow = await run_probe(cfg, LoadSpec(mode="open", request_rate_rps=10.0), itertools.repeat((16, 200)), plan)
    quick = await run_probe(cfg, LoadSpec(mode="open", request_rate_rps=10.0), itertools.repeat((16, 20)), plan)
    assert slow.warmup_capped and any("warm-up's cap" in w for w in slow.warnings)
    assert not quick.warmup_capped and not any("warm-up's cap" in w for w in quick.warnings)
