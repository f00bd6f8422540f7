"""Pricer: hand-computed prices, tiers and capacity, splits, the seed convention, bad input, CLI."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.pricing_builders import (
    PAIRS,
    PROBES_FILE,
    SEED_FILE,
    config_a,
    config_b,
    make_probe,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from pricing.capacity.choice import nearest_probe
from pricing.cost.catalog import load_catalog
from pricing.cost.price_rows import PricesFile, PricingParams, price_records
from pricing.cost.seed_prices import seed_revenue_usd_s
from pricing.cost.split import cost_per_request_usd, effective_hourly_usd, split_prices
from pricing.errors import InputError
from pricing.measure.slo import parse_tiers
from pricing.price import main
from pricing.results import SourcedProbe, load_records
from pricing.schema import DEFAULT_TIERS, SloTier

ROOT = Path(__file__).resolve().parents[1]
CATALOG = load_catalog()
H100, L4 = 2.99, 0.71  # packaged on-demand rates the hand computations use
BASELINE, FAST, INSTANT = DEFAULT_TIERS


def rows_by(rows):
    return {(r.gpu_name, r.tier.name): r for r in rows}


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=Console(file=out, width=220), err=Console(file=err, width=220, soft_wrap=True))
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- hand-computed prices
def test_prefill_split_hand_computed():
    row = rows_by(price_records(config_a(), DEFAULT_TIERS, CATALOG))["H100-SXM", "Baseline"]
    c = H100 / (3600 * 8.0)  # capacity: the c=16 probe, 8 req/s
    p_in = H100 / 3600 / 40000.0  # the prefill probe at c=16: 40k input tok/s
    p_out = (c - 500 * p_in) / 100
    assert row.capacity_rps == 8.0 and row.load_level == 16
    assert row.cost_usd_per_request == pytest.approx(c)
    assert row.input_usd_per_mtok == pytest.approx(p_in * 1e6)  # 0.02076
    assert row.output_usd_per_mtok == pytest.approx(p_out * 1e6)  # 0.93437
    assert row.split_used == "prefill" and row.cost_recovering and row.prefill_probe.endswith(":6")
    costs = sorted(i * p_in + o * p_out for i, o in PAIRS)
    assert row.usd_per_request_p50 == pytest.approx((costs[1] + costs[2]) / 2)
    assert row.usd_per_request_p99 == pytest.approx(costs[2] + 0.97 * (costs[3] - costs[2]))
    assert row.tok_s_per_usd_h == pytest.approx((4000 + 800) / H100)
    assert 500 * row.input_usd_per_mtok + 100 * row.output_usd_per_mtok == pytest.approx(c * 1e6)


def test_capacity_choice_and_failure_reasons():
    rows = rows_by(price_records(config_a() + config_b(), DEFAULT_TIERS, CATALOG))
    assert [rows["H100-SXM", t.name].capacity_rps for t in DEFAULT_TIERS] == [8.0, 3.0, 1.0]
    assert rows["L4", "Baseline"].capacity_rps == 2.0
    assert rows["L4", "Fast"].reason == "no probe meets TPOT p90 <= 16.7 ms; best 20 ms"
    assert rows["L4", "Instant"].reason == "no probe meets TTFT p90 <= 0.25 s; best 0.41 s"


def test_error_rate_and_missing_latency_fail_the_tier():
    probes = [make_probe(rps=2.0, level=2), make_probe(rps=5.0, level=4, failed=50),  # 9% errors
              make_probe(rps=9.0, level=8, ttft=None)]  # no latency sample
    row = price_records(probes, [BASELINE], CATALOG, PricingParams(split="ratio"))[0]
    # c=4 fails by its errors, by how much unknown: the capacity lies between c=2 and c=4.
    assert row.load_level == 3 and 2.0 < row.capacity_rps < 5.0
    only_errors = price_records([make_probe(rps=5.0, failed=50)], [BASELINE], CATALOG)[0]
    assert not only_errors.feasible and only_errors.reason.startswith("no probe meets error rate <= 1.0%; best 9.")
    no_sample = price_records([make_probe(rps=5.0, ttft=None)], [BASELINE], CATALOG)[0]
    assert not no_sample.feasible and "TTFT" in no_sample.reason


def test_not_jointly_met_reason():
    probes = [make_probe(rps=1.0, ttft=0.1, tpot=0.2, level=1), make_probe(rps=2.0, ttft=2.0, tpot=0.01, level=2)]
    row = price_records(probes, [BASELINE], CATALOG)[0]
    assert not row.feasible and row.reason.startswith("no probe meets TTFT, TPOT and errors at once")


def test_cheapest_marked_per_tier():
    rows = rows_by(price_records(config_a() + config_b(), DEFAULT_TIERS, CATALOG))
    # L4 Baseline: (0.71 + 70 W x 0.083 $/kWh) / (3600 x 2) < H100: 2.99 / (3600 x 8)
    assert rows["L4", "Baseline"].cheapest and not rows["H100-SXM", "Baseline"].cheapest
    assert rows["H100-SXM", "Fast"].cheapest and rows["H100-SXM", "Instant"].cheapest
    assert not rows["L4", "Fast"].cheapest


def test_text_prompt_probes_are_priced_apart_from_token_id_probes():
    """Same config and profile, prompts sent as text: the server tokenizes, so another workload."""
    text = [p.model_copy(update={"load": p.load.model_copy(update={"prompts": "text"})}) for p in config_a()]
    for i in (2, 7):  # c=16 and c=5 miss Baseline's TTFT as text
        text[i] = text[i].model_copy(update={"stats": text[i].stats.model_copy(update={"ttft_s": text[3].stats.ttft_s})})
    rows = price_records(config_a() + text, [BASELINE], CATALOG)
    by_workload = {r.profile: r for r in rows}
    assert set(by_workload) == {"synthetic", "synthetic (text)"}
    # Text's c=5 and c=16 probes miss Baseline's TTFT, so its capacity falls to c=4's 3 rps.
    assert by_workload["synthetic"].capacity_rps == pytest.approx(8.0)
    assert by_workload["synthetic (text)"].capacity_rps == pytest.approx(3.0)


# ----------------------------------------------------------------------------- splits
def test_ratio_split_and_utilization_margin():
    params = PricingParams(split="ratio", ratio=3.0, utilization=0.5, margin=0.2)
    row = rows_by(price_records(config_a(), [FAST], CATALOG, params))["H100-SXM", "Fast"]
    c = H100 / 0.5 * 1.2 / (3600 * 3.0)
    p_in = c / (500 + 3.0 * 100)
    assert row.effective_hourly_cost_usd == pytest.approx(H100 / 0.5 * 1.2)
    assert row.input_usd_per_mtok == pytest.approx(p_in * 1e6)
    assert row.output_usd_per_mtok == pytest.approx(3 * p_in * 1e6)


def test_prefill_falls_back_to_ratio_with_warning_and_energy():
    row = rows_by(price_records(config_b(), [BASELINE], CATALOG, PricingParams(energy_cost=True)))["L4", "Baseline"]
    energy_usd_h = 70 / 1000 * CATALOG.regions["us-average"].usd_per_kwh
    c = (L4 + energy_usd_h) / (3600 * 2.0)
    assert row.split == "prefill" and row.split_used == "ratio"
    assert any("FALLBACK" in w and "no prefill probe" in w for w in row.warnings)
    assert row.energy_usd_h == pytest.approx(energy_usd_h)
    assert row.input_usd_per_mtok == pytest.approx(c / (500 + 4 * 100) * 1e6)
    kwh_req = 0.070 / (3600 * 2.0)
    e = row.energy
    assert 500 * e.input_kwh_per_mtok + 100 * e.output_kwh_per_mtok == pytest.approx(kwh_req * 1e6)
    assert e.output_kwh_per_mtok == pytest.approx(kwh_req * 4 / 900 * 1e6)
    assert e.output_gco2e_per_mtok["eu-france"] == pytest.approx(e.output_kwh_per_mtok * 56)
    no_energy = price_records(config_b(), [BASELINE], CATALOG)[0]  # default: cloud rates include power
    assert no_energy.hourly_cost_usd == pytest.approx(L4)


def test_prefill_clamps_output_at_zero():
    probes = [make_probe(rps=8.0, level=16), make_probe(rps=1.0, kind="prefill", level=16, input_tok_s=1000.0)]
    row = price_records(probes, [BASELINE], CATALOG)[0]  # 500 tokens at 1000 tok/s cost more than c
    assert row.output_usd_per_mtok == 0.0
    assert row.input_usd_per_mtok == pytest.approx(H100 / (3600 * 8.0) / 500 * 1e6)
    assert any("clamped to 0" in w for w in row.warnings)


def test_seed_split_on_probes_is_labelled_and_paired_with_recovering():
    row = price_records(config_a(), [BASELINE], CATALOG, PricingParams(split="seed"))[0]
    assert not row.cost_recovering and row.split_used == "seed"
    assert row.input_usd_per_mtok == pytest.approx(H100 / 3600 / 4000 * 1e6)
    assert row.output_usd_per_mtok == pytest.approx(H100 / 3600 / 800 * 1e6)
    default = price_records(config_a(), [BASELINE], CATALOG)[0]
    assert row.recovering.input_usd_per_mtok == pytest.approx(default.input_usd_per_mtok)
    assert row.recovering.output_usd_per_mtok == pytest.approx(default.output_usd_per_mtok)


def test_pricing_tier_variants_replicas_and_hourly_rate():
    row = price_records(config_a(), [BASELINE], CATALOG)[0]
    assert set(row.variants) == {"on_demand", "spot", "reserved_1y", "reserved_3y"}
    spot = CATALOG.gpus["H100-SXM"].spot.usd_per_gpu_h
    assert row.variants["spot"].output_usd_per_mtok == pytest.approx(row.output_usd_per_mtok * spot / H100)
    spot_row = price_records(config_a(), [BASELINE], CATALOG, PricingParams(pricing_tier="spot"))[0]
    assert spot_row.output_usd_per_mtok == pytest.approx(row.variants["spot"].output_usd_per_mtok)
    two = price_records(config_a(), [BASELINE], CATALOG, PricingParams(replicas=2))[0]
    assert two.capacity_rps == 16.0 and two.hourly_cost_usd == pytest.approx(2 * H100)
    assert two.output_usd_per_mtok == pytest.approx(row.output_usd_per_mtok)
    fixed = price_records(config_a(), [BASELINE], CATALOG, PricingParams(hourly_rate_usd=1.0))[0]
    assert fixed.output_usd_per_mtok == pytest.approx(row.output_usd_per_mtok / H100)
    assert set(fixed.variants) == {"hourly_rate"}
    tp2 = [make_probe(rps=8.0, gpu_count=2, tp=2)]
    assert price_records(tp2, [BASELINE], CATALOG)[0].hourly_cost_usd == pytest.approx(2 * H100)


@settings(max_examples=150, deadline=None)
@given(
    rps=st.floats(0.01, 500), rate=st.floats(0.01, 100), isl=st.integers(1, 32000), osl=st.integers(1, 8000),
    prefill_tok_s=st.one_of(st.none(), st.floats(10, 1e6)), split=st.sampled_from(["prefill", "ratio"]),
    ratio=st.floats(0.1, 20), utilization=st.floats(0.05, 1), margin=st.floats(0, 2),
)
def test_prices_always_recover_cost(rps, rate, isl, osl, prefill_tok_s, split, ratio, utilization, margin):
    h_eff = effective_hourly_usd(rate, utilization, margin)
    c = cost_per_request_usd(h_eff, rps)
    result = split_prices(split, c, h_eff, isl, osl, ratio, prefill_tok_s)
    assert result.cost_recovering and result.input_usd_per_tok >= 0 and result.output_usd_per_tok >= 0
    assert isl * result.input_usd_per_tok + osl * result.output_usd_per_tok == pytest.approx(c, rel=1e-3)


@settings(max_examples=40, deadline=None)
@given(rps=st.floats(0.1, 50), isl=st.integers(1, 4000), osl=st.integers(1, 2000), prefill=st.booleans(),
       split=st.sampled_from(["prefill", "ratio"]))
def test_price_rows_recover_cost(rps, isl, osl, prefill, split):
    probes = [make_probe(rps=rps, isl=isl, osl=osl, window_s=1000.0, level=4)]
    if prefill:
        probes.append(make_probe(rps=rps, isl=isl, osl=osl, window_s=1000.0, kind="prefill", level=4,
                                 input_tok_s=rps * isl * 3))
    row = price_records(probes, [BASELINE], CATALOG, PricingParams(split=split))[0]
    total = row.mean_isl * row.input_usd_per_mtok + row.mean_osl * row.output_usd_per_mtok
    assert total / 1e6 == pytest.approx(row.cost_usd_per_request, rel=1e-3)


# ----------------------------------------------------------------------------- seed files
def test_seed_convention_reproduced_and_collects_twice_c(tmp_path):
    out = tmp_path / "prices.json"
    code, _, _ = run_cli(str(SEED_FILE), "--split", "seed", "--hourly-rate", "5", "--json", str(out))
    assert code == 0
    rows = {(r.scheme, r.tier.name): r for r in PricesFile.model_validate_json(out.read_text()).rows}
    fp8 = rows["fp8", "Baseline"]  # batch 32 is the highest output_tps meeting 1 s / 50 ms (means)
    assert fp8.load_level == 32 and not fp8.cost_recovering
    assert fp8.input_usd_per_mtok == pytest.approx(5 / 3600 / 15000 * 1e6)  # 0.0926
    assert fp8.output_usd_per_mtok == pytest.approx(5 / 3600 / 800 * 1e6)  # 1.736
    assert seed_revenue_usd_s(fp8, 15000, 800) == pytest.approx(2 * 5 / 3600)  # twice C
    assert seed_revenue_usd_s(fp8.recovering, 15000, 800) == pytest.approx(5 / 3600)  # ours: C
    assert fp8.recovering.output_usd_per_mtok == pytest.approx(4 * fp8.recovering.input_usd_per_mtok)
    assert rows["fp8", "Fast"].load_level == 8 and rows["fp8", "Instant"].load_level == 1
    assert not rows["base", "Fast"].cheapest and rows["fp8", "Fast"].cheapest


def test_seed_file_default_split_is_recovering_with_fallback_label():
    code, out, err = run_cli(str(SEED_FILE))
    assert code == 0 and "FALLBACK" in out and "seed files have no prefill probe" in err


# ----------------------------------------------------------------------------- bad input
def _probe_line(**changes) -> dict:
    obj = json.loads(config_a()[0].model_dump_json())
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        target = obj
        for key in path:
            target = target[key]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return obj


BAD_FILES = {
    "malformed_json": (lambda: [json.dumps(_probe_line()), '{"run_id": "x",,}'], ":2:", "malformed JSON"),
    "missing_field": (lambda: [json.dumps(_probe_line(stats__completed=None))], ":1:", "stats.completed"),
    "unknown_gpu": (lambda: [json.dumps(_probe_line(config__gpu_name="H300"))], ":1:", "config.gpu_name"),
    "mixed_versions": (lambda: [json.dumps(_probe_line()), json.dumps(_probe_line(schema_version=1))], ":2:",
                       "schema_version"),
    "unknown_version": (lambda: [json.dumps(_probe_line(schema_version=3))], ":1:", "schema_version"),
    "empty": (lambda: [], ":1:", "empty file"),
    "bad_seed": (lambda: ['{"id": "fp8", "measurements": [{"batch_size": 1}]}'], ":1:", "id"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_is_one_clear_line(tmp_path, case):
    lines, where, field = BAD_FILES[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_text("\n".join(lines()) + ("\n" if lines() else ""))
    code, out, err = run_cli(str(path))
    assert code == 2 and out == ""
    assert f"{path}{where}" in err and field in err and "Traceback" not in err
    if case == "unknown_gpu":
        assert "H100-SXM" in err and "--catalog" in err


def test_keep_going_prices_the_other_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    code, out, err = run_cli(str(bad), str(PROBES_FILE))
    assert code == 2 and "1xH100-SXM" not in out and "--keep-going" in err
    code, out, err = run_cli(str(bad), str(PROBES_FILE), "--keep-going")
    assert code == 2 and "1xH100-SXM" in out and f"{bad}:1:" in err


def test_subprocess_never_prints_a_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_probe_line(config__gpu_name="H300")) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pricing.price", str(bad), str(PROBES_FILE), "--keep-going",
                           "--tier", "Baseline"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert f"{bad}:1: config.gpu_name: unknown GPU 'H300'" in proc.stderr
    assert "Baseline" in proc.stdout and "Fast" not in proc.stdout


def test_bad_flags_and_tiers():
    code, _, err = run_cli(str(PROBES_FILE), "--utilization", "1.5")
    assert code == 2 and "--utilization" in err
    code, _, err = run_cli(str(PROBES_FILE), "--tier", "Turbo")
    assert code == 2 and "unknown tier" in err
    code, _, err = run_cli(str(PROBES_FILE), "--region", "mars")
    assert code == 2 and "unknown region" in err
    assert parse_tiers(["fast", "Custom:0.8:0.03:99"]) == (
        FAST, SloTier(name="Custom", ttft_s=0.8, tpot_s=0.03, percentile=99))
    with pytest.raises(InputError, match="ttft_s"):
        parse_tiers(["Bad:-1:0.03"])


def test_load_records_collects_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    records, errors = load_records([PROBES_FILE, missing])
    assert len(records) == 12 and all(isinstance(r, SourcedProbe) for r in records)
    assert len(errors) == 1 and errors[0].file == str(missing) and "no such file" in str(errors[0])


def test_cli_matrix_and_json(tmp_path):
    out_json = tmp_path / "p.json"
    code, out, _ = run_cli(str(PROBES_FILE), "--json", str(out_json))
    assert code == 0 and "★ cheapest" in out and "Definitions: split prefill" in out
    assert "no probe meets TTFT p90 <= 0.25 s; best 0.41 s" in out
    doc = PricesFile.model_validate_json(out_json.read_text())
    assert len(doc.rows) == 6 and doc.params.split == "prefill"


def test_prices_recover_the_hourly_cost_at_the_window_token_rates():
    """Requests wholly inside a short window over-represent short ones; prices must follow the
    window's token flows, so that selling those flows pays exactly the hourly cost."""
    probe = make_probe(rps=4.0, isl=1000, osl=200, window_s=20.0, level=8)
    skewed = probe.model_copy(update={"stats": probe.stats.model_copy(update={"output_tokens": probe.stats.completed * 120})})
    row = price_records([skewed], [BASELINE], CATALOG, PricingParams(split="ratio"))[0]
    revenue_per_s = (skewed.stats.input_tok_s * row.input_usd_per_mtok + skewed.stats.output_tok_s * row.output_usd_per_mtok) / 1e6
    assert revenue_per_s == pytest.approx(row.effective_hourly_cost_usd / 3600)
    assert (row.mean_isl, row.mean_osl) == pytest.approx((1000, 200))


