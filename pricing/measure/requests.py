"""Per-request records of a probe, compact and columnar: each request's clocks relative to the
window's opening (µs), its lengths and its error. Latency samples are computed from this table
both when a probe is measured and when a result file is priced again later, so a new tier or
percentile needs no new run. The tables of a results file live beside it, one JSON line per probe.

The latency sample is the window's cohort: every request whose first token arrived in the
window, followed to its end (the load runs on after the window until they finish). Choosing by
first-token time does not favour short requests, as "started and ended inside" does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from pricing.load.settle import grew_beyond_noise
from pricing.measure.intervals import rate_interval
from pricing.schema import CANCELLED, RequestRecord, Strict

NONE = -1  # a missing clock, token count or error in a column
US = 1_000  # ns per µs


class RequestTable(Strict):
    """One probe's requests, one column per field; times in µs from the window's opening."""

    run_id: str
    probe_index: int
    window_us: int  # the window closes here; later rows are its tail
    start_us: list[int]
    first_us: list[int]  # first output chunk (NONE: no output)
    last_us: list[int]  # last output chunk
    end_us: list[int]
    chunks: list[int]  # output chunks received
    out_tokens: list[int]  # the server's usage (NONE: cut or failed before it came)
    in_tokens: list[int]  # the server's usage, else the length asked for
    error: list[int]  # index into error_kinds, NONE when the request succeeded
    error_kinds: list[str] = Field(default_factory=list)

    def __len__(self) -> int:
        return len(self.start_us)


def table_from_records(records: Sequence[RequestRecord], window_start_ns: int, window_end_ns: int,
                       run_id: str = "", probe_index: int = 0) -> RequestTable:
    kinds: list[str] = []

    def rel(ns: int) -> int:
        return (ns - window_start_ns) // US

    def error(rec: RequestRecord) -> int:
        if rec.error is None:
            return NONE
        if rec.error not in kinds:
            kinds.append(rec.error)
        return kinds.index(rec.error)

    return RequestTable(
        run_id=run_id, probe_index=probe_index, window_us=rel(window_end_ns),
        start_us=[rel(r.start_ns) for r in records],
        first_us=[rel(r.chunk_ns[0]) if r.chunk_ns else NONE for r in records],
        last_us=[rel(r.chunk_ns[-1]) if r.chunk_ns else NONE for r in records],
        end_us=[rel(r.end_ns) for r in records],
        chunks=[len(r.chunk_ns) for r in records],
        out_tokens=[r.completion_tokens if r.completion_tokens is not None else NONE for r in records],
        in_tokens=[r.prompt_tokens if r.prompt_tokens is not None else r.target_input_tokens for r in records],
        error=[error(r) for r in records],
        error_kinds=kinds,
    )


@dataclass(frozen=True)
class Cohort:
    """The latency sample of one window, each array in the order of first-token arrival."""

    ttft_s: np.ndarray
    tpot_s: np.ndarray
    e2e_s: np.ndarray
    in_tokens: np.ndarray  # of every cohort request (the measured input flow)
    failed: int  # errors among requests started in the window (cancellations are not errors)
    issued: int  # requests started in the window that ended, ok or failed
    errors_by_kind: dict[str, int]


def _cohort_members(table: RequestTable) -> np.ndarray:
    """Requests, ended or cut by the tail's cap, whose first token came in the window."""
    first = np.asarray(table.first_us, dtype=np.int64)
    error = np.asarray(table.error, dtype=np.int64)
    cancelled = table.error_kinds.index(CANCELLED) if CANCELLED in table.error_kinds else -2
    return ((error == NONE) | (error == cancelled)) & (first >= 0) & (first <= table.window_us)


