"""95% intervals (measure.intervals) against samples whose distribution is known, and the
per-request table a probe keeps (measure.requests)."""

import math

import numpy as np
import pytest
from fixtures.pricing_builders import make_probe
from scipy import stats

from pricing.capacity.choice import fell_behind, tier_point
from pricing.capacity.curve import BIG
from pricing.measure.intervals import (
    percentile_interval,
    proportion_interval,
    rate_interval,
    variance_inflation,
)
from pricing.load.run_state import LoadRun
from pricing.measure.probe import measure_run, open_loop_rate
from pricing.measure.requests import (
    arrival_flow,
    arrival_rate,
    cohort,
    fell_behind_arrivals,
    latest_part,
    still_filling,
    table_from_records,
)
from pricing.results import SourcedProbe
from pricing.schema import CANCELLED, LoadSpec, RequestRecord, SloTier

TRUE_P90 = math.exp(0.5 * stats.norm.ppf(0.9))  # of exp(0.5 Z)


def _lognormal(n: int, rho: float, rng) -> np.ndarray:
    """exp(0.5 X) with X an AR(1) series of correlation rho: neighbours in time look alike."""
    e = rng.standard_normal(n)
    x = np.empty(n)
    x[0] = e[0]
    for i in range(1, n):
        x[i] = rho * x[i - 1] + math.sqrt(1 - rho * rho) * e[i]
    return np.exp(0.5 * x)


@pytest.mark.parametrize(("n", "rho"), [(100, 0.0), (300, 0.0), (300, 0.7)])
def test_p90_interval_covers_the_truth_95_percent_of_the_time(n, rho):
    rng = np.random.default_rng(7)
    covered = 0
    for _ in range(300):
        low, high = percentile_interval(_lognormal(n, rho, rng), 90)
        covered += low <= TRUE_P90 <= high
    assert covered / 300 >= 0.90  # 95% nominal; correlated samples are widened, not ignored


def test_a_correlation_longer_than_a_batch_still_widens_the_interval():
    """rho 0.95 decorrelates over ~40 samples, longer than a tenth of the 300: ten batches of 30
    alone covered 84% of these 300, with the autocorrelation sum 87%, with three and five
    batches too 93%."""
    rng = np.random.default_rng(7)
    covered = 0
    for _ in range(300):
        low, high = percentile_interval(_lognormal(300, 0.95, rng), 90)
        covered += low <= TRUE_P90 <= high
    assert covered / 300 >= 0.90


def test_correlation_widens_the_interval():
    rng = np.random.default_rng(3)
    iid, corr = _lognormal(400, 0.0, rng), _lognormal(400, 0.9, rng)
    assert variance_inflation((corr <= np.percentile(corr, 90)).astype(float)) > 2
    width = lambda x: np.subtract(*percentile_interval(x, 90)[::-1])  # noqa: E731
    assert width(corr) > width(iid)


def test_too_few_samples_leave_the_p90_unbounded_above():
    rng = np.random.default_rng(0)
    assert percentile_interval(rng.random(30), 90)[1] == math.inf
    assert math.isfinite(percentile_interval(rng.random(60), 90)[1])


def test_rate_interval_is_the_flow_and_batch_means():
    t = np.arange(0, 10_000, 10) * 1_000_000  # one event every 10 ms for 10 s
    rate, (low, high) = rate_interval(t, np.ones(t.size), 0, 10_000 * 1_000_000)
    assert rate == pytest.approx(100.0, rel=0.01) and low <= rate <= high and high - low < 2


def test_error_rate_interval_is_clopper_pearson():
    low, high = proportion_interval(0, 100)
    assert low == 0 and high == pytest.approx(1 - 0.025 ** (1 / 100))


def _rec(start, chunks, tokens=None, error=None):
    ms = 1_000_000
    return RequestRecord(start_ns=start * ms, chunk_ns=[c * ms for c in chunks],
                         end_ns=(chunks[-1] if chunks else start) * ms, completion_tokens=tokens,
                         prompt_tokens=10, target_input_tokens=10, target_output_tokens=len(chunks), error=error)


