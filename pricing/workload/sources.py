"""Streaming readers behind `pricing.profile`: WildChat-schema conversations (Hugging Face hub
or local JSONL/Parquet, always through `datasets` in streaming mode) and precomputed
(timestamp, isl, osl) length files. Each turn comes out as `TurnLengths`, also in source order
for sessions (`Readout`); bad input raises `ProfileInputError` naming file:line and field (for
Parquet the "line" is the 1-based row)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple

from pricing.errors import InputError

Advance = Callable[[int], None]  # progress callback: rows read (or bytes, for length files)
CONVERSATION_SUFFIXES = {".jsonl", ".json", ".parquet"}


class ProfileInputError(InputError, ValueError):
    """Bad input, said in one line (`file:line: field: what is wrong`); a ValueError too, so callers
    that catch ValueError (bench's --profile) report it. For Parquet and hub rows, line = 1-based row."""

    def __init__(self, file: str, line: int | None, field: str | None, message: str) -> None:
        super().__init__(file, line, field or "", message)


class TurnLengths(NamedTuple):
    """One request: when the user turn arrived (epoch seconds, UTC), prompt and answer tokens."""

    timestamp_s: float
    isl: int
    osl: int


@dataclass(frozen=True)
class TimeWindow:
    """A UTC slice [start, end); either side may be open."""

    start_s: float | None = None
    end_s: float | None = None

    def contains(self, ts_s: float) -> bool:
        return (self.start_s is None or ts_s >= self.start_s) and (self.end_s is None or ts_s < self.end_s)

    @classmethod
    def from_args(cls, start: str | None, end: str | None) -> TimeWindow:
        """Dates are whole UTC days, both inclusive (`--end 2024-03-23` runs to 03-24T00:00Z);
        full ISO datetimes are taken as exact bounds."""
        return cls(_bound(start, whole_day_end=False), _bound(end, whole_day_end=True))


def _bound(text: str | None, whole_day_end: bool) -> float | None:
    if text is None:
        return None
    try:
        if len(text) == 10:  # YYYY-MM-DD
            day = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
            return (day + timedelta(days=1 if whole_day_end else 0)).timestamp()
        return parse_timestamp(text)
    except ValueError:
        raise ProfileInputError("--start/--end", None, None, f"not a date or ISO datetime: {text!r}") from None


def parse_timestamp(value: Any) -> float:
    """ISO-8601 string, datetime (pandas Timestamp included) or epoch number -> epoch seconds.
    Naive times are taken as UTC, as WildChat stores UTC."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    raise ValueError(f"not a timestamp: {value!r}")


def _count(value: Any, where: tuple[str, int], field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProfileInputError(*where, field, f"expected a non-negative integer, got {value!r}")
    return value


def length_rows(path: Path, advance: Advance) -> Iterator[TurnLengths]:
    """Every `{"timestamp", "isl", "osl"}` line of a lengths file, in file order, checked."""
    if not path.is_file():
        raise ProfileInputError(str(path), None, None, "no such file")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            advance(len(raw))
            if not raw.strip():
                continue  # a trailing blank line is not a record
            where = (str(path), lineno)
            try:
                rec = json.loads(raw.rstrip(b"\r\n"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ProfileInputError(*where, None, f"malformed JSON ({_json_problem(exc)})") from None
            if not isinstance(rec, dict):
                raise ProfileInputError(*where, None, "expected a JSON object")
            for field in ("timestamp", "isl", "osl"):
                if field not in rec:
                    raise ProfileInputError(*where, field, "required field is missing")
            try:
                ts_s = parse_timestamp(rec["timestamp"])
            except ValueError:
                raise ProfileInputError(*where, "timestamp", f"not a timestamp: {rec['timestamp']!r}") from None
            yield TurnLengths(ts_s, _count(rec["isl"], where, "isl"), _count(rec["osl"], where, "osl"))


def select_turns(rows: Iterable[TurnLengths], window: TimeWindow, skipped: Counter[str]) -> Iterator[TurnLengths]:
    """The rows that are requests of the slice: inside `window` and usable; the others are counted."""
    for turn in rows:
        if not window.contains(turn.timestamp_s):
            skipped["turns_outside_window"] += 1
        elif (reason := unusable(turn)) is not None:
            skipped[reason] += 1
        else:
            yield turn


def unusable(turn: TurnLengths) -> str | None:
    """A turn with no answer tokens (or no prompt tokens) is no request a load client can send."""
    if turn.osl == 0:
        return "empty_answer"
    if turn.isl == 0:
        return "empty_prompt"
    return None


# ---- conversations (WildChat schema) -------------------------------------------------------


class Message(NamedTuple):
    role: str
    content: str
    timestamp_s: float | None  # WildChat stamps every turn; other sources may not


def is_local_source(spec: str) -> bool:
    """A path (existing, or named like a data file) rather than a hub dataset id."""
    return Path(spec).suffix in CONVERSATION_SUFFIXES or Path(spec).exists()


def iter_conversations(
    spec: str, window: TimeWindow, split: str, skipped: Counter[str], advance: Advance, max_rows: int | None = None
) -> Iterator[tuple[float, list[Message]]]:
    """(conversation timestamp, messages) of rows whose timestamp lies in `window`.

    The filter runs as rows stream; for hub datasets and Parquet with a real timestamp column it
    is also pushed down to the reader, so row groups outside the slice are never fetched (and
    rows filtered there are not counted in `skipped`)."""
    local = is_local_source(spec)
    fmt = "parquet" if spec.endswith(".parquet") else "json"
    if local and not Path(spec).is_file():
        raise ProfileInputError(spec, None, None, "no such file")
    rows = _open_rows(spec, local, fmt, window, split)
    index = -1
    while max_rows is None or index + 1 < max_rows:
        try:
            row = next(rows)
        except StopIteration:
            return
        except ProfileInputError:
            raise
        except Exception as exc:  # pyarrow/datasets parse errors: find the line ourselves
            raise _read_error(spec, local, fmt, index + 1, exc) from None
        index += 1
        advance(1)
        where = lambda: _where(spec, local, fmt, index)  # noqa: E731 - only computed on error
        ts_s = _row_timestamp(row, where)
        if not window.contains(ts_s):
            skipped["conversations_outside_window"] += 1
            continue
        yield ts_s, _messages(row, where)


def _open_rows(spec: str, local: bool, fmt: str, window: TimeWindow, split: str) -> Iterator[dict]:
    import datasets

    kwargs: dict[str, Any] = {}
    if not local or (fmt == "parquet" and _has_timestamp_column(Path(spec))):
        # Project and filter at the reader: WildChat rows carry large moderation columns.
        kwargs["columns"] = ["timestamp", "conversation"]
        if filters := _pushdown_filters(window):
            kwargs["filters"] = filters
    try:
        if local:
            ds = datasets.load_dataset(fmt, data_files=spec, split="train", streaming=True, **kwargs)
        else:
            ds = datasets.load_dataset(spec, split=split, streaming=True, **kwargs)
        return iter(ds)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProfileInputError(spec, None, None, f"cannot open with datasets: {first}") from None


def _has_timestamp_column(path: Path) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception:
        return False  # unreadable: let datasets report it
    names = set(schema.names)
    return {"timestamp", "conversation"} <= names and pa.types.is_timestamp(schema.field("timestamp").type)


def _pushdown_filters(window: TimeWindow) -> list[tuple] | None:
    bounds = [(">=", window.start_s), ("<", window.end_s)]
    return [("timestamp", op, datetime.fromtimestamp(s, UTC)) for op, s in bounds if s is not None] or None


def _where(spec: str, local: bool, fmt: str, index: int) -> tuple[str, int]:
    if not local or fmt == "parquet":
        return spec, index + 1  # 1-based row: Parquet and hub datasets have no lines
    # datasets skips blank lines, so the row index is the index among non-blank lines.
    with open(spec, "rb") as fh:
        seen = -1
        for lineno, raw in enumerate(fh, start=1):
            seen += bool(raw.strip())
            if seen == index:
                return spec, lineno
    return spec, index + 1


def _read_error(spec: str, local: bool, fmt: str, index: int, exc: Exception) -> ProfileInputError:
    if local and fmt == "json":
        with open(spec, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.rstrip(b"\r\n"))
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    return ProfileInputError(spec, lineno, None, f"malformed JSON ({_json_problem(err)})")
                if not isinstance(rec, dict):
                    return ProfileInputError(spec, lineno, None, "expected a JSON object")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ProfileInputError(*_where(spec, local, fmt, index), None, f"unreadable row ({type(exc).__name__}: {first})")


def _row_timestamp(row: dict, where: Callable[[], tuple[str, int]]) -> float:
    if row.get("timestamp") is None:
        raise ProfileInputError(*where(), "timestamp", "required field is missing")
    try:
        return parse_timestamp(row["timestamp"])
    except ValueError:
        raise ProfileInputError(*where(), "timestamp", f"not a timestamp: {row['timestamp']!r}") from None


def _messages(row: dict, where: Callable[[], tuple[str, int]]) -> list[Message]:
    conversation = row.get("conversation")
    if conversation is None:
        raise ProfileInputError(*where(), "conversation", "required field is missing")
    if not isinstance(conversation, list):
        raise ProfileInputError(*where(), "conversation", "expected a list of {role, content} turns")
    out = []
    for i, msg in enumerate(conversation):
        if not isinstance(msg, dict):
            raise ProfileInputError(*where(), f"conversation[{i}]", "expected an object with role and content")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                problem = "required field is missing" if msg.get(key) is None else f"expected a string, got {msg[key]!r}"
                raise ProfileInputError(*where(), f"conversation[{i}].{key}", problem)
        ts_s = None
        if msg.get("timestamp") is not None:
            try:
                ts_s = parse_timestamp(msg["timestamp"])
            except ValueError:
                raise ProfileInputError(*where(), f"conversation[{i}].timestamp", "not a timestamp") from None
        out.append(Message(msg["role"], msg["content"], ts_s))
    return out


def _answered(messages: list[Message]) -> Iterator[int]:
    """Indices of the user turns answered by the next (assistant) turn: each is one request."""
    for i, msg in enumerate(messages[:-1]):
        if msg.role == "user" and messages[i + 1].role == "assistant":
            yield i


def conversation_turns(messages: list[Message], token_counts: list[int], conversation_ts_s: float) -> list[TurnLengths]:
    """Multi-turn accounting: each user turn answered by the next (assistant) turn is one request.

    ISL = tokens of every earlier turn (user, assistant, system) + this user turn; OSL = tokens
    of the answer. Message contents are counted without special tokens or chat template, since
    the server adds its own. A user turn with no answer after it only adds to the context."""
    context = [0, *accumulate(token_counts)]  # tokens before message i
    return [TurnLengths(messages[i].timestamp_s if messages[i].timestamp_s is not None else conversation_ts_s,
                        context[i] + token_counts[i], token_counts[i + 1])
            for i in _answered(messages)]


def answer_times(messages: list[Message]) -> list[float | None]:
    """When each request's answer came (WildChat stamps assistant turns too), in the order of
    `conversation_turns`; None where the answer carries no timestamp."""
    return [messages[i + 1].timestamp_s for i in _answered(messages)]


def load_token_counter(spec: str) -> Callable[[list[str]], list[int]]:
    """Token counts of texts with a `transformers` tokenizer (hub id or local folder)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except Exception as exc:
        if Path(spec).is_absolute() or spec.startswith("."):
            raise ProfileInputError(f"--tokenizer {spec}", None, None, "no such tokenizer folder") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "the hub may be unreachable: pass a local tokenizer folder"
        raise ProfileInputError(f"--tokenizer {spec}", None, None, f"cannot load ({first}); {hint}") from None
    tokenizer.model_max_length = 1 << 62  # count long conversations in full; also silences the length warning

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return count


class Conversation(NamedTuple):
    """One conversation's requests in order (every answered user turn, inside the slice or not)
    and when each answer came (None where unstamped): what sessions are built from."""

    turns: list[TurnLengths]
    answered_s: list[float | None]


def iter_conversation_turns(
    spec: str,
    window: TimeWindow,
    split: str,
    count_tokens: Callable[[list[str]], list[int]],
    skipped: Counter[str],
    advance: Advance,
    max_rows: int | None = None,
) -> Iterator[Conversation]:
    """The answered turns of every conversation in `window`, in order.

    A conversation is selected by its timestamp (its last turn, in WildChat); which of its turns
    are requests of the slice (their own timestamp in it) is `select_turns`' business: turns
    that arrived before the window still count as context."""
    for conv_ts_s, messages in iter_conversations(spec, window, split, skipped, advance, max_rows):
        turns = conversation_turns(messages, count_tokens([m.content for m in messages]), conv_ts_s)
        if not turns:
            skipped["conversations_without_answer"] += 1
            continue
        yield Conversation(turns, answer_times(messages))


def _json_problem(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"  # the line is named by the caller
    return str(exc)


@dataclass
class Readout:
    """What the readers found: the usable turns in the slice (the profile's statistics and pool),
    and every turn in the order the source gives them, for sessions (workload.sessions)."""

    turns: list[TurnLengths]
    source: str
    rows: list[TurnLengths] = field(default_factory=list)  # lengths files: every row, in file order
    conversations: list[Conversation] = field(default_factory=list)  # conversation sources


def read_turns(
    lengths: list[Path] | None,
    dataset: list[str] | None,
    tokenizer: str | None,
    split: str,
    window: TimeWindow,
    skipped: Counter[str],
    max_rows: int | None = None,
) -> Readout:
    """Every usable turn of the length files or conversation sources, with a description of them
    and the turns in source order; a rich progress bar on stderr while it streams (when stderr
    is a terminal)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    quiet = not console.is_terminal  # a bar in a log file is noise
    if lengths:
        rows: list[TurnLengths] = []
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                      console=console, transient=True, disable=quiet) as bar:
            for path in lengths:
                task = bar.add_task(f"reading {path.name}", total=path.stat().st_size if path.is_file() else None)
                rows.extend(length_rows(path, lambda n, t=task: bar.advance(t, n)))
        turns = list(select_turns(rows, window, skipped))
        return Readout(turns, "lengths " + ", ".join(p.name for p in lengths), rows=rows)
    if not dataset:
        raise ProfileInputError("input", None, None, "give --lengths files or --dataset sources")
    if not tokenizer:
        raise ProfileInputError("--tokenizer", None, None, "required with --dataset (e.g. meta-llama/Llama-3.1-8B-Instruct)")
    import datasets

    datasets.disable_progress_bars()  # ours is below
    for handler in logging.getLogger("datasets").handlers:  # its parse errors reach us as exceptions and are
        handler.addFilter(_below_error)  # reported once, with file:line; a logged copy would be a second line
    count_tokens = load_token_counter(tokenizer)
    turns: list[TurnLengths] = []
    conversations: list[Conversation] = []
    with Progress(TextColumn("{task.description}"), TextColumn("{task.completed:,} rows"),
                  TextColumn("{task.fields[turns]:,} turns"), TimeElapsedColumn(),
                  console=console, transient=True, disable=quiet) as bar:
        for spec in dataset:
            task = bar.add_task(f"streaming {spec}", total=None, turns=len(turns))
            advance = lambda n, t=task: bar.advance(t, n)  # noqa: E731
            for conversation in iter_conversation_turns(spec, window, split, count_tokens, skipped, advance, max_rows):
                conversations.append(conversation)
                turns.extend(select_turns(conversation.turns, window, skipped))
                bar.update(task, turns=len(turns))
    names = [Path(spec).name if is_local_source(spec) else spec for spec in dataset]
    return Readout(turns, f"conversations {', '.join(names)} (split {split})", conversations=conversations)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR
