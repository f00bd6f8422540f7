"""Session replay (pricing.load.sessions) against the mock server, which streams token ids and
keeps a prefix cache: each prompt extends the last prompt and answer exactly, think times
scale, open loops start sessions, and a probe records the cache's hits beside the history share."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from pricing.load.client import ClientConfig, ProbePlan
from pricing.load.sessions import SessionTraffic
from pricing.measure.probe import measured_probe, run_probe
from pricing.schema import LoadSpec
from pricing.testing.mock_server import LatencyModel, MockConfig
from pricing.testing.mock_timeline import fetch_timeline
from pricing.workload.sessions import SessionTurn, history_share

FAST = LatencyModel(ttft_base_s=0.002, tpot_base_s=0.002)
BLOCK = 4


def sessions_load(n: int = 2, kind: str = "decode", think_scale: float = 0.0) -> LoadSpec:
    return LoadSpec(mode="closed", concurrency=n, kind=kind, sessions=True, think_scale=think_scale)


def by_session(entries: list[dict], first_tokens: int) -> list[list[dict]]:
    """Timeline entries grouped by their first turn's random ids, each group in arrival order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for entry in sorted(entries, key=lambda e: e["recv_ns"]):
        groups[tuple(entry["prompt"][:first_tokens])].append(entry)
    return list(groups.values())


THREE = (SessionTurn(20, 5, 0.0), SessionTurn(7, 4, 0.0), SessionTurn(3, 6, 0.0))


async def test_each_prompt_is_the_last_prompt_and_answer_as_streamed_plus_new_tokens(mock_server):
    mock = mock_server(MockConfig(latency=FAST, prefix_cache_block_tokens=BLOCK, timeline_prompts=True))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    result = await run_probe(cfg, sessions_load(2), SessionTraffic([THREE]), ProbePlan(min_window_s=0.5, min_requests=6))
    assert result.stats.failed == 0 and result.aborted is None
    done = {r.response_id for r in result.records if r.ok}
    sessions = [g for g in by_session(list(fetch_timeline(mock.url).values()), 20) if all(e["chunk_ns"] for e in g)]
    continued = 0
    for turns in sessions:
        assert len(turns) <= 3 and len(turns[0]["prompt"]) == 20
        for k in range(1, len(turns)):
            prev, this = turns[k - 1], turns[k]
            streamed = prev["answer"][:prev["osl"]]
            history = prev["prompt"] + streamed
            assert this["prompt"][:len(history)] == history  # the exact ids, answer as streamed
            assert len(this["prompt"]) == len(history) + THREE[k].new_input_tokens
            # the mock's cache served every whole block of what it computed for the last turn
            assert this["cached"] == (len(history) - 1) // BLOCK * BLOCK
            continued += 1
    assert continued >= 4
    assert all(r.prompt_tokens == r.target_input_tokens for r in result.records if r.response_id in done)


async def test_think_time_scales_and_zero_sends_at_once(mock_server):
    mock = mock_server(MockConfig(latency=FAST))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    two = [(SessionTurn(10, 3, 0.0), SessionTurn(5, 3, 0.4))]
    for scale, low_s, high_s in ((0.5, 0.2, 0.26), (0.0, 0.0, 0.02)):
        result = await run_probe(cfg, sessions_load(1, think_scale=scale), SessionTraffic(two),
                                 ProbePlan(min_window_s=0.8, min_requests=4))
        records = sorted((r for r in result.records if r.ok), key=lambda r: r.start_ns)
        gaps = [(b.start_ns - a.end_ns) / 1e9 for a, b in zip(records, records[1:])
                if b.target_input_tokens == 10 + 3 + 5]  # turn 2 after its turn 1
        assert len(gaps) >= 2 and all(low_s <= g <= high_s for g in gaps), (scale, gaps)


async def test_open_loop_starts_sessions_at_the_rate_over_the_mean_turns(mock_server):
    mock = mock_server(MockConfig(latency=FAST))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    two = [(SessionTurn(10, 3, 0.0), SessionTurn(5, 3, 0.0))]
    load = LoadSpec(mode="open", request_rate_rps=40.0, sessions=True, think_scale=0.0)
    result = await run_probe(cfg, load, SessionTraffic(two), ProbePlan(min_window_s=2.0, min_requests=20))
    starts = np.array(sorted(r.start_ns for r in result.records if r.target_input_tokens == 10)) / 1e9
    assert abs(len(starts) / (starts[-1] - starts[0]) - 20.0) < 6.0  # 40 req/s of 2-turn sessions
    assert result.stats.request_rate_rps == pytest.approx(40.0, rel=0.3)


