"""Chunk arrival times stamped at the socket read, not when the reading task next runs.

aiohttp hands each socket read to the response's StreamReader and wakes the task iterating it
on a later turn of the event loop. With hundreds of streams that turn comes milliseconds later,
and a stamp taken there carries the client's own backlog (at 512 streams on one core: p99 4-8 ms).
`stamped_connector` makes aiohttp's protocol note, for each read, the time and the body bytes
delivered so far; `ReadLog.split` turns a finished body back into per-read pieces with those
times, which pricing.load.sse then parses as before.

Each stamp is the read's time less how long its bytes had waited in the kernel
(`pricing.load.kernel_stamps`), so on asyncio's own loop under Linux it is the bytes' arrival, however
busy the loop; elsewhere it is the read's time.

It relies on two aiohttp internals (the connector's protocol factory and the protocol's current
payload); where they are missing the connector is plain and callers keep their own stamps.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable

import aiohttp
from aiohttp.client_proto import ResponseHandler

from pricing.load import kernel_stamps


OnRead = Callable[[int], None]


class _StampingHandler(ResponseHandler):
    def __init__(self, *args, clock: Callable[[], int], on_read: OnRead | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._clock = clock
        self._on_read = on_read
        self.read_log: tuple[object, list[tuple[int, int]]] | None = None  # (payload, [(ns, body bytes so far)])

    def data_received(self, data: bytes) -> None:
        now = kernel_stamps.arrival_ns(self.transport, self._clock())
        if self._on_read is not None:
            self._on_read(now)
        super().data_received(data)
        payload = getattr(self, "_payload", None)
        total = getattr(payload, "total_bytes", None)
        if payload is None or total is None:
            return
        if self.read_log is None or self.read_log[0] is not payload:
            self.read_log = (payload, [])
        reads = self.read_log[1]
        if not reads or reads[-1][1] != total:
            reads.append((now, total))


def stamped_connector(clock: Callable[[], int] = time.perf_counter_ns, on_read: OnRead | None = None,
                      **kwargs) -> aiohttp.TCPConnector:
    """A connector whose connections stamp their reads; `on_read(ns)` is told of every read on
    any of them (the server's signs of life, load.server_watch)."""
    if kernel_stamps.SUPPORTED and "socket_factory" in inspect.signature(aiohttp.TCPConnector).parameters:  # aiohttp >= 3.12
        kwargs.setdefault("socket_factory", kernel_stamps.client_socket)
    connector = aiohttp.TCPConnector(**kwargs)
    factory = getattr(connector, "_factory", None)
    if isinstance(factory, functools.partial) and factory.func is ResponseHandler:
        connector._factory = functools.partial(_StampingHandler, *factory.args, clock=clock, on_read=on_read,
                                               **factory.keywords)
    return connector


def reports_reads(connector: aiohttp.BaseConnector) -> bool:
    """Whether `connector` stamps its reads (and so tells `on_read`): False where aiohttp's
    internals it relies on are missing."""
    factory = getattr(connector, "_factory", None)
    return isinstance(factory, functools.partial) and factory.func is _StampingHandler


class ReadLog:
    """The read times of one response, captured while its connection is held."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        protocol = response.connection.protocol if response.connection is not None else None
        self._protocol = protocol if isinstance(protocol, _StampingHandler) else None
        self._payload = response.content

    @property
    def stamping(self) -> bool:
        return self._protocol is not None

    def buffered(self) -> bytes:
        """Everything the response's reader holds (nothing was consumed), even after an error."""
        return b"".join(getattr(self._payload, "_buffer", ()))

    def split(self, body: bytes) -> tuple[list[int], list[bytes]] | None:
        """(read times, body pieces) for the whole body, or None when the log does not cover it."""
        log = self._protocol.read_log if self._protocol is not None else None
        if log is None or log[0] is not self._payload or not log[1] or log[1][-1][1] != len(body):
            return None
        stamps, pieces, start = [], [], 0
        for ns, end in log[1]:
            if end > start:
                stamps.append(ns)
                pieces.append(body[start:end])
                start = end
        return stamps, pieces
