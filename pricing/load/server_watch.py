"""Noticing, within seconds, a server that is gone or hung while a probe drives it.

A killed server refuses connections at once, so a closed loop without this check spun through
failed requests as fast as it could (a core, and gigabytes of failed records, for the probe's
whole `max_duration_s`). The load generator feeds every finished request, every send and every
socket read here; the probe's controller asks `verdict` on each tick and stops the probe with
its abort kind and a one-line reason naming the URL. Failures also set a worker's backoff.
"""

from __future__ import annotations

import asyncio
import errno
import os
from dataclasses import dataclass, field

import aiohttp

from pricing.schema import CANCELLED, AbortKind, RequestRecord

# Error kinds that say the connection itself failed, not the server's answer: refused (nothing
# listens), reset or closed mid-response (the process died). A prompt made through the server
# (`/detokenize`) that failed so is "prompt_" + the kind.
CONNECTION_ERRORS = frozenset({"connect", "disconnect"})
# Connection failures in a row, with nothing read from the server meanwhile, before it counts as
# gone: one or two are a blip (a connection closed by an idle timeout).
UNREACHABLE_MIN_FAILURES = 3
# A worker whose requests keep failing waits before the next: 10 ms after the first failure,
# doubling to at most 1 s, so a dead server costs a few requests per worker per second.
BACKOFF_FIRST_S = 0.01
BACKOFF_MAX_S = 1.0


def error_kind(exc: BaseException) -> str:
    """A request's failure as the record's error kind."""
    if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return "disconnect"
    return f"client_{type(exc).__name__}"


def describe(exc: BaseException) -> str:
    """What happened to a connection, for people: 'connection refused', 'connection reset by peer'."""
    os_error = getattr(exc, "os_error", None) or (exc if isinstance(exc, OSError) else None)
    code = getattr(os_error, "errno", None)
    if code in errno.errorcode:
        return os.strerror(code).lower()
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "connection closed mid-response"
    if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
        return "no answer in time"
    return type(exc).__name__


def is_connection_error(kind: str | None) -> bool:
    return kind is not None and kind.removeprefix("prompt_") in CONNECTION_ERRORS


def backoff_s(failures_in_a_row: int) -> float:
    """How long a worker waits after its `failures_in_a_row`-th failure in a row (0: none)."""
    if failures_in_a_row <= 0:
        return 0.0
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** min(failures_in_a_row - 1, 30))


@dataclass
class ServerWatch:
    """The server's signs of life during one probe.

    Gone (`server_unreachable`): at least UNREACHABLE_MIN_FAILURES connection failures in a row
    (no success between them) and nothing read from the server for `unreachable_after_s` since
    the first. Hung (`server_stalled`): requests in flight and not a byte read for `stall_after_s`
    since the oldest was sent, on any connection; a busy server still streams tokens to the
    requests it runs, so a long queue alone does not look hung. The reads come from the
    connector (`load.read_stamps`); where it cannot report them (`reads_reported` False) only
    finished requests count as signs of life and the hung check is off.
    """

    url: str
    unreachable_after_s: float
    stall_after_s: float
    reads_reported: bool = True
    last_read_ns: int = 0
    streak: int = 0  # connection failures since the last success
    streak_start_ns: int | None = None
    streak_kinds: dict[str, int] = field(default_factory=dict)
    causes: dict[str, str] = field(default_factory=dict)  # the latest description per error kind
    _in_flight: dict[int, int] = field(default_factory=dict)  # request token -> sent at (ns)

    def read(self, now_ns: int) -> None:
        """Bytes arrived from the server."""
        self.last_read_ns = max(self.last_read_ns, now_ns)

    def sent(self, token: int, now_ns: int) -> None:
        self._in_flight[token] = now_ns

    def done(self, token: int) -> None:
        self._in_flight.pop(token, None)

    def finished(self, rec: RequestRecord) -> None:
        """A request ended: its streamed output and a success are signs of life; a connection
        failure (also one cut mid-stream) extends the streak; other failures (HTTP errors,
        timeouts) leave it as it is."""
        if rec.chunk_ns:
            self.read(rec.chunk_ns[-1])
        if rec.ok:
            self.read(rec.end_ns)
            self.streak, self.streak_start_ns, self.streak_kinds = 0, None, {}
            return
        if rec.error == CANCELLED or not is_connection_error(rec.error):
            return
        if self.streak == 0:
            self.streak_start_ns = rec.end_ns
        self.streak += 1
        self.streak_kinds[rec.error] = self.streak_kinds.get(rec.error, 0) + 1  # type: ignore[index]

    def verdict(self, now_ns: int) -> tuple[AbortKind, str] | None:
        """Why the probe must stop now (abort kind, one line naming the URL), or None."""
        if self.streak >= UNREACHABLE_MIN_FAILURES and self.streak_start_ns is not None:
            quiet_s = (now_ns - max(self.streak_start_ns, self.last_read_ns)) / 1e9
            if quiet_s >= self.unreachable_after_s:
                counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.streak_kinds.items()))
                return "server_unreachable", (
                    f"server {self.url} unreachable: {self.cause()} ({counts} errors in a row, nothing received "
                    f"for {quiet_s:.1f} s)")
        if self.reads_reported and self._in_flight:
            oldest_ns = min(self._in_flight.values())
            quiet_s = (now_ns - max(oldest_ns, self.last_read_ns)) / 1e9
            if quiet_s >= self.stall_after_s:
                return "server_stalled", (
                    f"server {self.url} stalled: {len(self._in_flight)} request(s) in flight and not a byte received "
                    f"for {quiet_s:.1f} s (hung, or a single step longer than that; --server-stall-s sets the limit)")
        return None

    def cause(self) -> str:
        """The latest connection failure's description, most frequent kind first."""
        kinds = sorted(self.streak_kinds, key=lambda k: -self.streak_kinds[k])
        described = [self.causes[k] for k in kinds if k in self.causes]
        return "; ".join(dict.fromkeys(described)) or ", ".join(kinds)


ALIVE_CHECK_S = 2.0


async def answers(session: aiohttp.ClientSession, base_url: str) -> bool:
    """Whether anything answers HTTP at `base_url` (any status: a 404 is a live server)."""
    try:
        async with session.get(f"{base_url.rstrip('/')}/health", timeout=aiohttp.ClientTimeout(total=ALIVE_CHECK_S)):
            return True
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False
