"""One probe: the client's load turned into window statistics (`run_probe`), and the same with
its telemetry, GPU energy and vLLM `/metrics` around it (`measured_probe`).

Energy is reported for the steady-state window, like the token counts it is divided by: the
mean power of the samples inside the window (scaled to the NVML counter's total over the probe,
which is exact where the samples are not) times the window's length.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from math import inf, sqrt

import aiohttp

from pricing.load.client import ClientConfig, ProbePlan
from pricing.load.loops import StopRule, WindowMark, drive_load
from pricing.load.run_state import LoadRun, OnRecord
from pricing.load.sessions import SessionTraffic, drive_sessions
from pricing.load.event_loop import paused_gc
from pricing.measure.requests import (
    KEPT_UP_GROWTH_SHARE,
    RequestTable,
    arrival_flow,
    arrival_rate,
    backlog,
    cohort,
    kept_up_with_arrivals,
    prompt_token_flow,
    served_share,
    still_filling,
    table_from_records,
)
from pricing.measure.slo import outcome
from pricing.measure.telemetry import (
    GpuEnergyMeter,
    GpuSample,
    ProbeTelemetry,
    TelemetryResult,
)
from pricing.measure.window import latency_at, window_stats
from pricing.schema import (
    SERVER_ABORTS,
    AbortKind,
    EnergyStats,
    LoadSpec,
    RequestRecord,
    SloTier,
    WindowStats,
)

# What a probe sends: independent requests of these (ISL, OSL), or chat sessions.
Traffic = Iterator[tuple[int, int]] | SessionTraffic

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
    table: RequestTable | None = None  # the per-request records, compact
    undecided_at_cap: bool = False
    warmup_capped: bool = False  # an open loop's window opened at the warm-up's cap (load.settle)


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


def decided_rule(tiers: Sequence[SloTier]) -> StopRule:
    """Decided once every tier's TTFT and TPOT verdicts are (the cohort of the requests finished
    so far: an early look, biased to short requests, that only decides when to stop)."""

    def decided(records: Sequence[RequestRecord], window_start_ns: int, now_ns: int) -> bool:
        sample = cohort(table_from_records(records, window_start_ns, now_ns))
        for tier in tiers:
            verdicts = [outcome(*latency_at(values, tier.percentile), limit)
                        for values, limit in ((sample.ttft_s, tier.ttft_s), (sample.tpot_s, tier.tpot_s))]
            if "fail" not in verdicts and "undecided" in verdicts:
                return False
        return True

    return decided


def sent_lengths(load: LoadSpec, lengths: tuple[float, float] | None) -> tuple[float, float] | None:
    """Mean (ISL, OSL) asked per request: the profile's, with one output token for prefill probes
    (a prefill-only session replay's prompts keep the sessions' lengths: load.sessions)."""
    if lengths is None:
        return None
    return (lengths[0], 1.0) if load.prefill_only else lengths


def open_loop_rate(stats: WindowStats, load: LoadSpec, table: RequestTable | None) -> WindowStats:
    """An open loop's request rate and flows.

    Independent arrivals at a rate, uncapped, into a server that surely kept up with them
    (requests.kept_up_with_arrivals: the requests in it grew by no more than 3% of the window's
    arrivals, so it served all but that), none failing:
    - where it served at least 97% of what the offered rate asks for in the window
      (requests.served_share), it serves the offered rate in the long run: the request rate is
      the offered rate and the flows that rate times the traffic's mean lengths as the server
      counted them (stats.lengths_mean), exact (rate_source "offered"), the rate the capacity
      (capacity.choice) is read on;
    - else fewer arrived than offered and the window cannot say it would keep up with more: the
      request rate is the arrivals counted (rate_source "arrivals"), the flows that count times
      the mean lengths.
    The window's streamed output tokens and prefilled prompts are samples of these flows, and
    noisy ones for a heavy-tailed profile (on the simulated engine at 60% of its saturation,
    20-40 s windows of WildChat lengths streamed up to 9.8% more or less than the long run); they
    stay on the record (output_tokens, input_tokens, measured_input_tok_s).

    Otherwise (a server that may be falling behind or failing requests, a session's turns, a cap
    on requests in flight) the request rate is the arrivals the window received, counted, with
    the interval of the long-run rate it stands for (requests.arrival_flow), and the flows stay
    as measured (a server that fell behind serves less than its arrivals ask for)."""
    if load.mode != "open" or load.kind != "decode" or table is None or table.window_us <= 0:
        return stats
    offered = load.request_rate_rps
    rate, ci = arrival_flow(table)
    counted = {"request_rate_rps": rate, "request_rate_rps_ci": ci, "rate_source": "arrivals"}
    if not (offered and load.independent_arrivals and stats.lengths_mean is not None
            and stats.failed == 0 and kept_up_with_arrivals(table)):
        return stats.model_copy(update=counted)
    isl, osl = stats.lengths_mean
    if served_share(table, offered) >= 1 - KEPT_UP_GROWTH_SHARE:
        return stats.model_copy(update={
            "request_rate_rps": offered, "request_rate_rps_ci": (offered, offered),
            "input_tok_s": offered * isl, "input_tok_s_ci": (offered * isl, offered * isl),
            "output_tok_s": offered * osl, "output_tok_s_ci": (offered * osl, offered * osl),
            "rate_source": "offered"})
    return stats.model_copy(update={**counted, "input_tok_s": rate * isl, "input_tok_s_ci": (ci[0] * isl, ci[1] * isl),
                                    "output_tok_s": rate * osl, "output_tok_s_ci": (ci[0] * osl, ci[1] * osl)})


def sent_as_offered(load: LoadSpec, table: RequestTable) -> bool:
    """The window's arrivals stand for the offered rate: their count is within 3 sd of the rate x
    the window (Poisson, or gamma gaps of shape `burstiness`: variance count / shape). A client
    that cannot keep pace (a starved event loop) sends fewer."""
    expected = (load.request_rate_rps or 0.0) * table.window_us / 1e6
    return abs(arrival_rate(table) * table.window_us / 1e6 - expected) <= 3 * sqrt(expected / load.burstiness)


def prefill_flow(stats: WindowStats, load: LoadSpec, table: RequestTable | None) -> WindowStats:
    """A prefill-only probe's input flow is the prompt tokens its server prefilled in the window,
    counted. Its request rate times the population's mean ISL is not: a prefill-bound server's
    request rate follows the window's own ISLs (six H200 prefill probes of two sweeps gave 66-73k
    tok/s that way, and 69.3-70.7k counted)."""
    if not load.prefill_only or table is None or table.window_us <= 0:
        return stats
    rate, ci = prompt_token_flow(table)
    update: dict = {"input_tok_s": rate, "input_tok_s_ci": ci}
    if stats.lengths_mean is not None and stats.request_rate_rps > 0:  # the window's own ISL, as counted
        update["lengths_mean"] = (rate / stats.request_rate_rps, stats.lengths_mean[1])
    return stats.model_copy(update=update)


def with_dropped_failures(stats: WindowStats, dropped: dict[str, int]) -> WindowStats:
    """The window's error counts with the failed requests the client counted but did not keep
    (ProbePlan.max_kept_failures): they were issued in the window and failed."""
    if not dropped:
        return stats
    extra = sum(dropped.values())
    by_kind = dict(stats.errors_by_kind)
    for kind, n in dropped.items():
        by_kind[kind] = by_kind.get(kind, 0) + n
    return stats.model_copy(update={"failed": stats.failed + extra, "errors_by_kind": by_kind,
                                    "issued": (stats.issued or 0) + extra})


def measure_run(run: LoadRun, lengths: tuple[float, float] | None = None, load: LoadSpec | None = None
                ) -> ProbeResult:
    """The window statistics of what the client recorded."""
    table = table_from_records(run.records, run.window_start_ns, run.window_end_ns)
    stats = with_dropped_failures(window_stats(run.records, run.window_start_ns, run.window_end_ns, lengths, table),
                                  run.dropped_failures)
    if load is not None:
        stats = prefill_flow(open_loop_rate(stats, load, table), load, table)
    warnings = [w for w in (_prompt_wait_warning(run.prompt_wait_s, stats.e2e_s.mean),) if w]
    open_window = load is not None and load.mode == "open" and load.kind == "decode" and table.window_us > 0
    if open_window and still_filling(table):
        b = backlog(table)
        warnings.append(f"the server was still filling when the window closed (requests in it {b.at_open} -> "
                        f"{b.at_close}): the window flatters it; no pass is sure, and its latest third judges the tiers it meets")
    if open_window and load.independent_arrivals and load.request_rate_rps and not sent_as_offered(load, table):
        # Fewer than offered never read as the offered rate (requests.served_share); more can.
        warnings.append(f"the client sent {arrival_rate(table):.4g} req/s in the window, beyond noise of the "
                        f"{load.request_rate_rps:g} offered (an overloaded client host, or a bug)")
    if run.warmup_capped:
        warnings.append("the window opened at the warm-up's cap (load.settle), before the server had filled: near "
                        "saturation it flatters the server; no pass is sure, and its latest third judges the tiers it "
                        "meets (a longer --max-probe-s lets it fill)")
    if run.undecided_at_cap:
        warnings.append("the window ran its longest (ProbePlan.max_extension times its length, or --max-probe-s) "
                        "with a tier's verdict still undecided: its interval straddles the limit")
    return ProbeResult(run.records, run.window_start_ns, run.window_end_ns, stats, run.aborted, run.abort,
                       warnings=warnings, table=table, undecided_at_cap=run.undecided_at_cap,
                       warmup_capped=run.warmup_capped)


async def run_probe(
    cfg: ClientConfig,
    load: LoadSpec,
    traffic: Traffic,
    plan: ProbePlan | None = None,
    on_record: OnRecord | None = None,
    clock: Callable[[], int] = time.perf_counter_ns,
    tiers: Sequence[SloTier] = (),
    lengths: tuple[float, float] | None = None,
    mark: WindowMark | None = None,
) -> ProbeResult:
    """Drive one load level (load.loops.drive_load, or load.sessions.drive_sessions for a probe
    that replays sessions) until its window is full and, for decode probes, every tier's verdict
    decided; then reduce the records to the window's statistics. `lengths`: the profile's mean
    (ISL, OSL) per request, from which the request rate follows."""
    rule = decided_rule(tiers) if tiers and load.kind == "decode" else None
    if load.replays_sessions:
        if not isinstance(traffic, SessionTraffic):
            raise ValueError(f"a {load.kind} probe of sessions needs the profile's sessions (SessionTraffic)")
        run = await drive_sessions(cfg, load, traffic, plan, on_record, clock, stop_rule=rule, mark=mark)
    else:
        pairs = traffic.turn_pairs() if isinstance(traffic, SessionTraffic) else traffic
        run = await drive_load(cfg, load, pairs, plan, on_record, clock, stop_rule=rule, mark=mark)
    return measure_run(run, sent_lengths(load, lengths), load)


def server_ttft_warning(stats: WindowStats, server: dict[str, float] | None) -> str | None:
    """Client and server TTFT p90 over the same window should meet within the server histogram's
    bucket that holds its p90 (the client's interval overlapping it); say so when they do not."""
    if not server or "server_ttft_window_p90_s" not in server or stats.ttft_s.p90 is None:
        return None
    low, high = server["server_ttft_window_p90_bucket_low_s"], server.get("server_ttft_window_p90_bucket_high_s", inf)
    ci_low, ci_high = stats.ttft_s.p90_ci or (stats.ttft_s.p90, stats.ttft_s.p90)
    if (ci_high is None or ci_high >= low) and (ci_low is None or ci_low <= high):
        return None
    return (f"client TTFT p90 {stats.ttft_s.p90 * 1e3:.4g} ms is outside the server histogram's bucket "
            f"{low * 1e3:g}-{high * 1e3:g} ms that holds the server's p90 ({server['server_ttft_window_p90_s'] * 1e3:.4g} ms) "
            "over the same window: time is spent between the socket and the engine (tokenizing, queueing in the "
            "API server, the network) or the client is overloaded")


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
    traffic: Traffic,
    plan: ProbePlan,
    meter: GpuEnergyMeter | None,
    on_record: OnRecord | None = None,
    tiers: Sequence[SloTier] = (),
    lengths: tuple[float, float] | None = None,
) -> ProbeResult:
    """`run_probe` with GPU energy and the server's /metrics (scraped also as the window opens
    and closes, to cross-check TTFT over the same window)."""
    async with aiohttp.ClientSession() as session:
        telemetry = ProbeTelemetry(session, cfg.base_url, meter)
        t0_ns = time.perf_counter_ns()
        await telemetry.start()
        result: ProbeResult | None = None
        try:
            with paused_gc():
                result = await run_probe(cfg, load, traffic, plan, on_record=on_record, tiers=tiers, lengths=lengths,
                                         mark=telemetry.mark)
        finally:
            # A probe that lost its server gets no last scrape: a hung server would hold it for
            # the scrape's timeout, and its metrics describe nothing measured.
            tele = await telemetry.stop(final_scrape=result is not None and result.abort not in SERVER_ABORTS)
    result.server_metrics = tele.server_metrics
    result.energy = window_energy(tele, t0_ns, result.window_start_ns, result.window_end_ns)
    if (warning := server_ttft_warning(result.stats, tele.server_metrics)) is not None:
        result.warnings.append(warning)
    return result