def cohort(table: RequestTable) -> Cohort:
    """TTFT of every request whose first token came in the window; TPOT of those with two or more
    chunks, over their whole life, or over what arrived before the probe's end for the few the
    tail's cap cut (their token count is estimated from the probe's tokens per chunk)."""
    a = {name: np.asarray(getattr(table, name), dtype=np.int64)
         for name in ("start_us", "first_us", "last_us", "end_us", "chunks", "out_tokens", "in_tokens", "error")}
    cancelled = table.error_kinds.index(CANCELLED) if CANCELLED in table.error_kinds else -2
    ok, cut = a["error"] == NONE, a["error"] == cancelled
    members = _cohort_members(table)
    order = np.argsort(a["first_us"][members], kind="stable")
    pick = {name: col[members][order] for name, col in a.items()}
    known = ok & (a["out_tokens"] != NONE)
    per_chunk = a["out_tokens"][known].sum() / a["chunks"][known].sum() if a["chunks"][known].sum() else 1.0
    tokens = np.where(pick["out_tokens"] != NONE, pick["out_tokens"], pick["chunks"] * per_chunk)
    span = (pick["last_us"] - pick["first_us"]) / 1e6
    # A token per chunk is the usual stream; where chunks carry several tokens, usage counts them.
    steps = np.where(pick["out_tokens"] != NONE, tokens - 1, (pick["chunks"] - 1) * per_chunk)
    timed = (pick["chunks"] >= 2) & (steps > 0)
    finished = pick["error"] == NONE
    started_in = (a["start_us"] >= 0) & (a["start_us"] <= table.window_us)
    failed_mask = started_in & ~ok & ~cut
    kinds = np.asarray(table.error_kinds + [""])[a["error"][failed_mask]] if failed_mask.any() else []
    by_kind: dict[str, int] = {}
    for kind in kinds:
        by_kind[str(kind)] = by_kind.get(str(kind), 0) + 1
    return Cohort(
        ttft_s=(pick["first_us"] - pick["start_us"]) / 1e6,
        tpot_s=span[timed] / steps[timed],
        e2e_s=((pick["end_us"] - pick["start_us"]) / 1e6)[finished],
        in_tokens=pick["in_tokens"],
        failed=int(failed_mask.sum()),
        issued=int((started_in & (ok | failed_mask)).sum()),
        errors_by_kind=by_kind,
    )


def arrival_rate(table: RequestTable) -> float:
    """Requests sent per second inside the window: an open loop's load as the server received it.
    A Poisson window of 300 arrivals is off its nominal rate by 6% (1 sd), and one seed's gap
    sequence repeated in every probe was 11% short in all of them on an H200."""
    return arrival_flow(table)[0] if table.window_us > 0 else 0.0


def arrival_flow(table: RequestTable) -> tuple[float, tuple[float, float]]:
    """arrival_rate, with a batch-means interval over sub-windows: the long-run rate the window's
    count stands for. Arrivals bunch (Poisson, bursty gaps, a session's turns), so a count is its
    rate's estimate only to about 1.96 / sqrt(count) (Poisson), more where they bunch."""
    start = np.asarray(table.start_us, dtype=np.int64)
    return rate_interval(start * US, np.ones(start.size), 0, table.window_us * US)


def prompt_token_flow(table: RequestTable) -> tuple[float, tuple[float, float]]:
    """Prompt tokens per second of the requests whose first token came in the window (the
    cohort's), with a batch-means interval over their first-token times: what a prefill-only
    probe's server prefilled, counted rather than derived from its request rate."""
    first, members = np.asarray(table.first_us, dtype=np.int64), _cohort_members(table)
    return rate_interval(first[members] * US, np.asarray(table.in_tokens, dtype=np.float64)[members],
                         0, table.window_us * US)


@dataclass(frozen=True)
class Backlog:
    """Requests in the server (sent, not ended) and those of them still queued for their first
    token, when the window opened and when it closed, and the arrivals between. A server that
    keeps up admits requests as fast as they arrive: as many wait at the close as at the opening.
    Those in the server grow anyway for as long as the longest answers last (on an H200 at
    16.2-16.6 req/s, below its 17.5 req/s saturation, from 23-47 to 129-141 in a 25 s window,
    TTFT p90 0.25 s), unless the window opens after that."""

    at_open: int
    at_close: int
    queued_at_open: int
    queued_at_close: int
    arrivals: int


def backlog(table: RequestTable) -> Backlog:
    start = np.asarray(table.start_us, dtype=np.int64)
    end = np.asarray(table.end_us, dtype=np.int64)
    # Waiting ends with the first output chunk, or with the request's end where it had none.
    admitted = np.where(np.asarray(table.chunks) > 0, np.asarray(table.first_us, dtype=np.int64), end)
    w = table.window_us

    def held(until: np.ndarray, at: int) -> int:  # sent by `at` and not yet past `until`
        return int(((start <= at) & (until > at)).sum())

    return Backlog(at_open=held(end, 0), at_close=held(end, w), queued_at_open=held(admitted, 0),
                   queued_at_close=held(admitted, w), arrivals=int(((start >= 0) & (start <= w)).sum()))


