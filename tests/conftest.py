"""Shared fixtures: the mock server runs in its own process, like a real server would."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from pricing.testing.mock_server import MockConfig, MockServerProcess

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def mock_server() -> Iterator[Callable[[MockConfig], MockServerProcess]]:
    """Factory: `mock_server(MockConfig(...))` starts a mock and returns it (with .url)."""
    with ExitStack() as stack:
        yield lambda cfg=None: stack.enter_context(MockServerProcess(cfg))