async def test_a_probe_records_the_cache_hits_beside_the_history_share(mock_server):
    mock = mock_server(MockConfig(latency=FAST, prefix_cache_block_tokens=BLOCK))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    two = (SessionTurn(20, 5, 0.0), SessionTurn(7, 4, 0.0))  # prompts 20 and 32: history 25 of 52 tokens
    result = await measured_probe(cfg, sessions_load(2), SessionTraffic([two]), ProbePlan(min_window_s=1.0,
                                  min_requests=10), meter=None)
    hit = result.server_metrics["prefix_cache_window_hit_frac"]
    assert history_share([two]) == pytest.approx(25 / 52)
    assert hit == pytest.approx(24 / 52, abs=0.03)  # whole blocks of the 24 tokens computed before turn 2
    # a prefill-only replay: the streamed token and stand-ins for the rest of the answer keep the
    # lengths, and only what the server computed (the prompt) is a hit
    mock2 = mock_server(MockConfig(latency=FAST, prefix_cache_block_tokens=BLOCK, timeline_prompts=True))
    cfg2 = cfg.model_copy(update={"base_url": mock2.url})
    await run_probe(cfg2, sessions_load(2, kind="prefill_cached"), SessionTraffic([two]),
                    ProbePlan(min_window_s=0.5, min_requests=6))
    seconds = [e for e in fetch_timeline(mock2.url).values() if e["isl"] == 32]
    assert seconds and all(e["osl"] == 1 and e["cached"] == 20 for e in seconds)


async def test_fresh_prefill_probe_of_a_session_sweep_sends_the_turns_as_independent_prompts(mock_server):
    mock = mock_server(MockConfig(latency=FAST, prefix_cache_block_tokens=BLOCK, timeline_prompts=True))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    two = (SessionTurn(20, 5, 0.0), SessionTurn(7, 4, 0.0))
    await run_probe(cfg, sessions_load(2, kind="prefill"), SessionTraffic([two]),
                    ProbePlan(min_window_s=0.5, min_requests=6))
    entries = list(fetch_timeline(mock.url).values())
    assert {e["isl"] for e in entries} == {20, 32} and all(e["osl"] == 1 and e["cached"] == 0 for e in entries)


async def test_session_replay_needs_token_id_prompts():
    cfg = ClientConfig(base_url="http://127.0.0.1:9", model="m", prompt_format="text")
    with pytest.raises(ValueError, match="session replay sends token ids"):
        await run_probe(cfg, sessions_load(1), SessionTraffic([THREE]), ProbePlan(min_window_s=0.1, min_requests=1))
    with pytest.raises(ValueError, match="needs the profile's sessions"):
        await run_probe(cfg.model_copy(update={"prompt_format": "token_ids"}), sessions_load(1),
                        iter([(10, 2)]), ProbePlan(min_window_s=0.1, min_requests=1))


async def test_a_server_killed_during_a_session_replay_stops_the_probe_in_seconds_with_failures_counted(mock_server):
    """The load generator's server watch and bounded failures hold for session units too: a
    session ends at its first failed turn and its worker backs off before the next session."""
    import asyncio
    import time

    mock = mock_server(MockConfig(latency=FAST, prefix_cache_block_tokens=BLOCK))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    plan = ProbePlan(min_window_s=60, min_requests=10**6, max_duration_s=60, max_kept_failures=20)

    async def kill_after(delay_s: float) -> float:
        await asyncio.sleep(delay_s)
        mock.proc.kill()
        return time.monotonic()

    killer = asyncio.create_task(kill_after(1.0))
    result = await run_probe(cfg, sessions_load(32), SessionTraffic([THREE]), plan)
    detect_s = time.monotonic() - await killer
    assert result.abort == "server_unreachable" and result.aborted.startswith(f"server {mock.url} unreachable: ")
    assert plan.unreachable_after_s <= detect_s < plan.unreachable_after_s + 5, detect_s
    assert len([r for r in result.records if r.error not in (None, "cancelled")]) <= plan.max_kept_failures
    assert plan.max_kept_failures < result.stats.failed == sum(result.stats.errors_by_kind.values()) <= result.stats.issued


