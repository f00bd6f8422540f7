"""Requests to vLLM's OpenAI-compatible API: where and how to send them (`ClientConfig`), how
long a probe runs (`ProbePlan`), and one streaming request (`send_request`, `stream_request`).
The loops that drive them are `loops.py`.

The hot loop only reads and stamps: each network read gets `perf_counter_ns()` and its bytes
are kept; SSE events are split and parsed after the stream ends (`sse.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from pricing.load.read_stamps import ReadLog
from pricing.load.server_watch import describe, error_kind
from pricing.load.sse import parse_stream
from pricing.schema import CANCELLED, PromptKind, RequestRecord, Strict


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

    The window lasts at least `min_window_s` (an open loop: `open_window_multiple` times that) and
    `window_e2e_multiple` times the p90 end-to-end latency of the warm-up requests (so
    heavy-tailed traffic gets enough samples without tuning),
    holds `min_requests` completions, and then runs on while the caller's stop rule says its
    figures are undecided, to `max_extension` times that length (or `max_duration_s` for the
    whole probe) at most. After the window closes
    the load goes on until the requests sent in it have finished (at most `tail_frac` of the
    window again), so their latencies are measured under the same load.
    """

    min_window_s: float = Field(default=10.0, ge=0)
    # An open loop's window lasts at least this many times min_window_s: each window sees its own
    # stretch of Poisson load, and the long run's percentiles are over all of them (simulated
    # engine at 60% of saturation, benchmarks/window_length.py: TPOT p90 -3.5% in 10 s windows,
    # intervals covering the truth in 83%; 20 s: -1.7%, 90%).
    open_window_multiple: float = Field(default=2.0, ge=1)
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


def _request_body(cfg: ClientConfig, prompt: list[int] | str, max_tokens: int, token_ids: bool = False) -> dict:
    body: dict = {
        "model": cfg.model,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,  # vLLM extension: generate exactly max_tokens
        "temperature": 0.0,
    }
    if token_ids:  # vLLM >= 0.10 extension: each streamed choice carries its token ids
        body["return_token_ids"] = True
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


@dataclass(frozen=True)
class Reply:
    """A request's timing record and, where asked for, the answer's token ids as streamed."""

    record: RequestRecord
    token_ids: list[int] | None = None


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
    return (await stream_request(session, cfg, prompt, isl, osl, clock, causes=causes)).record


async def stream_request(
    session: aiohttp.ClientSession,
    cfg: ClientConfig,
    prompt: list[int] | str,
    isl: int,
    osl: int,
    clock: Callable[[], int] = time.perf_counter_ns,
    token_ids: bool = False,
    causes: dict[str, str] | None = None,
) -> Reply:
    """`send_request`, with the answer's token ids when `token_ids` (a session's next prompt holds them)."""
    url = f"{cfg.base_url.rstrip('/')}/v1/{'chat/completions' if cfg.endpoint == 'chat' else 'completions'}"
    body = _request_body(cfg, prompt, osl, token_ids)
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
    record = RequestRecord(
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
    return Reply(record, parsed.token_ids)


