"""Driving one load level: closed and open loops of units (one request, or one chat session in
`sessions.py`), the steady-state window controller, warm-up, the window's tail and the drain.
Statistics are measure's; requests are sent by `client.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import aiohttp
import numpy as np

from pricing.load.arrivals import arrival_gaps_s, think_time_s
from pricing.load.client import (
    ClientConfig,
    ProbePlan,
    Reply,
    sent_stamp_trace,
    stream_request,
)
from pricing.load.read_stamps import reports_reads, stamped_connector
from pricing.load.server_watch import (
    ServerWatch,
    answers,
    backoff_s,
    describe,
    error_kind,
)
from pricing.load.run_state import LoadRun, OnRecord, RunState
from pricing.load.settle import UnitShape, grew_beyond_noise, settle_cap_s, settled
from pricing.schema import CANCELLED, LoadSpec, RequestRecord
from pricing.workload.prompts import PromptFactory, PromptSource

READ_BUFSIZE = 64 * 2**20


# Called at most every STOP_RULE_EVERY_S once the window is long enough: (records so far, window
# start, now) -> True when the figures the probe is judged on are decided.
StopRule = Callable[[Sequence[RequestRecord], int, int], bool]
# Told when the window opens and when it closes (e.g. to scrape the server's /metrics then).
WindowMark = Callable[[Literal["open", "close"], int], None]
STOP_RULE_EVERY_S = 1.0


# An open loop's window opens once its first arrivals have all ended (those of its first 2 s,
# 4 to 16 units; sessions: the first) and the server has filled (load.settle).
# Opened by the first completion, an H200's windows held 2-23% fewer output tokens than their
# arrivals asked for. Fewer units at low rates, where 16 arrivals take long.
OPEN_WARMUP_UNITS, OPEN_WARMUP_S, OPEN_WARMUP_MIN = 16, 2.0, 4
KEEPALIVE_S = 2.0  # below the idle timeout of the servers we load (uvicorn's 5 s)


async def _controller(state: RunState, clock: Callable[[], int], stop_rule: StopRule | None,
                      mark: WindowMark | None) -> None:
    """Opens nothing (the load does that at the end of warm-up); closes the window once it is full
    and decided, then ends the probe when the window's requests have finished (or the tail's cap)."""
    plan, t0 = state.plan, clock()
    last_rule_ns, opened, tail_end_ns = 0, False, 0
    while not state.stop.is_set():
        now = clock()
        if (gone := state.watch.verdict(now)) is not None:
            state.abort, state.aborted = gone
            state.stop.set()
            return
        warmed_s = (now - (state.first_sent_ns or now)) / 1e9
        if state.window_start_ns is None and state.warmed is not None and settled(
                state.records, state.sent_units, warmed_s, settle_cap_s(plan),
                grew=state.in_flight - state.warmed[0], arrived=state.sent_requests - state.warmed[1]):
            state.warmup_capped = warmed_s >= settle_cap_s(plan)
            state.open_window(now)
        w0 = state.window_start_ns
        if w0 is not None and not opened:
            opened = True
            if mark is not None:
                mark("open", w0)
        over_time = (now - t0) / 1e9 >= plan.max_duration_s
        if state.window_end_ns is None:
            filled = (w0 is not None and (now - w0) / 1e9 >= state.window_target_s
                      and state.window_completions >= plan.min_requests)
            decided = filled and stop_rule is None
            if filled and not decided and (now - last_rule_ns) / 1e9 >= STOP_RULE_EVERY_S:
                last_rule_ns = now
                decided = stop_rule(state.records, w0, now)  # type: ignore[arg-type,misc]
            extended_enough = filled and (now - w0) / 1e9 >= plan.max_extension * state.window_target_s  # type: ignore[operator]
            # An open loop's server that still fills (its requests grow beyond noise) is not yet
            # what the long run sees: the window runs on, to its caps (settle.grew_beyond_noise).
            filling = state.load.mode == "open" and grew_beyond_noise(state.in_flight_at_open, state.in_flight)
            if (decided and not filling) or (filled and (over_time or extended_enough)):
                state.undecided_at_cap = not decided
                state.window_end_ns, state.tail_pending = now, state.in_flight
                window_s = (now - w0) / 1e9  # type: ignore[operator]
                tail_s = min(plan.tail_frac * window_s, max(0.0, plan.max_duration_s - (now - t0) / 1e9))
                tail_end_ns = now + int(tail_s * 1e9)
                if mark is not None:
                    mark("close", now)
            elif over_time:
                if state.aborted is None:
                    state.abort = "window_not_filled"
                    state.aborted = f"max_duration_s={plan.max_duration_s:g} reached before the window filled"
                state.stop.set()
                return
        elif state.tail_pending <= 0 or now >= tail_end_ns:
            state.stop.set()
            return
        try:
            await asyncio.wait_for(state.stop.wait(), timeout=0.05)
        except asyncio.TimeoutError:
            pass


@dataclass
class Sink:
    """Where a unit reports: each finished request, and its last request once the unit has done
    what warm-up waits for (one request; a whole session, so that the mix of first and later
    turns, and the prefix cache, are near their steady state when the window opens)."""

    done: Callable[[RequestRecord], None]
    warmed: Callable[[RequestRecord], None]


# What a closed-loop worker repeats and an open-loop arrival starts: one request (and a closed
# loop's think time after it) or one chat session (load.sessions). Called with the sink, the
# share of the output its first request asks for, and the worker's generator; returns False
# once the probe is stopping (its request was cancelled).
Unit = Callable[[Sink, float, np.random.Generator], Awaitable[bool]]


class Link:
    """One probe's HTTP session, in-flight accounting and server watch: every request of a unit
    goes through it."""

    def __init__(self, session: aiohttp.ClientSession, cfg: ClientConfig, state: RunState,
                 clock: Callable[[], int]) -> None:
        self.session, self.cfg, self.state, self.clock = session, cfg, state, clock
        self._tokens = itertools.count()

    async def send(self, prompt: list[int] | str, isl: int, osl: int, token_ids: bool = False) -> Reply:
        state, watch = self.state, self.state.watch
        state.in_flight += 1
        sent_ns, token = self.clock(), next(self._tokens)
        if state.window_start_ns is None:
            state.sent_requests += 1
            state.first_sent_ns = state.first_sent_ns or sent_ns
        watch.sent(token, sent_ns)
        try:
            return await stream_request(self.session, self.cfg, prompt, isl, osl, self.clock, token_ids, watch.causes)
        finally:
            watch.done(token)
            state.in_flight -= 1
            if state.window_end_ns is not None and sent_ns <= state.window_end_ns:
                state.tail_pending -= 1

    def planned(self, shape: UnitShape) -> None:
        """A unit starts: what it will ask, for load.settle's estimate (before the window only)."""
        if self.state.window_start_ns is None:
            self.state.sent_units.append(shape)

    def failed(self, isl: int, osl: int, error: str) -> RequestRecord:
        """A request that could not be sent, as a record of its error."""
        now = self.clock()
        return RequestRecord(start_ns=now, end_ns=now, target_input_tokens=isl, target_output_tokens=osl, error=error,
                             wall_time_s=time.time())


