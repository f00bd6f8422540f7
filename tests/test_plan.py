"""Cost planner: hand-computed fleets, autoscaling, spot mix, cascades, right-sizing, budgets, and the CLI."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.pricing_builders import PROBES_FILE, config_a, config_b, make_probe
from pydantic import ValidationError
from rich.console import Console

from pricing.cost.catalog import load_catalog
from pricing.cost.price_rows import PricingParams, price_records
from pricing.errors import InputError
from pricing.plan import main
from pricing.planning.choices import (
    CascadePolicy,
    crossing_day,
    plan_budget,
    plan_cascade,
    prefill_share,
    scaled_capacity_rps,
    size_tier,
)
from pricing.planning.fleet import (
    AutoscalePolicy,
    SpotPolicy,
    plan_fleet,
    plan_spot,
    replicas_needed,
    short_probability,
    simulate_autoscale,
    spot_unavailability,
    week_pattern,
    week_rates_rps,
)
from pricing.planning.plan import (
    PlanFile,
    PlanOptions,
    build_plan,
    match_config,
    tier_rows,
)
from pricing.report.plan_html import plan_section_html
from pricing.schema import DEFAULT_TIERS
from pricing.workload.profile import Arrivals, fixed_profile

ROOT = Path(__file__).resolve().parents[1]
CATALOG = load_catalog()
BASELINE, FAST, INSTANT = DEFAULT_TIERS
NO_ENERGY = PricingParams(energy_cost=False)
MONTH_WEEKS = 730 / 168


def rows_of(records, tiers=DEFAULT_TIERS):
    return price_records(records, tiers, CATALOG, NO_ENERGY)


# ----------------------------------------------------------------------------- 1. fleet over a week
def test_week_pattern_tiles_short_and_folds_long_patterns():
    assert week_pattern([1, 2, 3])[:7] == [1, 2, 3, 1, 2, 3, 1] and len(week_pattern([1, 2, 3])) == 168
    long = [1.0] * 168 + [3.0] * 168 + [5.0] * 10  # two weeks and 10 hours: averaged by hour of week
    folded = week_pattern(long)
    assert folded[0] == 3.0 and folded[9] == 3.0 and folded[10] == 2.0
    rates = week_rates_rps([10, 40], 100.0)
    assert rates[:2] == [25.0, 100.0]
    assert replicas_needed([25.0, 100.0, 0.0, 20.0], 20.0) == [2, 5, 0, 1]  # 20/20 is exactly 1
    with pytest.raises(ValueError):
        week_rates_rps([0, 0], 10.0)


def test_autoscaler_hand_computed():
    """capacity 10 req/s; rates alternate 10 and 40 req/s each hour (needed 1, 4; targets 2, 5 at 0.8).

    Hour 1 of each cycle: over threshold from minute 0, launches 3 at minute 5, they serve at minute 8:
    minutes 0-7 short (8 x 60 x 40 = 19,200 requests), billed 5 x 2 + 55 x 5 = 285 replica-minutes.
    Hour 0: 15 minutes at 5 before scaling down to 2 (15 x 5 + 45 x 2 = 165 replica-minutes).
    """
    rates = week_rates_rps([1, 4], 40.0)
    sim = simulate_autoscale(rates, 10.0, AutoscalePolicy())
    assert sim.short_min[:2] == [0, 8] and sim.short_requests[1] == pytest.approx(19_200)
    assert sim.billed_replica_h[:2] == pytest.approx([165 / 60, 285 / 60])
    assert sim.max_replicas == 5
    fleet = plan_fleet(rates, 10.0, 2.0, AutoscalePolicy())
    assert fleet.static_replicas == 4
    assert fleet.static_monthly_usd == pytest.approx(4 * 168 * MONTH_WEEKS * 2.0)  # 5,840
    assert fleet.ideal_monthly_usd == pytest.approx(5 * 84 * MONTH_WEEKS * 2.0)  # 3,650
    assert fleet.autoscaled_monthly_usd == pytest.approx(450 / 60 * 84 * MONTH_WEEKS * 2.0)  # 5,475
    assert fleet.short_request_fraction == pytest.approx(19_200 / (50 * 3600))
    assert fleet.short_fleet_h_per_week == pytest.approx(8 * 84 / 60)
    assert fleet.short_requests_per_month == pytest.approx(19_200 * 84 * MONTH_WEEKS)


def test_no_delays_means_no_shortfall_and_scale_to_zero():
    instant = AutoscalePolicy(scale_up_delay_min=0, cold_start_min=0)
    assert sum(simulate_autoscale(week_rates_rps([1, 4], 40.0), 10.0, instant).short_min) == 0
    rates = week_rates_rps([0, 1], 5.0)  # idle hour, then 5 req/s (one replica)
    keep_one = simulate_autoscale(rates, 10.0, AutoscalePolicy())
    assert sum(keep_one.short_min) == 0 and keep_one.billed_replica_h[:2] == pytest.approx([1.0, 1.0])
    to_zero = simulate_autoscale(rates, 10.0, AutoscalePolicy(scale_to_zero=True))
    assert to_zero.short_min[:2] == [0, 8]  # 5 + 3 minutes cold from zero
    assert to_zero.billed_replica_h[:2] == pytest.approx([15 / 60, 55 / 60])  # 15 min to scale down, billed boot
    with pytest.raises(ValidationError):
        AutoscalePolicy(scale_up_util=0.5, scale_down_util=0.6)


# ----------------------------------------------------------------------------- 2. spot mix
def test_spot_mix_hand_computed():
    q = spot_unavailability(0.5, 12.0)  # down 0.1 h per 2 h up
    assert q == pytest.approx(0.1 / 1.1)
    assert short_probability(3, 1, 0.1) == pytest.approx(1 - (0.9**3 + 3 * 0.1 * 0.81))  # 0.028
    assert short_probability(2, -1, 0.1) == 1.0 and short_probability(0, 0, 0.5) == 0.0
    rates = week_rates_rps([1, 2], 40.0)  # 20 and 40 req/s: needed 2 and 4 at 10 req/s
    needed = replicas_needed(rates, 10.0)
    spot = plan_spot(rates, needed, SpotPolicy(spot_preempt_per_h=0.5, spot_replace_min=12.0), 3.0, 1.0)
    assert spot.baseline_replicas == 2 and spot.spot_replicas[:2] == [0, 2]
    assert spot.monthly_usd == pytest.approx((6 + 8) * 84 * MONTH_WEEKS)  # 5,110
    assert spot.all_on_demand_monthly_usd == pytest.approx(6 * 3 * 84 * MONTH_WEEKS)  # 6,570
    assert spot.short_request_fraction == pytest.approx(40 / 60 * (1 - (1 - q) ** 2))
    spare = plan_spot(rates, needed, SpotPolicy(spot_preempt_per_h=0.5, spot_replace_min=12.0, spot_spare=1), 3.0, 1.0)
    assert spare.spot_replicas[:2] == [1, 3]
    assert spare.short_request_fraction == pytest.approx(40 / 60 * short_probability(3, 1, q))


# ----------------------------------------------------------------------------- 3. cascades
def test_cascade_blend_hand_computed():
    plan = plan_cascade((0.1, 0.4), (1.0, 4.0), CascadePolicy(router_small_frac=0.8, escalate_frac=0.25),
                        "small", "large", "command line")
    assert plan.large_share == pytest.approx(0.4)  # 20% routed + 80% x 25% escalated
    assert plan.blended_usd_per_mtok == pytest.approx((0.08 + 0.4, 0.32 + 1.6))
    assert (plan.savings_input, plan.savings_output) == pytest.approx((0.52, 0.52))


def _two_models():
    big = [make_probe(rps=r, ttft=t, tpot=0.03, model="big-llama", gpu_count=4, tp=4, level=lv, index=i)
           for i, (r, t, lv) in enumerate([(1.0, 0.3, 1), (2.0, 0.7, 4)])]
    return rows_of(config_a() + big)


def test_cascade_measured_large_and_command_line_large():
    rows = _two_models()
    opts = PlanOptions(peak_rps=8.0, config="tiny-llama", cascade_large="big-llama")
    plan = build_plan(rows, BASELINE, "synthetic", [1, 2], CATALOG, opts)
    small, large = (match_config(tier_rows(rows, "Baseline", "synthetic")[0], k, "--x") for k in ("tiny", "big"))
    assert plan.cascade.large_source == "measured"
    expected = 0.7 * small.output_usd_per_mtok + 0.37 * large.output_usd_per_mtok
    assert plan.cascade.blended_usd_per_mtok[1] == pytest.approx(expected)
    cli_priced = build_plan(rows, BASELINE, "synthetic", [1], CATALOG, PlanOptions(
        peak_rps=8.0, config="tiny", large_price_in_usd_per_mtok=1.0, large_price_out_usd_per_mtok=4.0))
    assert cli_priced.cascade.large_source == "command line" and "not measured" in cli_priced.cascade.large_label
    for bad, flag in ((dict(large_price_in_usd_per_mtok=1.0), "--large-price-out"),
                      (dict(cascade_large="big", large_price_in_usd_per_mtok=1.0, large_price_out_usd_per_mtok=1.0),
                       "--cascade-large"),
                      (dict(cascade_large="llama"), "--cascade-large")):  # ambiguous: matches both
        with pytest.raises(InputError, match=flag):
            build_plan(rows, BASELINE, "synthetic", [1], CATALOG, PlanOptions(peak_rps=8.0, **bad))


# ----------------------------------------------------------------------------- 4. right-sizing
def test_right_sizing_scales_measured_capacity_by_flops_and_bandwidth():
    rows = [r for r in rows_of(config_a()) if r.tier.name == "Baseline"]
    sizing = size_tier("Baseline", rows, CATALOG, "on_demand")
    assert sizing.cheapest.gpu_name == "H100-SXM" and not sizing.cheapest.estimate
    assert sizing.cheapest.cost_usd_per_request == pytest.approx(2.99 / (3600 * 8.0))
    h200 = next(e for e in sizing.estimates if e.gpu_name == "H200")
    s = 8.0 * 500 / 40000.0  # capacity x mean ISL / prefill tok/s (the prefill probe at c=16) = 0.1
    cap = 8.0 / (s / (989 / 989) + (1 - s) / (4800 / 3350))  # 10.99 req/s
    assert h200.estimate and h200.capacity_rps == pytest.approx(cap)
    assert h200.cost_usd_per_request == pytest.approx(3.50 / (3600 * cap))
    ratio = h200.cost_usd_per_request / sizing.cheapest.cost_usd_per_request
    assert h200.output_usd_per_mtok == pytest.approx(sizing.cheapest.output_usd_per_mtok * ratio)
    assert "cpu" not in {e.gpu_name for e in sizing.estimates} and any("cpu" in k for k in sizing.skipped)
    costs = [e.cost_usd_per_request for e in sizing.estimates]
    assert costs == sorted(costs)
    assert prefill_share(8.0, 500, None) == 0.0 and scaled_capacity_rps(2.0, 0.0, 9.0, 3.0) == pytest.approx(6.0)


def test_right_sizing_per_tier_picks_cheapest_measured():
    rows = rows_of(config_a() + config_b())
    by_tier = {t.name: size_tier(t.name, [r for r in rows if r.tier.name == t.name], CATALOG, "on_demand")
               for t in DEFAULT_TIERS}
    assert by_tier["Baseline"].cheapest.gpu_name == "L4"  # 0.71/(3600 x 2) < 2.99/(3600 x 8)
    a100 = next(e for e in by_tier["Baseline"].estimates if e.gpu_name == "A100-80GB")
    assert a100.capacity_rps == pytest.approx(2.0 * 2039 / 300)  # no prefill probe on L4: decode-bound
    assert by_tier["Fast"].cheapest.gpu_name == "H100-SXM" and by_tier["Fast"].cheapest.capacity_rps == 3.0
    assert {e.gpu_name for e in by_tier["Fast"].estimates}.isdisjoint({"H100-SXM", "L4"})
    none = size_tier("Instant", [r for r in rows if r.tier.name == "Instant" and r.gpu_name == "L4"], CATALOG,
                     "on_demand")
    assert none.cheapest is None and "TTFT" in none.reason


# ----------------------------------------------------------------------------- 5. budgets
def test_budget_alert_days_hand_computed():
    flat = plan_budget("static", [10.0] * 168, 7300.0)  # $7,300 over 730 h
    assert [a.day for a in flat.alerts] == [22, 28, 31]  # hours 511, 657 and 730 of the month
    assert flat.monthly_usd == pytest.approx(7300.0)
    mondays = [100.0] * 24 + [0.0] * 144  # $2,400 on days 1, 8, 15, 22, 29
    plan = plan_budget("autoscaled", mondays, 10_000.0)
    assert [a.day for a in plan.alerts] == [15, 22, 29] and plan.monthly_usd == pytest.approx(12_000.0)
    assert crossing_day([1.0], 1000.0) is None


# ----------------------------------------------------------------------------- plan assembly
def test_build_plan_picks_cheapest_config_and_warns_on_profile_mismatch():
    rows = rows_of(config_a() + config_b())
    gpus = {**CATALOG.gpus, "L4": CATALOG.gpus["L4"].model_copy(update={"spot": None})}
    no_l4_spot = CATALOG.model_copy(update={"gpus": gpus})
    plan = build_plan(rows, BASELINE, "other-traffic", [1, 4], no_l4_spot,
                      PlanOptions(peak_rps=8.0, budget_usd=1000.0), [t.name for t in DEFAULT_TIERS])
    assert plan.fleet.label.startswith("tiny-llama · base · TP1 · 1xL4") and plan.fleet.capacity_rps == 2.0
    assert plan.fleet.needed_replicas[:2] == [1, 4] and plan.fleet.replica_usd_h == pytest.approx(0.71)
    assert plan.spot is None  # this catalog has no spot rate for L4
    assert any("spot mix skipped" in w for w in plan.warnings) and any("other-traffic" in w for w in plan.warnings)
    assert [b.fleet for b in plan.budgets] == ["static", "autoscaled"]
    assert [s.tier for s in plan.right_sizing] == ["Baseline", "Fast", "Instant"]
    with pytest.raises(InputError, match="no measured config meets"):
        build_plan([r for r in rows if r.gpu_name == "L4"], INSTANT, "synthetic", [1], CATALOG,
                   PlanOptions(peak_rps=1.0))
    html = plan_section_html(plan)
    assert "Cost plan" in html and "<script" not in html and "Right-sizing" in html


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def profile_file(tmp_path: Path) -> Path:
    arrivals = Arrivals(window_start_utc="2024-03-17T00:00:00+00:00", window_end_utc="2024-03-17T02:00:00+00:00",
                        hourly_counts=[10, 40], mean_requests_per_hour=25.0, peak_requests_per_hour=40,
                        peak_to_mean=1.6)
    profile = fixed_profile(500, 100).model_copy(update={"name": "synthetic", "kind": "empirical",
                                                          "arrivals": arrivals})
    path = tmp_path / "synthetic.json"
    path.write_text(profile.model_dump_json())
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=Console(file=out, width=200), err=Console(file=err, width=200, soft_wrap=True))
    return code, out.getvalue(), err.getvalue()


def test_cli_on_tiny_fixture(tmp_path, profile_file):
    json_path, html_path = tmp_path / "plan.json", tmp_path / "plan.html"
    code, out, err = run_cli(str(PROBES_FILE), "--tier", "Fast", "--peak-rps", "12", "--profile", str(profile_file),
                             "--budget-usd", "5000", "--large-price-in", "1", "--large-price-out", "4",
                             "--json", str(json_path), "--html", str(html_path))
    assert code == 0, err
    plan = PlanFile.model_validate_json(json_path.read_text())
    assert plan.fleet.config_key == "tiny-llama|base|tp1|1xH100-SXM" and plan.fleet.capacity_rps == 3.0
    assert plan.fleet.needed_replicas[:2] == [1, 4] and plan.fleet.static_replicas == 4  # 3 and 12 req/s
    assert plan.fleet.static_monthly_usd == pytest.approx(4 * 2.99 * 730)
    assert plan.spot is not None and plan.spot.baseline_replicas == 1
    assert plan.cascade.large_source == "command line" and len(plan.budgets) == 3
    for text in ("Monthly cost", "Cascade", "ESTIMATE", "Budget", "Sun"):
        assert text in out
    assert "<section class='plan'>" in html_path.read_text()


@pytest.mark.parametrize("extra, expected", [
    (["--peak-rps", "0"], "--peak-rps"),
    (["--peak-rps", "5", "--scale-down-util", "0.9"], "--scale-down-util"),
    (["--peak-rps", "5", "--spot-baseline", "-1"], "--spot-baseline"),
    (["--peak-rps", "5", "--config", "nope"], "--config: nope: matches no config"),
    (["--peak-rps", "5", "--tier", "Nope"], "--tier: Nope: unknown tier"),
    (["--peak-rps", "5", "--profile", "fixed:500:100"], "fixed:500:100: arrivals:"),
    (["--peak-rps", "5", "--profile", "no-such-profile"], "no profile found"),
])
def test_bad_input_is_one_line_exit_2(profile_file, extra, expected):
    argv = [str(PROBES_FILE), "--tier", "Baseline", "--profile", str(profile_file), *extra]
    code, _, err = run_cli(*argv)
    assert code == 2 and expected in err and err.count("\n") == 1, err


def test_bad_file_names_line_and_no_traceback(tmp_path, profile_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(PROBES_FILE.read_text().splitlines()[0] + "\n{not json\n")
    proc = subprocess.run([sys.executable, "-m", "pricing.plan", str(bad), "--tier", "Baseline", "--peak-rps", "5",
                           "--profile", str(profile_file)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}:2: malformed JSON" in proc.stderr


def test_catalog_rates_used_match_hand_values():
    assert math.isclose(CATALOG.gpus["H100-SXM"].on_demand.usd_per_gpu_h, 2.99)
    assert CATALOG.gpus["L4"].on_demand.usd_per_gpu_h == 0.71 and CATALOG.gpus["H200"].spot.usd_per_gpu_h == 2.10


def test_a_file_torn_by_a_crash_plans_with_a_warning_naming_the_line(tmp_path, profile_file):
    torn = tmp_path / "torn.jsonl"
    lines = PROBES_FILE.read_text().splitlines()
    torn.write_text("\n".join(lines) + "\n" + lines[0][:57])
    argv = ["--tier", "Fast", "--peak-rps", "12", "--profile", str(profile_file)]
    code, out, err = run_cli(str(torn), *argv)
    assert code == 0, err
    assert f"warning: {torn}:{len(lines) + 1}: torn last line skipped" in err
    assert out == run_cli(str(PROBES_FILE), *argv)[1], "the torn line changes nothing"


def test_an_implausible_record_is_one_line_naming_file_line_and_field(tmp_path, profile_file):
    import json

    lines = PROBES_FILE.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["stats"]["completed"] = -3
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(bad), *lines[2:]]) + "\n")
    code, _, err = run_cli(str(path), "--tier", "Fast", "--peak-rps", "12", "--profile", str(profile_file))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {path}:2: stats.completed: Input should be greater than or equal to 0")
