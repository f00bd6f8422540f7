"""Streaming load generator for vLLM's OpenAI-compatible API (closed and open loop).

The hot loop only reads and stamps: each network read gets `perf_counter_ns()` and its bytes
are kept; SSE events are split and parsed after the stream ends (`sse.py`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from pricing.load.read_stamps import ReadLog, reports_reads, stamped_connector
from pricing.load.server_watch import ServerWatch, backoff_s, describe, error_kind, is_connection_error
from pricing.load.sse import parse_stream
from pricing.schema import (
    CANCELLED,
    AbortKind,
    LoadSpec,
    PromptKind,
    RequestRecord,
    Strict,
)
from pricing.workload.prompts import PromptFactory, PromptSource

OnRecord = Callable[[RequestRecord], None]


class ClientConfig(BaseModel):
    """Where and how to send requests."""

    model_config = ConfigDict(extra="forbid")

    base_url: str
    model: str
    endpoint: str = Field(default="completions", pattern="^(completions|chat)$")
    prompt_format: Literal["token_ids", "text"] = "token_ids"  # for completions; chat sends text
    tokenizer: str | None = None  # local tokenizer for text prompts; without one, the server's /detokenize
    api_key: SecretStr | None = None  # SecretStr: never printed or dumped in clear
    # A request is given up as "timeout" when the server sends no byte for stall_timeout_s (its
    # first token queued that long fails every tier anyway), or after request_timeout_s in all
    # (a probe runs 300 s at most by default: a request longer than that is cut at its end anyway).
    request_timeout_s: float = Field(default=300.0, gt=0)
    stall_timeout_s: float = Field(default=30.0, gt=0)
    vocab_size: int = Field(default=32000, ge=16)
    seed: int = 0

    @property
    def prompts(self) -> PromptKind:
        return "chat" if self.endpoint == "chat" else self.prompt_format


class ProbePlan(Strict):
    """How long a probe runs: until its steady-state window holds enough evidence.

    The window lasts at least `min_window_s` and `window_e2e_multiple` times the p90 end-to-end
    latency of the warm-up requests (so heavy-tailed traffic gets enough samples without tuning),
    holds `min_requests` completions, and then runs on while the caller's stop rule says its
    figures are undecided, to `max_extension` times that length (or `max_duration_s` for the
    whole probe) at most. After the window closes
    the load goes on until the requests sent in it have finished (at most `tail_frac` of the
    window again), so their latencies are measured under the same load.
    """

    min_window_s: float = Field(default=10.0, ge=0)
    window_e2e_multiple: float = Field(default=2.0, ge=0)
    max_extension: float = Field(default=3.0, ge=1)  # an undecided window runs to at most this many times its length
    # 50 completions: the fewest whose p90 has an upper 95% bound at all (the 48th of 50 i.i.d.)
    min_requests: int = Field(default=50, ge=1)
    max_duration_s: float = Field(default=300.0, gt=0)
    tail_frac: float = Field(default=0.5, ge=0)
    # Closed loop: worker i starts at i/N x ramp_up_s, so N identical requests do not arrive as one herd.
    ramp_up_s: float = Field(default=0.0, ge=0)
    # Give up early when this many requests failed and none succeeded (server down).
    fail_fast_after: int = Field(default=20, ge=1)
    # Stop the probe when the server is gone: connections refused or reset, in a row, and nothing
    # received for this long (load.server_watch).
    unreachable_after_s: float = Field(default=3.0, gt=0)
    # Stop the probe when the server is hung: requests in flight and not a byte from it, on any
    # of them, for this long. A busy server still streams to the requests it runs; only a single
    # engine step (a huge prefill) longer than this would look hung.
    server_stall_s: float = Field(default=10.0, gt=0)
    # Failed requests beyond this many are counted (per error kind), not kept: a server failing
    # every request at once must not fill memory with records.
    max_kept_failures: int = Field(default=1000, ge=0)


# Called at most every STOP_RULE_EVERY_S once the window is long enough: (records so far, window
# start, now) -> True when the figures the probe is judged on are decided.
StopRule = Callable[[Sequence[RequestRecord], int, int], bool]
# Told when the window opens and when it closes (e.g. to scrape the server's /metrics then).
WindowMark = Callable[[Literal["open", "close"], int], None]
STOP_RULE_EVERY_S = 1.0


@dataclass
class LoadRun:
    """What driving one load level produced: raw records and the window; statistics are measure's."""

    records: list[RequestRecord]
    window_start_ns: int
    window_end_ns: int  # when the window closed; records go on to the end of the tail
    aborted: str | None = None  # why the probe stopped early, for people
    abort: AbortKind | None = None  # the same, for code
    prompt_wait_s: float | None = None  # mean wait per in-window request for its prompt (None: none taken)
    undecided_at_cap: bool = False  # the stop rule never said decided before max_duration_s
    # Failed requests started in the window that were counted, not kept (ProbePlan.max_kept_failures).
    dropped_failures: dict[str, int] = field(default_factory=dict)


