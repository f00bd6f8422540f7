"""Where the data that ships with the tool lives: `profiles/` and `quant_recipes/` sit at the top
of a checkout, and inside the package (`pricing/profiles/`, `pricing/quant_recipes/`) once
installed from the wheel (pyproject maps them there)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """The installed copy when there is one, else the checkout's top-level folder."""
    installed = _PACKAGE / name
    return installed if installed.is_dir() else _PACKAGE.parent / name


def profiles_dir() -> Path:
    return shipped_dir("profiles")


def recipes_dir() -> Path:
    return shipped_dir("quant_recipes")