MakeUnit = Callable[[Link], tuple[Unit, Callable[[], None]]]  # the unit, and what to close at the drain


async def drive_load(
    cfg: ClientConfig,
    load: LoadSpec,
    pairs: Iterator[tuple[int, int]],
    plan: ProbePlan | None = None,
    on_record: OnRecord | None = None,
    clock: Callable[[], int] = time.perf_counter_ns,
    stop_rule: StopRule | None = None,
    mark: WindowMark | None = None,
) -> LoadRun:
    """Drive one load level of independent requests, (input, output) lengths from `pairs`, through
    warm-up, its steady-state window and the window's tail (`run_units`)."""
    with PromptFactory(cfg) as prompts:  # new token ids every probe: nothing for the prefix cache

        def make_unit(link: Link) -> tuple[Unit, Callable[[], None]]:
            source = PromptSource(prompts, link.session, pairs, ahead=max(load.concurrency or 0, 16))
            return _request_unit(link, source, load), source.close

        return await run_units(cfg, load, make_unit, plan, on_record, clock, stop_rule, mark)


async def run_units(
    cfg: ClientConfig,
    load: LoadSpec,
    make_unit: MakeUnit,
    plan: ProbePlan | None = None,
    on_record: OnRecord | None = None,
    clock: Callable[[], int] = time.perf_counter_ns,
    stop_rule: StopRule | None = None,
    mark: WindowMark | None = None,
    arrivals_per_request: float = 1.0,
) -> LoadRun:
    """Drive one load level of units through warm-up, its steady-state window and the window's
    tail, then stop and cut the rest. An open loop starts units at `arrivals_per_request` x the
    load's request rate (a session of n turns on average: 1/n).

    Warm-up ends when every closed-loop worker has completed one unit, or for sessions when as
    many have been completed as there are workers (open loop: when the first units complete, i.e.
    the pipeline is full). The drain starts when issuing stops; requests
    still in flight then are cancelled and recorded as "cancelled", not as errors.
    """
    plan = plan or ProbePlan()
    watch = ServerWatch(cfg.base_url, plan.unreachable_after_s, plan.server_stall_s)
    state = RunState(plan=plan, load=load, on_record=on_record, watch=watch)
    limit = load.concurrency or 0
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s, sock_read=cfg.stall_timeout_s)
    # Idle connections go before the server drops them (vLLM's uvicorn: 5 s; aiohttp keeps them
    # 15 s): a request sent on one the server is closing fails as a disconnect, and at 1-2 req/s
    # open loop on vLLM CPU 3 such errors failed Baseline's 1% error limit.
    connector = stamped_connector(clock, on_read=watch.read, limit=limit, limit_per_host=limit,
                                  keepalive_timeout=KEEPALIVE_S)
    watch.reads_reported = reports_reads(connector)
    # read_bufsize: a stream is read once, when it ends, so its buffer must hold a whole reply
    # (aiohttp stops reading a socket whose buffer passes twice this).
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, trace_configs=[sent_stamp_trace(clock)],
                                     read_bufsize=READ_BUFSIZE) as session:
        unit, close = make_unit(Link(session, cfg, state, clock))
        if load.mode == "closed":
            tasks = _start_closed_loop(state, unit, cfg.seed)
        else:
            rate_rps = (load.request_rate_rps or 1.0) * arrivals_per_request
            tasks = [asyncio.create_task(_open_loop(state, unit, rate_rps, cfg.seed, clock))]
        await _controller(state, clock, stop_rule, mark)
        drain_ns = clock()
        close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if state.abort is None and watch.streak > 0 and not await answers(session, cfg.base_url):
            # The server died as the probe ended (its last requests' connections failed): the
            # window's figures hold failures it caused, so the probe is measured again on resume.
            state.abort = "server_unreachable"
            state.aborted = (f"server {cfg.base_url} unreachable: the probe's last requests failed "
                             f"({watch.cause()}) and it does not answer")

    w0 = state.window_start_ns if state.window_start_ns is not None else drain_ns
    w1 = state.window_end_ns if state.window_end_ns is not None else drain_ns
    wait_s = state.prompt_wait_ns / state.prompts_taken / 1e9 if state.prompts_taken else None
    return LoadRun(sorted(state.records, key=lambda r: r.start_ns), w0, w1, state.aborted, state.abort, wait_s,
                   state.undecided_at_cap, dict(state.dropped_failures), state.warmup_capped)


