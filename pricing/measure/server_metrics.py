"""vLLM's Prometheus `/metrics` around a probe: scrape before, poll gauges during, scrape after,
and reduce to a flat `dict[str, float]` for ProbeRecord.server_metrics (keys carry their units).

Histogram percentiles interpolate linearly inside the bucket that holds the rank, as Prometheus'
`histogram_quantile` does; a rank in the +Inf bucket gives the largest finite bound.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

# (output key prefix, metric names: current first, then older vLLM names, percentiles wanted).
# Means are exact (_sum/_count); percentiles are only as fine as the buckets. Queue/prefill/decode
# buckets start at 0.3 s in vLLM 0.32, too coarse to interpolate, so they get means only.
HISTOGRAMS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("server_ttft", ("vllm:time_to_first_token_seconds",), True),
    ("server_itl", ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"), True),
    ("server_tpot", ("vllm:request_time_per_output_token_seconds",), True),
    ("server_e2e", ("vllm:e2e_request_latency_seconds",), True),
    ("server_queue", ("vllm:request_queue_time_seconds",), False),
    ("server_prefill", ("vllm:request_prefill_time_seconds",), False),
    ("server_decode", ("vllm:request_decode_time_seconds",), False),
)
# (output key, counter sample names): value is the after - before delta.
COUNTERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("preemptions", ("vllm:num_preemptions_total",)),
    ("prompt_tokens", ("vllm:prompt_tokens_total",)),
    ("generation_tokens", ("vllm:generation_tokens_total",)),
    ("requests_finished", ("vllm:request_success_total",)),  # every finished_reason, abort and error included
    ("requests_aborted", ("vllm:request_success_total|finished_reason=abort",)),
    ("requests_errored", ("vllm:request_success_total|finished_reason=error",)),
    ("prefix_cache_queries_tokens", ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")),
    ("prefix_cache_hits_tokens", ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")),
)
# (output key stem, gauge names, aggregate over label sets): max and mean over the probe's scrapes.
GAUGES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("kv_cache_usage", ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"), "max"),  # a 0-1 fraction
    ("requests_running", ("vllm:num_requests_running",), "sum"),
    ("requests_waiting", ("vllm:num_requests_waiting",), "sum"),
)
GAUGE_UNITS = {"kv_cache_usage": "_frac"}
PERCENTILES = (50, 90, 99)
# Labels whose values stay apart in a snapshot, as extra keys "name|label=value".
LABELS_KEPT = ("finished_reason",)


@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram summed over label sets: cumulative counts by upper bound `le`."""

    sum: float
    count: float
    buckets: dict[float, float]  # le -> cumulative count; includes math.inf


@dataclass(frozen=True)
class MetricsSnapshot:
    """One parse of `/metrics`: samples summed over label sets (max kept too), histograms by base name."""

    sums: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    t_ns: int = 0

    def names(self) -> set[str]:
        return set(self.sums) | set(self.histograms)


def parse_metrics(text: str, t_ns: int = 0) -> MetricsSnapshot:
    """Parse Prometheus text; every sample is summed across its label sets (engine, model_name, ...),
    and also per value of the labels in LABELS_KEPT."""
    sums: dict[str, float] = {}
    maxima: dict[str, float] = {}
    hist_sums: dict[str, dict[str, float]] = {}  # base name -> {"sum": .., "count": ..}
    hist_buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            if family.type == "histogram" and s.name.startswith(family.name):
                suffix = s.name[len(family.name):]
                parts = hist_sums.setdefault(family.name, {"sum": 0.0, "count": 0.0})
                buckets = hist_buckets.setdefault(family.name, {})
                if suffix == "_bucket":
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
                elif suffix in ("_sum", "_count"):
                    parts[suffix[1:]] += s.value
                continue
            keys = [s.name] + [f"{s.name}|{lab}={s.labels[lab]}" for lab in LABELS_KEPT if lab in s.labels]
            for key in keys:
                sums[key] = sums.get(key, 0.0) + s.value
                maxima[key] = max(maxima.get(key, -math.inf), s.value)
    histograms = {
        name: Histogram(sum=parts["sum"], count=parts["count"], buckets=dict(sorted(hist_buckets[name].items())))
        for name, parts in hist_sums.items()
    }
    return MetricsSnapshot(sums=sums, maxima=maxima, histograms=histograms, t_ns=t_ns)


def _counter_delta(before: float, after: float) -> float:
    """Counter growth; a drop means the server restarted, so the new value is all the growth."""
    return after - before if after >= before else after


