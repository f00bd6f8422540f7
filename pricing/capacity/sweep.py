"""Sweep one deployment: probe load levels chosen by `search`, record every probe, resume.

Probes already in the results file (same config, profile and load mode) are reused, so a
rerun after a crash continues where the last one stopped. After the decode search, one
prefill-only probe (max_tokens=1) per capacity level gives the input-token rate the price
split needs.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from pricing.capacity.search import (
    SearchParams,
    capacity_level,
    histories_from,
    next_probe,
)
from pricing.load.client import ProbePlan
from pricing.measure.probe import ProbeResult
from pricing.measure.slo import meets
from pricing.results import append_record, read_records, repair_torn_tail
from pricing.schema import (
    DeploymentConfig,
    LoadSpec,
    ProbeRecord,
    ProfileSummary,
    PromptKind,
    SloTier,
)

ProbeFn = Callable[[LoadSpec, int], Awaitable[ProbeResult]]


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: DeploymentConfig
    profile: ProfileSummary
    tiers: list[SloTier]
    search: SearchParams = Field(default_factory=SearchParams)
    plan: ProbePlan = Field(default_factory=ProbePlan)
    mode: Literal["closed", "open"] = "closed"
    prompts: PromptKind = "token_ids"  # must match the client's: a sweep resumes only its own kind
    max_probes: int = Field(default=12, ge=1)  # decode probes run by this invocation
    prefill_probes: bool = True
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


# budget: --max-probes spent (rerun to continue); server_failed: a probe completed no request.
StopKind = Literal["budget", "server_failed"]


class SweepOutcome(BaseModel):
    capacity_level: dict[str, float | None]  # per tier: highest passing level (None: none passes)
    records: list[ProbeRecord]
    probes_run: int
    stop: StopKind | None = None  # why the sweep stopped early, if it did
    stopped: str | None = None  # the same, for people


def _load(spec: SweepSpec, level: float, kind: Literal["decode", "prefill"]) -> LoadSpec:
    if spec.mode == "closed":
        return LoadSpec(mode="closed", concurrency=int(level), kind=kind, prompts=spec.prompts)
    return LoadSpec(mode="open", request_rate_rps=level, kind=kind, prompts=spec.prompts)


def _same_sweep(rec: ProbeRecord, spec: SweepSpec) -> bool:
    return (rec.config.key == spec.config.key and rec.profile.name == spec.profile.name and rec.load.mode == spec.mode
            and rec.load.prompts == spec.prompts)


def _to_record(spec: SweepSpec, index: int, load: LoadSpec, result: ProbeResult) -> ProbeRecord:
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
    )


async def run_sweep(spec: SweepSpec, probe: ProbeFn, out_path: Path, events: SweepEvents | None = None) -> SweepOutcome:
    events = events or _Silent()
    repair_torn_tail(out_path)
    mine = [r for r in read_records(out_path) if _same_sweep(r, spec)]
    done = {(r.load.kind, r.load.level): r for r in mine}
    for rec in mine:
        events.probe_finished(rec, reused=True)
    tier_names = [t.name for t in spec.tiers]
    next_index = max((r.probe_index for r in mine), default=-1) + 1
    probes_run, stop, stopped = 0, None, None

    def histories():
        decode = [r for r in done.values() if r.load.kind == "decode" and r.abort in (None, "window_not_filled")]
        return histories_from([(r.load.level, {t.name: meets(r.stats, t) for t in spec.tiers}) for r in decode], tier_names)

    async def measure(level: float, kind: Literal["decode", "prefill"]) -> ProbeRecord:
        nonlocal next_index, probes_run
        load = _load(spec, level, kind)
        events.probe_started(load, next_index)
        result = await probe(load, next_index)
        record = _to_record(spec, next_index, load, result)
        append_record(out_path, record)
        done[(kind, load.level)] = record
        next_index += 1
        probes_run += 1
        events.probe_finished(record, reused=False)
        return record

    while (level := next_probe(histories(), spec.search)) is not None:
        if probes_run >= spec.max_probes:
            stop, stopped = "budget", f"probe budget of {spec.max_probes} spent; rerun to continue"
            break
        record = await measure(level, "decode")
        if record.stats.completed == 0 and record.abort != "window_not_filled":
            stop, stopped = "server_failed", f"probe at {spec.mode} load {level:g} completed no request: {record.note}"
            break

    capacity = {name: capacity_level(h) for name, h in histories().items()}
    # Prefill probes for the capacities known so far, also when the budget ran out: without
    # them the pricer can only fall back to a fixed ratio.
    if spec.prefill_probes and stop != "server_failed":
        for level in sorted({c for c in capacity.values() if c is not None}):
            if ("prefill", level) not in done:
                await measure(level, "prefill")
    return SweepOutcome(capacity_level=capacity, records=list(done.values()), probes_run=probes_run, stop=stop,
                        stopped=stopped)