def test_capacity_without_a_failing_probe_above_is_a_lower_bound(capsys):
    open_ended = [make_probe(rps=2.0, level=2), make_probe(rps=5.0, level=8, index=1)]
    row = price_records(open_ended, [BASELINE], CATALOG)[0]
    assert row.capacity_lower_bound and any("lower bound" in w for w in row.warnings)
    bounded = open_ended + [make_probe(rps=6.0, level=16, ttft=3.0, index=2)]
    assert not price_records(bounded, [BASELINE], CATALOG)[0].capacity_lower_bound


def test_a_file_torn_by_a_crash_prices_with_a_warning_naming_the_line(tmp_path):
    torn = tmp_path / "torn.jsonl"
    lines = PROBES_FILE.read_text().splitlines()
    torn.write_text("\n".join(lines) + "\n" + lines[0][:57])  # the crash cut the last line short
    code, out, err = run_cli(str(torn))
    assert code == 0 and "1xH100-SXM" in out
    assert f"warning: {torn}:{len(lines) + 1}: torn last line skipped" in err and "error" not in err
    assert out == run_cli(str(PROBES_FILE))[1], "the torn line changes nothing"


def test_keep_going_skips_each_bad_record_with_one_line_and_prices_the_rest(tmp_path):
    lines = PROBES_FILE.read_text().splitlines()
    bad_window = json.dumps(_probe_line(stats__window_s=-15))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join([lines[0], bad_window, *lines[1:], "{not json"]) + "\n")
    code, out, err = run_cli(str(mixed))
    assert code == 2 and out == "" and f"{mixed}:2: stats.window_s: Input should be greater than 0" in err
    code, out, err = run_cli(str(mixed), "--keep-going")
    assert code == 2 and "1xH100-SXM" in out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {mixed}:2: stats.window_s: Input should be greater than 0 (got -15)",
                      f"error: {mixed}:{len(lines) + 2}: malformed JSON at column 2: Expecting property name "
                      "enclosed in double quotes"]
    # The rest priced exactly as the clean file.
    assert out == run_cli(str(PROBES_FILE))[1]