# The server fell behind its arrivals when, during the window and beyond noise (3 x the Poisson
# sd of the two counts), either
# - the requests queued for their first token grew by more than QUEUE_SHARE of the window's
#   arrivals: arrivals outpaced admissions. Over 34 open H200 probes that kept up (2.7-17.6
#   req/s, saturation about 17.5) this growth stayed at or below -0.1% of arrivals; the two at 25
#   req/s grew by 22% and 33% (TTFT p90 9-14 s); the simulated engine 25% past its saturation, 8%;
# - or the requests in the server grew by more than BACKLOG_SHARE of them: vLLM admits all it
#   has room for and the batch swells. The same 34 grew by up to 31% (heavy-tailed answers: the
#   count ramps for as long as the longest last); two at 23-25 req/s whose windows still met
#   Baseline grew by 47% and 56%.
QUEUE_SHARE = 0.01
BACKLOG_SHARE = 0.4


def fell_behind_arrivals(table: RequestTable) -> bool:
    """An open loop's server did not keep up with its arrivals during the window (the rule above)."""
    b = backlog(table)
    return (grew_beyond_noise(b.queued_at_open, b.queued_at_close, QUEUE_SHARE * b.arrivals)
            or grew_beyond_noise(b.at_open, b.at_close, BACKLOG_SHARE * b.arrivals))


# An open loop's server surely kept up with its arrivals when the requests in it grew during the
# window by no more than this share of them (and one more): it served all but that growth. Not
# falling behind beyond noise (fell_behind_arrivals) is not enough: on an H200 at 18.8 req/s,
# past saturation (TPOT p90 85 ms and rising), the requests in the server grew 244 -> 569 over
# 2,309 arrivals (14%) while no more than 29 waited for a first token; on the simulated engine
# at 1.1x its saturation, 225 -> 283 over 1,272 (4.6%). Stable H200 windows of 2 minutes grew by
# 0.6% (9.5 and 11.0 req/s), 1.6% (14.2) and 2.9% (17.6).
KEPT_UP_GROWTH_SHARE = 0.03


def kept_up_with_arrivals(table: RequestTable) -> bool:
    """An open loop's server surely kept up with the arrivals its window received (KEPT_UP_GROWTH_SHARE),
    and by the pricer's rule it did not fall behind (fell_behind_arrivals)."""
    b = backlog(table)
    return b.at_close - b.at_open <= KEPT_UP_GROWTH_SHARE * b.arrivals + 1 and not fell_behind_arrivals(table)


def served_share(table: RequestTable, offered_rps: float) -> float:
    """What the server served in the window (its arrivals less the growth of the requests in it)
    over what the offered rate asks for in as long. Keeping up with a window's arrivals says
    nothing of the offered rate when fewer came: on the simulated engine at 1.1x its saturation,
    a window whose Poisson count fell short kept up with it."""
    b = backlog(table)
    window_s = table.window_us / 1e6
    return (b.arrivals - max(0, b.at_close - b.at_open)) / (offered_rps * window_s) if offered_rps * window_s > 0 else 0.0


# The share of a window, at its end, that judges it when the server was still filling.
LATEST_SHARE = 1 / 3


def still_filling(table: RequestTable) -> bool:
    """The requests in the server grew during the window beyond noise: it had not reached its
    steady state, and the window flatters it. On an H200 (FP8 8B, WildChat) a 225 s window at
    17.6 req/s, 93% of the closed loop's saturation, held 94 and then 206 requests, and its TPOT
    p90 by quarter read 31.5, 42.4, 47.9 and 54.4 ms."""
    b = backlog(table)
    return grew_beyond_noise(b.at_open, b.at_close)


def latest_part(table: RequestTable, share: float = LATEST_SHARE) -> RequestTable:
    """The table as if its window were only its last `share`: the requests nearest the steady
    state of a server that was still filling."""
    shift = int(table.window_us * (1 - share))

    def moved(column: list[int]) -> list[int]:
        return [t - shift if t != NONE else NONE for t in column]

    return table.model_copy(update={
        "window_us": table.window_us - shift, "start_us": moved(table.start_us), "first_us": moved(table.first_us),
        "last_us": moved(table.last_us), "end_us": moved(table.end_us)})


# ------------------------------------------------------------------------------------ files
def requests_path(results_file: Path) -> Path:
    """Where the per-request tables of a results file live: `<stem>.requests.jsonl` beside it."""
    return results_file.with_name(f"{results_file.stem}.requests.jsonl")
