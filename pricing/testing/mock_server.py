"""An OpenAI-compatible streaming server whose latency is known: the ground truth for tests.

TTFT = queueing for a batch slot + ttft_base + prefill(ISL) x (1 + prefill_batch_factor x running);
TPOT = tpot_base + tpot_per_seq x running. With a prefix cache (`prefix_cache_block_tokens`,
`mock_cache`), only the prompt tokens it does not hold are prefilled; `/metrics` counts its hits
as vLLM does, and `return_token_ids` streams each token's id, as vLLM >= 0.10 does. Or, with
`engine` set, every request goes through one simulated continuous-batching engine (`sim_engine`)
run in real time. Faults (`mock_faults`) on every k-th request: HTTP 500, a dropped connection
mid-stream, a stall, a request accepted and never answered; and bursts of HTTP 503.
`/mock/timeline` returns what the server did.
Run alone: `python -m pricing.testing.mock_server --port 8000 --config '{"latency": {"tpot_base_s": 0.02}}'`.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from pricing.testing.mock_cache import PrefixCache, answer_ids, metrics_text
from pricing.testing.mock_faults import Faults
from pricing.testing.mock_http import Request, Response, serve
from pricing.testing.mock_timeline import server_ttft_s
from pricing.testing.sim_engine import ADMIT_S, EngineModel, EngineStep, SimEngine

ns = time.perf_counter_ns


class LatencyModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttft_base_s: float = Field(default=0.010, ge=0)
    prefill_s_per_token: float = Field(default=0.0, ge=0)
    prefill_batch_factor: float = Field(default=0.0, ge=0)
    tpot_base_s: float = Field(default=0.010, ge=0)
    tpot_per_seq_s: float = Field(default=0.0, ge=0)
    max_num_seqs: int = Field(default=100_000, ge=1)  # beyond this, requests queue


class MockConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency: LatencyModel = Field(default_factory=LatencyModel)
    faults: Faults = Field(default_factory=Faults)
    model_name: str = "mock-model"
    api_key: str | None = None  # when set, generation requires "Authorization: Bearer <key>"
    # When set, requests share one simulated engine and `latency` is not used. Faults apply as in
    # the fixed-latency path; a stalled stream's tokens are still generated, and sent when it ends.
    engine: EngineModel | None = None
    prefix_cache_block_tokens: int = Field(default=0, ge=0)  # 0: no prefix cache
    timeline_prompts: bool = False  # the timeline keeps each token-id prompt and the answer's ids


@dataclass
class _State:
    cfg: MockConfig
    slots: asyncio.Semaphore
    running: int = 0
    counter: itertools.count = field(default_factory=itertools.count)
    timeline: dict[str, dict] = field(default_factory=dict)
    engine: _EngineLoop | None = None
    cache: PrefixCache | None = None
    started_ns: int = field(default_factory=lambda: ns())


def _prompt_tokens(body: dict) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    prompt = body.get("prompt", "")
    return len(prompt) if isinstance(prompt, list) else len(str(prompt).split())


def _prompt_head(body: dict) -> str:
    """The prompt's first 16 tokens (or words): equal heads would be prefix-cache hits in vLLM."""
    if "messages" in body:
        return " ".join(" ".join(str(m.get("content", "")) for m in body["messages"]).split()[:16])
    prompt = body.get("prompt", "")
    return " ".join(map(str, prompt[:16] if isinstance(prompt, list) else str(prompt).split()[:16]))