def test_energy_and_lengths_come_from_a_probe_that_measured_something():
    """An unfilled window at the capacity's load (0 requests, 0 J) stands aside for the nearest
    probe that measured: priced from it, Baseline's output cost 0 kWh per 1M tokens."""
    empty = make_probe(rps=0.0, ttft=None, tpot=None, level=4, index=3, gpu="L4", energy_j=0.0)
    empty = empty.model_copy(update={"abort": "window_not_filled"})
    probes = [SourcedProbe(p, "f.jsonl", i + 1) for i, p in enumerate([empty, *config_b()])]
    assert nearest_probe(probes, "closed", 4.0).line == 3  # config_b's c=4, not the empty one (line 1)
    assert nearest_probe(probes[:1], "closed", 4.0).line == 1  # alone, it is all there is


def test_a_limit_where_latency_barely_rises_with_load_says_why_its_interval_is_wide():
    """Instant's TPOT limit just above the server's unloaded TPOT: 1% of p90 noise moves the
    crossing far, and more probes hardly narrow it; the warning says so and what a looser limit buys."""
    flat = [make_probe(rps=c / 4, tpot=t, level=c, index=i)
            for i, (c, t) in enumerate([(8, 0.0097), (16, 0.0098), (20, 0.0099), (24, 0.0101), (64, 0.0140)])]
    row = price_records(flat, [INSTANT], CATALOG, PricingParams(load_model="closed"))[0]
    warning = next(w for w in row.warnings if "interval" in w or "known to" in w)
    assert "rises only 0.11% per 1% of load" in warning and "moves the capacity 9%" in warning
    assert row.capacity_elasticity == pytest.approx(math.log(1.01 / 0.99) / math.log(1.2))  # c=20 to 24, in the JSON too
    steep = [make_probe(rps=c / 4, tpot=t, level=c, index=i)
             for i, (c, t) in enumerate([(8, 0.006), (16, 0.008), (32, 0.012), (64, 0.020)])]
    assert not any("per 1% of load" in w for w in price_records(steep, [INSTANT], CATALOG)[0].warnings)
