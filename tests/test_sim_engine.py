"""The simulated engine: its step arithmetic by hand, the offline truth against hand formulas, Little's
law and a step-by-step replay, and the mock server's engine mode against the engine's own timeline."""

from __future__ import annotations

import asyncio
import itertools
import json

import aiohttp
import numpy as np
import pytest

from pricing.testing.mock_server import Faults, MockConfig
from pricing.testing.mock_timeline import fetch_timeline
from pricing.testing.sim_engine import EngineModel, SimEngine, replay
from pricing.testing.sim_truth import (
    arrival_times_s,
    capacity_truth,
    closed_loop_requests,
    closed_loop_truth,
    meets,
    open_loop_truth,
)
from pricing.workload.profile import load_profile

# Round numbers so the expected durations can be worked out by hand.
SMALL = EngineModel(step_base_s=0.010, step_per_seq_s=0.001, step_per_prefill_token_s=0.0001,
                    max_num_seqs=4, max_num_batched_tokens=8)


@pytest.fixture(scope="module")
def wildchat_pairs() -> list[tuple[int, int]]:
    return load_profile("wildchat-2024-03-17_23").sample(20_000, seed=0, max_model_len=4096)


def test_two_requests_step_by_step() -> None:
    engine = SimEngine(SMALL)
    engine.add("a", 10, 3, 0.0)  # a prompt longer than the budget of 8: two chunks
    engine.add("b", 3, 1, 0.0)
    steps = []
    while (step := engine.step()) is not None:
        steps.append(step)
    # 0: a's first chunk takes the whole budget, so b waits. 1: a's last 2 tokens, then b's 3 (both
    # complete: first tokens; b, osl=1, is done with it). 2, 3: a decodes alone, its 3rd token ends it.
    assert [s.prefill_tokens for s in steps] == [8, 5, 0, 0]
    assert [s.batch_seqs for s in steps] == [1, 2, 1, 1]
    assert [s.duration_s for s in steps] == pytest.approx([0.010 + 0.001 + 0.0008, 0.010 + 0.002 + 0.0005,
                                                          0.011, 0.011], rel=1e-12)
    assert [(s.first_token, s.decoded, s.finished) for s in steps] == [
        ((), (), ()), (("a", "b"), (), ("b",)), ((), ("a",), ()), ((), ("a",), ("a",))]
    assert engine.idle and engine.step() is None
    ends = np.cumsum([s.duration_s for s in steps])
    times = replay(SMALL, [("a", 0.0, 10, 3), ("b", 0.0, 3, 1)])
    assert times == {"a": pytest.approx(ends[1:].tolist(), rel=1e-12), "b": pytest.approx([ends[1]], rel=1e-12)}


def test_decodes_take_their_budget_before_prefills() -> None:
    engine = SimEngine(SMALL)
    engine.add("a", 2, 4, 0.0)
    steps = [engine.step()]
    engine.add("b", 20, 1, 0.0)
    while (step := engine.step()) is not None:
        steps.append(step)
    # a decodes one token a step, so b's 20-token prompt gets 7 of the 8 a step.
    assert [s.prefill_tokens for s in steps] == [2, 7, 7, 6]
    assert [s.batch_seqs for s in steps] == [1, 2, 2, 2]
    assert steps[3].first_token == ("b",) and steps[3].decoded == ("a",) and set(steps[3].finished) == {"a", "b"}


def test_arrival_during_a_step_joins_at_its_end() -> None:
    times = replay(SMALL, [("a", 0.0, 2, 2), ("b", 0.005, 2, 1)])
    first_step_s = SMALL.step_s(1, 2)
    assert times["a"][0] == pytest.approx(first_step_s)
    # b arrived mid-step: its prefill is in the second step, next to a's decode.
    assert times["b"] == pytest.approx([first_step_s + SMALL.step_s(2, 2)])
    assert times["a"][1] == times["b"][0]


def test_max_num_seqs_queues_the_rest() -> None:
    model = SMALL.model_copy(update={"max_num_seqs": 2, "max_num_batched_tokens": 64})
    engine = SimEngine(model)
    for rid in "abc":
        engine.add(rid, 4, 5, 0.0)
    first = engine.step()
    assert first is not None and first.first_token == ("a", "b") and first.prefill_tokens == 8
    assert (engine.running, engine.waiting) == (2, 1)
    seen: list = []
    while (step := engine.step()) is not None:
        seen.append(step)
    finish_step = next(i for i, s in enumerate(seen) if s.finished)  # a and b: 4 more tokens
    assert seen[finish_step].finished == ("a", "b") and finish_step == 3
    assert seen[finish_step + 1].first_token == ("c",)  # a slot is free only after the step
    assert all(s.batch_seqs <= 2 for s in seen)


def test_cancel_removes_a_sequence_wherever_it_is() -> None:
    model = SMALL.model_copy(update={"max_num_seqs": 1})
    engine = SimEngine(model)
    engine.add("a", 2, 100, 0.0)
    engine.add("b", 2, 2, 0.0)
    engine.step()
    assert engine.cancel("b") and engine.waiting == 0  # waiting
    assert engine.cancel("a") and engine.idle and engine.step() is None  # decoding
    assert not engine.cancel("a")


def _hand_ttft_s(model: EngineModel, isl: int) -> float:
    """Alone in the engine: one step per budget-sized chunk of the prompt."""
    chunks = [model.max_num_batched_tokens] * (isl // model.max_num_batched_tokens)
    chunks += [isl % model.max_num_batched_tokens] if isl % model.max_num_batched_tokens else []
    return sum(model.step_s(1, c) for c in chunks)


def test_closed_loop_at_concurrency_one_is_the_hand_formula() -> None:
    model = EngineModel()
    pairs = [(3000, 5), (100, 1), (2048, 2), (5000, 40), (7, 300)]
    horizon, warm = 1000, 0.2
    truth = closed_loop_truth(model, pairs, 1, horizon_requests=horizon, warmup_frac=warm)
    cohort = [pairs[i % len(pairs)] for i in range(int(warm * horizon), horizon)]
    ttft = np.array([_hand_ttft_s(model, isl) for isl, _ in cohort])
    tpot_s = model.step_base_s + model.step_per_seq_s
    e2e = ttft + tpot_s * (np.array([osl for _, osl in cohort]) - 1)
    assert truth.requests == len(cohort) and truth.stable
    assert [truth.ttft_s.p50, truth.ttft_s.p90, truth.ttft_s.p99] == pytest.approx(
        np.percentile(ttft, [50, 90, 99]).tolist(), rel=1e-9)
    assert [truth.tpot_s.p50, truth.tpot_s.p99, truth.tpot_s.count] == pytest.approx(
        [tpot_s, tpot_s, sum(osl >= 2 for _, osl in cohort)], rel=1e-9)
    assert truth.e2e_s.mean == pytest.approx(e2e.mean(), rel=1e-9)
    # One request at a time: the rate is one over the mean request time (to the window's edges).
    assert truth.request_rate_rps == pytest.approx(1 / e2e.mean(), rel=0.01)


@pytest.mark.parametrize("concurrency", [16, 200])  # 200: past max_num_seqs, so requests queue
def test_littles_law_holds_in_the_closed_loop(wildchat_pairs, concurrency) -> None:
    truth = closed_loop_truth(EngineModel(), wildchat_pairs, concurrency, horizon_requests=20_000)
    assert truth.request_rate_rps * truth.e2e_s.mean == pytest.approx(concurrency, rel=0.01)
    osl_mean = np.mean([osl for _, osl in wildchat_pairs])
    assert truth.output_tok_s == pytest.approx(truth.request_rate_rps * osl_mean, rel=0.02)


def test_a_closed_loops_requests_are_the_truths_requests(wildchat_pairs) -> None:
    """closed_loop_requests (every request of a run, for benchmarks/window_length.py) drives the
    same clients as closed_loop_truth: never more than N in the server, and the same TTFT and
    TPOT p90 over the truth's cohort."""
    model, n, think_s, horizon = EngineModel(), 24, 0.05, 6000
    r = closed_loop_requests(model, wildchat_pairs, n, think_s, seed=3, horizon_requests=horizon)
    events = np.concatenate([np.stack([r["arrive_s"], np.ones(r["arrive_s"].size)], 1),
                             np.stack([r["end_s"], -np.ones(r["end_s"].size)], 1)])
    in_server = np.cumsum(events[np.lexsort((events[:, 1], events[:, 0]))][:, 1])
    assert in_server.max() == n
    truth = closed_loop_truth(model, wildchat_pairs, n, think_s=think_s, seed=3, horizon_requests=horizon)
    cohort = slice(int(0.1 * horizon), horizon)  # the truth's warm-up share
    multi = r["osl"][cohort] >= 2
    ttft = (r["first_s"] - r["arrive_s"])[cohort]
    tpot = ((r["end_s"] - r["first_s"])[cohort] / np.maximum(r["osl"][cohort] - 1, 1))[multi]
    assert np.percentile(ttft, 90) == pytest.approx(truth.ttft_s.p90, rel=1e-6)
    assert np.percentile(tpot, 90) == pytest.approx(truth.tpot_s.p90, rel=1e-6)


def test_open_loop_truth_matches_a_step_by_step_replay(wildchat_pairs) -> None:
    """The truth jumps over quiet steps; the replay takes every step: the same arrivals give the same times."""
    model, rate_rps, seed, horizon = EngineModel(), 3.0, 7, 3000
    truth = open_loop_truth(model, wildchat_pairs, rate_rps, seed, burstiness=0.5, horizon_requests=horizon)
    arrivals = list(itertools.islice(arrival_times_s(rate_rps, 0.5, seed), 2 * horizon))
    times = replay(model, [(i, a, *wildchat_pairs[i]) for i, a in enumerate(arrivals)])
    cohort = range(int(0.1 * horizon), horizon)
    ttft = [times[i][0] - arrivals[i] for i in cohort]
    tpot = [(times[i][-1] - times[i][0]) / (len(times[i]) - 1) for i in cohort if len(times[i]) > 1]
    assert truth.stable and truth.ttft_s.count == len(ttft)
    # Equal to the rounding of clocks summed differently (one multiply per jump, one add per step).
    assert [truth.ttft_s.p50, truth.ttft_s.p90, truth.ttft_s.p99] == pytest.approx(
        np.percentile(ttft, [50, 90, 99]).tolist(), abs=1e-7)
    assert [truth.tpot_s.p50, truth.tpot_s.p90, truth.tpot_s.p99] == pytest.approx(
        np.percentile(tpot, [50, 90, 99]).tolist(), abs=1e-9)


def test_open_loop_past_saturation_is_flagged(wildchat_pairs) -> None:
    model = EngineModel()
    full = closed_loop_truth(model, wildchat_pairs, 4 * model.max_num_seqs, horizon_requests=10_000)
    most_rps = full.request_rate_rps  # every slot always busy: the engine's most
    over = open_loop_truth(model, wildchat_pairs, 1.2 * most_rps, horizon_requests=10_000)
    assert not over.stable and over.ttft_s.p90 is None and over.tpot_s.p90 is None
    assert over.request_rate_rps == pytest.approx(most_rps, rel=0.03)  # the engine's most, not the offered rate
    under = open_loop_truth(model, wildchat_pairs, 0.6 * most_rps, horizon_requests=10_000)
    assert under.stable and under.request_rate_rps == pytest.approx(0.6 * most_rps, rel=0.03)
    assert under.ttft_s.p90 is not None and not meets(over, 100.0, 100.0, 90)


def test_closed_capacity_is_the_last_passing_concurrency_and_is_cached(wildchat_pairs, tmp_path) -> None:
    model, horizon = EngineModel(), 5000
    tier_ttft_s = 1.0
    tier_tpot_s = closed_loop_truth(model, wildchat_pairs, 20, horizon_requests=horizon).tpot_s.p90
    cap = capacity_truth(model, wildchat_pairs, tier_ttft_s, tier_tpot_s, 90, "closed",
                         horizon_requests=horizon, cache_dir=tmp_path)
    assert cap.level >= 20 and cap.point is not None and cap.point.concurrency == cap.level
    above = closed_loop_truth(model, wildchat_pairs, int(cap.level) + 1, horizon_requests=horizon)
    assert meets(cap.point, tier_ttft_s, tier_tpot_s, 90) and not meets(above, tier_ttft_s, tier_tpot_s, 90)
    assert cap.request_rate_rps == cap.point.request_rate_rps
    files = sorted(p.name for p in tmp_path.iterdir())
    assert sum(name.startswith("capacity-") for name in files) == 1 and len(files) == len(cap.evaluated) + 1
    again = capacity_truth(model, wildchat_pairs, tier_ttft_s, tier_tpot_s, 90, "closed",
                           horizon_requests=horizon, cache_dir=tmp_path)
    assert again == cap


# The mock in engine mode: steps of 10+ ms, so a request put in the wrong step would be off by one.
MOCK_ENGINE = EngineModel(step_base_s=0.010, step_per_seq_s=0.002, step_per_prefill_token_s=0.00005,
                          max_num_seqs=3, max_num_batched_tokens=64)


async def _stream(session: aiohttp.ClientSession, url: str, delay_s: float, isl: int, osl: int,
                  read_tokens: int | None = None) -> str:
    """Sends a completion with `isl` token ids; reads it all (or `read_tokens` tokens, then hangs up)."""
    await asyncio.sleep(delay_s)
    body = {"model": "mock-model", "prompt": list(range(isl)), "max_tokens": osl, "stream": True}
    rid, tokens = "", 0
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            rid = event["id"]
            tokens += bool(event["choices"])
            if read_tokens is not None and tokens == read_tokens:
                resp.close()
                return rid
    assert tokens == osl
    return rid


async def test_mock_engine_mode_streams_the_engines_own_timeline(mock_server) -> None:
    mock = mock_server(MockConfig(engine=MOCK_ENGINE))
    # Five requests for three slots, arriving over a few steps; 100 tokens of prompt is two chunks.
    shapes = [(0.0, 100, 12), (0.004, 30, 8), (0.013, 100, 1), (0.021, 5, 15), (0.030, 60, 6)]
    async with aiohttp.ClientSession() as session:
        rids = await asyncio.gather(*(_stream(session, mock.url, *shape) for shape in shapes))
    did = fetch_timeline(mock.url)
    t0_ns = min(did[r]["recv_ns"] for r in rids)
    arrivals = [(r, (did[r]["recv_ns"] - t0_ns) / 1e9, did[r]["isl"], did[r]["osl"]) for r in rids]
    assert [a[2:] for a in arrivals] == [s[1:] for s in shapes]
    truth = replay(MOCK_ENGINE, arrivals)
    ttft_err_ms, gap_err_ms = [], []
    for rid, arrival_s, _, osl in arrivals:
        chunk_s = (np.array(did[rid]["chunk_ns"]) - t0_ns) / 1e9
        assert len(chunk_s) == len(truth[rid]) == osl
        ttft_err_ms.append((chunk_s[0] - truth[rid][0]) * 1e3)
        gap_err_ms += ((np.diff(chunk_s) - np.diff(truth[rid])) * 1e3).tolist()
    # The mock's timers wake on whole milliseconds, biased to centre the error on zero; on a busy
    # 2-core machine a wake-up can be late (CI: one chunk 5.4 ms late, the next gap 5.1 ms short),
    # but a token in the wrong step is a whole step (>= step_base_s) off.
    err_ms = np.abs(ttft_err_ms + gap_err_ms)
    assert np.percentile(err_ms, 90) <= 2.0 and err_ms.max() < MOCK_ENGINE.step_base_s * 1e3, (
        f"TTFT errors (ms): {np.round(ttft_err_ms, 2)}, inter-token gap errors: {np.round(gap_err_ms, 2)}")


async def test_mock_engine_mode_drops_a_disconnected_client(mock_server) -> None:
    mock = mock_server(MockConfig(engine=MOCK_ENGINE))
    async with aiohttp.ClientSession() as session:
        gone = await _stream(session, mock.url, 0.0, 10, 1000, read_tokens=3)
        await asyncio.sleep(0.1)  # the engine notices at its next write
        alone = await _stream(session, mock.url, 0.0, 10, 20)
    did = fetch_timeline(mock.url)
    assert len(did[gone]["chunk_ns"]) < 20
    # Had the hung-up sequence stayed in the batch, each step would cost another step_per_seq_s.
    gaps_s = np.diff(did[alone]["chunk_ns"]) / 1e9
    assert np.median(gaps_s) == pytest.approx(MOCK_ENGINE.step_s(1, 0), abs=0.001)


async def test_mock_engine_mode_keeps_the_faults(mock_server) -> None:
    faults = Faults(http500_every=2, disconnect_every=3, stall_every=5, stall_s=0.3)
    mock = mock_server(MockConfig(engine=MOCK_ENGINE, faults=faults))
    seen: list[tuple[int, int | str]] = []  # per request, in order: (status, tokens read or the error)
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            body = {"model": "mock-model", "prompt": [1, 2, 3], "max_tokens": 6, "stream": True}
            async with session.post(f"{mock.url}/v1/completions", json=body) as resp:
                try:
                    tokens = sum([line.startswith(b'data: {"id"') async for line in resp.content])
                    seen.append((resp.status, tokens))
                except aiohttp.ClientPayloadError:
                    seen.append((resp.status, "cut"))
    assert seen == [(200, 6 + 1), (500, 0), (200, "cut"), (500, 0), (200, 6 + 1)]  # + 1: the usage event
    stalled = fetch_timeline(mock.url)["mock-5"]["chunk_ns"]
    assert len(stalled) == 6 and (stalled[2] - stalled[1]) / 1e9 >= faults.stall_s
