"""Calibration prompts for quantization: real chat text (a local JSONL/JSON/Parquet of
WildChat-style conversations, a traffic profile naming one, or a Hugging Face dataset id)
or, when none can be had, seeded random token sequences. Every set says which it is.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol
from urllib.parse import urlparse

import numpy as np

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
DEFAULT_DATASET = "allenai/WildChat-1M"
_MESSAGE_KEYS = ("conversation", "conversations", "messages")
_TEXT_KEYS = ("text", "prompt", "content")
_LENGTH_KEYS = ("isl", "input_tokens", "prompt_tokens")


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer this module uses."""

    vocab_size: int
    all_special_ids: list[int]
    chat_template: str | None

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class CalibrationSet:
    """Token sequences to calibrate on, and where they came from (for the provenance file)."""

    token_ids: list[list[int]]
    source: str  # e.g. "chat:/data/wildchat.jsonl (512 conversations)", "synthetic (seed 0, ...)"
    real: bool  # True when the tokens are real chat text
    warnings: list[str] = field(default_factory=list)


class CalibrationError(ValueError):
    """A calibration source that exists but cannot be used (unreadable file, no usable rows)."""


def load_calibration(
    spec: str | None, tokenizer: Tokenizer, samples: int, max_seq_len: int, seed: int = 0
) -> CalibrationSet:
    """Calibration tokens from `spec`: a local data file, a profile JSON or name (profiles/<name>.json),
    a HF dataset id, or "synthetic"/None. Unreachable hub data falls back to synthetic tokens with a warning."""
    if samples < 1 or max_seq_len < 2:
        raise CalibrationError(f"need samples >= 1 and max_seq_len >= 2, got {samples} and {max_seq_len}")
    if spec is None or spec == SYNTHETIC:
        return synthetic_set(tokenizer, [max_seq_len] * samples, seed, note="requested")
    check_spec(spec)
    path = resolve_spec(spec)
    if path is not None:
        return _from_file(path, tokenizer, samples, max_seq_len, seed)
    return _from_hub(spec, tokenizer, samples, max_seq_len, seed)


def check_spec(spec: str | None) -> None:
    """Fail fast (before any model loads) on a calibration file that does not exist."""
    if spec and spec != SYNTHETIC and resolve_spec(spec) is None and _looks_like_path(spec):
        raise CalibrationError(f"calibration file not found: {spec} (give a .jsonl/.json/.parquet file, a profile, "
                               "a Hugging Face dataset id, or 'synthetic')")


def resolve_spec(spec: str, profiles_dir: Path = Path("profiles")) -> Path | None:
    """The local file `spec` names: a path, or a profile name as in profiles/<name>.json; else None."""
    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve()
    named = profiles_dir / f"{spec}.json"
    return named.resolve() if "/" not in spec and named.is_file() else None


def synthetic_set(
    tokenizer: Tokenizer, lengths: list[int], seed: int, note: str, warnings: list[str] | None = None
) -> CalibrationSet:
    ids = synthetic_token_ids(tokenizer.vocab_size, lengths, seed, set(tokenizer.all_special_ids or []))
    lo, hi = min(lengths), max(lengths)
    span = f"{lo} tokens" if lo == hi else f"{lo}-{hi} tokens"
    source = f"synthetic (random vocab tokens, seed {seed}, {len(lengths)} x {span}; {note})"
    return CalibrationSet(token_ids=ids, source=source, real=False, warnings=list(warnings or []))


