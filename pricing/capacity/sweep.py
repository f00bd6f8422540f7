"""Sweep one deployment: probe load levels chosen by `search`, record every probe, resume.

Two steps. The closed-loop search (concurrency) finds each tier's neighbourhood fast; one
prefill-only probe (max_tokens=1) per closed-loop capacity gives the input-token rate the price
split needs (a session sweep adds a prefill-only replay of the sessions there, whose prefix-cache
hits give the cost of a cached input token); then an open-loop search (Poisson arrivals, request
rate) starts at each tier's closed-loop capacity rate (or, for a tier the closed loop never
violated, its highest pass), which is its confirmation, and resolves the capacity a service with
independent arrivals has. Probes already in the results file (same config, profile, prompt kind
and schema) are reused, so a rerun after a crash continues where the last one stopped; a probe
that stopped because the server failed, went away or hung (schema.SERVER_ABORTS) stays in the
file as what happened, but is measured again. Such a probe stops the sweep ("server_failed").
Each probe's per-request records go to the `.requests.jsonl` file beside the results, before its line.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from pricing.capacity.choice import tier_point
from pricing.capacity.curve import Capacity, Point, capacity_from_points
from pricing.capacity.search import SearchParams, next_level
from pricing.load.client import ProbePlan
from pricing.measure.probe import ProbeResult
from pricing.measure.requests import requests_path
from pricing.measure.slo import meets
from pricing.results import SourcedProbe, append_record, read_records, repair_torn_tail
from pricing.schema import (
    SCHEMA_VERSION,
    SERVER_ABORTS,
    DeploymentConfig,
    LoadSpec,
    ProbeRecord,
    ProfileSummary,
    PromptKind,
    SloTier,
    Strict,
)

ProbeFn = Callable[[LoadSpec, int], Awaitable[ProbeResult]]
Mode = Literal["closed", "open"]
Kind = Literal["decode", "prefill", "prefill_cached"]


class SweepSpec(Strict):
    config: DeploymentConfig
    profile: ProfileSummary
    tiers: list[SloTier]
    search: SearchParams = Field(default_factory=SearchParams)  # of the first step's load (mode)
    plan: ProbePlan = Field(default_factory=ProbePlan)
    mode: Mode = "closed"  # the first step; open: a request-rate search only
    prompts: PromptKind = "token_ids"  # must match the client's: a sweep resumes only its own kind
    max_probes: int = Field(default=10, ge=1)  # decode probes of the first step, this invocation
    prefill_probes: bool = True
    open_loop: bool = True  # after a closed-loop search, the open-loop step
    # With the open-loop step to follow, the closed loop only finds the neighbourhood: to this
    # tolerance (the open step resolves to search.tolerance).
    neighbourhood: float = Field(default=0.15, gt=0)
    max_open_probes: int = Field(default=8, ge=0)  # its probes, this invocation
    burstiness: float = Field(default=1.0, gt=0)  # open-loop arrivals: gamma shape (1 = Poisson)
    think_s: float = Field(default=0.0, ge=0)  # closed loop: mean think time between a client's requests
    sessions: bool = False  # replay the profile's chat sessions (load.sessions)
    think_scale: float = Field(default=1.0, ge=0)  # sessions: the data's think times x this
    run_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])


class SweepEvents(Protocol):
    """What a front end (progress bar) is told; every method is optional to implement."""

    def probe_started(self, load: LoadSpec, index: int) -> None: ...
    def probe_finished(self, record: ProbeRecord, reused: bool) -> None: ...


class _Silent:
    def probe_started(self, load: LoadSpec, index: int) -> None:
        pass

    def probe_finished(self, record: ProbeRecord, reused: bool) -> None:
        pass


# budget: a step's probe budget was spent (rerun to continue); server_failed: the server failed,
# went away or hung during a probe (or a probe completed no request).
StopKind = Literal["budget", "server_failed", "too_few_requests"]


class SweepOutcome(BaseModel):
    closed: dict[str, Capacity]  # per tier, from the closed-loop probes
    open: dict[str, Capacity]  # per tier, from the open-loop probes
    records: list[ProbeRecord]
    probes_run: int
    open_probes_run: int = 0
    appended: int = 0  # probe lines this invocation wrote: decode, prefill and open-loop, failed ones too
    stop: StopKind | None = None  # why the sweep stopped early, if it did
    stopped: str | None = None  # the same, for people
    failed_probe: ProbeRecord | None = None  # the probe that stopped it with server_failed
    warnings: list[str] = Field(default_factory=list)  # e.g. Poisson arrivals at a closed-loop capacity fail


def _load(spec: SweepSpec, mode: Mode, level: float, kind: Kind) -> LoadSpec:
    workload = dict(kind=kind, prompts=spec.prompts, sessions=spec.sessions, think_scale=spec.think_scale)
    if mode == "closed":
        return LoadSpec(mode="closed", concurrency=int(level), think_s=spec.think_s, **workload)
    return LoadSpec(mode="open", request_rate_rps=level, burstiness=spec.burstiness, **workload)


def _same_sweep(rec: ProbeRecord, spec: SweepSpec) -> bool:
    same_load = (rec.load.think_s == spec.think_s if rec.load.mode == "closed"
                 else rec.load.burstiness == spec.burstiness)
    same_sessions = rec.load.sessions == spec.sessions and (not spec.sessions or rec.load.think_scale == spec.think_scale)
    return (rec.config.key == spec.config.key and rec.profile.name == spec.profile.name
            and rec.load.prompts == spec.prompts and rec.schema_version == SCHEMA_VERSION and same_load
            and same_sessions)


def server_failure(record: ProbeRecord) -> str | None:
    """Why this probe says the server failed (None: it measured the server)."""
    if record.abort in SERVER_ABORTS:
        return record.note or record.abort
    if record.load.kind == "decode" and record.stats.completed == 0 and record.abort != "window_not_filled":
        return f"it completed no request{f': {record.note}' if record.note else ''}"
    return None


def _to_record(spec: SweepSpec, index: int, load: LoadSpec, result: ProbeResult, requests_file: str | None
               ) -> ProbeRecord:
    passed = [t.name for t in spec.tiers if load.kind == "decode" and meets(result.stats, t)]
    return ProbeRecord(
        run_id=spec.run_id,
        probe_index=index,
        timestamp_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config=spec.config,
        profile=spec.profile,
        load=load,
        stats=result.stats,
        energy=result.energy,
        server_metrics=result.server_metrics,
        tiers_passed=passed,
        abort=result.abort,
        note=result.aborted,
        warnings=result.warnings,
        requests_file=requests_file,
        undecided_at_cap=result.undecided_at_cap,
        warmup_capped=result.warmup_capped,
    )


def points_by_tier(records: Sequence[ProbeRecord], tiers: Sequence[SloTier], mode: Mode,
                   results_file: Path | None = None) -> dict[str, list[Point]]:
    """What each decode probe says about each tier. `results_file`: where the records were
    written, so each probe's per-request records beside it are read as the pricer reads them
    (an open loop's backlog decides whether it fell behind): one capacity for the sweep's
    search, its summary and the price."""
    decode = _sourced([r for r in records if r.load.kind == "decode" and r.load.mode == mode], results_file)
    return {t.name: [pt for p in decode if (pt := tier_point(p, t)) is not None] for t in tiers}


def _sourced(records: Sequence[ProbeRecord], results_file: Path | None) -> list[SourcedProbe]:
    where = str(results_file) if results_file is not None else "<memory>"
    return [SourcedProbe(r, file=where) for r in records]


def capacities(records: Sequence[ProbeRecord], tiers: Sequence[SloTier], mode: Mode,
               results_file: Path | None = None) -> dict[str, Capacity]:
    return {name: capacity_from_points(pts, integer=mode == "closed")
            for name, pts in points_by_tier(records, tiers, mode, results_file).items()}


def _open_params(spec: SweepSpec, closed_rates: Sequence[float], records: Sequence[ProbeRecord]) -> SearchParams:
    """The rate search around the closed-loop capacities: small steps, no rounding."""
    fastest = max([r.stats.request_rate_rps for r in records if r.load.kind == "decode"] + list(closed_rates))
    start = min(closed_rates) if closed_rates else spec.search.start
    return SearchParams(start=start, growth=1.5, tolerance=spec.search.tolerance, integer=False,
                        min_level=max(1e-3, start / 64), max_level=max(fastest * 2, start * 2))


class _Run:
    """The sweep's mutable part: records so far, the output file, the event sink, counters."""

    def __init__(self, spec: SweepSpec, probe: ProbeFn, out_path: Path, events: SweepEvents) -> None:
        self.spec, self.probe, self.out_path, self.events = spec, probe, out_path, events
        repair_torn_tail(out_path)
        mine = [r for r in read_records(out_path) if _same_sweep(r, spec)]
        # A probe the server's failure cut short measured nothing: its load is probed again.
        self.records = [r for r in mine if server_failure(r) is None]
        self.next_index = max((r.probe_index for r in mine), default=-1) + 1
        self.first_index = self.next_index  # probes appended by this invocation: next_index - first_index
        self.failed: ProbeRecord | None = None  # the probe during which the server failed
        for rec in self.records:
            events.probe_finished(rec, reused=True)

    def levels(self, mode: Mode, kind: Kind = "decode") -> set[float]:
        """Loads measured so far. A session replay that filled no window said nothing: its load
        is tried again when the sweep resumes (with the longer --max-probe-s its stop asked for),
        where it had made the resumed search end at once, as if done."""
        return {r.load.level for r in self.records if r.load.mode == mode and r.load.kind == kind
                and not r.sessions_too_few}

    async def measure(self, mode: Mode, level: float, kind: Kind) -> ProbeRecord:
        load = _load(self.spec, mode, level, kind)
        self.events.probe_started(load, self.next_index)
        result = await self.probe(load, self.next_index)
        requests_file = None
        if result.table is not None:
            table = result.table.model_copy(update={"run_id": self.spec.run_id, "probe_index": self.next_index})
            sidecar = requests_path(self.out_path)
            append_record(sidecar, table)  # before the probe line: a line never points at nothing
            requests_file = sidecar.name
        record = _to_record(self.spec, self.next_index, load, result, requests_file)
        append_record(self.out_path, record)
        self.next_index += 1
        self.events.probe_finished(record, reused=False)
        if server_failure(record) is None:
            self.records.append(record)
        elif self.failed is None:
            self.failed = record
        return record

    def server_stop(self) -> tuple[StopKind, str] | None:
        """The sweep's stop once a probe found the server failed."""
        if self.failed is None:
            return None
        load = self.failed.load
        return "server_failed", (f"probe #{self.failed.probe_index} ({load.mode} {load.kind}, load {load.level:g}): "
                                 f"{server_failure(self.failed)}")

    def sessions_stop(self, record: ProbeRecord) -> tuple[StopKind, str] | None:
        """A session replay whose window did not fill: its sessions' think times left too few
        requests, which says nothing about the server (an H200 at 8 sessions with a tenth of
        WildChat's think times sent 0.4 req/s, and no window filled in 60 s). Independent
        requests that cannot fill a window are slow: a sure fail, not this stop."""
        if not record.sessions_too_few:
            return None
        return "too_few_requests", (
            f"probe #{record.probe_index} ({record.load.mode} load {record.load.level:g}, sessions): "
            f"{record.stats.completed} requests in its window, too few in --max-probe-s: the sessions' think times "
            f"(x --think-scale {record.load.think_scale:g}) leave the server idle; use a smaller --think-scale, "
            "a higher --start or a longer --max-probe-s")

    async def search(self, mode: Mode, params: SearchParams, budget: int,
                     first: dict[str, float] | None = None) -> tuple[int, StopKind | None, str | None]:
        """Probe where the search asks until every tier is resolved or `budget` probes ran.
        `first`: levels to probe before the search proper (the open loop's confirmations); then
        the tiers take turns (search.next_level), so one hard-to-resolve tier cannot spend the
        whole budget."""
        run, turn = 0, 0
        while True:
            points = points_by_tier(self.records, self.spec.tiers, mode, self.out_path)
            tried = self.levels(mode)
            wanted = [lvl for lvl in (first or {}).values() if lvl not in tried]
            if wanted:
                level = min(wanted)
            else:
                level, turn = next_level(points, params, tried, turn)
            if level is None:
                return run, None, None
            if run >= budget:
                return run, "budget", f"{mode}-loop probe budget of {budget} spent; rerun to continue"
            record = await self.measure(mode, level, "decode")
            run += 1
            if (stop := self.server_stop() or self.sessions_stop(record)) is not None:
                return run, *stop


async def run_sweep(spec: SweepSpec, probe: ProbeFn, out_path: Path, events: SweepEvents | None = None) -> SweepOutcome:
    state = _Run(spec, probe, out_path, events or _Silent())
    warnings: list[str] = []
    first_step = spec.search
    if spec.mode == "closed" and spec.open_loop:
        first_step = spec.search.model_copy(update={"tolerance": max(spec.search.tolerance, spec.neighbourhood)})
    run, stop, stopped = await state.search(spec.mode, first_step, spec.max_probes)
    open_run = 0
    if spec.mode == "closed" and stop not in ("server_failed", "too_few_requests"):
        closed = capacities(state.records, spec.tiers, "closed", out_path)
        # A tier the closed loop never violated (its budget or --max-level ran out first) still
        # has a best known load, its highest pass: the open loop starts there too, so on a server
        # faster than the budget foresaw the price still rests on Poisson arrivals.
        known = {name: c for name, c in closed.items() if c.kind in ("found", "at_least") and c.level}
        # Prefill probes at the capacities known so far, also when the budget ran out: without
        # them the pricer can only fall back to a fixed ratio.
        if spec.prefill_probes:
            kinds: tuple[Kind, ...] = ("prefill", "prefill_cached") if spec.sessions else ("prefill",)
            levels = sorted({c.level for c in known.values()})
            wanted = [(level, kind) for level in levels for kind in kinds]
            for level, kind in wanted:
                if level not in state.levels("closed", kind):
                    await state.measure("closed", level, kind)
                    if (server_stop := state.server_stop()) is not None:
                        stop, stopped = server_stop
                        break
        rates = {name: c.rate_rps for name, c in known.items() if c.rate_rps}
        if spec.open_loop and rates and spec.max_open_probes > 0 and stop != "server_failed":
            params = _open_params(spec, list(rates.values()), state.records)
            open_run, open_stop, open_stopped = await state.search("open", params, spec.max_open_probes, first=rates)
            if open_stop is not None and (stop is None or open_stop == "server_failed"):
                stop, stopped = open_stop, open_stopped
            lower = {name for name, c in known.items() if c.kind == "at_least"}
            warnings += _confirmation_warnings(state.records, spec.tiers, rates, out_path, lower)
    return SweepOutcome(closed=capacities(state.records, spec.tiers, "closed", out_path),
                        open=capacities(state.records, spec.tiers, "open", out_path), records=state.records,
                        probes_run=run, open_probes_run=open_run, appended=state.next_index - state.first_index,
                        stop=stop, stopped=stopped, warnings=warnings,
                        failed_probe=state.failed)


def _confirmation_warnings(records: Sequence[ProbeRecord], tiers: Sequence[SloTier], rates: dict[str, float],
                           results_file: Path | None = None, lower: Collection[str] = ()) -> list[str]:
    """Poisson arrivals at a tier's closed-loop capacity rate that surely violate the tier.
    `lower`: tiers whose rate is only their highest closed-loop pass (never violated there)."""
    out = []
    for tier in tiers:
        rate = rates.get(tier.name)
        at = [r for r in records if r.load.mode == "open" and r.load.kind == "decode" and rate is not None
              and abs(r.load.level - rate) <= 1e-9 * max(rate, 1)]
        points = [pt for p in _sourced(at, results_file) if (pt := tier_point(p, tier)) is not None]
        if points and all(pt.severity_low > 1 for pt in points):
            where = "highest closed-loop pass" if tier.name in lower else "closed-loop capacity"
            out.append(f"{tier.name}: Poisson arrivals at its {where} ({rate:.3g} req/s) violate the "
                       "tier; the open-loop capacity is lower and prices it")
    return out
