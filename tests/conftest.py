"""Shared fixtures: the mock server runs in its own process, like a real server would."""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from pricing.testing.mock_server import MockConfig, MockServerProcess

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VLLM_LOCK = Path("/tmp/vllm.lock")  # shared with every other job that starts a real vLLM here


@pytest.fixture
def mock_server() -> Iterator[Callable[[MockConfig], MockServerProcess]]:
    """Factory: `mock_server(MockConfig(...))` starts a mock and returns it (with .url)."""
    with ExitStack() as stack:
        yield lambda cfg=None: stack.enter_context(MockServerProcess(cfg))


@pytest.fixture
def vllm_lock() -> Iterator[None]:
    """Only one real vLLM starts at a time on this machine (other jobs take the same lock)."""
    with open(VLLM_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
