"""One probe with its telemetry: the client's load plus GPU energy and vLLM `/metrics` around it.

Energy is reported for the steady-state window, like the token counts it is divided by: the
mean power of the samples inside the window (scaled to the NVML counter's total over the probe,
which is exact where the samples are not) times the window's length.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import aiohttp

from pricing.client import ClientConfig, OnRecord, ProbePlan, ProbeResult, run_probe
from pricing.schema import EnergyStats, LoadSpec
from pricing.telemetry import GpuEnergyMeter, GpuSample, ProbeTelemetry, TelemetryResult


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
            result = await run_probe(cfg, load, pairs, plan, on_record=on_record)
        finally:
            tele = await telemetry.stop()
    result.server_metrics = tele.server_metrics
    result.energy = window_energy(tele, t0_ns, result.window_start_ns, result.window_end_ns)
    return result
