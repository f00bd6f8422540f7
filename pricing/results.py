"""Append-only JSONL of probe records: each line flushed and fsynced as the probe ends,
so a crash loses at most the probe in flight; reading back tolerates a torn last line."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from pricing.errors import from_validation_error
from pricing.schema import ProbeRecord


def append_record(path: Path, record: ProbeRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = record.model_dump_json() + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> list[ProbeRecord]:
    """Records of a results file; a last line without its newline (torn by a crash) is skipped.
    Raises InputError naming file:line and field for anything else that does not validate."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    torn_tail = not text.endswith("\n") and lines[-1] != ""
    records = []
    for number, line in enumerate(lines[:-1] if torn_tail or lines[-1] == "" else lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(ProbeRecord.model_validate_json(line))
        except ValidationError as exc:
            raise from_validation_error(str(path), number, exc) from None
    return records


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
