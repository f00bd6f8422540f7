"""One probe: the client's load turned into window statistics (`run_probe`), and the same with
its telemetry, GPU energy and vLLM `/metrics` around it (`measured_probe`).

Energy is reported for the steady-state window, like the token counts it is divided by: the
mean power of the samples inside the window (scaled to the NVML counter's total over the probe,
which is exact where the samples are not) times the window's length.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import aiohttp

from pricing.load.client import ClientConfig, LoadRun, OnRecord, ProbePlan, drive_load
from pricing.load.event_loop import paused_gc
from pricing.measure.telemetry import (
    GpuEnergyMeter,
    GpuSample,
    ProbeTelemetry,
    TelemetryResult,
)
from pricing.measure.window import window_stats
from pricing.schema import AbortKind, EnergyStats, LoadSpec, RequestRecord, WindowStats

# Requests may spend this share of their time (wait + end-to-end) waiting for their prompts
# before the probe says so.
PROMPT_WAIT_WARN_FRAC = 0.02


@dataclass
class ProbeResult:
    records: list[RequestRecord]
    window_start_ns: int
    window_end_ns: int
    stats: WindowStats
    aborted: str | None = None  # why the probe stopped early, for people
    abort: AbortKind | None = None  # the same, for code
    energy: EnergyStats | None = None  # filled by measured_probe when a GPU is metered
    server_metrics: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)  # the measurement's own shortcomings


def _prompt_wait_warning(wait_s: float | None, mean_e2e_s: float | None) -> str | None:
    """Text prompts are made ahead; if the makers fell behind, requests went out late and the
    server saw less load than the probe names (closed loop: each worker idled that long)."""
    if not wait_s or not mean_e2e_s:
        return None
    share = wait_s / (wait_s + mean_e2e_s)
    if share <= PROMPT_WAIT_WARN_FRAC:
        return None
    return (f"requests waited {wait_s * 1e3:.0f} ms each for their text prompts ({share:.0%} of their time): "
            "the load was lower than asked; send token ids (--prompt-format token_ids) or give the client more cores")


def measure_run(run: LoadRun) -> ProbeResult:
    """The window statistics of what the client recorded."""
    stats = window_stats(run.records, run.window_start_ns, run.window_end_ns)
    warning = _prompt_wait_warning(run.prompt_wait_s, stats.e2e_s.mean)
    return ProbeResult(run.records, run.window_start_ns, run.window_end_ns, stats, run.aborted, run.abort,
                       warnings=[warning] if warning else [])


async def run_probe(
    cfg: ClientConfig,
    load: LoadSpec,
    pairs: Iterator[tuple[int, int]],
    plan: ProbePlan | None = None,
    on_record: OnRecord | None = None,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> ProbeResult:
    """Drive one load level until its steady-state window is full (load.client.drive_load), then
    reduce the records to the window's statistics."""
    return measure_run(await drive_load(cfg, load, pairs, plan, on_record, clock))


def _power_series(samples: list[GpuSample]) -> list[tuple[float, float]]:
    """(t_s, power summed over GPUs) per sampling instant."""
    by_t: dict[float, float] = {}
    for s in samples:
        by_t[s.t_s] = by_t.get(s.t_s, 0.0) + s.power_w
    return sorted(by_t.items())


def window_energy(tele: TelemetryResult, t0_ns: int, window_start_ns: int, window_end_ns: int) -> EnergyStats | None:
    if tele.energy is None:
        return None
    window_s = (window_end_ns - window_start_ns) / 1e9
    series = _power_series(tele.gpu_samples)
    lo, hi = (window_start_ns - t0_ns) / 1e9, (window_end_ns - t0_ns) / 1e9
    inside = [p for t, p in series if lo <= t <= hi]
    probe_mean = tele.energy.mean_power_w
    if inside and series and probe_mean:
        samples_mean = sum(p for _, p in series) / len(series)
        power_w = sum(inside) / len(inside) * (probe_mean / samples_mean if samples_mean else 1.0)
    else:
        power_w = probe_mean or 0.0
    return EnergyStats(
        energy_j=power_w * window_s, idle_power_w=tele.energy.idle_power_w, mean_power_w=power_w, source=tele.energy.source
    )


async def measured_probe(
    cfg: ClientConfig,
    load: LoadSpec,
    pairs: Iterator[tuple[int, int]],
    plan: ProbePlan,
    meter: GpuEnergyMeter | None,
    on_record: OnRecord | None = None,
) -> ProbeResult:
    async with aiohttp.ClientSession() as session:
        telemetry = ProbeTelemetry(session, cfg.base_url, meter)
        t0_ns = time.perf_counter_ns()
        await telemetry.start()
        try:
            with paused_gc():
                result = await run_probe(cfg, load, pairs, plan, on_record=on_record)
        finally:
            tele = await telemetry.stop()
    result.server_metrics = tele.server_metrics
    result.energy = window_energy(tele, t0_ns, result.window_start_ns, result.window_end_ns)
    return result