def synthetic_token_ids(
    vocab_size: int, lengths: Iterable[int], seed: int, exclude: set[int] = frozenset()
) -> list[list[int]]:
    """Seeded uniform draws from the vocabulary, special tokens left out."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
    rng = np.random.default_rng(seed)
    return [rng.choice(allowed, size=int(n)).tolist() for n in lengths]


def conversation_text(row: dict[str, Any], tokenizer: Tokenizer) -> str | None:
    """The text of one WildChat-style row: its messages through the chat template when the
    tokenizer has one, else "role: content" lines; or a plain text/prompt field."""
    for key in _MESSAGE_KEYS:
        messages = row.get(key)
        if isinstance(messages, (list, tuple)) and messages:
            turns = [_message(m) for m in messages]
            turns = [t for t in turns if t["content"]]
            if not turns:
                return None
            if getattr(tokenizer, "chat_template", None):
                try:
                    return tokenizer.apply_chat_template(turns, tokenize=False)
                except Exception as exc:  # templates that reject a role order, etc.
                    log.debug("chat template failed (%s); joining turns", exc)
            return "\n".join(f"{t['role']}: {t['content']}" for t in turns)
    for key in _TEXT_KEYS:
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key]
    return None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (a list of rows or a single object) or .parquet file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(path).to_dict(orient="records")
        text = path.read_text()
        if suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        obj = json.loads(text)
    except (OSError, ValueError, ImportError) as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {exc}") from exc
    return obj if isinstance(obj, list) else [obj]


def hub_reachable(timeout_s: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face hub answers a TCP connect; (False, reason) when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False, "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True, ""
    except OSError as exc:
        return False, f"{host}:{port} unreachable ({exc.strerror or exc})"


def _from_file(path: Path, tokenizer: Tokenizer, samples: int, max_seq_len: int, seed: int) -> CalibrationSet:
    rows = read_rows(path)
    if len(rows) == 1 and _is_profile(rows[0]):
        return _from_profile(path, rows[0], tokenizer, samples, max_seq_len, seed)
    texts = [t for t in (conversation_text(r, tokenizer) for r in rows if isinstance(r, dict)) if t]
    if texts:
        ids = _tokenize(texts, tokenizer, samples, max_seq_len, seed)
        return _real_set(ids, f"chat:{path.resolve()}", samples)
    lengths = [n for n in (_length(r) for r in rows) if n is not None]
    if lengths:
        drawn = _draw_lengths(lengths, samples, max_seq_len, seed)
        warning = f"{path} has token counts but no text: calibrating on synthetic tokens at its lengths"
        return synthetic_set(tokenizer, drawn, seed, note=f"lengths from {path.resolve()}", warnings=[warning])
    raise CalibrationError(
        f"{path}: no usable rows (expected 'conversation'/'messages' lists, 'text'/'prompt' strings, or 'isl' counts)"
    )


def _from_profile(
    path: Path, profile: dict[str, Any], tokenizer: Tokenizer, samples: int, max_seq_len: int, seed: int
) -> CalibrationSet:
    """A traffic profile (profiles/<name>.json): the conversations it was built from when they can
    be read (its `source` "conversations A, B (split s)"), else synthetic tokens at its ISLs."""
    for spec in profile_conversation_sources(str(profile.get("source", ""))):
        local = Path(spec).expanduser()
        for candidate in (local, path.parent / local.name):
            if candidate.is_file():
                try:
                    found = _from_file(candidate, tokenizer, samples, max_seq_len, seed)
                except CalibrationError as exc:
                    log.info("profile %s: %s unusable (%s)", path, candidate, exc)
                    continue
                if found.real:
                    return found
        if not _looks_like_path(spec):
            found = _from_hub(spec, tokenizer, samples, max_seq_len, seed, fallback=False)
            if found is not None:
                return found
    isls = [int(n) for n in profile.get("pool_isl") or []]
    isls += [int(p[0]) for p in profile.get("sample_pairs") or [] if isinstance(p, (list, tuple)) and p]
    warning = (f"profile {path} ({profile.get('source', 'no source')}) gives no readable chat text: "
               "calibrating on synthetic tokens")
    if isls:
        drawn = _draw_lengths(isls, samples, max_seq_len, seed)
        return synthetic_set(tokenizer, drawn, seed, note=f"ISLs of profile {path.resolve()}", warnings=[warning])
    note = f"profile {path} has no ISLs"
    return synthetic_set(tokenizer, [max_seq_len] * samples, seed, note=note, warnings=[warning])


def profile_conversation_sources(source: str) -> list[str]:
    """The datasets named by a profile's `source` ("conversations A, B (split train)"); [] for
    profiles built from token-count files ("lengths ...") or fixed shapes."""
    if not source.startswith("conversations "):
        return []
    body = source[len("conversations "):].rsplit(" (split", 1)[0]
    return [s.strip() for s in body.split(",") if s.strip()]


def _from_hub(
    dataset_id: str, tokenizer: Tokenizer, samples: int, max_seq_len: int, seed: int, fallback: bool = True
) -> CalibrationSet | None:
    ok, reason = hub_reachable()
    rows: list[dict[str, Any]] = []
    if ok:
        try:
            import datasets

            stream = datasets.load_dataset(dataset_id, split="train", streaming=True)
            for row in stream:
                if not row.get("toxic", False):
                    rows.append(row)
                if len(rows) >= samples:
                    break
        except Exception as exc:  # network, auth (gated sets), missing split: all mean "no real data"
            ok, reason = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    texts = [t for t in (conversation_text(r, tokenizer) for r in rows) if t]
    if ok and texts:
        return _real_set(_tokenize(texts, tokenizer, samples, max_seq_len, seed), f"hf:{dataset_id}", samples)
    if ok:
        reason = "no conversation or text rows"
    if not fallback:
        return None
    warning = f"calibration dataset {dataset_id!r} not available ({reason}); falling back to synthetic tokens"
    note = f"fallback: {dataset_id} unavailable"
    return synthetic_set(tokenizer, [max_seq_len] * samples, seed, note=note, warnings=[warning])


def _tokenize(texts: list[str], tokenizer: Tokenizer, samples: int, max_seq_len: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(len(texts))
    out: list[list[int]] = []
    for i in order:
        ids = tokenizer(texts[i], truncation=True, max_length=max_seq_len, add_special_tokens=False)["input_ids"]
        if len(ids) >= 2:
            out.append(list(ids))
        if len(out) >= samples:
            break
    if not out:
        raise CalibrationError("every calibration text tokenized to fewer than 2 tokens")
    return out


def _real_set(ids: list[list[int]], where: str, samples: int) -> CalibrationSet:
    warnings = []
    if len(ids) < samples:
        warnings.append(f"{where} gave {len(ids)} usable conversations, fewer than the {samples} requested")
    return CalibrationSet(token_ids=ids, source=f"{where} ({len(ids)} conversations)", real=True, warnings=warnings)


def _draw_lengths(lengths: list[int], samples: int, max_seq_len: int, seed: int) -> list[int]:
    drawn = np.random.default_rng(seed).choice(np.asarray(lengths), size=samples)
    return [int(min(max(n, 2), max_seq_len)) for n in drawn]


def _length(row: Any) -> int | None:
    if isinstance(row, dict):
        for key in _LENGTH_KEYS:
            if isinstance(row.get(key), (int, float)):
                return int(row[key])
    return None


def _is_profile(obj: Any) -> bool:
    """A pricing.profile TrafficProfile (or a ProfileSummary) rather than a data row."""
    return isinstance(obj, dict) and not any(k in obj for k in _MESSAGE_KEYS + _TEXT_KEYS) and (
        "profile_version" in obj or "pool_isl" in obj or "sample_pairs" in obj
    )


def _looks_like_path(spec: str) -> bool:
    suffix = Path(spec).suffix.lower()
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or suffix in (".jsonl", ".json", ".parquet")


def _message(m: Any) -> dict[str, str]:
    if isinstance(m, dict):
        role = m.get("role") or m.get("from") or "user"
        content = m.get("content") if m.get("content") is not None else m.get("value", "")
        role = {"human": "user", "gpt": "assistant"}.get(str(role), str(role))
        return {"role": role, "content": str(content or "")}
    return {"role": "user", "content": str(m)}
