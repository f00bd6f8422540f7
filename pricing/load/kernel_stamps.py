"""When the bytes of a TCP read reached this host, from the kernel (Linux SO_TIMESTAMPNS).

An event loop serving hundreds of streams reads a socket up to milliseconds after its bytes
arrived, and a clock read in `data_received` carries that backlog: the load client's TTFT p99
grew with its own load, and so did the mock server's arrival stamps. With SO_TIMESTAMPNS the
kernel notes each segment's arrival and `recvmsg` hands that time back with the data.

`StampedSocket.recv` is what asyncio's selector transport calls for each read, so a protocol
can ask its transport's socket how long the bytes it was just given had waited (`read_lag_ns`)
and take that off its own clock (`arrival_ns`). uvloop reads through libuv and never calls it: there,
and off Linux, `read_lag_ns` gives None and callers keep the time of the read.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; Python does not export it
SUPPORTED = sys.platform.startswith("linux")
_TIMESPEC = struct.Struct("@ll")
_ANC_SPACE = socket.CMSG_SPACE(_TIMESPEC.size) if SUPPORTED else 0
_MAX_LAG_NS = 10 * 10**9  # a "lag" outside 0..10 s means the wall clock stepped: ignore it


def _ask_for_stamps(sock: socket.socket) -> None:
    if SUPPORTED:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:  # an architecture with another option number: reads keep their own time
            pass


class StampedSocket(socket.socket):
    """A socket whose every `recv` notes how long the data waited in the kernel."""

    __slots__ = ("lag_ns", "stamp_ns")

    def enable(self) -> StampedSocket:
        self.lag_ns: int | None = None
        self.stamp_ns: int | None = None  # the kernel's raw stamp of the last read, for diagnosis
        _ask_for_stamps(self)
        return self

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if not SUPPORTED:
            return super().recv(bufsize, flags)
        data, ancdata, _, _ = self.recvmsg(bufsize, _ANC_SPACE, flags)
        now, now_mono = time.time_ns(), time.monotonic_ns()
        self.lag_ns = self.stamp_ns = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack_from(payload)
                self.stamp_ns = sec * 10**9 + nsec
                self.lag_ns = _lag(self.stamp_ns, now, now_mono)
        return data


def _lag(stamp_ns: int, now_ns: int, now_mono_ns: int) -> int | None:
    """The stamp's age. The stamp is wall-clock time, except where a kernel passes a loopback
    segment's monotonic departure time through (TCP's pacing stamp); a stamp that fits neither
    clock (a stepped wall clock) gives None."""
    for lag in (now_ns - stamp_ns, now_mono_ns - stamp_ns):
        if 0 <= lag <= _MAX_LAG_NS:
            return lag
    return None


class StampedListener(socket.socket):
    """A listening socket whose accepted connections are StampedSockets."""

    __slots__ = ()

    def accept(self) -> tuple[StampedSocket, object]:
        fd, addr = self._accept()  # type: ignore[attr-defined]
        return StampedSocket(self.family, self.type, self.proto, fileno=fd).enable(), addr


def client_socket(addr_info: tuple) -> socket.socket:
    """aiohttp's `TCPConnector(socket_factory=...)`: a StampedSocket for each connection."""
    family, type_, proto, _, _ = addr_info
    return StampedSocket(family, type_, proto).enable()


def listener(host: str, port: int, backlog: int) -> StampedListener:
    # proto named, as getaddrinfo would: asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets
    sock = StampedListener(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _ask_for_stamps(sock)  # here too, so segments that arrive before accept() are stamped
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def read_lag_ns(transport: asyncio.BaseTransport | None) -> int | None:
    """How long the bytes of the transport's last read waited before it, or None if unknown.

    Reaches the selector transport's socket (`_sock`, an asyncio internal); anything else,
    uvloop's transports included, gives None."""
    sock = getattr(transport, "_sock", None)
    return sock.lag_ns if isinstance(sock, StampedSocket) else None


def arrival_ns(transport: asyncio.BaseTransport | None, now_ns: int) -> int:
    """When the bytes of the transport's last read arrived, on the clock that read `now_ns`."""
    return now_ns - (read_lag_ns(transport) or 0)