def histogram_delta(before: Histogram | None, after: Histogram) -> Histogram:
    """Observations made between two scrapes (a restart in between resets to `after`)."""
    if before is None or after.count < before.count:
        return after
    buckets = {le: _counter_delta(before.buckets.get(le, 0.0), c) for le, c in after.buckets.items()}
    return Histogram(sum=after.sum - before.sum, count=after.count - before.count, buckets=buckets)


def histogram_quantile(q: float, hist: Histogram) -> float | None:
    """Quantile `q` in [0, 1] by linear interpolation within the bucket holding rank q*count
    (lower edge 0 for the first bucket); the +Inf bucket yields the largest finite bound."""
    if hist.count <= 0 or not hist.buckets:
        return None
    rank = q * hist.count
    lower_le, lower_count = 0.0, 0.0
    finite = [le for le in hist.buckets if math.isfinite(le)]
    for le, cum in hist.buckets.items():
        if cum >= rank and cum > lower_count:
            if not math.isfinite(le):
                return max(finite) if finite else None
            return lower_le + (le - lower_le) * (rank - lower_count) / (cum - lower_count)
        lower_le, lower_count = le, cum
    return max(finite) if finite else None


def bucket_of(value: float, hist: Histogram) -> tuple[float, float]:
    """The histogram bucket (lower, upper bound) that holds `value`."""
    lower = 0.0
    for le in hist.buckets:
        if value <= le:
            return lower, le
        lower = le
    return lower, math.inf


def summarize_window(opened: MetricsSnapshot, closed: MetricsSnapshot, percentile: float = 90) -> dict[str, float]:
    """The server over the window, between its opening and closing scrapes: TTFT's p-th
    percentile and the bucket holding it (interpolated quantiles are only known to within their
    bucket), and the share of prompt tokens its prefix cache served (a session replay's warm-up
    holds first turns only, so the whole probe's share understates the window's)."""
    out: dict[str, float] = {}
    queries, hits = (_counter_over(opened, closed, key) for key in ("prefix_cache_queries_tokens",
                                                                      "prefix_cache_hits_tokens"))
    if queries:
        out["prefix_cache_window_hit_frac"] = (hits or 0.0) / queries
    name = _first_present(HISTOGRAMS[0][1], set(closed.histograms))
    if name is None:
        return out
    delta = histogram_delta(opened.histograms.get(name), closed.histograms[name])
    value = histogram_quantile(percentile / 100.0, delta)
    if value is None:
        return out
    low, high = bucket_of(value, delta)
    key = f"server_ttft_window_p{percentile:g}"
    out |= {f"{key}_s": value, "server_ttft_window_count": delta.count, f"{key}_bucket_low_s": low}
    if math.isfinite(high):
        out[f"{key}_bucket_high_s"] = high
    return out


def cache_hit_share(metrics: dict[str, float] | None) -> float | None:
    """The share of prompt tokens vLLM's prefix cache served: over the probe's window where it was
    scraped at both ends, else over the whole probe (None: not reported)."""
    metrics = metrics or {}
    return metrics.get("prefix_cache_window_hit_frac", metrics.get("prefix_cache_hit_frac"))


def _counter_over(before: MetricsSnapshot, after: MetricsSnapshot, key: str) -> float | None:
    """One of COUNTERS' growth between two scrapes (None: the server does not report it)."""
    name = _first_present(dict(COUNTERS)[key], after.names())
    return _counter_delta(before.sums.get(name, 0.0), after.sums[name]) if name is not None else None


def _first_present(names: Sequence[str], available: set[str]) -> str | None:
    return next((n for n in names if n in available), None)


