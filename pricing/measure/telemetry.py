"""Everything measured beside the client around one probe: GPU energy (gpu_energy.py) and vLLM's
`/metrics` (server_metrics.py), started and stopped together without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aiohttp
from pydantic import BaseModel, ConfigDict

from pricing.measure.gpu_energy import (
    EnergyWindow,
    GpuEnergyMeter,
    GpuSample,
    energy_kwh_per_mtok,
    net_energy_j,
    open_gpu_meter,
    visible_gpu_indices,
)
from pricing.measure.server_metrics import (
    ServerMetricsProbe,
    parse_metrics,
    scrape,
    summarize_probe,
)
from pricing.schema import EnergyStats

__all__ = [
    "EnergyWindow",
    "GpuEnergyMeter",
    "GpuSample",
    "ProbeTelemetry",
    "TelemetryResult",
    "energy_kwh_per_mtok",
    "gpu_summary",
    "net_energy_j",
    "open_gpu_meter",
    "parse_metrics",
    "scrape",
    "summarize_probe",
    "visible_gpu_indices",
]

log = logging.getLogger(__name__)


class TelemetryResult(BaseModel):
    """`energy` and `server_metrics` go into ProbeRecord as they are; `gpu_samples` feed plots."""

    model_config = ConfigDict(frozen=True)

    energy: EnergyStats | None = None
    server_metrics: dict[str, float] | None = None
    gpu_samples: list[GpuSample] = []
    notes: list[str] = []


def gpu_summary(samples: Sequence[GpuSample]) -> dict[str, float]:
    """Utilization, memory and power over the window's samples (GPUs summed per sample for power
    and memory, averaged for utilization); empty when there are no samples."""
    by_t: dict[float, list[GpuSample]] = {}
    for s in samples:
        by_t.setdefault(s.t_s, []).append(s)
    out: dict[str, float] = {}
    power = [sum(s.power_w for s in group) for group in by_t.values()]
    if power:
        out["gpu_power_max_w"] = max(power)
    utils = [s.util_pct for s in samples if s.util_pct is not None]
    if utils:
        out["gpu_util_mean_pct"] = sum(utils) / len(utils)
        out["gpu_util_max_pct"] = max(utils)
    mems = [sum(s.mem_used_mib or 0.0 for s in group) for group in by_t.values() if group[0].mem_used_mib is not None]
    if mems:
        out["gpu_mem_used_max_mib"] = max(mems)
    return out


class ProbeTelemetry:
    """`await start()` just before a probe's window, `await stop()` just after it.

    `meter` is None where there is no GPU: energy is then None ('not measured'). GPU utilization,
    memory and peak power (keys `gpu_*`) join the scraped `/metrics` keys in `server_metrics`.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        meter: GpuEnergyMeter | None,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.meter = meter
        self._metrics = ServerMetricsProbe(session, base_url, interval_s=poll_interval_s)
        self._metering = False

    async def start(self) -> None:
        if self.meter is not None:
            try:
                await asyncio.to_thread(self.meter.start)
                self._metering = True
            except Exception as exc:  # noqa: BLE001 - telemetry must not sink a probe
                log.warning("GPU energy window did not start (%s); energy not measured", exc)
        await self._metrics.start()

    def mark(self, label: str, _at_ns: int = 0) -> None:
        """A scrape of the server's /metrics now (the probe's window opens or closes)."""
        self._metrics.mark(label)

    async def stop(self, final_scrape: bool = True) -> TelemetryResult:
        window: EnergyWindow | None = None
        if self.meter is not None and self._metering:
            self._metering = False
            try:
                window = await asyncio.to_thread(self.meter.stop)
            except Exception as exc:  # noqa: BLE001
                log.warning("GPU energy window failed (%s); energy not measured", exc)
        server = await self._metrics.stop(final_scrape)
        if window is None:
            return TelemetryResult(server_metrics=server)
        gpu = gpu_summary(window.samples)
        merged = {**(server or {}), **gpu} if (server is not None or gpu) else None
        return TelemetryResult(energy=window.stats, server_metrics=merged, gpu_samples=window.samples, notes=window.notes)