def test_cohort_follows_each_first_token_of_the_window_to_its_end():
    records = [
        _rec(0, [50, 60, 70], tokens=3),  # first token before the window: out
        _rec(900, [1100, 1200, 1300, 1400], tokens=4),  # TPOT over its whole life: 100 ms
        _rec(1900, [1950, 2200, 2450], tokens=3),  # ends in the tail: TPOT 250 ms, not cut at the window's end
        _rec(1980, [1990, 2010, 2030, 2050], error=CANCELLED),  # cut by the drain: 20 ms a chunk
        _rec(1500, [], error="http_500"),
    ]
    sample = cohort(table_from_records(records, 1000 * 1_000_000, 2000 * 1_000_000))
    assert sample.ttft_s.tolist() == pytest.approx([0.2, 0.05, 0.01])
    assert sorted(sample.tpot_s.tolist()) == pytest.approx([0.02, 0.1, 0.25])
    assert sample.failed == 1 and sample.errors_by_kind == {"http_500": 1} and sample.issued == 2


def test_an_open_loop_that_kept_up_serves_its_offered_rate_else_it_counts_its_arrivals():
    """A window of 2 s holding 3 request starts (1.5 req/s) and a server that kept up with them (as
    many in it at the close as at the opening). Offered 1.5 req/s: it served that, so the offered
    rate and the flows at the traffic's mean lengths, exact. Offered 2: fewer came than offered,
    so the 3 starts counted and the flows at that rate. Capped in flight, a queue outgrowing the
    arrivals, a batch swelling by 5% of them, or no mean lengths: the starts counted and the flows
    as measured."""

    records = [_rec(900, [950, 960], tokens=2), _rec(1000, [1100, 1200], tokens=2), _rec(2000, [2100, 2150], tokens=2),
               _rec(2999, [3100, 3200], tokens=2), _rec(3001, [3100, 3200], tokens=2)]
    table = table_from_records(records, 1000 * 1_000_000, 3000 * 1_000_000)
    assert arrival_rate(table) == pytest.approx(1.5)
    stats = make_probe(rps=9.0).stats.model_copy(update={"lengths_mean": (500.0, 100.0)})
    kept = open_loop_rate(stats, LoadSpec(mode="open", request_rate_rps=1.5), table)
    assert kept.rate_source == "offered" and kept.request_rate_rps == 1.5 and kept.request_rate_rps_ci == (1.5, 1.5)
    assert (kept.input_tok_s, kept.output_tok_s) == (750.0, 150.0) and kept.output_tokens == stats.output_tokens
    load = LoadSpec(mode="open", request_rate_rps=2.0)
    short = open_loop_rate(stats, load, table)
    assert short.rate_source == "arrivals" and short.request_rate_rps == pytest.approx(1.5)
    assert (short.input_tok_s, short.output_tok_s) == pytest.approx((750.0, 150.0))

    # 30 more arrivals late in the window, none admitted by its close: the queue outgrew the arrivals.
    behind = table_from_records(records + [_rec(2500 + 15 * i, [3500], tokens=1) for i in range(30)],
                                1000 * 1_000_000, 3000 * 1_000_000)
    # 200 arrivals served in 5 ms each but the last 10, still in the server at the close: 5% more in
    # it, within noise of not falling behind, but not surely keeping up.
    swelling = table_from_records([_rec(1000 + 10 * i, [1000 + 10 * i + 2, 1000 + 10 * i + 5] if i < 190 else [3500],
                                        tokens=2) for i in range(200)], 1000 * 1_000_000, 3000 * 1_000_000)
    assert not fell_behind_arrivals(swelling)
    as_swelling = LoadSpec(mode="open", request_rate_rps=arrival_rate(swelling))
    as_sent = LoadSpec(mode="open", request_rate_rps=arrival_rate(behind))
    for counted, table_of in ((open_loop_rate(stats, load.model_copy(update={"concurrency": 4}), table), table),
                              (open_loop_rate(stats, as_sent, behind), behind),
                              (open_loop_rate(stats, as_swelling, swelling), swelling),
                              (open_loop_rate(make_probe(rps=9.0).stats, load, table), table)):
        assert counted.rate_source == "arrivals" and counted.request_rate_rps == pytest.approx(arrival_rate(table_of))
        assert counted.output_tok_s == stats.output_tok_s  # the flows stay as measured
        assert counted.request_rate_rps_ci == arrival_flow(table_of)[1]
    assert open_loop_rate(stats, LoadSpec(mode="closed", concurrency=2), table) is stats


