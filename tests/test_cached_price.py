"""Three prices per tier (cost.split, cost.cached, cost.price_rows): input, cached input and
output recover the cost per request, hand-computed; the cached share measured from a
prefill-only session replay, or assumed; non-session workloads priced as before."""

from __future__ import annotations

import io
import json

import pytest
from fixtures.pricing_builders import PROBES_FILE, config_a, make_probe
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from pricing.cost.cached import cached_share
from pricing.cost.catalog import load_catalog
from pricing.cost.price_rows import price_records
from pricing.cost.split import (
    ASSUMED_CACHED_FRACTION,
    cached_fraction,
    cost_per_request_usd,
    effective_hourly_usd,
    prefill_split,
    ratio_split,
    split_prices,
)
from pricing.price import main
from pricing.results import SourcedProbe
from pricing.schema import DEFAULT_TIERS, ProbeRecord

CATALOG = load_catalog()
H100 = 2.99
BASELINE = DEFAULT_TIERS[0]


# ---------------------------------------------------------------------------------- the split
def test_cached_fraction_hand_computed():
    # fresh: 10,000 tok/s, each token 100 us; the replay: 25,000 tok/s with 80% cache hits, so
    # 40 us = 0.2 x 100 us + 0.8 x t_cached: a cached token takes 25 us, a quarter of a new one
    assert cached_fraction(10_000, 25_000, 0.8) == pytest.approx(0.25)
    assert cached_fraction(10_000, 10_000, 0.8) == pytest.approx(1.0)  # no faster: as dear as new
    assert cached_fraction(10_000, 60_000, 0.8) == 0.0  # faster than free: noise, clamped
    assert cached_fraction(10_000, 20_000, 0.0) is None


def test_prefill_split_with_a_cached_term_hand_computed():
    c, h_eff = 0.01, 36.0  # H_eff / 3600 = 0.01 USD/s
    # p_in = 0.01 / 1000 = 1e-5; p_cached = 0.25 x 1e-5; 600 input tokens of which 400 cached, 100 out
    r = prefill_split(c, h_eff, 600, 100, 1000.0, mean_cached=400, cached_frac=0.25)
    assert r.input_usd_per_tok == pytest.approx(1e-5) and r.cached_input_usd_per_tok == pytest.approx(2.5e-6)
    assert r.output_usd_per_tok == pytest.approx((0.01 - 200 * 1e-5 - 400 * 2.5e-6) / 100)  # 7e-5
    assert 200 * r.input_usd_per_tok + 400 * r.cached_input_usd_per_tok + 100 * r.output_usd_per_tok == pytest.approx(c)
    # the same request without its cache pays the whole input at p_in: less is left for output
    fresh = prefill_split(c, h_eff, 600, 100, 1000.0)
    assert fresh.output_usd_per_tok == pytest.approx((0.01 - 600 * 1e-5) / 100)
    assert fresh.output_usd_per_tok < r.output_usd_per_tok
    # input alone dearer than c: output clamps at 0, both input prices fall in proportion
    clamped = prefill_split(0.001, h_eff, 600, 100, 1000.0, mean_cached=400, cached_frac=0.25)
    assert clamped.output_usd_per_tok == 0.0 and clamped.input_usd_per_tok == pytest.approx(0.001 / 300)
    assert clamped.cached_input_usd_per_tok == pytest.approx(0.25 * 0.001 / 300) and clamped.warnings


def test_ratio_split_with_a_cached_term_hand_computed():
    # p_out = 4 p_in, p_cached = 0.1 p_in: 200 + 0.1 x 400 + 4 x 100 = 640 new-token equivalents
    r = ratio_split(0.0064, 600, 100, 4.0, mean_cached=400, cached_frac=0.1)
    assert r.input_usd_per_tok == pytest.approx(1e-5) and r.output_usd_per_tok == pytest.approx(4e-5)
    assert r.cached_input_usd_per_tok == pytest.approx(1e-6)


@settings(max_examples=150, deadline=None)
@given(rps=st.floats(0.01, 500), isl=st.integers(1, 32000), osl=st.integers(1, 8000), hit=st.floats(0, 1),
       frac=st.floats(0, 1), prefill_tok_s=st.one_of(st.none(), st.floats(10, 1e6)),
       split=st.sampled_from(["prefill", "ratio"]), ratio=st.floats(0.1, 20))
