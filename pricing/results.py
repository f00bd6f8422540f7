"""Result files, the one reader and writer: our append-only probe JSONL (each line flushed and
fsynced as its probe ends, so a crash loses at most the probe in flight) and the seed
calculator's files. Bench (resume), price, plan and the report all read through here.

A last line without its newline that does not parse was torn by a crash: it is skipped with a
warning naming file:line. Anything else that does not validate (bad JSON, a missing field, an
implausible value: schema's checks) raises InputError there, or, for a caller that keeps going,
is reported as one and skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field, ValidationError

from pricing.errors import InputError, from_validation_error
from pricing.measure.requests import RequestTable
from pricing.schema import READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION, Frozen, ProbeRecord

Warn = Callable[[str], None]
OnBad = Callable[[InputError], None]  # told of each record skipped as bad (--keep-going)


class RecordCheck(Protocol):
    """What a reader's caller may demand of each probe beyond the schema (the pricer's catalog:
    a GPU it can price); raises InputError naming file:line."""

    def check_record(self, record: ProbeRecord, file: str, line: int) -> None: ...


@dataclass(frozen=True)
class SourcedProbe:
    """A probe record and where it was read from (for file:line in messages), with its
    per-request records when the probe has them (schema 2; `table` reads them once)."""

    record: ProbeRecord
    file: str = "<memory>"
    line: int = 0
    requests: RequestTable | None = None  # given directly (a probe measured in this process)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def table(self, warn: Warn | None = None) -> RequestTable | None:
        """The probe's per-request records, or None (with a warning) when their file is missing or
        holds no line for this probe: its aggregates still price."""
        if self.requests is not None:
            return self.requests
        if self.record.requests_file is None or self.file == "<memory>":
            return None
        path = Path(self.file).parent / self.record.requests_file
        table = read_requests(path, warn).get((self.record.run_id, self.record.probe_index))
        if table is None and warn is not None and path.exists():
            warn(f"{path}: no per-request records for probe {self.record.run_id}#{self.record.probe_index} "
                 f"({self.where}); its stored percentiles are used")
        return table


_REQUESTS_CACHE: dict[tuple[str, float], dict[tuple[str, int], RequestTable]] = {}


def read_requests(path: Path, warn: Warn | None = None) -> dict[tuple[str, int], RequestTable]:
    """Every per-request table of one `.requests.jsonl` file by (run id, probe index); lines that
    are torn or do not validate are skipped with a warning (the probes' aggregates still price)."""
    try:
        key = (str(path), path.stat().st_mtime)
    except OSError:
        if warn is not None:
            warn(f"{path}: per-request records missing; the probes' stored percentiles are used")
        return {}
    if key in _REQUESTS_CACHE:
        return _REQUESTS_CACHE[key]
    tables: dict[tuple[str, int], RequestTable] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                table = RequestTable.model_validate_json(line)
            except ValidationError:
                if warn is not None:
                    warn(f"{path}:{number}: per-request records torn or invalid; skipped")
                continue
            tables[(table.run_id, table.probe_index)] = table
    _REQUESTS_CACHE[key] = tables
    return tables


# ------------------------------------------------------------------------------------ seed files
class SeedMeasurement(Frozen):
    """One batch size of the seed's sweep; latencies are means in seconds, throughputs tokens/s."""

    batch_size: int = Field(ge=1)
    input_tps: float = Field(gt=0)
    output_tps: float = Field(gt=0)
    avg_ttft: float = Field(ge=0)
    avg_tpot: float = Field(ge=0)


class SeedLine(Frozen):
    """`{"id": "<quant>_<tp>", "measurements": [...]}`: one whole server billed at one hourly rate C."""

    id: str = Field(pattern=r"^.+_\d+$")  # "<quant>_<tp>", e.g. "fp8_4"
    measurements: list[SeedMeasurement] = Field(min_length=1)


@dataclass(frozen=True)
class SeedServer:
    """One seed line (a quantization x TP on one server) and where it was read."""

    line_model: SeedLine
    file: str
    line: int

    @property
    def quant(self) -> str:
        return self.line_model.id.rsplit("_", 1)[0]

    @property
    def tp(self) -> int:
        return int(self.line_model.id.rsplit("_", 1)[1])

    @property
    def name(self) -> str:
        return Path(self.file).stem


def looks_like_seed(obj: Any) -> bool:
    """A seed line has `id` and `measurements` and no `schema_version` (our probe records have one)."""
    return isinstance(obj, dict) and "measurements" in obj and "id" in obj and "schema_version" not in obj


def parse_seed_line(obj: Any, file: str, line: int) -> SeedServer:
    """Validate one decoded seed line; raises InputError naming file:line and the field."""
    try:
        model = SeedLine.model_validate(obj)
    except ValidationError as exc:
        err = from_validation_error(file, line, exc)
        if err.field == "id" and "pattern" in err.message:
            err.message = f"expected '<quant>_<tp>' such as 'fp8_4' (got {obj.get('id')!r})"
        raise err from None
    return SeedServer(model, file, line)


Loaded = SourcedProbe | SeedServer


# ------------------------------------------------------------------------------------ writing
def append_record(path: Path, record: BaseModel) -> None:
    """One JSON line, flushed and fsynced before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = record.model_dump_json() + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def repair_torn_tail(path: Path) -> bool:
    """Cut a torn last line so appends start on a fresh line; True when something was cut."""
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    cut = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(cut)
    return True


# ------------------------------------------------------------------------------------ reading
def _lines(path: Path, file: str) -> tuple[list[str], bool]:
    """The file's lines, and whether the last one lacks its newline."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(file, None, "", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(file, None, "", f"cannot read the file: {exc}") from None
    return text.splitlines(), bool(text) and not text.endswith("\n")


def _decode(raw: str, file: str, number: int) -> dict:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(file, number, "", f"malformed JSON at column {exc.colno}: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise InputError(file, number, "", f"expected one JSON object per line, got {type(obj).__name__}")
    return obj


def read_result_file(path: str | Path, catalog: RecordCheck | None = None, warn: Warn | None = None,
                     on_bad: OnBad | None = None) -> list[Loaded]:
    """Every record of one result file (ours or the seed's, by shape). A bad record raises
    InputError naming file:line and the field, or with `on_bad` is handed to it and skipped. A
    torn last line is skipped and reported through `warn`."""
    file = str(path)
    lines, torn_possible = _lines(Path(path), file)
    items: list[Loaded] = []
    first: tuple[int, str, object] | None = None  # line, kind, schema_version of the first record
    skipped = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = _decode(raw, file, number)
        except InputError as err:
            if torn_possible and number == len(lines):
                if warn is not None:
                    warn(f"{file}:{number}: torn last line skipped (a run stopped while writing it; "
                         "rerunning the sweep measures that probe again)")
                break
            if on_bad is None:
                raise err from None
            on_bad(err)
            skipped += 1
            continue
        try:
            item = _record(obj, file, number, first, catalog)
        except InputError as err:
            if on_bad is None:
                raise err from None
            on_bad(err)
            skipped += 1
            continue
        if first is None:
            first = (number, "seed" if isinstance(item, SeedServer) else "probe", obj.get("schema_version"))
        items.append(item)
    if not items and not skipped:
        raise InputError(file, 1, "", "empty file: no records (expected one JSON object per line)")
    return items


def _record(obj: dict, file: str, number: int, first: tuple[int, str, object] | None,
            catalog: RecordCheck | None) -> Loaded:
    """One decoded line as a record, checked against the file's first record's kind and version."""
    kind = "seed" if looks_like_seed(obj) else "probe"
    if kind == "probe" and "schema_version" not in obj:
        raise InputError(file, number, "schema_version", "required field is missing (probe records carry "
                         "schema_version; seed calculator files carry id and measurements)")
    version = obj.get("schema_version")
    if first is not None and kind != first[1]:
        raise InputError(file, number, "schema_version" if first[1] == "probe" else "measurements",
                         f"mixed formats in one file: line {first[0]} is a {first[1]} record, "
                         f"this line a {kind} record")
    if first is not None and version != first[2]:
        raise InputError(file, number, "schema_version", f"mixed schema versions in one file: line {first[0]} "
                         f"has {first[2]!r}, this line {version!r}; price each version from its own file")
    if kind == "seed":
        return parse_seed_line(obj, file, number)
    if version not in READABLE_SCHEMA_VERSIONS:
        raise InputError(file, number, "schema_version", f"unsupported schema version {version!r}; this "
                         f"pricer reads versions {', '.join(map(str, READABLE_SCHEMA_VERSIONS))}")
    try:
        record = ProbeRecord.model_validate(obj)
    except ValidationError as exc:
        raise from_validation_error(file, number, exc) from None
    if catalog is not None:
        catalog.check_record(record, file, number)
    return SourcedProbe(record, file, number)


def load_records(paths: Sequence[str | Path], catalog: RecordCheck | None = None, warn: Warn | None = None,
                 keep_going: bool = False) -> tuple[list[Loaded], list[InputError]]:
    """Records of every readable file, and the errors: strict, one per file that could not be read
    whole (its records are left out); keeping going, one per bad record, the file's others kept."""
    records: list[Loaded] = []
    errors: list[InputError] = []
    for path in paths:
        try:
            records.extend(read_result_file(path, catalog, warn, on_bad=errors.append if keep_going else None))
        except InputError as err:
            errors.append(err)
    return records, errors


def read_records(path: Path, warn: Warn | None = None) -> list[ProbeRecord]:
    """Our probe records of one file, for a sweep to resume from and append to (no file yet: none)."""
    if not path.exists() or not path.read_bytes().strip():
        return []
    loaded = read_result_file(path, warn=warn)
    seeds = [item for item in loaded if isinstance(item, SeedServer)]
    if seeds:
        raise InputError(str(path), seeds[0].line, "", "a seed calculator file, not probe records: "
                         "write the sweep to another file (--out)")
    probes = [item for item in loaded if isinstance(item, SourcedProbe)]
    if probes and probes[0].record.schema_version != SCHEMA_VERSION:
        raise InputError(str(path), probes[0].line, "schema_version", f"holds schema {probes[0].record.schema_version} "
                         f"probes; this sweep writes schema {SCHEMA_VERSION}: write it to another file (--out)")
    return [item.record for item in probes]
