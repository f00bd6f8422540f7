"""Window statistics and SLO verdicts: pure functions from request records to results.

Percentiles use numpy's default ('linear') method. An empty sample gives None, never 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from pricing.schema import LatencyStats, RequestRecord, SloTier, SloVerdict, WindowStats

NS_PER_S = 1e9
# Requests ended on purpose when the probe stops issuing (drain): never counted as errors.
CANCELLED = "cancelled"


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


def latency_stats(values: Iterable[float | None]) -> LatencyStats:
    sample = np.fromiter((v for v in values if v is not None), dtype=float)
    if sample.size == 0:
        return LatencyStats(count=0)
    p50, p90, p99 = np.percentile(sample, [50, 90, 99])
    return LatencyStats(
        count=int(sample.size),
        mean=float(sample.mean()),
        p50=float(p50),
        p90=float(p90),
        p99=float(p99),
        max=float(sample.max()),
    )


def _tokens_per_chunk(records: Sequence[RequestRecord]) -> float:
    """Mean tokens per output chunk of finished requests: converts chunks of cut-off requests to tokens."""
    tokens = sum(r.completion_tokens or 0 for r in records if r.ok and r.completion_tokens is not None)
    chunks = sum(len(r.chunk_ns) for r in records if r.ok and r.completion_tokens is not None)
    return tokens / chunks if chunks else 1.0


def window_stats(records: Sequence[RequestRecord], window_start_ns: int, window_end_ns: int) -> WindowStats:
    """Steady-state statistics over [window_start_ns, window_end_ns].

    Latencies come from requests that started after the window opened and finished before it
    closed. Throughput counts what happened inside the window whatever the request: completions
    per second, prompt tokens of requests whose first token arrived in it, and output tokens
    streamed in it. Counting only fully-contained requests would under-count by about
    (mean request duration / window) at high load.
    """
    w0, w1 = window_start_ns, window_end_ns
    window_s = max(w1 - w0, 1) / NS_PER_S
    inside = [r for r in records if r.ok and r.start_ns >= w0 and r.end_ns <= w1]
    failed = [r for r in records if r.error not in (None, CANCELLED) and w0 <= r.start_ns <= w1]

    completions = sum(1 for r in records if r.ok and w0 <= r.end_ns <= w1)
    prompt_tokens_in = sum(
        (r.prompt_tokens if r.prompt_tokens is not None else r.target_input_tokens)
        for r in records
        if r.chunk_ns and w0 <= r.chunk_ns[0] <= w1 and (r.ok or r.error == CANCELLED)
    )
    per_chunk = _tokens_per_chunk(records)
    output_tokens_in = 0.0
    for r in records:
        if not r.chunk_ns:
            continue
        in_window = sum(1 for t in r.chunk_ns if w0 <= t <= w1)
        if in_window:
            tokens = r.completion_tokens if r.completion_tokens is not None else len(r.chunk_ns) * per_chunk
            output_tokens_in += tokens * in_window / len(r.chunk_ns)

    return WindowStats(
        window_s=window_s,
        completed=len(inside),
        failed=len(failed),
        errors_by_kind=dict(Counter(r.error for r in failed if r.error)),
        input_tokens=sum(r.prompt_tokens or r.target_input_tokens for r in inside),
        output_tokens=sum(output_token_count(r) for r in inside),
        request_rate_rps=completions / window_s,
        input_tok_s=prompt_tokens_in / window_s,
        output_tok_s=output_tokens_in / window_s,
        ttft_s=latency_stats(ttft_s(r) for r in inside),
        tpot_s=latency_stats(tpot_s(r) for r in inside),
        itl_s=latency_stats(gap for r in inside for gap in itl_s(r)),
        e2e_s=latency_stats(e2e_s(r) for r in inside),
    )


def slo_verdicts(stats: WindowStats, tier: SloTier) -> list[SloVerdict]:
    """One verdict per limit; a missing latency sample fails (no evidence is not a pass)."""
    verdicts = []
    for metric, limit in (("ttft", tier.ttft_s), ("tpot", tier.tpot_s)):
        value = stats.latency(metric, tier.percentile)  # type: ignore[arg-type]
        verdicts.append(SloVerdict(metric=metric, value=value, limit=limit, passed=value is not None and value <= limit))
    verdicts.append(
        SloVerdict(
            metric="error_rate",
            value=stats.error_rate,
            limit=tier.max_error_rate,
            passed=stats.error_rate <= tier.max_error_rate and stats.completed > 0,
        )
    )
    return verdicts


def meets(stats: WindowStats, tier: SloTier) -> bool:
    return all(v.passed for v in slo_verdicts(stats, tier))
