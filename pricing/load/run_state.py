"""One load level's run: the records and window it produced (LoadRun), and its state while it
runs (RunState), which the loops, the window controller and each request's link update."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pricing.load.client import ProbePlan
from pricing.load.server_watch import ServerWatch, is_connection_error
from pricing.load.settle import UnitShape
from pricing.schema import CANCELLED, AbortKind, LoadSpec, RequestRecord

OnRecord = Callable[[RequestRecord], None]


@dataclass
class LoadRun:
    """What driving one load level produced: raw records and the window; statistics are measure's."""

    records: list[RequestRecord]
    window_start_ns: int
    window_end_ns: int  # when the window closed; records go on to the end of the tail
    aborted: str | None = None  # why the probe stopped early, for people
    abort: AbortKind | None = None  # the same, for code
    prompt_wait_s: float | None = None  # mean wait per in-window request for its prompt (None: none taken)
    undecided_at_cap: bool = False  # the stop rule never said decided before max_duration_s
    # Failed requests started in the window that were counted, not kept (ProbePlan.max_kept_failures).
    dropped_failures: dict[str, int] = field(default_factory=dict)
    # An open loop's window opened at the warm-up's cap (load.settle), not once the server had filled.
    warmup_capped: bool = False


@dataclass
class RunState:
    """One probe as it runs: its records, window, in-flight count and why it stopped."""

    plan: ProbePlan
    load: LoadSpec
    on_record: OnRecord | None
    watch: ServerWatch
    records: list[RequestRecord] = field(default_factory=list)
    window_start_ns: int | None = None
    window_end_ns: int | None = None
    window_target_s: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ok_count: int = 0
    fail_count: int = 0
    window_completions: int = 0
    in_flight: int = 0  # requests sent and not yet recorded
    # Open loop (load.settle): first arrival, units and requests sent before the window, (in flight,
    # requests sent) as the first units ended
    first_sent_ns: int | None = None
    sent_units: list[UnitShape] = field(default_factory=list)
    sent_requests: int = 0
    warmed: tuple[int, int] | None = None
    in_flight_at_open: int = 0  # requests in the server as the window opened
    warmup_capped: bool = False
    tail_pending: int = 0  # requests sent before the window closed that have not finished
    aborted: str | None = None
    abort: AbortKind | None = None
    undecided_at_cap: bool = False
    prompt_wait_ns: int = 0  # in the window, summed over requests: time spent waiting for a prompt
    prompts_taken: int = 0  # in the window
    dropped_failures: dict[str, int] = field(default_factory=dict)  # in the window, by kind, not kept

    def add(self, rec: RequestRecord) -> None:
        self.watch.finished(rec)
        failed = not rec.ok and rec.error != CANCELLED
        if failed:
            self.fail_count += 1
        if failed and self.fail_count > self.plan.max_kept_failures:
            if self._in_window(rec.start_ns):
                self.dropped_failures[rec.error] = self.dropped_failures.get(rec.error, 0) + 1  # type: ignore[index]
        else:
            self.records.append(rec)
        if rec.ok:
            self.ok_count += 1
            # Anything added before the window opened also started before it: no recount needed.
            if self.window_start_ns is not None and rec.start_ns >= self.window_start_ns:
                self.window_completions += 1
        elif failed and self.ok_count == 0 and self.fail_count >= self.plan.fail_fast_after:
            if is_connection_error(rec.error):
                self.abort = "server_unreachable"
                self.aborted = (f"server {self.watch.url} unreachable: {self.watch.cause()} (its first "
                                f"{self.fail_count} requests failed); is the server running?")
            else:
                self.abort = "server_failing"
                self.aborted = (f"first {self.fail_count} requests to {self.watch.url} failed ({rec.error}); "
                                "is the server healthy?")
            self.stop.set()
        if self.on_record is not None:
            self.on_record(rec)

    def _in_window(self, start_ns: int) -> bool:
        """Started in the window (measure.requests.cohort counts such failures)."""
        w0, w1 = self.window_start_ns, self.window_end_ns
        return w0 is not None and start_ns >= w0 and (w1 is None or start_ns <= w1)

    def open_window(self, now_ns: int) -> None:
        """Warm-up is over: the window's length follows from how long warm-up requests took."""
        self.window_start_ns = now_ns
        self.in_flight_at_open = self.in_flight
        e2e = [(r.end_ns - r.start_ns) / 1e9 for r in self.records if r.ok]
        p90 = float(np.percentile(e2e, 90)) if e2e else 0.0
        shortest = self.plan.min_window_s * (self.plan.open_window_multiple if self.load.mode == "open" else 1.0)
        self.window_target_s = max(shortest, self.plan.window_e2e_multiple * p90)