def test_three_prices_always_recover_cost(rps, isl, osl, hit, frac, prefill_tok_s, split, ratio):
    h_eff = effective_hourly_usd(3.0, 0.7, 0.2)
    c = cost_per_request_usd(h_eff, rps)
    cached = hit * isl
    r = split_prices(split, c, h_eff, isl, osl, ratio, prefill_tok_s, mean_cached=cached, cached_frac=frac)
    assert min(r.input_usd_per_tok, r.cached_input_usd_per_tok, r.output_usd_per_tok) >= 0
    assert r.cached_input_usd_per_tok == pytest.approx(frac * r.input_usd_per_tok)
    total = (isl - cached) * r.input_usd_per_tok + cached * r.cached_input_usd_per_tok + osl * r.output_usd_per_tok
    assert total == pytest.approx(c, rel=1e-9)


# ---------------------------------------------------------------------------------- price rows
def session_probes(hit_at_capacity: float = 0.6, replay_hit: float | None = 0.8) -> list[ProbeRecord]:
    """config_a's shape (Baseline capacity at c=16, 8 req/s; fresh prefill 40k tok/s there) replaying
    sessions: the cache served `hit_at_capacity` of the input at c=16; a prefill-only replay there ran
    100k tok/s with `replay_hit` of its tokens hits."""
    kw = dict(sessions=True, history_share=0.83)
    served = lambda hit: {"prefix_cache_window_hit_frac": hit} if hit is not None else None  # noqa: E731
    return [
        make_probe(rps=1.0, ttft=0.10, tpot=0.008, level=1, index=0, server_metrics=served(0.5), **kw),
        make_probe(rps=8.0, ttft=0.60, tpot=0.030, level=16, index=1, server_metrics=served(hit_at_capacity), **kw),
        make_probe(rps=12.0, ttft=2.00, tpot=0.060, level=64, index=2, server_metrics=served(0.6), **kw),
        make_probe(rps=8.4, ttft=1.20, tpot=0.032, level=17, index=3, server_metrics=served(0.6), **kw),
        make_probe(rps=80.0, kind="prefill", level=16, input_tok_s=40_000.0, index=4, **kw),
        make_probe(rps=200.0, kind="prefill_cached", level=16, input_tok_s=100_000.0, index=5,
                   server_metrics=served(replay_hit), **kw),
    ]


def test_session_rows_recover_cost_with_three_prices_hand_computed():
    row = price_records(session_probes(), [BASELINE], CATALOG)[0]
    c = H100 / (3600 * 8.0)
    p_in = H100 / 3600 / 40_000
    f = (40_000 / 100_000 - (1 - 0.8)) / 0.8  # 0.25: measured
    cached = 0.6 * 500  # the capacity probe's cache served 60% of its 500 input tokens
    p_out = (c - (500 - cached) * p_in - cached * f * p_in) / 100
    assert row.capacity_rps == 8.0 and row.profile == "synthetic (sessions, think x1)"
    assert (row.cached_source, row.cached_fraction, row.mean_cached_isl) == ("measured", pytest.approx(f), cached)
    assert row.cached_probe.endswith(":6") and row.cache_hit_frac == 0.6 and row.history_share == 0.83
    assert row.input_usd_per_mtok == pytest.approx(p_in * 1e6)
    assert row.cached_input_usd_per_mtok == pytest.approx(f * p_in * 1e6)
    assert row.output_usd_per_mtok == pytest.approx(p_out * 1e6)
    identity = (500 - cached) * row.input_usd_per_mtok + cached * row.cached_input_usd_per_mtok \
        + 100 * row.output_usd_per_mtok
    assert identity / 1e6 == pytest.approx(c)
    assert row.variants["on_demand"].cached_input_usd_per_mtok == pytest.approx(row.cached_input_usd_per_mtok)


def test_the_same_probes_as_independent_requests_are_priced_as_before():
    """Non-session workloads: the cached price is quoted (assumed) but cached input is 0, so input
    and output prices are config_a's, exactly."""
    plain = price_records(config_a(), [BASELINE], CATALOG)[0]
    assert plain.mean_cached_isl == 0.0 and plain.cached_source == "assumed"
    assert plain.cached_input_usd_per_mtok == pytest.approx(ASSUMED_CACHED_FRACTION * plain.input_usd_per_mtok)
    c = H100 / (3600 * 8.0)
    p_in = H100 / 3600 / 40000.0
    assert plain.input_usd_per_mtok == p_in * 1e6 and plain.output_usd_per_mtok == (c - 500 * p_in) / 100 * 1e6
    assert not any("cached" in w for w in plain.warnings)
    # the committed fixture file (written before sessions existed) prices as it did
    old = [SourcedProbe(ProbeRecord.model_validate_json(line), str(PROBES_FILE), i + 1)
           for i, line in enumerate(PROBES_FILE.read_text().splitlines())]
    assert all(not p.record.load.sessions for p in old)
    assert price_records(old, DEFAULT_TIERS, CATALOG)[0].output_usd_per_mtok == pytest.approx(plain.output_usd_per_mtok)
    # sessions cut the output price: the cache carries part of the input at a lower price
    session = price_records(session_probes(), [BASELINE], CATALOG)[0]
    assert session.output_usd_per_mtok > plain.output_usd_per_mtok  # same c, less of it charged to input


