import pytest

from pricing.measure.slo import meets, slo_verdicts
from pricing.measure.window import itl_s, latency_stats, tpot_s, ttft_s, window_stats
from pricing.schema import CANCELLED, RequestRecord, SloTier

MS = 1_000_000


def rec(start_ms, chunks_ms, end_ms=None, tokens=None, prompt=100, error=None):
    return RequestRecord(
        start_ns=start_ms * MS,
        chunk_ns=[c * MS for c in chunks_ms],
        end_ns=(end_ms if end_ms is not None else (chunks_ms[-1] if chunks_ms else start_ms)) * MS,
        prompt_tokens=prompt,
        completion_tokens=tokens if tokens is not None else len(chunks_ms),
        target_input_tokens=prompt,
        target_output_tokens=len(chunks_ms),
        error=error,
    )


def test_ttft_tpot_itl_definitions():
    r = rec(0, [100, 110, 130, 160])
    assert ttft_s(r) == pytest.approx(0.100)
    assert tpot_s(r) == pytest.approx(0.060 / 3)
    assert itl_s(r) == pytest.approx([0.010, 0.020, 0.030])
    # invariant: the ITL gaps add up to last chunk - first chunk
    assert sum(itl_s(r)) == pytest.approx((r.chunk_ns[-1] - r.chunk_ns[0]) / 1e9)


def test_tpot_uses_server_token_count_not_chunk_count():
    r = rec(0, [100, 160], tokens=7)  # 7 tokens arrived in 2 chunks
    assert tpot_s(r) == pytest.approx(0.060 / 6)
    assert tpot_s(rec(0, [100])) is None


def test_empty_sample_is_none_not_zero():
    s = latency_stats([])
    assert s.count == 0 and s.p90 is None and s.mean is None


def test_window_cohort_is_every_first_token_in_the_window_followed_to_its_end():
    records = [
        rec(0, [50, 60], end_ms=60),  # first token before the window: not in the cohort
        rec(1000, [1100, 1200], end_ms=1200),  # inside
        rec(1500, [1600, 1700, 1800], end_ms=1800),  # inside
        rec(1900, [1950, 2050], end_ms=2050),  # first token inside, ends in the tail: in, whole
        rec(1950, [], error="http_500"),  # failed inside
        rec(1990, [1995], error=CANCELLED, tokens=None),  # cut at the drain: its TTFT counts, not an error
    ]
    s = window_stats(records, 1000 * MS, 2000 * MS)
    assert s.completed == 3
    assert s.failed == 1 and s.errors_by_kind == {"http_500": 1}
    assert s.ttft_s.count == 4 and s.ttft_s.mean == pytest.approx((0.1 + 0.1 + 0.05 + 0.005) / 4)
    assert s.tpot_s.count == 3 and s.tpot_s.p50 == pytest.approx(0.1)
    # output tokens streamed inside: 2 + 3 + 1 (half of the straddling one) + 1 (cancelled)
    assert s.output_tok_s == pytest.approx(7.0) and s.output_tokens == 7
    # requests/s = token flow / mean output length asked for (targets of the requests sent: 2, 2, 3, 2, 1)
    assert s.lengths_mean == pytest.approx((100.0, 2.0))
    assert s.request_rate_rps == pytest.approx(7.0 / 2.0)
    assert s.input_tok_s == pytest.approx(7.0 / 2.0 * 100)
    assert s.measured_input_tok_s == pytest.approx(400.0)  # four first tokens in a 1 s window
    assert s.input_tokens == 300
    assert s.issued == 4 and s.error_rate == pytest.approx(1 / 4)


def test_request_rate_uses_the_population_lengths_and_the_servers_token_counts():
    """The flow over the profile's mean OSL, scaled by what the server counted over what was
    asked (a chat template adds tokens): a window of unlucky long requests does not bias it."""
    records = [rec(k * 100, [k * 100 + 10 + i for i in range(50)], tokens=55, prompt=110) for k in range(30)]
    for r in records:
        r.target_output_tokens, r.target_input_tokens = 50, 100
    s = window_stats(records, 500 * MS, 2500 * MS, lengths=(400.0, 20.0))
    assert s.lengths_mean == pytest.approx((440.0, 22.0))
    assert s.request_rate_rps == pytest.approx(s.output_tok_s / 22.0)
    assert s.input_tok_s == pytest.approx(s.request_rate_rps * 440.0)
    low, high = s.request_rate_rps_ci
    assert low <= s.request_rate_rps <= high


def test_shortened_warm_up_requests_do_not_count_in_the_mean_length_sent():
    """A closed loop's first requests ask for (i+1)/N of their output (to desynchronise the
    slots) and end before the window opens; with no population lengths given, the request rate
    is the flow over the mean output of the steady state's requests (4 slots, 50 ms to the
    first token and 10 ms a token after: one 32-token request per 0.36 s per slot)."""
    n, tokens = 4, 32
    records = []
    for slot in range(n):
        t = slot
        for osl in [round(tokens * (slot + 1) / n)] + [tokens] * 19:
            records.append(rec(t, [t + 50 + 10 * i for i in range(osl)]))  # asks for its length
            t = records[-1].end_ns // MS
    w0 = max(r.end_ns for r in records[::20])  # every slot's first request has ended
    s = window_stats(sorted(records, key=lambda r: r.start_ns), w0, w0 + 4000 * MS)
    assert s.lengths_mean[1] == pytest.approx(32.0)
    assert s.request_rate_rps == pytest.approx(n / 0.36, rel=0.02)
    assert s.output_tok_s == pytest.approx(n * tokens / 0.36, rel=0.02)


def test_lockstep_closed_loop_rates_do_not_depend_on_where_the_window_falls():
    """16 equal requests in lockstep, one round per 3.3 s (0.3 s prefill, then 300 tokens): a
    15 s window holds 4 or 5 rounds of completions depending on its phase; the rates must not."""
    n, period_ms, tokens = 16, 3300, 300
    step = (period_ms - 300) / tokens
    records = [
        rec(k * period_ms, [k * period_ms + 300 + round(i * step) for i in range(tokens)], prompt=1800)
        for k in range(12) for _ in range(n)
    ]
    true_rps = n / (period_ms / 1000)
    rates, counts = [], []
    for phase_ms in range(0, period_ms, 300):
        w0 = (5000 + phase_ms) * MS
        s = window_stats(records, w0, w0 + 15_000 * MS)
        rates.append(s.request_rate_rps)
        counts.append(sum(1 for r in records if w0 <= r.end_ns <= w0 + 15_000 * MS) / 15)
        assert s.input_tok_s == pytest.approx(s.request_rate_rps * 1800)
    assert max(counts) / min(counts) > 1.2  # counting completions would swing by a whole round
    assert rates == pytest.approx([true_rps] * len(rates), rel=0.03)


def test_slo_verdicts_pass_fail_and_missing_sample_fails():
    records = [rec(0, [100 + i, 110 + i, 120 + i], end_ms=130 + i) for i in range(10)]
    s = window_stats(records, 0, 1000 * MS)
    assert meets(s, SloTier(name="t", ttft_s=0.2, tpot_s=0.02))
    verdicts = {v.metric: v for v in slo_verdicts(s, SloTier(name="t", ttft_s=0.05, tpot_s=0.02))}
    assert not verdicts["ttft"].passed and verdicts["ttft"].margin < 0
    assert verdicts["tpot"].passed
    empty = window_stats([], 0, 1000 * MS)
    assert not meets(empty, SloTier(name="t", ttft_s=10, tpot_s=10))
