"""load.server_watch: a gone or hung server is named within seconds; a busy or flaky one is not."""

from __future__ import annotations

import aiohttp
import pytest

from pricing.load.server_watch import (
    BACKOFF_MAX_S,
    UNREACHABLE_MIN_FAILURES,
    ServerWatch,
    backoff_s,
    describe,
    error_kind,
)
from pricing.schema import RequestRecord

S = 1_000_000_000
URL = "http://127.0.0.1:8123"


def rec(end_s: float, error: str | None = None, chunks_s: tuple[float, ...] = ()) -> RequestRecord:
    return RequestRecord(start_ns=0, end_ns=int(end_s * S), chunk_ns=[int(c * S) for c in chunks_s],
                         target_input_tokens=8, target_output_tokens=8, error=error)


def watch(**kw) -> ServerWatch:
    return ServerWatch(URL, unreachable_after_s=kw.pop("unreachable_after_s", 3.0),
                       stall_after_s=kw.pop("stall_after_s", 10.0), **kw)


def test_refused_connections_with_nothing_received_are_unreachable_after_the_quiet_time():
    w = watch()
    w.finished(rec(9.0))  # a success
    for t in (10.0, 10.1, 10.2, 10.4):
        w.causes["connect"] = "connection refused"
        w.finished(rec(t, "connect"))
    assert w.verdict(int(12.9 * S)) is None  # 2.9 s since the first failure
    kind, line = w.verdict(13 * S)
    assert kind == "server_unreachable"
    assert line.startswith(f"server {URL} unreachable: connection refused (4 connect errors in a row")


def test_a_success_or_a_read_between_failures_is_a_live_server():
    w = watch()
    for t in (10.0, 10.1):
        w.finished(rec(t, "disconnect"))
    w.finished(rec(10.2))  # the server still answers
    for t in (10.3, 10.4):
        w.finished(rec(t, "disconnect"))
    assert w.streak == 2 < UNREACHABLE_MIN_FAILURES and w.verdict(20 * S) is None
    w.finished(rec(10.5, "connect"))
    w.read(12 * S)  # bytes on another stream: alive
    assert w.verdict(int(14.9 * S)) is None
    assert w.verdict(15 * S)[0] == "server_unreachable"


def test_http_errors_and_timeouts_do_not_make_a_server_unreachable():
    w = watch()
    for t in range(50):
        w.finished(rec(10 + t * 0.01, "http_503"))
        w.finished(rec(10 + t * 0.01, "timeout"))
    assert w.streak == 0 and w.verdict(100 * S) is None


def test_a_stream_cut_mid_response_counts_as_a_connection_failure_and_its_chunks_as_reads():
    w = watch()
    w.finished(rec(10.0, "disconnect", chunks_s=(9.5, 9.9)))
    assert w.streak == 1 and w.last_read_ns == int(9.9 * S)


def test_prompt_failures_through_the_server_count_too():
    w = watch()
    for t in (1.0, 1.1, 1.2):
        w.finished(rec(t, "prompt_connect"))
    assert w.verdict(5 * S)[0] == "server_unreachable"


def test_requests_in_flight_and_no_byte_for_the_stall_time_is_a_hung_server():
    w = watch(stall_after_s=2.0)
    w.sent(1, 10 * S)
    w.sent(2, 11 * S)
    w.read(int(10.5 * S))
    assert w.verdict(int(12.4 * S)) is None  # 1.9 s since the last byte
    kind, line = w.verdict(int(12.6 * S))
    assert kind == "server_stalled" and f"server {URL} stalled: 2 request(s) in flight" in line
    w.done(1)
    w.done(2)
    assert w.verdict(100 * S) is None  # nothing in flight: idle, not hung


def test_a_request_sent_after_a_quiet_spell_is_given_the_stall_time_afresh():
    w = watch(stall_after_s=2.0)
    w.read(1 * S)
    w.sent(1, 50 * S)  # e.g. after a long think time
    assert w.verdict(int(51.9 * S)) is None and w.verdict(52 * S)[0] == "server_stalled"


def test_without_read_reports_the_hung_check_is_off():
    w = watch(stall_after_s=1.0, reads_reported=False)
    w.sent(1, 0)
    assert w.verdict(100 * S) is None


def test_backoff_grows_and_is_capped():
    assert backoff_s(0) == 0
    steps = [backoff_s(n) for n in range(1, 12)]
    assert steps[0] == pytest.approx(0.01) and steps[1] == pytest.approx(0.02)
    assert all(b >= a for a, b in zip(steps, steps[1:])) and steps[-1] == BACKOFF_MAX_S
    assert backoff_s(10_000) == BACKOFF_MAX_S


def test_errors_are_classified_and_described():
    refused = aiohttp.ClientConnectorError(aiohttp.client_reqrep.ConnectionKey(
        "127.0.0.1", 9, False, True, None, None, None), ConnectionRefusedError(111, "Connect call failed"))
    assert (error_kind(refused), describe(refused)) == ("connect", "connection refused")
    reset = aiohttp.ClientOSError(104, "Connection reset by peer")
    assert (error_kind(reset), describe(reset)) == ("disconnect", "connection reset by peer")
    gone = aiohttp.ServerDisconnectedError()
    assert (error_kind(gone), describe(gone)) == ("disconnect", "server closed the connection")
    assert error_kind(TimeoutError()) == "timeout"