@dataclass
class _RunState:
    plan: ProbePlan
    load: LoadSpec
    on_record: OnRecord | None
    watch: ServerWatch
    records: list[RequestRecord] = field(default_factory=list)
    window_start_ns: int | None = None
    window_end_ns: int | None = None
    window_target_s: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ok_count: int = 0
    fail_count: int = 0
    window_completions: int = 0
    in_flight: int = 0  # requests sent and not yet recorded
    tail_pending: int = 0  # requests sent before the window closed that have not finished
    aborted: str | None = None
    abort: AbortKind | None = None
    undecided_at_cap: bool = False
    prompt_wait_ns: int = 0  # in the window, summed over requests: time spent waiting for a prompt
    prompts_taken: int = 0  # in the window
    dropped_failures: dict[str, int] = field(default_factory=dict)  # in the window, by kind, not kept

    def add(self, rec: RequestRecord) -> None:
        self.watch.finished(rec)
        failed = not rec.ok and rec.error != CANCELLED
        if failed:
            self.fail_count += 1
        if failed and self.fail_count > self.plan.max_kept_failures:
            if self._in_window(rec.start_ns):
                self.dropped_failures[rec.error] = self.dropped_failures.get(rec.error, 0) + 1  # type: ignore[index]
        else:
            self.records.append(rec)
        if rec.ok:
            self.ok_count += 1
            # Anything added before the window opened also started before it: no recount needed.
            if self.window_start_ns is not None and rec.start_ns >= self.window_start_ns:
                self.window_completions += 1
        elif failed and self.ok_count == 0 and self.fail_count >= self.plan.fail_fast_after:
            if is_connection_error(rec.error):
                self.abort = "server_unreachable"
                self.aborted = (f"server {self.watch.url} unreachable: {self.watch.cause()} (its first "
                                f"{self.fail_count} requests failed); is the server running?")
            else:
                self.abort = "server_failing"
                self.aborted = (f"first {self.fail_count} requests to {self.watch.url} failed ({rec.error}); "
                                "is the server healthy?")
            self.stop.set()
        if self.on_record is not None:
            self.on_record(rec)

    def _in_window(self, start_ns: int) -> bool:
        """Started in the window (measure.requests.cohort counts such failures)."""
        w0, w1 = self.window_start_ns, self.window_end_ns
        return w0 is not None and start_ns >= w0 and (w1 is None or start_ns <= w1)

    def open_window(self, now_ns: int) -> None:
        """Warm-up is over: the window's length follows from how long warm-up requests took."""
        self.window_start_ns = now_ns
        e2e = [(r.end_ns - r.start_ns) / 1e9 for r in self.records if r.ok]
        p90 = float(np.percentile(e2e, 90)) if e2e else 0.0
        self.window_target_s = max(self.plan.min_window_s, self.plan.window_e2e_multiple * p90)


def _request_body(cfg: ClientConfig, prompt: list[int] | str, max_tokens: int) -> dict:
    body: dict = {
        "model": cfg.model,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,  # vLLM extension: generate exactly max_tokens
        "temperature": 0.0,
    }
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        body["max_completion_tokens"] = max_tokens
    else:
        body["prompt"] = prompt
    return body


def _headers(cfg: ClientConfig) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if cfg.api_key is not None:
        headers["Authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
    return headers


READ_BUFSIZE = 64 * 2**20


class _SentAt:
    """Filled by the session's trace hook when the request's last bytes are written."""

    __slots__ = ("ns",)

    def __init__(self) -> None:
        self.ns: int | None = None


def sent_stamp_trace(clock: Callable[[], int] = time.perf_counter_ns) -> aiohttp.TraceConfig:
    """A session hook stamping when the request body has been handed to the socket.

    TTFT starts there, not where `send_request` begins: building the request and (on Python
    3.11) the loop hop aiohttp takes before writing the body are the client's own delay, up to
    milliseconds when the loop is busy with hundreds of streams, not the server's.
    """

    async def on_chunk_sent(_session, ctx, _params) -> None:
        if isinstance(ctx.trace_request_ctx, _SentAt):
            ctx.trace_request_ctx.ns = clock()

    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(on_chunk_sent)
    return trace


async def send_request(
    session: aiohttp.ClientSession,
    cfg: ClientConfig,
    prompt: list[int] | str,
    isl: int,
    osl: int,
    clock: Callable[[], int] = time.perf_counter_ns,
    causes: dict[str, str] | None = None,
) -> RequestRecord:
    """Send one streaming request; errors become the record's `error` kind, never exceptions.
    `causes`, when given, gets the failure's description under its kind ("connection refused")."""
    url = f"{cfg.base_url.rstrip('/')}/v1/{'chat/completions' if cfg.endpoint == 'chat' else 'completions'}"
    body = _request_body(cfg, prompt, osl)
    reads_ns: list[int] = []
    reads: list[bytes] = []
    wall = time.time()
    start_ns = clock()  # replaced by the moment the body was written when the session has sent_stamp_trace
    sent = _SentAt()
    error: str | None = None
    try:
        async with session.post(url, json=body, headers=_headers(cfg), trace_request_ctx=sent) as resp:
            if resp.status != 200:
                await resp.read()
                error = f"http_{resp.status}"
            else:
                log = ReadLog(resp)
                if log.stamping:
                    # The reads are stamped as they arrive: wake once at the end, not per chunk.
                    try:
                        await resp.content.wait_eof()
                    finally:  # also on a disconnect or a cancellation at drain: keep what arrived, stamped
                        body = log.buffered()
                        reads_ns, reads = log.split(body) or ([clock()], [body])
                else:
                    async for data in resp.content.iter_any():
                        reads_ns.append(clock())
                        reads.append(data)
    except asyncio.CancelledError:
        error = CANCELLED
    except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
        error = error_kind(exc)
        if causes is not None:
            causes[error] = describe(exc)
    end_ns = clock()
    parsed = parse_stream(reads_ns, reads, chat=cfg.endpoint == "chat")
    if error is None and parsed.error:
        error = parsed.error
    return RequestRecord(
        start_ns=sent.ns if sent.ns is not None else start_ns,
        chunk_ns=parsed.chunk_ns,
        end_ns=end_ns,
        prompt_tokens=parsed.prompt_tokens,
        completion_tokens=parsed.completion_tokens,
        target_input_tokens=isl,
        target_output_tokens=osl,
        error=error,
        response_id=parsed.response_id,
        wall_time_s=wall,
    )


def _arrival_gaps_s(rate_rps: float, burstiness: float, seed: int) -> Iterator[float]:
    """Gamma inter-arrival times with mean 1/rate; shape 1 is Poisson, smaller is burstier."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / (rate_rps * burstiness)
    while True:
        yield from rng.gamma(burstiness, scale, size=1024)


async def _controller(state: _RunState, clock: Callable[[], int], stop_rule: StopRule | None,
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
            if decided or (filled and (over_time or extended_enough)):
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
    """Drive one load level through warm-up, its steady-state window and the window's tail, then
    stop and cut the rest.

    Warm-up ends when every closed-loop worker has completed one request (open loop: when the
    first request completes, i.e. the pipeline is full). The drain starts when issuing stops;
    requests still in flight then are cancelled and recorded as "cancelled", not as errors.
    """
    plan = plan or ProbePlan()
    watch = ServerWatch(cfg.base_url, plan.unreachable_after_s, plan.server_stall_s)
    state = _RunState(plan=plan, load=load, on_record=on_record, watch=watch)
    with PromptFactory(cfg) as prompts:  # new token ids every probe: nothing for the prefix cache
        return await _drive(cfg, load, pairs, state, prompts, clock, stop_rule, mark)


async def _drive(cfg, load, pairs, state: _RunState, prompts: PromptFactory, clock, stop_rule, mark) -> LoadRun:
    limit = load.concurrency or 0
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s, sock_read=cfg.stall_timeout_s)
    watch = state.watch
    connector = stamped_connector(clock, on_read=watch.read, limit=limit, limit_per_host=limit)
    watch.reads_reported = reports_reads(connector)
    tokens = itertools.count()
    # read_bufsize: a stream is read once, when it ends, so its buffer must hold a whole reply
    # (aiohttp stops reading a socket whose buffer passes twice this).
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, trace_configs=[sent_stamp_trace(clock)],
                                     read_bufsize=READ_BUFSIZE) as session:

        source = PromptSource(prompts, session, pairs, ahead=max(limit, 16))

        async def send_next(osl_fraction: float = 1.0) -> RequestRecord:
            asked_ns = clock()
            isl, osl, prompt = await source.next()
            if state.window_start_ns is not None:
                state.prompt_wait_ns += clock() - asked_ns
                state.prompts_taken += 1
            osl = 1 if load.kind == "prefill" else max(1, round(osl * osl_fraction))
            if isinstance(prompt, (aiohttp.ClientError, asyncio.TimeoutError)):
                kind = f"prompt_{error_kind(prompt)}"  # the server's /detokenize failed
                watch.causes[kind] = describe(prompt)
                return _failed_before_send(isl, osl, kind, clock)
            if isinstance(prompt, Exception):
                raise prompt
            state.in_flight += 1
            sent_ns, token = clock(), next(tokens)
            watch.sent(token, sent_ns)
            try:
                return await send_request(session, cfg, prompt, isl, osl, clock, watch.causes)
            finally:
                watch.done(token)
                state.in_flight -= 1
                if state.window_end_ns is not None and sent_ns <= state.window_end_ns:
                    state.tail_pending -= 1

        if load.mode == "closed":
            tasks = _start_closed_loop(state, send_next, cfg.seed)
        else:
            tasks = [asyncio.create_task(_open_loop(state, send_next, cfg.seed, clock))]
        await _controller(state, clock, stop_rule, mark)
        drain_ns = clock()
        source.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if state.abort is None and watch.streak > 0 and not await _answers(session, cfg.base_url):
            # The server died as the probe ended (its last requests' connections failed): the
            # window's figures hold failures it caused, so the probe is measured again on resume.
            state.abort = "server_unreachable"
            state.aborted = (f"server {cfg.base_url} unreachable: the probe's last requests failed "
                             f"({watch.cause()}) and it does not answer")

    w0 = state.window_start_ns if state.window_start_ns is not None else drain_ns
    w1 = state.window_end_ns if state.window_end_ns is not None else drain_ns
    wait_s = state.prompt_wait_ns / state.prompts_taken / 1e9 if state.prompts_taken else None
    return LoadRun(sorted(state.records, key=lambda r: r.start_ns), w0, w1, state.aborted, state.abort, wait_s,
                   state.undecided_at_cap, dict(state.dropped_failures))


ALIVE_CHECK_S = 2.0


async def _answers(session: aiohttp.ClientSession, base_url: str) -> bool:
    """Whether anything answers HTTP at `base_url` (any status: a 404 is a live server)."""
    try:
        async with session.get(f"{base_url.rstrip('/')}/health", timeout=aiohttp.ClientTimeout(total=ALIVE_CHECK_S)):
            return True
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


def _failed_before_send(isl: int, osl: int, error: str, clock: Callable[[], int]) -> RequestRecord:
    now = clock()
    return RequestRecord(
        start_ns=now, end_ns=now, target_input_tokens=isl, target_output_tokens=osl, error=error, wall_time_s=time.time()
    )


# A think time is a fixed part plus an exponential one (mean think_s in all). The exponential part
# breaks the lockstep a closed loop of equal requests falls into; the fixed part keeps it from
# being near zero, where a client's own millisecond turnaround would decide which engine step a
# request joins (the offline truth, sim_truth, draws think times the same way).
THINK_FIXED_FRAC = 0.2


def think_time_s(rng: np.random.Generator, mean_s: float) -> float:
    return mean_s * (THINK_FIXED_FRAC + float(rng.exponential(1.0 - THINK_FIXED_FRAC)))


def _start_closed_loop(state: _RunState, send_next, seed: int) -> list[asyncio.Task]:
    n, think_s = state.load.concurrency or 1, state.load.think_s
    first_done: list[int | None] = [None] * n

    async def worker(slot: int) -> None:
        rng = np.random.default_rng((seed, slot))
        failures = 0  # in a row: a failing server gets a growing pause, not a hot loop
        if state.plan.ramp_up_s:
            await asyncio.sleep(state.plan.ramp_up_s * slot / n)
        while not state.stop.is_set():
            # Slot i's first request asks for (i+1)/N of its output: equal requests started together
            # would otherwise run in lockstep for many rounds (all finish, all return, their prefills
            # queue together), far from the steady state. First requests end before the window opens.
            rec = await send_next((slot + 1) / n if first_done[slot] is None else 1.0)
            state.add(rec)
            if rec.error == CANCELLED:  # the drain: a window opened now would start after it
                return
            if first_done[slot] is None:
                first_done[slot] = rec.end_ns
                if all(t is not None for t in first_done):
                    state.open_window(max(first_done))  # type: ignore[type-var]
            failures = 0 if rec.ok else failures + 1
            if failures:
                await asyncio.sleep(backoff_s(failures))
            if think_s > 0:  # a user reading the answer before the next question
                await asyncio.sleep(think_time_s(rng, think_s))

    return [asyncio.create_task(worker(i)) for i in range(n)]


async def _open_loop(state: _RunState, send_next, seed: int, clock) -> None:
    """Poisson/gamma arrivals; at most `concurrency` in flight (later arrivals wait for a slot)."""
    load = state.load
    slots = asyncio.Semaphore(load.concurrency) if load.concurrency else None
    in_flight: set[asyncio.Task] = set()

    async def one() -> None:
        if slots is not None:
            async with slots:
                rec = await send_next()
        else:
            rec = await send_next()
        state.add(rec)
        if state.window_start_ns is None and rec.ok:
            state.open_window(rec.end_ns)

    next_ns = clock()
    try:
        for gap_s in _arrival_gaps_s(load.request_rate_rps or 1.0, load.burstiness, seed):
            if state.stop.is_set():
                break
            delay_s = (next_ns - clock()) / 1e9
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            task = asyncio.create_task(one())
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            next_ns += int(gap_s * 1e9)
    finally:
        for task in list(in_flight):
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