def test_a_client_that_sent_far_fewer_than_offered_says_so_and_counts_them():
    """200 Poisson arrivals at 10 req/s in 20 s where 20 req/s were offered: a starved client."""
    rng = np.random.default_rng(0)
    starts = np.cumsum(rng.exponential(100, 240)).astype(int)
    records = [_rec(int(t), [int(t) + 20, int(t) + 30], tokens=2) for t in starts]
    run = LoadRun(records, 1000 * 1_000_000, 21_000 * 1_000_000)
    result = measure_run(run, (10.0, 2.0), LoadSpec(mode="open", request_rate_rps=20.0))
    assert result.stats.rate_source == "arrivals" and result.stats.request_rate_rps == pytest.approx(10, rel=0.2)
    assert any("the client sent" in w and "20 offered" in w for w in result.warnings), result.warnings
    as_sent = LoadSpec(mode="open", request_rate_rps=result.stats.request_rate_rps)
    kept = measure_run(run, (10.0, 2.0), as_sent)
    assert kept.stats.rate_source == "offered" and not any("the client sent" in w for w in kept.warnings)


def test_an_open_loops_count_carries_the_poisson_noise_of_its_long_run_rate():
    """200 windows of 20 s of Poisson arrivals at 20 req/s (~400 each, 5% sd): the interval holds
    20 req/s in about 95% of them; evenly spaced arrivals have no such noise."""
    rng = np.random.default_rng(7)
    covered, widths = 0, []
    for _ in range(200):
        starts_ms = np.cumsum(rng.exponential(50.0, size=600))
        table = table_from_records([_rec(int(t), [int(t) + 1], tokens=1) for t in starts_ms], 0, 20_000 * 1_000_000)
        rate, (low, high) = arrival_flow(table)
        assert rate == arrival_rate(table)
        covered += low <= 20.0 <= high
        widths.append((high - low) / rate)
    assert 0.9 <= covered / 200 <= 0.99
    assert np.median(widths) == pytest.approx(2 * 1.96 / math.sqrt(400), rel=0.25)
    even = table_from_records([_rec(50 * i + 25, [50 * i + 26], tokens=1) for i in range(400)], 0, 20_000 * 1_000_000)
    low, high = arrival_flow(even)[1]
    assert (high - low) / arrival_rate(even) < 0.01


@pytest.mark.parametrize(("flow_high", "window_s", "behind"), [
    (900.0, 100.0, False),  # 10 req/s x 100 tokens asked for; 90% of it is within the slack
    (850.0, 100.0, True),
    (850.0, 5.0, False),  # an older record: its 5 s window with a 1 s E2E p90 still ramped up, 10%
])
def test_an_open_loop_that_fell_behind_its_arrivals_is_a_sure_fail(flow_high, window_s, behind):
    rec = make_probe(rps=10.0, window_s=window_s, ttft=1.0)  # E2E p90 1 s
    source = "flow" if window_s < 10 else "arrivals"  # a window opened by the first completion, or after warm-up
    stats = rec.stats.model_copy(update={"output_tok_s_ci": (800.0, flow_high), "lengths_mean": (500.0, 100.0),
                                         "rate_source": source})
    rec = rec.model_copy(update={"load": LoadSpec(mode="open", request_rate_rps=10.0), "stats": stats})
    assert fell_behind(rec, 10.0) is behind
    offered = rec.model_copy(update={"stats": stats.model_copy(update={"rate_source": "offered"})})
    assert not fell_behind(offered, 10.0)  # its flows were overwritten with the offered rate's



