"""HTML report: one self-contained page, plotly.js once; rendered for real in headless chromium."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from fixtures.pricing_builders import PROBES_FILE, SEED_FILE

from pricing.cost.catalog import load_catalog
from pricing.cost.price_rows import PricingParams, mark_cheapest, price_records
from pricing.cost.seed_prices import price_seed
from pricing.report.html import build_figures, build_report_html, profile_histograms
from pricing.results import SourcedProbe, load_records
from pricing.schema import DEFAULT_TIERS

CHROMIUM = Path("/usr/bin/chromium")
PLOTLY_JS_BANNER = re.compile(r"\* plotly\.js v\d")


def _inputs(profile=None):
    catalog = load_catalog()
    records, errors = load_records([PROBES_FILE, SEED_FILE], catalog)
    assert not errors
    probes = [r for r in records if isinstance(r, SourcedProbe)]
    seeds = [r for r in records if not isinstance(r, SourcedProbe)]
    params = PricingParams(split="seed")
    rows = price_records(probes, DEFAULT_TIERS, catalog, params) + price_seed(seeds, DEFAULT_TIERS, params)
    rows = mark_cheapest(rows)
    return rows, probes, params, catalog


@pytest.fixture(scope="module")
def report_html() -> str:
    rows, probes, params, catalog = _inputs()
    return build_report_html(rows, probes, DEFAULT_TIERS, params, catalog)


def test_page_is_self_contained_with_plotly_once(report_html):
    assert len(PLOTLY_JS_BANNER.findall(report_html)) == 1
    assert not re.search(r"<script[^>]+src=", report_html)  # nothing fetched
    # latency, heatmap, capacity, pricing tiers, cost vs throughput, energy, profile (from sample pairs)
    assert report_html.count('class="plotly-graph-div"') == 7
    assert "not verified online" in report_html and "FALLBACK" in report_html


def test_figures_skip_missing_data():
    rows, probes, _, _ = _inputs()
    no_energy = [r.model_copy(update={"energy": None}) for r in rows]
    # heatmap, capacity, pricing tiers, cost vs throughput
    assert len(build_figures(no_energy, [], DEFAULT_TIERS)) == 4


def test_profile_histograms_are_duck_typed():
    edges, counts = [1, 10, 100], [3, 4]
    hist = SimpleNamespace(isl_hist={"edges": edges, "counts": counts}, osl_hist=(edges, counts))
    assert profile_histograms(hist) == {"ISL": (edges, counts), "OSL": (edges, counts)}
    joint_hist = SimpleNamespace(isl_edges=[1, 2, 4], osl_edges=[1, 8, 64], counts=[[1, 2], [3, 4]])
    joint = SimpleNamespace(histogram=joint_hist)
    assert profile_histograms(joint) == {"ISL": ([1, 2, 4], [3.0, 7.0]), "OSL": ([1, 8, 64], [4.0, 6.0])}
    pool = profile_histograms(SimpleNamespace(pool_isl=[100, 200, 300], pool_osl=[10, 20, 30]))
    assert sum(pool["ISL"][1]) == 3 and sum(pool["OSL"][1]) == 3
    assert profile_histograms(None) is None and profile_histograms(object()) is None


def test_report_takes_a_profile_object():
    rows, probes, params, catalog = _inputs()
    profile = SimpleNamespace(name="wildchat-x", isl_hist=([1, 10, 100], [5, 6]), osl_hist=([1, 10, 100], [7, 8]))
    html = build_report_html(rows, probes, DEFAULT_TIERS, params, catalog, profile=profile)
    assert "Traffic profile wildchat-x" in html


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=8000"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


def _bar_heights(svg: str) -> list[float]:
    """Pixel heights of a plotly bar trace's bars, from their paths (M x,y0 V y1 H x' V y0 Z)."""
    return [abs(float(y0) - float(y1)) for y0, y1 in re.findall(r'class="point"><path d="M[\d.]+,([\d.]+)V([\d.]+)H', svg)]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path, report_html):
    from PIL import Image, ImageStat

    page = tmp_path / "report.html"
    page.write_text(report_html, encoding="utf-8")
    dom = _chromium("--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    plots = dom.stdout.split('class="plotly-graph-div')[1:]
    # latency, heatmap, capacity, pricing tiers, cost vs throughput, energy, profile
    assert len(plots) == 7
    assert all('class="main-svg"' in chunk for chunk in plots), "a plot div has no svg.main-svg"
    # Capacity per tier draws each priced cell's closed-loop capacity to scale; the fixture has no
    # open-loop probes, so that trace's bars are flat.
    capacity = [chunk for chunk in plots if "Capacity per tier: closed loop" in chunk]
    assert len(capacity) == 1
    closed_bars, open_bars = [_bar_heights(trace) for trace in capacity[0].split('class="trace bars"')[1:]]
    rows, _, _, _ = _inputs()
    closed = [r.closed_capacity_rps for r in rows if r.feasible and r.source == "probe" and r.capacity_rps]
    assert len(closed) >= 2 and all(c > 0 for c in closed)
    assert closed_bars == pytest.approx([c / max(closed) * max(closed_bars) for c in closed], rel=0.02)
    assert open_bars == [0.0] * len(closed)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    errors = [line for line in console if re.search(r"error|uncaught|exception|failed", line, re.I)]
    assert not errors, errors
    shot = tmp_path / "shot.png"
    done = _chromium("--hide-scrollbars", "--window-size=1400,4200", f"--screenshot={shot}", page.as_uri(),
                     tmp=tmp_path)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = Image.open(shot).convert("L")
    assert ImageStat.Stat(image).var[0] > 200  # not blank
    top = image.crop((0, 0, image.width, 1200))
    assert ImageStat.Stat(top).var[0] > 200  # the first plots drew something


def test_client_vs_server_ttft_figure_only_when_scraped():
    from pathlib import Path

    from pricing.report.html import fig_ttft_client_vs_server
    from pricing.schema import ProbeRecord

    lines = Path(__file__).parent.joinpath("fixtures", "pricing_probes.jsonl").read_text().splitlines()
    records = [ProbeRecord.model_validate_json(line) for line in lines]
    record = next(r for r in records if r.load.kind == "decode" and r.stats.ttft_s.p90 is not None)
    bare = record.model_copy(update={"server_metrics": None})
    assert fig_ttft_client_vs_server([SourcedProbe(bare, "f", 1)]) is None
    scraped = record.model_copy(update={"server_metrics": {"server_ttft_p90_s": 0.123}})
    fig = fig_ttft_client_vs_server([SourcedProbe(scraped, "f", 1)])
    assert fig is not None and list(fig.data[0].x) == [0.123]
    assert list(fig.data[0].y) == [record.stats.ttft_s.p90]
