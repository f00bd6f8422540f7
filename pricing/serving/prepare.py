"""What to serve and on what: a shape, a checkpoint or a model quantized first (in llmcompressor's
own venv), and the catalog name of the GPU this host has."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from pricing.serving.shapes import SHAPES, read_json, resolve_model, write_shape

# nvidia-smi names -> catalog keys; anything else is used as printed (the pricer then asks for --catalog).
GPU_NAMES = (
    (r"H200", "H200"),
    (r"H100.*PCIe", "H100-PCIe"),
    (r"H100", "H100-SXM"),
    (r"B200", "B200"),
    (r"A100.*80", "A100-80GB"),
    (r"L40S", "L40S"),
    (r"\bL4\b", "L4"),
)


def detect_gpu() -> str:
    """Catalog name of the first visible GPU; "cpu" without any. (A server's GPU count is its TP.)"""
    if shutil.which("nvidia-smi") is None:
        return "cpu"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not names:
        return "cpu"
    return next((key for pattern, key in GPU_NAMES if re.search(pattern, names[0])), names[0])



# The folder holding the `pricing` package: a checkout (the quantizer runs from it) or site-packages.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
IN_CHECKOUT = (PACKAGE_ROOT / "pyproject.toml").is_file()


def quant_python() -> str:
    """llmcompressor's interpreter: its own virtualenv (its pins clash with vLLM's, see `make
    quant-env`, beside the checkout or in the working folder), or $QUANT_PYTHON."""
    base = PACKAGE_ROOT if IN_CHECKOUT else Path.cwd()
    return os.environ.get("QUANT_PYTHON", str(base / ".venv-quant" / "bin" / "python"))


def prepare_model(model: str, scheme: str, models_dir: Path, checkpoints_dir: Path = Path("checkpoints")):
    """What to serve for (model, scheme): shapes get a folder (with the scheme's quantization
    config and dummy weights when not base); a real model with a scheme is quantized first
    (once: an existing valid checkpoint is reused); base models, and folders that already hold a
    checkpoint of the scheme, are used as given."""
    if scheme == "base":
        return resolve_model(model, models_dir)
    if _quantized_as(model) == scheme:  # a checkpoint of this scheme already (e.g. from pricing.quantize)
        return resolve_model(model, models_dir)
    if model in SHAPES:
        from pricing.serving.quantization import shape_quantization_config

        folder = write_shape(model, models_dir / f"{model}-{scheme}", shape_quantization_config(scheme))
        return resolve_model(str(folder), models_dir)
    checkpoint = checkpoints_dir / f"{Path(model).name}-{scheme}"
    quantize_checkpoint(model, scheme, checkpoint)
    return resolve_model(str(checkpoint), models_dir)


def _quantized_as(model: str) -> str | None:
    """The scheme of a local folder's compressed-tensors quantization_config, or None."""
    from pricing.serving.quantization import scheme_of

    config = read_json(Path(model).expanduser() / "config.json") or {}
    return scheme_of(config.get("quantization_config"))


def quantize_checkpoint(model: str, scheme: str, checkpoint: Path) -> None:
    """Run the quantizer in its own venv; it prints progress and reuses a valid checkpoint."""
    python = quant_python()
    if not Path(python).exists():
        raise FileNotFoundError(f"{python} not found: run `make quant-env` (llmcompressor's own venv) to quantize {model}")
    cmd = [python, "-m", "pricing.quantize", "--model", model, "--scheme", scheme, "-o", str(checkpoint)]
    # From a checkout the quantizer imports this package's source; an installed tool needs the
    # package installed in llmcompressor's venv too (pip install --no-deps).
    env = {**os.environ, **({"PYTHONPATH": str(PACKAGE_ROOT)} if IN_CHECKOUT else {})}
    if subprocess.run(cmd, env=env).returncode != 0:
        raise ValueError(f"quantizing {model} to {scheme} failed (see the line above); nothing was served")
