"""Hardware catalog: packaged defaults, user overrides merged by key, clear errors."""

from __future__ import annotations

import io

import pytest
from fixtures.pricing_builders import make_probe
from rich.console import Console

from pricing.cost.catalog import (
    PRICING_TIERS,
    gpu_rate_usd_h,
    load_catalog,
    merge_tables,
)
from pricing.cost.price_rows import PricingParams, price_records
from pricing.errors import InputError
from pricing.price import main
from pricing.schema import DEFAULT_TIERS

REQUIRED = {"H100-SXM", "H100-PCIe", "H200", "A100-80GB", "L40S", "L4", "B200", "cpu"}

OVERRIDE = """
[gpus.H100-SXM.on_demand]
usd_per_gpu_h = 2.00
date = "2025-11-01"
source = "our contract"
estimate = false

[gpus.MI300X]
board_power_w = 750
mem_bandwidth_gb_s = 5300
peak_bf16_dense_tflops = 1307
on_demand = { usd_per_gpu_h = 2.50, date = "2025-11", source = "quote", estimate = false }

[regions.home]
usd_per_kwh = 0.30
gco2e_per_kwh = 100
date = "2025"
source = "bill"
"""


def test_packaged_catalog_is_complete_and_sourced():
    catalog = load_catalog()
    assert REQUIRED <= set(catalog.gpus)
    assert "snapshot" in catalog.meta.note.lower()
    for name in REQUIRED:
        gpu = catalog.gpus[name]
        assert gpu.board_power_w > 0 and gpu.mem_bandwidth_gb_s > 0 and gpu.peak_bf16_dense_tflops > 0
        rates = [gpu.rate(t) for t in PRICING_TIERS]
        assert all(r is not None and r.date and r.source for r in rates), name
        assert all(r.estimate == r.source.startswith("estimate") for r in rates), name
        assert rates[1].usd_per_gpu_h < rates[0].usd_per_gpu_h  # spot below on-demand
        assert rates[3].usd_per_gpu_h <= rates[2].usd_per_gpu_h <= rates[0].usd_per_gpu_h
    assert catalog.meta.default_region in catalog.regions and len(catalog.regions) >= 3


def test_merge_tables_by_key():
    base = {"a": {"x": 1, "y": {"z": 2}}, "b": 3}
    assert merge_tables(base, {"a": {"y": {"z": 5}}, "c": 4}) == {"a": {"x": 1, "y": {"z": 5}}, "b": 3, "c": 4}
    assert base["a"]["y"]["z"] == 2  # not mutated


def test_user_catalog_overrides_and_extends(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(OVERRIDE)
    catalog = load_catalog(path)
    assert gpu_rate_usd_h(catalog, "H100-SXM", "on_demand") == 2.00
    assert gpu_rate_usd_h(catalog, "H100-SXM", "spot") == load_catalog().gpus["H100-SXM"].spot.usd_per_gpu_h
    assert catalog.gpus["H100-SXM"].board_power_w == 700  # untouched keys kept
    assert gpu_rate_usd_h(catalog, "MI300X", "spot") is None and "home" in catalog.regions
    assert catalog.find_gpu("mi300x") == "MI300X"
    rows = price_records([make_probe(rps=1.0, gpu="MI300X")], DEFAULT_TIERS[:1], catalog)
    assert rows[0].hourly_cost_usd == 2.50 and set(rows[0].variants) == {"on_demand"}
    spot = price_records([make_probe(rps=1.0, gpu="MI300X")], DEFAULT_TIERS[:1], catalog,
                         PricingParams(pricing_tier="spot"))
    assert not spot[0].feasible and "no spot rate for MI300X" in spot[0].reason


def test_catalog_flag_makes_an_unknown_gpu_known(tmp_path):
    probes = tmp_path / "p.jsonl"
    probes.write_text(make_probe(rps=1.0, gpu="MI300X").model_dump_json() + "\n")
    user = tmp_path / "mine.toml"
    user.write_text(OVERRIDE)
    out, err = io.StringIO(), io.StringIO()
    console = dict(width=200, soft_wrap=True)
    assert main([str(probes)], out=Console(file=out, **console), err=Console(file=err, **console)) == 2
    assert f"{probes}:1: config.gpu_name: unknown GPU 'MI300X'" in err.getvalue()
    assert main([str(probes), "--catalog", str(user)], out=Console(file=out, **console),
                err=Console(file=err, **console)) == 0
    assert "1xMI300X" in out.getvalue()


@pytest.mark.parametrize(
    ("text", "field", "line"),
    [
        ("[gpus.H100-SXM]\nboard_power_watts = 700\n", "gpus.H100-SXM.board_power_watts", 1),
        ("[gpus.X]\nboard_power_w = 1\nmem_bandwidth_gb_s = 1\npeak_bf16_dense_tflops = 1\n", "gpus.X", 1),
        ("[gpus.H200.spot]\nusd_per_gpu_h = -1\n", "gpus.H200.spot.usd_per_gpu_h", 1),
        ("[meta]\ndefault_region = 'mars'\n", "", None),
        ("[gpus\nx = 1\n", "", 1),
    ],
)
def test_bad_user_catalog_is_one_clear_error(tmp_path, text, field, line):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_catalog(path)
    err = info.value
    assert err.file == str(path) and err.field == field and err.line == line, str(err)


def test_missing_catalog_file(tmp_path):
    with pytest.raises(InputError, match="cannot read catalog file"):
        load_catalog(tmp_path / "absent.toml")