def _timed(ttft_ms_of, e2e_ms_of):
    """10 req/s from 5 s before a 20 s window to its close; request i arriving at t ms gets its
    first token after ttft_ms_of(t, i) and ends after e2e_ms_of(t, i)."""
    return [_rec(round(t), [round(t + ttft_ms_of(t, i)), round(t + e2e_ms_of(t, i))], tokens=2)
            for i, t in enumerate(np.arange(-5000, 20_000, 100.0))]


@pytest.mark.parametrize(("ttft_ms_of", "e2e_ms_of", "behind"), [
    (lambda t, i: 1000, lambda t, i: 2000, False),  # steady: 20 in the server at the opening and at the close
    # Heavy-tailed answers: every tenth lasts a minute, so the count in the server ramps up all
    # window (23 -> 43) while every request gets its first token at once: the server keeps up.
    (lambda t, i: 100, lambda t, i: 60_000 if i % 10 == 0 else 2000, False),
    # A full batch: requests queue for their first token longer and longer (1 -> 21 queued), the
    # count in the server grows by only 10% of the arrivals.
    (lambda t, i: 100 + 0.1 * max(t, 0), lambda t, i: 1100 + 0.1 * max(t, 0), True),
    # All admitted, the batch swells: each answer takes longer (20 -> 154 in the server).
    (lambda t, i: 100, lambda t, i: 2000 + 3 * max(t, 0), True),
])
def test_an_open_loop_fell_behind_when_its_queue_or_its_batch_grew(ttft_ms_of, e2e_ms_of, behind):
    """With per-request records the requests in the server and those queued for a first token
    decide, not the flow: a window's own mean OSL of a small heavy-tailed sample is no measure of
    what the arrivals asked for, and a count that ramps up with long answers is no fault."""
    table = table_from_records(_timed(ttft_ms_of, e2e_ms_of), 0, 20_000 * 1_000_000)
    rec = make_probe(rps=10.0, window_s=20.0)
    # A flow far below the arrivals' ask: the flow test alone would call it behind.
    stats = rec.stats.model_copy(update={"output_tok_s_ci": (10.0, 20.0), "lengths_mean": (500.0, 100.0),
                                         "rate_source": "arrivals"})
    rec = rec.model_copy(update={"load": LoadSpec(mode="open", request_rate_rps=10.0), "stats": stats})
    assert fell_behind(rec, 10.0, table) is behind
    assert fell_behind(rec, 10.0)  # no records: the flow says it


@pytest.mark.parametrize(("e2e_ms_of", "sure_fail"), [
    (lambda t: 2000, False),  # few arrivals, the server kept up: judged on what the window holds
    (lambda t: 2000 + 0.5 * max(t, 0), True),  # the server fell behind: a sure fail
])
def test_an_open_loop_window_short_of_arrivals_is_judged_on_what_it_holds(e2e_ms_of, sure_fail):
    records = [_rec(round(t), [round(t + e2e_ms_of(t) / 2), round(t + e2e_ms_of(t))], tokens=2)
               for t in np.arange(-5000, 20_000, 100.0)]
    table = table_from_records(records, 0, 20_000 * 1_000_000)
    rec = make_probe(rps=10.0, window_s=20.0)
    rec = rec.model_copy(update={"load": LoadSpec(mode="open", request_rate_rps=10.0), "abort": "window_not_filled",
                                 "stats": rec.stats.model_copy(update={"rate_source": "arrivals"})})
    tier = SloTier(name="Loose", ttft_s=1.0, tpot_s=0.05)
    point = tier_point(SourcedProbe(rec, requests=table), tier)
    assert (point.severity_low == BIG) is sure_fail  # a sure fail (by how much: its latest third's TTFT)
    if not sure_fail:
        assert point.severity == pytest.approx(max(1.0 / 1.0, 1.0 / 0.05))  # its requests' p90s (1 s apart) over the limits
    closed = rec.model_copy(update={"load": LoadSpec(mode="closed", concurrency=4)})
    assert tier_point(SourcedProbe(closed, requests=table), tier).severity == BIG  # a slow server