async def test_a_session_sweep_whose_think_times_leave_too_few_requests_stops_with_what_to_do(mock_server, tmp_path):
    """Two turns 3 s apart: at concurrency 2 no window of 15 requests fills in 2 s. That says
    nothing about the server (it answered in milliseconds): the sweep stops rather than read a
    fail and search lower, and the pricer reads nothing from the probe."""
    from pricing.capacity.choice import tier_point
    from pricing.capacity.search import SearchParams
    from pricing.capacity.sweep import SweepSpec, run_sweep
    from pricing.results import SourcedProbe, read_records
    from pricing.schema import DeploymentConfig, ProfileSummary, SloTier

    mock = mock_server(MockConfig(latency=FAST))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    traffic = SessionTraffic([(SessionTurn(10, 3, 0.0), SessionTurn(5, 3, 3.0))])
    tier = SloTier(name="Mock", ttft_s=0.5, tpot_s=0.05)
    plan = ProbePlan(min_window_s=0.5, min_requests=15, max_duration_s=2.0)
    profile = ProfileSummary(name="two-turns", kind="fixed", isl_mean=10, osl_mean=3, isl_p50=10, isl_p90=10,
                             isl_p99=10, osl_p50=3, osl_p90=3, osl_p99=3)
    sweep = SweepSpec(config=DeploymentConfig(model="mock-model", gpu_name="cpu"), profile=profile, tiers=[tier],
                      search=SearchParams(max_level=64, start=2), plan=plan, sessions=True, think_scale=1.0)
    seen = []

    async def probe(load, index):
        seen.append(load.level)
        return await run_probe(cfg, load, traffic, plan, tiers=[tier])

    out = tmp_path / "sessions.jsonl"
    outcome = await run_sweep(sweep, probe, out)
    assert outcome.stop == "too_few_requests" and "--think-scale" in outcome.stopped, outcome.stopped
    assert seen == [2], "one probe, not a search downwards"
    (record,) = read_records(out)
    assert record.abort == "window_not_filled" and record.load.replays_sessions
    assert tier_point(SourcedProbe(record), tier) is None
    outcome = await run_sweep(sweep, probe, out)  # resumed: the load that said nothing is tried again
    assert seen == [2, 2] and outcome.stop == "too_few_requests", (seen, outcome.stop)


async def test_a_closed_loop_of_sessions_opens_its_window_without_waiting_for_the_longest(mock_server):
    """The window opens once as many sessions have ended as there are workers: a worker that drew
    a long session (20 turns, 0.1 s apart) must not hold it shut, as the longest of hundreds of
    heavy-tailed sessions did on an H200 for minutes."""
    long = tuple(SessionTurn(8, 2, 0.1) for _ in range(20))
    mock = mock_server(MockConfig(latency=FAST))
    cfg = ClientConfig(base_url=mock.url, model="mock-model")
    plan = ProbePlan(min_window_s=0.5, min_requests=6, max_duration_s=20.0)
    # Seed 57: the first worker draws the long session, the next eight draws are one-turn sessions.
    traffic = SessionTraffic([long] + [(SessionTurn(8, 2, 0.0),)] * 5, seed=57)
    result = await run_probe(cfg, sessions_load(4, think_scale=1.0), traffic, plan)
    assert result.aborted is None
    t0 = min(r.start_ns for r in result.records)
    assert (result.window_start_ns - t0) / 1e9 < 1.0, "the window waited for the long session"
    # The long session was still under way: its later turns (prompts of 40+ tokens) come after.
    assert any(r.start_ns > result.window_start_ns for r in result.records if (r.prompt_tokens or 0) > 40)


async def test_an_open_loop_of_sessions_opens_its_window_once_the_server_has_filled(mock_server):
    """Half the sessions are one 5-token turn (~60 ms), half four 20-token turns 0.3 s apart
    (~1.75 s at 10 ms a token): the first session ends at once, but the server holds fewer long
    sessions than it will until they have had time to pile up (load.settle): the window opens
    3 p90 session lengths (~5.3 s) after the first arrival, and then counts the offered rate."""
    from pricing.load.settle import SETTLE_E2E_P90S

    short = (SessionTurn(10, 5, 0.0),)
    long = (SessionTurn(10, 20, 0.0),) + tuple(SessionTurn(5, 20, 0.3) for _ in range(3))
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.01, tpot_base_s=0.01)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", seed=3)
    load = LoadSpec(mode="open", request_rate_rps=25.0, sessions=True, think_scale=1.0)
    result = await run_probe(cfg, load, SessionTraffic([short, long], seed=3), ProbePlan(min_window_s=1.5, min_requests=20))
    assert result.aborted is None
    records = sorted(result.records, key=lambda r: r.start_ns)
    opened_s = (result.window_start_ns - records[0].start_ns) / 1e9
    long_s = 0.01 * 4 + 0.01 * 19 * 4 + 0.9
    assert SETTLE_E2E_P90S * long_s * 0.95 <= opened_s <= SETTLE_E2E_P90S * long_s * 1.15 + 0.3, opened_s
    assert result.stats.request_rate_rps == pytest.approx(25.0, rel=0.2)
