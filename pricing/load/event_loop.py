"""The client process's timing settings: the event loop that times the client best, and the
cyclic garbage collector paused while a probe runs. Both are process-wide, so a command (or a
benchmark) chooses them at its top; the client itself never touches them.

On Linux that is asyncio's own loop: its transports read through `socket.recv`, where
`pricing.load.kernel_stamps` takes the kernel's arrival time of every read, so a busy loop no longer
shows up as latency (TTFT error p99 at 512 streams: 0.04 ms, against 1.2-2.7 ms with uvloop;
benchmarks/client_overhead.py). Elsewhere uvloop, when installed, at least keeps the loop lag short.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Coroutine, Iterator
from typing import Any, Literal, TypeVar

from pricing.load import kernel_stamps

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


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic collection inside, one full collection after. The collector's pauses (several ms
    with thousands of live request records) would land on chunk stamps; records hold no cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()
