"""The mock server's HTTP/1.1 layer: an asyncio.Protocol, not a web framework.

The mock is the ground truth the client's timing is checked against, so its own overhead must
be small and must not sit between the wire and its clocks. A web framework's server spends
most of a core writing ~20k chunks/s at 512 streams, and new requests queue behind those writes
before a handler could stamp their arrival, which would count as client error. Here arrival is
when the request's last bytes reached the host
(the kernel's stamp, `pricing.load.kernel_stamps`; the read's time where there is none), and each
streamed chunk is one synchronous `transport.write`.

Enough HTTP for aiohttp and urllib clients: keep-alive, Content-Length request bodies, JSON
responses with Content-Length, and chunked event streams.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pricing.load import kernel_stamps

ns = time.perf_counter_ns
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 413: "Payload Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}
MAX_BODY = 64 * 2**20


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    arrival_ns: int  # when the last bytes of the request arrived

    def json(self):
        return json.loads(self.body or b"{}")


@dataclass
class Response:
    """What a handler writes with; one per request."""

    transport: asyncio.Transport
    keep_alive: bool = True
    streaming: bool = field(default=False, init=False)

    def send_json(self, obj, status: int = 200) -> None:
        self._send(json.dumps(obj).encode(), "application/json", status)

    def send_text(self, text: str, status: int = 200) -> None:
        self._send(text.encode(), "text/plain; version=0.0.4", status)

    def _send(self, body: bytes, content_type: str, status: int) -> None:
        close = "" if self.keep_alive else "Connection: close\r\n"
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{close}\r\n")
        self.transport.write(head.encode() + body)

    def start_stream(self, content_type: str = "text/event-stream") -> None:
        self.streaming = True
        self.transport.write(f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n"
                             f"Cache-Control: no-cache\r\n\r\n".encode())

    def write(self, data: bytes) -> None:
        """One chunk of the stream, written now (the transport buffers only if the socket is full)."""
        self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def end_stream(self) -> None:
        self.transport.write(b"0\r\n\r\n")

    def abort(self) -> None:
        """Drop the connection mid-response, like a crashed server."""
        self.transport.abort()

    @property
    def closed(self) -> bool:
        return self.transport.is_closing()


Handler = Callable[[Request, Response], Awaitable[None]]


class HttpProtocol(asyncio.Protocol):
    """Parses requests off one connection and runs the routed handler for each, in order."""

    def __init__(self, routes: dict[tuple[str, str], Handler]) -> None:
        self.routes = routes
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue[Request | None] = asyncio.Queue()
        self.worker: asyncio.Task | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.worker = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def data_received(self, data: bytes) -> None:
        now = kernel_stamps.arrival_ns(self.transport, ns())
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
            size = int(headers.get("content-length") or 0)
            if size > MAX_BODY:
                Response(self.transport, keep_alive=False).send_json({"error": {"message": "body too large"}}, 413)
                self.transport.close()  # type: ignore[union-attr]
                return
            if len(self.buffer) < end + 4 + size:
                return  # wait for the rest of the body
            method, path, *_ = head[0].split(" ")
            body = self.buffer[end + 4:end + 4 + size]
            self.buffer = self.buffer[end + 4 + size:]
            self.queue.put_nowait(Request(method, path.split("?")[0], headers, body, now))

    async def _serve(self) -> None:
        while True:
            req = await self.queue.get()
            resp = Response(self.transport)  # type: ignore[arg-type]
            handler = self.routes.get((req.method, req.path))
            try:
                if handler is None:
                    resp.send_json({"error": {"message": f"no route {req.method} {req.path}"}}, 404)
                else:
                    await handler(req, resp)
            except (ValueError, KeyError) as exc:  # a malformed body
                if not resp.streaming:
                    resp.send_json({"error": {"message": f"bad request: {exc}"}}, 400)
            if resp.closed:
                return


async def serve(routes: dict[tuple[str, str], Handler], host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: HttpProtocol(routes), sock=kernel_stamps.listener(host, port, 4096))