def summarize_probe(
    before: MetricsSnapshot, after: MetricsSnapshot, during: Sequence[MetricsSnapshot] = ()
) -> dict[str, float]:
    """Flat, unit-suffixed server metrics over the probe. Keys whose value is unknown (no
    observation, metric absent) are left out rather than set to 0. See module doc for quantiles."""
    out: dict[str, float] = {}
    available = after.names()
    for prefix, names, with_percentiles in HISTOGRAMS:
        name = _first_present(names, set(after.histograms))
        if name is None:
            continue
        delta = histogram_delta(before.histograms.get(name), after.histograms[name])
        out[f"{prefix}_count"] = delta.count
        if delta.count > 0:
            out[f"{prefix}_mean_s"] = delta.sum / delta.count
            for p in PERCENTILES if with_percentiles else ():
                value = histogram_quantile(p / 100.0, delta)
                if value is not None:
                    out[f"{prefix}_p{p}_s"] = value
    for key, _names in COUNTERS:
        if (grown := _counter_over(before, after, key)) is not None:
            out[key] = grown
    if out.get("prefix_cache_queries_tokens"):
        out["prefix_cache_hit_frac"] = out.get("prefix_cache_hits_tokens", 0.0) / out["prefix_cache_queries_tokens"]
    snaps = [before, *during, after]
    for stem, names, how in GAUGES:
        name = _first_present(names, available)
        if name is None:
            continue
        values = [(s.maxima if how == "max" else s.sums)[name] for s in snaps if name in s.sums]
        unit = GAUGE_UNITS.get(stem, "")
        out[f"{stem}_max{unit}"] = max(values)
        out[f"{stem}_mean{unit}"] = sum(values) / len(values)
    if after.t_ns > before.t_ns:
        out["scrape_window_s"] = (after.t_ns - before.t_ns) / 1e9
    out["scrapes"] = float(len(snaps))
    return out


async def scrape(
    session: aiohttp.ClientSession, metrics_url: str, timeout_s: float = 5.0, warn: bool = True
) -> MetricsSnapshot | None:
    """GET and parse `/metrics`; None (with a warning unless `warn` is False) on any failure,
    never raises into the probe."""
    try:
        async with session.get(metrics_url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                if warn:
                    log.warning("GET %s: HTTP %d; server metrics not scraped", metrics_url, resp.status)
                return None
            text = await resp.text()
        snap = parse_metrics(text, t_ns=time.perf_counter_ns())
    except Exception as exc:  # noqa: BLE001 - connection, timeout, malformed text: all mean 'not scraped'
        if warn:
            log.warning("GET %s failed (%s: %s); server metrics not scraped", metrics_url, type(exc).__name__, exc)
        return None
    if not snap.names() & {n for _, names, _ in HISTOGRAMS for n in names}:
        log.warning("%s has no vLLM latency histograms; server metrics not scraped", metrics_url)
        return None
    return snap


class ServerMetricsProbe:
    """Scrape at `start()`, poll gauges every `interval_s` while the probe runs, scrape at `stop()`.

    `stop()` returns the flat dict for ProbeRecord.server_metrics, or None when a scrape failed.
    """

    def __init__(self, session: aiohttp.ClientSession, base_url: str, interval_s: float = 1.0) -> None:
        self._session = session
        self.metrics_url = base_url.rstrip("/") + "/metrics"
        self.interval_s = interval_s
        self._before: MetricsSnapshot | None = None
        self._during: list[MetricsSnapshot] = []
        self._task: asyncio.Task[None] | None = None
        self._marks: dict[str, asyncio.Task[MetricsSnapshot | None]] = {}

    def mark(self, label: str) -> None:
        """Scrape now, without waiting (e.g. when the probe's window opens or closes)."""
        if self._before is not None:
            self._marks[label] = asyncio.create_task(scrape(self._session, self.metrics_url))

    async def _poll(self) -> None:
        warn = True  # once per probe: a server that went away would otherwise add a line a second
        while True:
            await asyncio.sleep(self.interval_s)
            snap = await scrape(self._session, self.metrics_url, warn=warn)
            if snap is not None:
                self._during.append(snap)
            else:
                warn = False

    async def start(self) -> None:
        self._during = []
        self._before = await scrape(self._session, self.metrics_url)
        if self._before is not None and self.interval_s > 0:
            self._task = asyncio.create_task(self._poll())

    async def stop(self, final_scrape: bool = True) -> dict[str, float] | None:
        """The probe's metrics; with `final_scrape` False (the server is gone or hung) none, at once."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._before is None or not final_scrape:
            for task in self._marks.values():
                task.cancel()
            self._marks = {}
            return None
        after = await scrape(self._session, self.metrics_url)
        marks = {label: await task for label, task in self._marks.items()}
        self._marks = {}
        if after is None:
            return None
        try:
            window = {}
            if marks.get("open") is not None and marks.get("close") is not None:
                window = summarize_window(marks["open"], marks["close"])  # type: ignore[arg-type]
            return {**summarize_probe(self._before, after, self._during), **window}
        except Exception as exc:  # noqa: BLE001 - telemetry must not sink a probe
            log.warning("summarizing %s failed (%s); server metrics dropped", self.metrics_url, exc)
            return None
