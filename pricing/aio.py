"""Run a coroutine on the event loop that times the client best.

On Linux that is asyncio's own loop: its transports read through `socket.recv`, where
`pricing.kernel_stamps` takes the kernel's arrival time of every read, so a busy loop no longer
shows up as latency (TTFT error p99 at 512 streams: 0.04 ms, against 1.2-2.7 ms with uvloop;
benchmarks/client_overhead.py). Elsewhere uvloop, when installed, at least keeps the loop lag short.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

from pricing import kernel_stamps

T = TypeVar("T")
LoopChoice = Literal["auto", "asyncio", "uvloop"]


def run(coro: Coroutine[Any, Any, T], loop: LoopChoice = "auto") -> T:
    if loop == "uvloop" or (loop == "auto" and not kernel_stamps.SUPPORTED):
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)