def test_the_cached_share_interval_follows_the_two_prefill_rates():
    probes = [SourcedProbe(p, "f.jsonl", i + 1) for i, p in enumerate(session_probes())]
    with_ci = lambda p, ci: SourcedProbe(p.record.model_copy(update={"stats": p.record.stats.model_copy(  # noqa: E731
        update={"input_tok_s_ci": ci})}), p.file, p.line)
    probes[4] = with_ci(probes[4], (36_000.0, 44_000.0))  # fresh prefill
    probes[5] = with_ci(probes[5], (90_000.0, 110_000.0))  # the replay
    share = cached_share(probes)
    assert share.source == "measured" and share.probe == "f.jsonl:6"
    assert share.low == pytest.approx((36_000 / 110_000 - 0.2) / 0.8)  # slow fresh, fast replay: cheapest
    assert share.high == pytest.approx((44_000 / 90_000 - 0.2) / 0.8)
    assert share.low < share.fraction < share.high


def test_the_cached_share_comes_from_the_replay_at_the_highest_load_for_every_tier():
    """A replay at c=4 that left the server idle (40k tok/s: a cached token as dear as a new one)
    beside the busy one at c=16 (100k): each tier's cached share is the busy pair's, 25%."""
    probes = session_probes()
    probes += [make_probe(rps=80.0, kind="prefill", level=4, input_tok_s=40_000.0, index=6, sessions=True),
               make_probe(rps=80.0, kind="prefill_cached", level=4, input_tok_s=40_000.0, index=7, sessions=True,
                          server_metrics={"prefix_cache_window_hit_frac": 0.8})]
    sourced = [SourcedProbe(p, "f.jsonl", i + 1) for i, p in enumerate(probes)]
    assert cached_share(sourced).fraction == pytest.approx(0.25)  # not the c=4 pair's 1.0
    rows = [row for row in price_records(probes, DEFAULT_TIERS, CATALOG) if row.feasible]
    assert len(rows) >= 2 and len({row.capacity_rps for row in rows}) >= 2  # tiers at different loads
    assert all(row.cached_fraction == pytest.approx(0.25) and row.cached_probe.endswith(":6") for row in rows)


def test_without_a_replay_the_cached_share_is_assumed_and_said():
    probes = [p for p in session_probes() if p.load.kind != "prefill_cached"]
    row = price_records(probes, [BASELINE], CATALOG)[0]
    assert row.cached_source == "assumed" and row.cached_fraction == ASSUMED_CACHED_FRACTION
    assert any("cached-input price assumed at 10%" in w for w in row.warnings)
    no_hits = price_records(session_probes(replay_hit=None), [BASELINE], CATALOG)[0]
    assert no_hits.cached_source == "assumed" and any("reported no prefix-cache hits" in w for w in no_hits.warnings)


def test_unscraped_hits_at_capacity_fall_back_to_the_history_share():
    probes = session_probes()
    probes[1] = probes[1].model_copy(update={"server_metrics": None})
    row = price_records(probes, [BASELINE], CATALOG)[0]
    assert row.mean_cached_isl == pytest.approx(0.83 * 500)
    assert any("not scraped at capacity" in w for w in row.warnings)


def test_matrix_and_json_show_the_cached_price(tmp_path):
    src = tmp_path / "sessions.jsonl"
    src.write_text("".join(p.model_dump_json() + "\n" for p in session_probes()))
    out, err = io.StringIO(), io.StringIO()
    code = main([str(src), "--tier", "Baseline", "--json", str(tmp_path / "p.json"), "--html", str(tmp_path / "r.html")],
                out=Console(file=out, width=220), err=Console(file=err, width=220))
    assert code == 0, err.getvalue()
    row = json.loads((tmp_path / "p.json").read_text())["rows"][0]
    text = out.getvalue()
    assert f"cached ${row['cached_input_usd_per_mtok']:.3g}" in text and "measured" in text
    assert "prefix cache served 60% of input" in text and "history 83%" in text
    page = (tmp_path / "r.html").read_text()
    assert "$ per 1M cached input tokens" in page
