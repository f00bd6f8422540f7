"""GPU energy, power, utilization and memory over a probe window, read through NVML.

Energy comes from NVML's total-energy counter (mJ since driver load) summed over the server's
GPUs; a GPU without the counter, or whose counter reset mid-window, falls back to the trapezoid
integral of ~100 ms power samples. No GPU or no `pynvml` (package `nvidia-ml-py`) -> None, never 0.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, Self

from pydantic import BaseModel, ConfigDict

from pricing.schema import EnergyStats

log = logging.getLogger(__name__)

NVML_ERROR_NOT_SUPPORTED = 3  # pynvml.NVML_ERROR_NOT_SUPPORTED
ENERGY_COUNTER_MODULUS_MJ = 2**64  # nvmlDeviceGetTotalEnergyConsumption is an unsigned long long
# A wrapped counter is told from a reset by the energy it implies: above this per-GPU power it is a reset.
MAX_PLAUSIBLE_GPU_POWER_W = 3000.0


class NvmlApi(Protocol):
    """The few pynvml functions used here; the `pynvml` module itself satisfies it, tests pass a fake.

    Units are NVML's: energy in mJ, power in mW, memory in bytes. Errors are `NVMLError` with `.value`.
    """

    @property
    def NVMLError(self) -> type[Exception]: ...
    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...  # .gpu, .memory in %
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...  # .used, .total in bytes


class GpuSample(BaseModel):
    """One reading of one GPU; `t_s` is seconds since the window (or idle measurement) started."""

    model_config = ConfigDict(frozen=True)

    t_s: float
    gpu: int  # NVML index
    power_w: float
    util_pct: float | None = None
    mem_used_mib: float | None = None


class EnergyWindow(BaseModel):
    """What one window measured: the stats for ProbeRecord.energy, the samples for plots, and why
    a fallback was taken (one line per GPU that did not use its counter)."""

    model_config = ConfigDict(frozen=True)

    stats: EnergyStats | None
    window_s: float
    samples: list[GpuSample]
    notes: list[str] = []


def net_energy_j(stats: EnergyStats | None, window_s: float) -> float | None:
    """Energy above idle over the window: `energy_j - idle_power_w * window_s`, floored at 0.

    `energy_j` is gross (all the server's GPUs, idle draw included); `idle_power_w` is the same GPUs'
    summed power before any load. None when energy or idle power was not measured.
    """
    if stats is None or stats.idle_power_w is None:
        return None
    return max(0.0, stats.energy_j - stats.idle_power_w * window_s)


def energy_kwh_per_mtok(stats: EnergyStats | None, tok_s: float, net: bool = False) -> float | None:
    """kWh per 1M tokens at a steady `tok_s` (tokens/s of the same window), from the mean power, so a
    meter window a little wider than the stats window does not skew it. `net` subtracts idle power."""
    if stats is None or stats.mean_power_w is None or tok_s <= 0:
        return None
    if net and stats.idle_power_w is None:
        return None
    power_w = max(0.0, stats.mean_power_w - stats.idle_power_w) if net else stats.mean_power_w  # type: ignore[operator]
    return power_w / tok_s * 1e6 / 3.6e6


def visible_gpu_indices(env: Mapping[str, str] | None = None) -> list[int] | None:
    """NVML indices from CUDA_VISIBLE_DEVICES; None means all GPUs (unset, or UUID/MIG entries we
    cannot map without NVML). Assumes CUDA_DEVICE_ORDER=PCI_BUS_ID, as NVML numbers by PCI bus."""
    env = os.environ if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None or not raw.strip():
        return None
    try:
        return [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        log.warning("CUDA_VISIBLE_DEVICES=%r is not a list of indices; measuring all GPUs", raw)
        return None


def trapezoid_energy_j(samples: Sequence[tuple[float, float]]) -> float:
    """Integral of power over time from (t_s, power_w) points sorted by time; 0 for fewer than 2."""
    return sum((p0 + p1) / 2.0 * (t1 - t0) for (t0, p0), (t1, p1) in itertools.pairwise(samples))


def counter_delta_mj(before_mj: int, after_mj: int, window_s: float) -> int | None:
    """Counter growth over the window, across a 64-bit wrap; None when the counter reset (driver
    reload) or the implied power is implausible."""
    if after_mj >= before_mj:
        return after_mj - before_mj
    wrapped = ENERGY_COUNTER_MODULUS_MJ - before_mj + after_mj
    if wrapped <= MAX_PLAUSIBLE_GPU_POWER_W * 1000.0 * max(window_s, 1e-3):
        return wrapped
    return None


def _is_not_supported(nvml: NvmlApi, exc: Exception) -> bool:
    return isinstance(exc, nvml.NVMLError) and getattr(exc, "value", None) == NVML_ERROR_NOT_SUPPORTED


class GpuEnergyMeter:
    """Measures one window at a time over fixed GPUs: `start()`, run the probe, `stop()`.

    A daemon thread samples power/utilization/memory every `interval_s` (NVML calls block, so they
    stay off the event loop). Call `measure_idle()` once per run before load; later windows carry it.
    """

    def __init__(
        self,
        nvml: NvmlApi,
        gpu_indices: Sequence[int] | None = None,
        interval_s: float = 0.1,
        clock_ns: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self._nvml = nvml
        self.gpu_indices = list(range(nvml.nvmlDeviceGetCount())) if gpu_indices is None else list(gpu_indices)
        self._handles = {i: nvml.nvmlDeviceGetHandleByIndex(i) for i in self.gpu_indices}
        self.interval_s = interval_s
        self._clock_ns = clock_ns
        self.idle_power_w: float | None = None
        self._t0_ns = 0
        self._counters0: dict[int, int | None] = {}
        self._samples: list[GpuSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._open = False

    def close(self) -> None:
        """Stop any window in flight and shut NVML down."""
        if self._open:
            self.stop()
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down; nothing to recover
            log.debug("nvmlShutdown failed: %s", exc)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_counter_mj(self, gpu: int) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handles[gpu]))
        except Exception as exc:  # noqa: BLE001 - any NVMLError: fall back to the power integral
            if not _is_not_supported(self._nvml, exc):
                log.warning("GPU %d: energy counter read failed (%s); using the power integral", gpu, exc)
            return None

    def _sample_all(self) -> None:
        t_s = (self._clock_ns() - self._t0_ns) / 1e9
        for gpu, handle in self._handles.items():
            try:
                power_w = self._nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            except Exception as exc:  # noqa: BLE001 - a missed sample only thins the series
                log.debug("GPU %d: power read failed: %s", gpu, exc)
                continue
            util_pct = mem_mib = None
            try:
                util_pct = float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                mem_mib = self._nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
            except Exception as exc:  # noqa: BLE001
                log.debug("GPU %d: utilization/memory read failed: %s", gpu, exc)
            self._samples.append(GpuSample(t_s=t_s, gpu=gpu, power_w=power_w, util_pct=util_pct, mem_used_mib=mem_mib))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample_all()

    def start(self, background: bool = True) -> None:
        """Open a window: read the counters, take a first sample, start the sampler thread."""
        if self._open:
            raise RuntimeError("GpuEnergyMeter.start() called while a window is open")
        self._open = True
        self._samples = []
        self._t0_ns = self._clock_ns()
        self._counters0 = {gpu: self._read_counter_mj(gpu) for gpu in self.gpu_indices}
        self._sample_all()
        self._stop.clear()
        if background:
            self._thread = threading.Thread(target=self._run, name="gpu-energy-sampler", daemon=True)
            self._thread.start()

    def sample_now(self) -> None:
        """Take one sample in the caller's thread (for tests, or with `start(background=False)`)."""
        self._sample_all()

    def stop(self) -> EnergyWindow:
        """Close the window: stop the sampler, take a last sample, read counters, compute energy."""
        if not self._open:
            raise RuntimeError("GpuEnergyMeter.stop() called with no window open")
        self._open = False
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._sample_all()
        window_s = (self._clock_ns() - self._t0_ns) / 1e9
        counters1 = {gpu: self._read_counter_mj(gpu) for gpu in self.gpu_indices}
        return self._summarize(window_s, counters1)

    def _summarize(self, window_s: float, counters1: dict[int, int | None]) -> EnergyWindow:
        total_j, notes, used_integral = 0.0, [], False
        for gpu in self.gpu_indices:
            c0, c1 = self._counters0.get(gpu), counters1.get(gpu)
            delta_mj = counter_delta_mj(c0, c1, window_s) if c0 is not None and c1 is not None else None
            if delta_mj is not None:
                total_j += delta_mj / 1000.0
                continue
            points = [(s.t_s, s.power_w) for s in self._samples if s.gpu == gpu]
            if len(points) < 2:
                notes.append(f"GPU {gpu}: no energy counter and fewer than 2 power samples; not measured")
                log.warning(notes[-1])
                return EnergyWindow(stats=None, window_s=window_s, samples=list(self._samples), notes=notes)
            why = "counter not supported" if c0 is None or c1 is None else f"counter reset ({c0} -> {c1} mJ)"
            notes.append(f"GPU {gpu}: {why}; energy from the power integral of {len(points)} samples")
            log.warning(notes[-1])
            total_j += trapezoid_energy_j(points)
            used_integral = True
        stats = EnergyStats(
            energy_j=total_j,
            idle_power_w=self.idle_power_w,
            mean_power_w=total_j / window_s if window_s > 0 else None,
            source="nvml_power_integral" if used_integral else "nvml_counter",
        )
        return EnergyWindow(stats=stats, window_s=window_s, samples=list(self._samples), notes=notes)

    def measure_idle(self, duration_s: float = 3.0, sleep: Callable[[float], None] = time.sleep) -> float | None:
        """Mean summed power of the idle GPUs over `duration_s`; stored on the meter for later windows.
        Blocking: call before load starts (from async code, through `asyncio.to_thread`)."""
        self.start()
        sleep(duration_s)
        window = self.stop()
        self.idle_power_w = window.stats.mean_power_w if window.stats is not None else None
        return self.idle_power_w


def load_pynvml() -> NvmlApi | None:
    """Import `pynvml` (package `nvidia-ml-py`) lazily; None when it is not installed."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        log.info("pynvml not installed (pip install nvidia-ml-py): GPU energy not measured")
        return None
    return pynvml  # type: ignore[no-any-return]


def open_gpu_meter(
    gpu_indices: Sequence[int] | None = None,
    nvml: NvmlApi | None = None,
    interval_s: float = 0.1,
) -> GpuEnergyMeter | None:
    """A meter over `gpu_indices` (default: CUDA_VISIBLE_DEVICES, else all), or None when there is
    no pynvml, no driver, or no GPU: energy is then 'not measured', never 0."""
    nvml = nvml if nvml is not None else load_pynvml()
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        log.info("NVML unavailable (%s): GPU energy not measured", exc)
        return None
    indices = visible_gpu_indices() if gpu_indices is None else list(gpu_indices)
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0 or (indices is not None and (not indices or max(indices) >= count or min(indices) < 0)):
            log.warning("GPU indices %s not among the %d NVML devices: GPU energy not measured", indices, count)
            nvml.nvmlShutdown()
            return None
        return GpuEnergyMeter(nvml, indices, interval_s=interval_s)
    except Exception as exc:  # noqa: BLE001
        log.warning("NVML device setup failed (%s): GPU energy not measured", exc)
        return None