def test_a_probe_is_judged_by_its_per_request_records_not_by_the_p90s_its_line_stored():
    """The line's p90s were computed by the code of the day; the records recompute them by
    today's (a TTFT of 1 s each against a line that says 0.1 s)."""
    records = [_rec(round(t), [round(t + 1000), round(t + 1010)], tokens=2) for t in np.arange(-5000, 20_000, 250.0)]
    table = table_from_records(records, 0, 20_000 * 1_000_000)
    rec = make_probe(rps=4.0, window_s=20.0, ttft=0.1, tpot=0.01, level=4)
    tier = SloTier(name="T", ttft_s=0.5, tpot_s=0.05)
    assert tier_point(SourcedProbe(rec), tier).severity == pytest.approx(0.2)  # no records: the line's
    assert tier_point(SourcedProbe(rec, requests=table), tier).severity == pytest.approx(2.0)


def test_an_open_loop_capacity_is_at_the_offered_rate_not_the_windows_count():
    """10.5 arrivals a second counted in a window of Poisson arrivals at 10: the long run serves
    10. Session turns follow their sessions, so their count stands."""
    rec = make_probe(rps=10.5, window_s=20.0)
    rec = rec.model_copy(update={"load": LoadSpec(mode="open", request_rate_rps=10.0),
                                 "stats": rec.stats.model_copy(update={"rate_source": "arrivals"})})
    tier = SloTier(name="Loose", ttft_s=1.0, tpot_s=0.05)
    point = tier_point(SourcedProbe(rec), tier)
    assert (point.level, point.rate_rps, point.rate_low, point.rate_high) == (10.0, 10.0, 10.0, 10.0)
    sessions = rec.model_copy(update={"load": LoadSpec(mode="open", request_rate_rps=10.0, sessions=True)})
    assert tier_point(SourcedProbe(sessions), tier).rate_rps == pytest.approx(10.5)


def test_a_window_that_closed_still_filling_is_judged_on_its_latest_third_and_is_never_a_sure_pass():
    """10 req/s whose answers grow longer through the window (a batch that swells) read a TPOT p75
    under the limit over the whole window but not in its latest third; a steady server keeps
    its whole-window figures and a sure pass."""
    def probe(e2e_ms_of):
        records = [_rec(round(t), [round(t + 100 + k * (e2e_ms_of(t) - 100) / 9) for k in range(10)], tokens=10)
                   for t in np.arange(-5000, 20_000, 100.0)]
        table = table_from_records(records, 0, 20_000 * 1_000_000)
        rec = make_probe(rps=10.0, window_s=20.0)
        rec = rec.model_copy(update={"load": LoadSpec(mode="open", request_rate_rps=10.0),
                                     "stats": rec.stats.model_copy(update={"rate_source": "arrivals"})})
        return table, SourcedProbe(rec, requests=table)

    tier = SloTier(name="T", ttft_s=1.0, tpot_s=0.95, percentile=75)  # not stored: read from the table
    steady_table, steady = probe(lambda t: 2000)
    swelling_table, swelling = probe(lambda t: 2000 + 0.4 * max(t, 0))  # TPOT 0.21 s -> 1.1 s
    assert not still_filling(steady_table) and still_filling(swelling_table)
    assert len(cohort(latest_part(swelling_table)).ttft_s) == 67  # first tokens in the last 6.67 s
    whole = np.percentile(cohort(swelling_table).tpot_s, 75)
    assert whole < 0.95 < np.percentile(cohort(latest_part(swelling_table)).tpot_s, 75)
    point = tier_point(swelling, tier)
    assert point.severity > 1 and point.severity_high == BIG  # its latest third fails; nothing sure about it
    calm = tier_point(steady, tier)
    assert calm.severity < 1 and calm.severity_high < 1  # a sure pass
    # The same steady window, opened at the warm-up's cap: not known to be steady, so not sure.
    capped = SourcedProbe(steady.record.model_copy(update={"warmup_capped": True}), requests=steady_table)
    assert tier_point(capped, tier).severity < 1 and tier_point(capped, tier).severity_high == BIG