def _request_unit(link: Link, source: PromptSource, load: LoadSpec) -> Unit:
    """One independent request, then (closed loop) a think time."""
    state, clock = link.state, link.clock
    think_s = load.think_s if load.mode == "closed" else 0.0

    async def one(sink: Sink, osl_fraction: float, rng: np.random.Generator) -> bool:
        asked_ns = clock()
        isl, osl, prompt = await source.next()
        if state.window_start_ns is not None:
            state.prompt_wait_ns += clock() - asked_ns
            state.prompts_taken += 1
        osl = 1 if load.prefill_only else max(1, round(osl * osl_fraction))
        link.planned(UnitShape(1, osl - 1))
        if isinstance(prompt, (aiohttp.ClientError, asyncio.TimeoutError)):
            kind = f"prompt_{error_kind(prompt)}"  # the server's /detokenize failed
            state.watch.causes[kind] = describe(prompt)
            rec = link.failed(isl, osl, kind)
        elif isinstance(prompt, Exception):
            raise prompt
        else:
            rec = (await link.send(prompt, isl, osl)).record
        sink.done(rec)
        if rec.error == CANCELLED:  # the drain: a window opened now would start after it
            return False
        sink.warmed(rec)
        if think_s > 0:  # a user reading the answer before the next question
            await asyncio.sleep(think_time_s(rng, think_s))
        return True

    return one


def _start_closed_loop(state: RunState, unit: Unit, seed: int) -> list[asyncio.Task]:
    n = state.load.concurrency or 1
    first_done: list[int | None] = [None] * n
    # Sessions: the window opens once as many sessions have ended as there are workers, not when
    # every worker has ended one: the longest of N heavy-tailed sessions grows with N (on an H200,
    # 128 and 596 sessions at think x0.01 had not all ended one after 150 and 240 s).
    by_count, ended = bool(state.load.sessions), [0]

    async def worker(slot: int) -> None:
        rng = np.random.default_rng((seed, slot))
        failures = 0  # units in a row ending in a failure: a failing server gets a growing pause, not a hot loop
        last_ok = True

        def done(rec: RequestRecord) -> None:
            nonlocal last_ok
            last_ok = rec.ok
            state.add(rec)

        def warmed(rec: RequestRecord) -> None:
            if by_count:
                ended[0] += 1
                if ended[0] == n:
                    state.open_window(rec.end_ns)
            elif first_done[slot] is None:
                first_done[slot] = rec.end_ns
                if all(t is not None for t in first_done):
                    state.open_window(max(first_done))  # type: ignore[type-var]

        sink = Sink(done, warmed)
        if state.plan.ramp_up_s:
            await asyncio.sleep(state.plan.ramp_up_s * slot / n)
        # Slot i's first request asks for (i+1)/N of its output: equal requests started together
        # would otherwise run in lockstep for many rounds (all finish, all return, their prefills
        # queue together), far from the steady state. First requests end before the window opens.
        fraction = (slot + 1) / n
        while not state.stop.is_set():
            if not await unit(sink, fraction, rng):
                return
            fraction = 1.0
            failures = 0 if last_ok else failures + 1
            if failures:
                await asyncio.sleep(backoff_s(failures))

    return [asyncio.create_task(worker(i)) for i in range(n)]


async def _open_loop(state: RunState, unit: Unit, rate_rps: float, seed: int, clock) -> None:
    """Poisson/gamma arrivals of units; at most `concurrency` in progress (later ones wait for a slot)."""
    load = state.load
    slots = asyncio.Semaphore(load.concurrency) if load.concurrency else None
    in_flight: set[asyncio.Task] = set()
    rng = np.random.default_rng((seed, 1))
    # Sessions: the first one (its turns already mix first and later ones, as a closed loop's do).
    warmup_units = 1 if load.sessions else min(OPEN_WARMUP_UNITS, max(OPEN_WARMUP_MIN, math.ceil(rate_rps * OPEN_WARMUP_S)))
    warming = [warmup_units]

    def warmed(rec: RequestRecord) -> None:
        warming[0] -= 1
        if warming[0] == 0 and state.window_start_ns is None:  # the controller opens it once settled
            state.warmed = (state.in_flight, state.sent_requests)

    first_sink, later_sink = Sink(state.add, warmed), Sink(state.add, lambda rec: None)

    async def one(sink: Sink) -> None:
        if slots is not None:
            async with slots:
                await unit(sink, 1.0, rng)
        else:
            await unit(sink, 1.0, rng)

    next_ns, arrived = clock(), 0
    try:
        for gap_s in arrival_gaps_s(rate_rps, load.burstiness, seed):
            if state.stop.is_set():
                break
            delay_s = (next_ns - clock()) / 1e9
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            task = asyncio.create_task(one(first_sink if arrived < warmup_units else later_sink))
            arrived += 1
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            next_ns += int(gap_s * 1e9)
    finally:
        for task in list(in_flight):
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