def _chunk(rid: str, chat: bool, text: str, finish: str | None, token_id: int | None = None) -> bytes:
    if chat:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        obj = {"id": rid, "object": "chat.completion.chunk", "choices": [choice]}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        if token_id is not None:
            choice["token_ids"] = [token_id]
        obj = {"id": rid, "object": "text_completion", "choices": [choice]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _role_chunk(rid: str) -> bytes:
    role = {"id": rid, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    return b"data: " + json.dumps(role).encode() + b"\n\n"


def _usage_chunk(rid: str, isl: int, osl: int) -> bytes:
    usage = {"prompt_tokens": isl, "completion_tokens": osl, "total_tokens": isl + osl}
    return b"data: " + json.dumps({"id": rid, "choices": [], "usage": usage}).encode() + b"\n\n"


# asyncio's epoll selector wakes on whole milliseconds, rounding up: aiming half a
# millisecond early centres the emission error on zero instead of +0.5 ms.
_TIMER_BIAS_NS = 500_000


# The engine's step ends are the truth the benchmarks check against: a timer that wakes a
# millisecond late under load (2 shared cores) shows up as TTFT the model did not ask for. So the
# engine loop sleeps to just short of a step's end and spins the rest (a few % of its core).
_SPIN_NS = 1_500_000


async def _sleep_until_exact(deadline_ns: int) -> None:
    await _sleep_until(deadline_ns - _SPIN_NS)
    while ns() < deadline_ns:
        pass


async def _sleep_until(deadline_ns: int) -> None:
    delay = (deadline_ns - _TIMER_BIAS_NS - ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


async def _generate(state: _State, req: Request, resp: Response, chat: bool) -> None:
    recv_ns = req.arrival_ns  # stamped when the request's bytes were read, before any parsing
    if state.cfg.api_key and req.headers.get("authorization") != f"Bearer {state.cfg.api_key}":
        return resp.send_json({"error": {"message": "bad api key"}}, 401)
    body = req.json()
    n = next(state.counter) + 1
    faults = state.cfg.faults
    if (refused := faults.refusal(n, state.started_ns, recv_ns)) is not None:
        return resp.send_json({"error": {"message": refused[1]}}, refused[0])
    if faults.hangs(n):
        await asyncio.get_running_loop().create_future()  # until the client hangs up (the handler is cancelled)
    isl, osl = _prompt_tokens(body), int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
    if state.engine is not None and (isl < 1 or osl < 1):  # a 400, as vLLM answers
        raise ValueError(f"the engine needs a prompt and max_tokens >= 1, got {isl} and {osl}")
    rid = f"mock-{n}"
    events: list[int] = []
    entry = state.timeline[rid] = {"recv_ns": recv_ns, "isl": isl, "osl": osl, "head": _prompt_head(body),
                                   "chunk_ns": events}
    prompt = body.get("prompt") if isinstance(body.get("prompt"), list) else None
    send_ids = bool(body.get("return_token_ids")) and not chat
    # Answer ids only where something reads them: the mock's own cost is part of every timing test.
    wanted = send_ids or (prompt is not None and (state.cache is not None or state.cfg.timeline_prompts))
    stream = _Stream(rid, n, resp, chat, isl, osl, events, prefill=isl, answer=answer_ids(n, osl) if wanted else [],
                     send_ids=send_ids)
    if prompt is not None and state.cache is not None:
        entry["cached"] = hit = state.cache.lookup(prompt)
        stream.prefill = isl - hit
        stream.finished = lambda: state.cache.insert(prompt + stream.answer[:-1])  # type: ignore[union-attr]
    if prompt is not None and state.cfg.timeline_prompts:
        entry["prompt"], entry["answer"] = prompt, stream.answer
    if state.engine is not None:
        return await state.engine.serve(stream, recv_ns)
    queued = state.slots.locked()
    async with state.slots:
        state.running += 1
        # The clock starts at arrival, or at the batch slot when queued.
        start_ns = ns() if queued else recv_ns
        try:
            await _stream(resp, state, stream, start_ns)
        finally:
            state.running -= 1


async def _stream(resp: Response, state: _State, stream: _Stream, start_ns: int) -> None:
    faults, lat = state.cfg.faults, state.cfg.latency
    chat, rid, n, osl, events = stream.chat, stream.rid, stream.n, stream.osl, stream.events
    resp.start_stream()
    prefill_s = lat.prefill_s_per_token * stream.prefill * (1 + lat.prefill_batch_factor * (state.running - 1))
    deadline = start_ns + int((lat.ttft_base_s + prefill_s) * 1e9)
    if chat:
        resp.write(_role_chunk(rid))
    for i in range(osl):
        await _sleep_until(deadline)
        if resp.closed:
            return  # the client went away (e.g. cancelled at drain)
        if faults.disconnect_every and n % faults.disconnect_every == 0 and i == 2:
            return resp.abort()
        if faults.stall_every and n % faults.stall_every == 0 and i == 2:
            await asyncio.sleep(faults.stall_s)
        resp.write(stream.chunk(i))
        events.append(ns())
        deadline += int((lat.tpot_base_s + lat.tpot_per_seq_s * state.running) * 1e9)
    stream.finished()
    resp.write(_usage_chunk(rid, stream.isl, osl))
    resp.write(b"data: [DONE]\n\n")
    resp.end_stream()


@dataclass
class _Stream:
    """One request's event stream in engine mode; `done` resolves when it has ended or gone."""

    rid: str
    n: int  # the request's number, for faults
    resp: Response
    chat: bool
    isl: int
    osl: int
    events: list[int]  # chunk_ns of the timeline
    prefill: int = 0  # prompt tokens to compute: those the prefix cache does not hold
    answer: list[int] = field(default_factory=list)  # the ids generated
    send_ids: bool = False  # each chunk carries its token's id (return_token_ids)
    finished: Callable[[], None] = lambda: None  # called when the last token was generated
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    sent: int = 0  # output tokens generated so far
    held: list[bytes | None] | None = None  # while stalled: chunks to send (None: the end of the stream)

    def chunk(self, i: int) -> bytes:
        """The event of output token i."""
        return _chunk(self.rid, self.chat, " t", "length" if i == self.osl - 1 else None,
                      self.answer[i] if self.send_ids else None)

    def send(self, data: bytes | None) -> None:
        """A token chunk, or None for the usage, [DONE] and the end of the stream."""
        if self.held is not None:
            self.held.append(data)
        elif data is not None:
            self.resp.write(data)
            self.events.append(ns())
        else:
            self.finished()
            self.resp.write(_usage_chunk(self.rid, self.isl, self.osl))
            self.resp.write(b"data: [DONE]\n\n")
            self.resp.end_stream()
            self.end()

    def release(self) -> None:
        """The stall is over: send what was generated meanwhile."""
        held, self.held = self.held or [], None
        for data in held:
            if self.resp.closed:
                return self.end()
            self.send(data)

    def end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


# A step is planned ADMIT_S after it starts and takes the requests stamped by then (sim_engine's
# rule, which the truth follows too); its end stays anchored to its start.
_PLAN_LAG_NS = round(ADMIT_S * 1e9)


class _EngineLoop:
    """One engine for every request, in real time: plan a step, sleep until its ideal end (the
    previous end + its duration, so sleeps do not drift), write its tokens, repeat."""

    def __init__(self, cfg: MockConfig) -> None:
        assert cfg.engine is not None
        self.cfg, self.engine = cfg, SimEngine(cfg.engine)
        self.streams: dict[str, _Stream] = {}
        self.pending: list[tuple[int, str]] = []  # (arrival_ns, rid) not yet in the engine, by arrival
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.plan_lag_ns = _PLAN_LAG_NS
        self.write_ns = 0.0  # mean time to write one chunk, learnt as the engine runs

    async def serve(self, stream: _Stream, arrival_ns: int) -> None:
        stream.resp.start_stream()
        if stream.chat:
            stream.resp.write(_role_chunk(stream.rid))
        self.streams[stream.rid] = stream
        bisect.insort(self.pending, (arrival_ns, stream.rid))
        self.wake.set()
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())
            self.task.add_done_callback(self._crashed)
        try:
            await stream.done
        finally:  # ended, or cancelled with its connection
            self._drop(stream.rid)

    def _crashed(self, task: asyncio.Task) -> None:
        """A bug in the loop: say so, and hang up on every stream rather than leave them waiting."""
        if not task.cancelled() and task.exception() is not None:
            print(f"mock engine loop failed: {task.exception()!r}", file=sys.stderr, flush=True)
            for stream in list(self.streams.values()):
                stream.resp.abort()
                self._drop(stream.rid)
        self.task = None

    def _drop(self, rid: str) -> None:
        stream = self.streams.pop(rid, None)
        if stream is None:
            return
        stream.end()
        self.engine.cancel(rid)
        self.pending = [p for p in self.pending if p[1] != rid]

    async def _run(self) -> None:
        end_ns: int | None = None  # the ideal end of the last step: the next one starts there
        while True:
            if self.engine.idle:
                while not self.pending:
                    self.wake.clear()
                    await self.wake.wait()
                # An idle engine starts at the first arrival (its kernel stamp), not at the wake-up.
                start_ns = self.pending[0][0] if end_ns is None else max(end_ns, self.pending[0][0])
            else:
                start_ns = end_ns  # type: ignore[assignment]
            await _sleep_until(start_ns + self.plan_lag_ns)
            # Reads waiting in the selector (requests stamped in time, not yet parsed) first: one
            # loop pass polls the sockets, the next runs their handlers.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            while self.pending and self.pending[0][0] <= start_ns + self.plan_lag_ns:
                rid = self.pending.pop(0)[1]
                stream = self.streams[rid]
                self.engine.add(rid, max(1, stream.prefill), stream.osl, start_ns / 1e9)
            step = self.engine.step()
            if step is None:  # everything that had arrived was dropped
                end_ns = start_ns
                continue
            end_ns = start_ns + round(step.duration_s * 1e9)
            # Its chunks are written one after another: centre them on its end (else first tokens
            # came 0.5 ms late at 7 req/s, +4% on a 16 ms TTFT p90); at most a quarter step early.
            writes = len(step.first_token) + len(step.decoded)
            lead_ns = min(round(writes * self.write_ns / 2), (end_ns - start_ns) // 4)
            await _sleep_until_exact(end_ns - lead_ns)
            t_ns = ns()
            self._emit(step)
            if writes:
                self.write_ns += 0.1 * ((ns() - t_ns) / writes - self.write_ns)

    def _emit(self, step: EngineStep) -> None:
        faults = self.cfg.faults
        for rid in step.first_token + step.decoded:
            stream = self.streams.get(rid)
            if stream is None:
                continue
            i, n = stream.sent, stream.n
            if stream.resp.closed:  # the client went away (e.g. cancelled at drain)
                self._drop(rid)
                continue
            if faults.disconnect_every and n % faults.disconnect_every == 0 and i == 2:
                stream.resp.abort()
                self._drop(rid)
                continue
            if faults.stall_every and n % faults.stall_every == 0 and i == 2:
                stream.held = []
                asyncio.get_running_loop().call_later(faults.stall_s, stream.release)
            stream.sent += 1
            stream.send(stream.chunk(i))
        for rid in step.finished:
            if (stream := self.streams.get(rid)) is not None:
                stream.send(None)


def build_routes(cfg: MockConfig) -> dict:
    state = _State(cfg=cfg, slots=asyncio.Semaphore(cfg.latency.max_num_seqs))
    if cfg.engine is not None:
        state.engine = _EngineLoop(cfg)
    if cfg.prefix_cache_block_tokens:
        state.cache = PrefixCache(cfg.prefix_cache_block_tokens)

    async def metrics(_req: Request, resp: Response) -> None:
        resp.send_text(metrics_text(state.cache, (server_ttft_s(t) for t in state.timeline.values() if t["chunk_ns"])))

    def reply(obj_of_request):
        async def handler(req: Request, resp: Response) -> None:
            resp.send_json(obj_of_request(req))
        return handler

    models = {"data": [{"id": cfg.model_name, "max_model_len": 1 << 20}]}
    return {
        ("GET", "/health"): reply(lambda _r: {}),
        ("GET", "/version"): reply(lambda _r: {"version": "mock"}),
        ("GET", "/v1/models"): reply(lambda _r: models),
        ("POST", "/v1/completions"): lambda req, resp: _generate(state, req, resp, chat=False),
        ("POST", "/v1/chat/completions"): lambda req, resp: _generate(state, req, resp, chat=True),
        ("POST", "/tokenize"): reply(_tokenize),
        ("POST", "/detokenize"): reply(lambda r: {"prompt": " ".join(f"t{i}" for i in r.json()["tokens"])}),
        ("GET", "/mock/timeline"): reply(lambda _r: state.timeline),
        ("GET", "/metrics"): metrics,
    }


def _tokenize(req: Request) -> dict:
    words = str(req.json().get("prompt", "")).split()
    return {"tokens": list(range(len(words))), "count": len(words)}


class MockServerProcess:
    """Runs the mock in its own process (its own core), so its timing does not share the client's loop."""

    def __init__(self, cfg: MockConfig | None = None) -> None:
        self.cfg = cfg or MockConfig()
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MockServerProcess:
        cmd = [sys.executable, "-m", "pricing.testing.mock_server", "--port", "0", "--config", self.cfg.model_dump_json()]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("READY "):
            self.__exit__()
            raise RuntimeError(f"mock server did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            if self.proc.poll() is None:
                self.proc.kill()


async def _serve(cfg: MockConfig, host: str, port: int) -> None:
    server = await serve(build_routes(cfg), host, port)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--config", default="{}", help="MockConfig as JSON")
    args = parser.parse_args(argv)
    cfg = MockConfig.model_validate_json(args.config)
    gc.disable()  # collector pauses of several ms would show up as latency the model did not ask for
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(cfg, args.host, args.port))


if __name__ == "__main__":
    main()
