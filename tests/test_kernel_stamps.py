"""Kernel receive stamps: a read knows how long its bytes waited, so a busy loop is not latency."""

import asyncio
import itertools
import socket
import time

import numpy as np
import pytest

from pricing.load import kernel_stamps
from pricing.load.client import ClientConfig, ProbePlan
from pricing.measure.probe import run_probe
from pricing.measure.window import ttft_s
from pricing.schema import LoadSpec
from pricing.testing.mock_server import LatencyModel, MockConfig
from pricing.testing.mock_timeline import fetch_timeline, server_ttft_s

pytestmark = pytest.mark.skipif(not kernel_stamps.SUPPORTED, reason="SO_TIMESTAMPNS receive stamps are Linux-only")


def test_a_read_reports_how_long_its_bytes_waited():
    listener = kernel_stamps.listener("127.0.0.1", 0, 8)
    listener.setblocking(True)
    client = kernel_stamps.client_socket((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ()))
    client.connect(listener.getsockname())
    served, _ = listener.accept()
    with listener, client, served:
        assert isinstance(served, kernel_stamps.StampedSocket)
        for sender, reader in ((served, client), (client, served)):
            sender.sendall(b"token")
            time.sleep(0.050)
            assert reader.recv(64) == b"token"
            if reader.stamp_ns is None:
                pytest.skip("this kernel gave no SO_TIMESTAMPNS stamp on a loopback TCP read; reads keep their own time")
            assert reader.lag_ns is not None and 0.045e9 <= reader.lag_ns <= 0.5e9, (
                f"stamp {reader.stamp_ns} ns, wall clock {time.time_ns()}, monotonic {time.monotonic_ns()}")


def test_a_stamp_on_either_clock_gives_its_age_and_a_stepped_clock_gives_none():
    wall, mono = 1_800_000_000 * 10**9, 5_000 * 10**9
    assert kernel_stamps._lag(wall - 7_000_000, wall, mono) == 7_000_000
    assert kernel_stamps._lag(mono - 3_000_000, wall, mono) == 3_000_000
    assert kernel_stamps._lag(wall + 1_000_000, wall, mono) is None  # from the future
    assert kernel_stamps._lag(wall - 60 * 10**9, wall, mono) is None  # the wall clock stepped


def test_other_transports_give_no_lag():
    assert kernel_stamps.read_lag_ns(None) is None
    assert kernel_stamps.read_lag_ns(asyncio.Transport()) is None


async def test_a_busy_client_loop_does_not_lengthen_ttft(mock_server):
    """A task that holds the client's loop for 4 ms of every 5 delays every read by up to 4 ms.
    With read-time stamps the TTFT error then has a median near 2 ms; with kernel stamps it stays
    within the mock's own noise."""
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.030, tpot_base_s=0.010)))

    async def hog():
        while True:
            time.sleep(0.004)  # blocks the loop, as hundreds of streams' parsing would
            await asyncio.sleep(0.001)

    hogging = asyncio.create_task(hog())
    try:
        result = await run_probe(ClientConfig(base_url=mock.url, model="mock-model"), LoadSpec(mode="closed", concurrency=4),
                                 itertools.repeat((64, 8)), ProbePlan(min_window_s=2.0, min_requests=20, ramp_up_s=0.2))
    finally:
        hogging.cancel()
    timeline = fetch_timeline(mock.url)
    errors_ms = [(ttft_s(r) - server_ttft_s(timeline[r.response_id])) * 1e3 for r in result.records if r.ok]
    assert len(errors_ms) >= 20
    assert abs(np.median(errors_ms)) <= 0.5, f"TTFT error p50 {np.median(errors_ms):.3f} ms under a busy loop"
