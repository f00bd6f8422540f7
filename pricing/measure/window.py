"""Window statistics: pure functions from request records to results, with 95% intervals.

Percentiles use numpy's default ('linear') method. An empty sample gives None, never 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from pricing.measure.intervals import percentile_interval, rate_interval
from pricing.measure.requests import RequestTable, cohort, table_from_records
from pricing.schema import (
    CANCELLED,
    STORED_PERCENTILES,
    Ci,
    LatencyStats,
    RequestRecord,
    WindowStats,
)

NS_PER_S = 1e9


def ttft_s(rec: RequestRecord) -> float | None:
    """Request sent -> first streamed output received."""
    if not rec.chunk_ns:
        return None
    return (rec.chunk_ns[0] - rec.start_ns) / NS_PER_S


def output_token_count(rec: RequestRecord) -> int:
    """Tokens generated: the server's usage when given, else one per output chunk."""
    return rec.completion_tokens if rec.completion_tokens is not None else len(rec.chunk_ns)


def tpot_s(rec: RequestRecord) -> float | None:
    """(last token time - first token time) / (output tokens - 1); None for single-token replies."""
    tokens = output_token_count(rec)
    if len(rec.chunk_ns) < 2 or tokens < 2:
        return None
    return (rec.chunk_ns[-1] - rec.chunk_ns[0]) / NS_PER_S / (tokens - 1)


def itl_s(rec: RequestRecord) -> list[float]:
    """Every gap between consecutive output chunks."""
    chunks = rec.chunk_ns
    return [(b - a) / NS_PER_S for a, b in zip(chunks, chunks[1:])]


def e2e_s(rec: RequestRecord) -> float:
    return (rec.end_ns - rec.start_ns) / NS_PER_S


def _ci(interval: tuple[float, float]) -> Ci:
    low, high = interval
    return (low if np.isfinite(low) else None, high if np.isfinite(high) else None)


def latency_at(values: np.ndarray, percentile: float) -> tuple[float | None, Ci | None]:
    """One percentile of a sample in time order, and its 95% interval (measure.intervals)."""
    if values.size == 0:
        return None, None
    return float(np.percentile(values, percentile)), _ci(percentile_interval(values, percentile))


def latency_stats(values: Iterable[float | None]) -> LatencyStats:
    """Percentiles with intervals; the sample's order is its time order (the intervals need it)."""
    sample = np.fromiter((v for v in values if v is not None), dtype=float)
    if sample.size == 0:
        return LatencyStats(count=0)
    fields: dict[str, object] = {}
    for p in STORED_PERCENTILES:
        fields[f"p{p}"], fields[f"p{p}_ci"] = latency_at(sample, p)
    return LatencyStats(count=int(sample.size), mean=float(sample.mean()), max=float(sample.max()), **fields)


def _prompt_tokens(rec: RequestRecord) -> int:
    return rec.prompt_tokens if rec.prompt_tokens is not None else rec.target_input_tokens


def _usage_ratios(records: Sequence[RequestRecord]) -> tuple[float, float]:
    """Tokens the server counted over tokens asked for, input and output, over finished requests:
    a chat template or a text prompt's tokenizing shifts the real lengths from the targets."""
    done = [r for r in records if r.ok and r.completion_tokens is not None]
    asked_in = sum(r.target_input_tokens for r in done)
    asked_out = sum(r.target_output_tokens for r in done)
    got_in = sum(_prompt_tokens(r) for r in done)
    got_out = sum(r.completion_tokens or 0 for r in done)
    return (got_in / asked_in if asked_in else 1.0, got_out / asked_out if asked_out else 1.0)


