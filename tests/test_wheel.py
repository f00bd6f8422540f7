"""The wheel: it holds every module and the data the tool reads (profiles, recipes, catalog), and
once installed outside the checkout it prices a committed result file, loads the default profile
and finds the recipes."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"vllm-price", "vllm-price-bench", "vllm-price-plan", "vllm-price-profile", "vllm-price-quantize"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0 and "No matching distribution" in proc.stderr:
        pytest.skip(f"no package index for the build backend: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    (built,) = out.glob("*.whl")
    return built


def test_wheel_holds_every_module_and_the_shipped_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pricing").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= names, f"missing from the wheel: {sorted(modules - names)}"
    shipped = {f"pricing/profiles/{p.name}" for p in (ROOT / "profiles").glob("*.json")}
    shipped |= {f"pricing/quant_recipes/{p.name}" for p in (ROOT / "quant_recipes").glob("*.yaml")}
    shipped.add("pricing/cost/catalog.toml")
    assert shipped <= names, f"data missing from the wheel: {sorted(shipped - names)}"
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert {line.split("=")[0].strip() for line in text.splitlines() if "=" in line} >= SCRIPTS


def test_installed_wheel_prices_loads_the_profile_and_finds_recipes(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    work = tmp_path / "elsewhere"  # not the checkout: nothing may be found relative to it
    work.mkdir()
    check = (
        "import pricing; from pathlib import Path;"
        f"assert Path(pricing.__file__).is_relative_to({str(target)!r}), pricing.__file__;"
        "from pricing.workload.profile import DEFAULT_PROFILE, load_profile;"
        "p = load_profile(DEFAULT_PROFILE); assert p.turns > 1000, p.turns;"
        "from pricing.serving.quantization import recipe_path;"
        "r = recipe_path('w8a8'); assert r.is_file() and Path(r).is_relative_to("
        f"{str(target)!r}), r; print('ok', p.name, r.name)"
    )
    proc = subprocess.run([sys.executable, "-c", check], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr
    results = ROOT / "benchmark_results" / "llama-3.1-8b_H200.jsonl"
    script = target / "bin" / "vllm-price"
    proc = subprocess.run([str(script), str(results), "--json", str(work / "prices.json")], cwd=work, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (work / "prices.json").stat().st_size > 1000
