"""Hardware catalog: hourly GPU rates per pricing tier, power and compute specs, energy price and
grid carbon per region. Defaults ship as package data (cost/catalog.toml); a user TOML file is
merged over them key by key.
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from pricing.errors import InputError, from_validation_error
from pricing.schema import Frozen, ProbeRecord

PricingTier = Literal["on_demand", "spot", "reserved_1y", "reserved_3y"]
PRICING_TIERS: tuple[PricingTier, ...] = ("on_demand", "spot", "reserved_1y", "reserved_3y")


class Rate(Frozen):
    """One hourly rate per GPU, with where and when it came from."""

    usd_per_gpu_h: float = Field(ge=0)
    date: str
    source: str
    estimate: bool = True


class GpuSpec(Frozen):
    """One GPU type: rates per pricing tier (absent = unknown) and hardware specs."""

    description: str = ""
    board_power_w: float = Field(gt=0)
    mem_bandwidth_gb_s: float = Field(gt=0)  # HBM; GDDR6 for L40S/L4
    peak_bf16_dense_tflops: float = Field(gt=0)
    on_demand: Rate | None = None
    spot: Rate | None = None
    reserved_1y: Rate | None = None
    reserved_3y: Rate | None = None

    @model_validator(mode="after")
    def _has_a_rate(self) -> GpuSpec:
        if all(getattr(self, t) is None for t in PRICING_TIERS):
            raise ValueError("a GPU needs at least one rate (on_demand, spot, reserved_1y or reserved_3y)")
        return self

    def rate(self, tier: PricingTier) -> Rate | None:
        return getattr(self, tier)


class Region(Frozen):
    """Electricity price and average grid carbon intensity of one region."""

    usd_per_kwh: float = Field(ge=0)
    gco2e_per_kwh: float = Field(ge=0)
    date: str
    source: str
    estimate: bool = True


class CatalogMeta(Frozen):
    note: str = ""
    default_region: str


class Catalog(Frozen):
    """The merged catalog. Keys of `gpus` are the names probes carry in `config.gpu_name`."""

    meta: CatalogMeta
    gpus: dict[str, GpuSpec]
    regions: dict[str, Region]

    @model_validator(mode="after")
    def _default_region_known(self) -> Catalog:
        if self.meta.default_region not in self.regions:
            known = ", ".join(sorted(self.regions))
            raise ValueError(f"meta.default_region {self.meta.default_region!r} is not one of the regions: {known}")
        return self

    def known_gpus(self) -> list[str]:
        return sorted(self.gpus)

    def check_record(self, record: ProbeRecord, file: str, line: int) -> None:
        """Raise InputError at file:line when the catalog cannot price the record's GPU."""
        if self.find_gpu(record.config.gpu_name) is None:
            raise unknown_gpu_error(self, record.config.gpu_name, file, line)

    def find_gpu(self, name: str) -> str | None:
        """The catalog key for `name` (exact, else a unique case-insensitive match), or None."""
        if name in self.gpus:
            return name
        matches = [key for key in self.gpus if key.casefold() == name.casefold()]
        return matches[0] if len(matches) == 1 else None


def merge_tables(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge by key: tables merge, anything else in `override` replaces `base`."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_tables(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_toml(text: str, file: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        line = int(found.group(1)) if found else None
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise InputError(file, line, "", f"invalid TOML: {message}") from None


def _line_of(text: str, field: str) -> int | None:
    """Best-effort line of a dotted field in a TOML text (the section header or the key)."""
    parts = field.split(".")
    for depth in range(len(parts), 0, -1):
        header = ".".join(parts[:depth])
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if stripped in (f"[{header}]", f"[[{header}]]"):
                return number
    last = parts[-1]
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"\s*{re.escape(last)}\s*=", line):
            return number
    return None


def default_catalog_text() -> str:
    return resources.files("pricing.cost").joinpath("catalog.toml").read_text(encoding="utf-8")


def load_catalog(user_path: str | Path | None = None) -> Catalog:
    """The packaged catalog, with `user_path` (a TOML file) merged over it. Raises InputError."""
    default_text = default_catalog_text()
    raw = _read_toml(default_text, "pricing/cost/catalog.toml")
    file, text = "pricing/cost/catalog.toml", default_text
    if user_path is not None:
        file = str(user_path)
        try:
            text = Path(user_path).read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(file, None, "--catalog", f"cannot read catalog file: {exc.strerror or exc}") from None
        raw = merge_tables(raw, _read_toml(text, file))
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        err = from_validation_error(file, None, exc)
        err.line = _line_of(text, err.field)
        raise err from None


def unknown_gpu_error(catalog: Catalog, name: str, file: str, line: int | None) -> InputError:
    known = ", ".join(catalog.known_gpus())
    return InputError(
        file, line, "config.gpu_name",
        f"unknown GPU {name!r}; the catalog knows: {known}. Pass --catalog FILE with a [gpus.{name}] table "
        "(board_power_w, mem_bandwidth_gb_s, peak_bf16_dense_tflops and at least an on_demand rate)",
    )


def gpu_rate_usd_h(catalog: Catalog, gpu_name: str, tier: PricingTier) -> float | None:
    """Hourly rate of one GPU at `tier`, or None when the catalog has no such rate."""
    key = catalog.find_gpu(gpu_name)
    if key is None:
        return None
    rate = catalog.gpus[key].rate(tier)
    return rate.usd_per_gpu_h if rate is not None else None