def _chunk_flow(records: Sequence[RequestRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Every output chunk's arrival and the tokens it carried (usage over chunks per request;
    for a request cut before its usage came, the probe's mean tokens per chunk)."""
    done = [r for r in records if r.ok and r.completion_tokens is not None and r.chunk_ns]
    chunks = sum(len(r.chunk_ns) for r in done)
    per_chunk = sum(r.completion_tokens or 0 for r in done) / chunks if chunks else 1.0
    with_chunks = [r for r in records if r.chunk_ns]
    if not with_chunks:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    times = np.concatenate([np.asarray(r.chunk_ns, dtype=np.int64) for r in with_chunks])
    weights = np.concatenate([
        np.full(len(r.chunk_ns), r.completion_tokens / len(r.chunk_ns) if r.completion_tokens is not None else per_chunk)
        for r in with_chunks])
    return times, weights


def window_stats(records: Sequence[RequestRecord], window_start_ns: int, window_end_ns: int,
                 lengths: tuple[float, float] | None = None, table: RequestTable | None = None) -> WindowStats:
    """Steady-state statistics of a window [window_start_ns, window_end_ns] and its tail.

    Flows are measured over the window, not derived from small-sample means: output tokens are
    those streamed in it, with a batch-means interval over ten sub-windows. The request rate is
    that flow over the mean output tokens per request of the traffic sent (`lengths`: the
    profile's population means of (ISL, OSL) as asked; when not given, the mean targets of the
    requests sent from the window's opening on), scaled by the tokens the server counted over
    those asked for; input tokens per second are the request rate times the mean ISL. A mean
    over the few dozen requests in a window of a heavy-tailed profile would be off by tens of
    percent; the population's is not. The prompt tokens of the requests whose first token
    arrived in the window, per second, are kept as `measured_input_tok_s`.

    Latencies are the cohort's (measure.requests.cohort): TTFT of every request whose first token
    arrived in the window, TPOT of each followed to its end, with 95% intervals.

    Why not count completions: a closed loop of equal requests runs in lockstep (all N finish
    together once per request duration), so completions come in bursts and a count over a
    window of a few bursts is off by up to one burst (on an H200, 16 streams of 1807/449 tokens,
    a 15 s window: completions gave 4.33 req/s and first tokens 5.33, while the streamed tokens
    gave 4.65; `vllm bench serve` over 320 requests gave 4.86). Streamed tokens flow evenly.
    """
    w0, w1 = window_start_ns, window_end_ns
    window_s = max(w1 - w0, 1) / NS_PER_S
    table = table or table_from_records(records, w0, w1)
    sample = cohort(table)
    times, weights = _chunk_flow(records)
    output_tok_s, output_ci = rate_interval(times, weights, w0, w1)
    if lengths is None:
        # The steady state's requests only: warm-up requests are the client's, not the traffic's
        # (a closed loop's first requests ask for a fraction of their output, to desynchronise).
        sent = [r for r in records if r.error is None or r.error == CANCELLED or r.chunk_ns]
        sent = [r for r in sent if r.start_ns >= w0] or sent
        lengths = (float(np.mean([r.target_input_tokens for r in sent])) if sent else 0.0,
                   float(np.mean([r.target_output_tokens for r in sent])) if sent else 0.0)
    ratio_in, ratio_out = _usage_ratios(records)
    isl, osl = lengths[0] * ratio_in, lengths[1] * ratio_out
    per_request = 1.0 / osl if osl > 0 else 0.0
    in_window = (times >= w0) & (times <= w1)
    cohort_records = [r for r in records if r.chunk_ns and w0 <= r.chunk_ns[0] <= w1 and r.error in (None, CANCELLED)]
    finished = [r for r in cohort_records if r.ok]
    return WindowStats(
        window_s=window_s,
        completed=len(finished),
        failed=sample.failed,
        errors_by_kind=sample.errors_by_kind,
        input_tokens=sum(_prompt_tokens(r) for r in finished),
        output_tokens=int(round(float(weights[in_window].sum()))),
        request_rate_rps=output_tok_s * per_request,
        input_tok_s=output_tok_s * per_request * isl,
        output_tok_s=output_tok_s,
        ttft_s=latency_stats(sample.ttft_s),
        tpot_s=latency_stats(sample.tpot_s),
        itl_s=latency_stats(gap for r in cohort_records for gap in itl_s(r)),
        e2e_s=latency_stats(sample.e2e_s),
        issued=sample.issued,
        output_tok_s_ci=_ci(output_ci),
        request_rate_rps_ci=_ci((output_ci[0] * per_request, output_ci[1] * per_request)),
        input_tok_s_ci=_ci((output_ci[0] * per_request * isl, output_ci[1] * per_request * isl)),
        measured_input_tok_s=float(sample.in_tokens.sum() / window_s),
        lengths_mean=(isl, osl),
        rate_source="flow",
    )
