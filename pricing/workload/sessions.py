"""Chat sessions: a conversation as the turns a user sends one after another, each with its new
user tokens, its answer tokens and the think time before it. Found three ways: a conversation's
own messages (datasets), a sessions file with session ids, or inferred from a lengths file's row
order (the rule below); with their statistics and the pool the load client replays.

The inference rule for lengths files (rows in conversation order, as the original profiler wrote
them; each ISL holds the whole conversation so far): a row continues the previous row's session
when ISL >= previous ISL + previous OSL + 1 (its prompt can hold the previous prompt, its answer
and one new token at least) and it came 0 to 3,600 s after the previous row. Otherwise it starts
a session. A session's first turn has ISL new tokens; a continuation has ISL - (previous ISL +
previous OSL). Rows with no answer or no prompt end the session they are in and are left out.

Think time before a turn: its arrival minus the previous answer's arrival where answers are
stamped (WildChat stamps them), else minus the previous turn's arrival, which then also holds
the time the original service took to answer (lengths files stamp user turns only).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pydantic import Field, ValidationError

from pricing.errors import from_validation_error
from pricing.schema import Strict
from pricing.workload.sources import (
    Conversation,
    ProfileInputError,
    Readout,
    TimeWindow,
    TurnLengths,
    parse_timestamp,
    select_turns,
    unusable,
)

MAX_CONTINUATION_GAP_S = 3600.0
INFERRED_RULE = ("inferred from row order: a row continues the previous one when ISL >= previous ISL + previous OSL "
                 "+ 1 and it came 0-3600 s after it")
CONVERSATION_RULE = "each conversation's answered user turns"
FILE_RULE = "session ids of a sessions file"


class SessionTurn(NamedTuple):
    """One request of a session: the prompt is the last turn's prompt + its answer + new tokens."""

    new_input_tokens: int
    output_tokens: int
    think_s: float  # before this turn, after the last answer; 0 for the first turn


class Session(NamedTuple):
    start_s: float  # the first turn's arrival (epoch s): which slice the session belongs to
    turns: tuple[SessionTurn, ...]


def prompt_tokens(turns: Sequence[SessionTurn], answer_tokens: int | None = None) -> list[int]:
    """Each turn's whole prompt: every earlier prompt and answer, plus its new tokens. With
    `answer_tokens`, every answer is taken to be that long (a prefill-only replay's)."""
    out, context = [], 0
    for turn in turns:
        out.append(context + turn.new_input_tokens)
        context = out[-1] + (turn.output_tokens if answer_tokens is None else answer_tokens)
    return out


def continues(prev: TurnLengths, turn: TurnLengths, max_gap_s: float = MAX_CONTINUATION_GAP_S) -> bool:
    """The inference rule (module docstring): `turn` is the next turn of `prev`'s session."""
    gap_s = turn.timestamp_s - prev.timestamp_s
    return turn.isl >= prev.isl + prev.osl + 1 and 0 <= gap_s <= max_gap_s


def infer_sessions(rows: Iterable[TurnLengths], max_gap_s: float = MAX_CONTINUATION_GAP_S
                   ) -> Iterator[list[TurnLengths]]:
    """Rows in conversation order, grouped into sessions by `continues`; an unusable row ends
    the session it is in and is left out (the profile's turns count it already)."""
    current: list[TurnLengths] = []
    for row in rows:
        if unusable(row) is not None:
            if current:
                yield current
            current = []
        elif current and continues(current[-1], row, max_gap_s):
            current.append(row)
        else:
            if current:
                yield current
            current = [row]
    if current:
        yield current


def session_of(turns: Sequence[TurnLengths], answered_s: Sequence[float | None] | None = None) -> Session:
    """A session from its turns in order, each ISL holding the conversation so far: new tokens
    = ISL - (previous ISL + previous OSL), think = arrival - previous answer's arrival (or the
    previous turn's where answers are unstamped), at least 0 (clocks of one chat can disagree)."""
    out: list[SessionTurn] = []
    for k, turn in enumerate(turns):
        if k == 0:
            out.append(SessionTurn(turn.isl, turn.osl, 0.0))
            continue
        prev = turns[k - 1]
        answered = answered_s[k - 1] if answered_s is not None else None
        since = answered if answered is not None else prev.timestamp_s
        out.append(SessionTurn(turn.isl - prev.isl - prev.osl, turn.osl, max(0.0, turn.timestamp_s - since)))
    return Session(turns[0].timestamp_s, tuple(out))


def conversation_sessions(conversations: Iterable[Conversation], skipped: Counter[str]) -> Iterator[Session]:
    """A session per conversation: its answered turns, up to its first unusable one."""
    for conv in conversations:
        cut = next((k for k, turn in enumerate(conv.turns) if unusable(turn) is not None), len(conv.turns))
        if cut < len(conv.turns):
            skipped["session_turns_after_an_unusable_turn"] += len(conv.turns) - cut - 1
        if cut:
            yield session_of(conv.turns[:cut], conv.answered_s[:cut])


def in_window(sessions: Iterable[Session], window: TimeWindow, skipped: Counter[str]) -> list[Session]:
    """The sessions that start in the slice (whole, also turns after its end: a user who started
    in the slice sent them); the others are counted."""
    kept = []
    for session in sessions:
        if window.contains(session.start_s):
            kept.append(session)
        else:
            skipped["sessions_outside_window"] += 1
    return kept


def readout_sessions(readout: Readout, window: TimeWindow, skipped: Counter[str]) -> tuple[list[Session], str]:
    """The sessions of what the readers found, and the rule that found them: a lengths file's by
    inference, a conversation source's one per conversation."""
    if readout.rows:
        found: Iterable[Session] = (session_of(g) for g in infer_sessions(readout.rows))
        rule = INFERRED_RULE
    else:
        found, rule = conversation_sessions(readout.conversations, skipped), CONVERSATION_RULE
    return in_window(found, window, skipped), rule


# ---- sessions files ------------------------------------------------------------------------


class SessionFileLine(Strict):
    """One line of a sessions file: a turn of session `session`, its ISL holding the whole
    conversation so far (every earlier prompt and answer, plus the new user tokens)."""

    session: str | int
    timestamp: str | float
    isl: int = Field(ge=1)
    osl: int = Field(ge=1)


def read_session_file(path: Path) -> list[list[TurnLengths]]:
    """The sessions of a JSONL file of `{"session", "timestamp", "isl", "osl"}` lines, turns of one
    session in order (sessions may interleave). A turn whose prompt does not grow from the last
    one (ISL < previous ISL + previous OSL + 1) or that comes before it is an error at file:line."""
    if not path.is_file():
        raise ProfileInputError(str(path), None, None, "no such file")
    sessions: dict[str | int, list[TurnLengths]] = {}
    last_line: dict[str | int, int] = {}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                line = SessionFileLine.model_validate_json(raw)
            except ValidationError as exc:
                first = exc.errors()[0]
                if first.get("type") == "json_invalid":
                    raise ProfileInputError(str(path), lineno, None, f"malformed JSON ({first['msg']})") from None
                err = from_validation_error(str(path), lineno, exc)
                raise ProfileInputError(err.file, err.line, err.field, err.message) from None
            try:
                ts_s = parse_timestamp(line.timestamp)
            except ValueError:
                raise ProfileInputError(str(path), lineno, "timestamp", f"not a timestamp: {line.timestamp!r}") from None
            turn = TurnLengths(ts_s, line.isl, line.osl)
            turns = sessions.setdefault(line.session, [])
            if turns:
                _check_growth(path, lineno, line.session, turns[-1], turn, last_line[line.session])
            turns.append(turn)
            last_line[line.session] = lineno
    if not sessions:
        raise ProfileInputError(str(path), None, None, "no sessions in the file")
    return list(sessions.values())


def read_session_files(paths: Sequence[Path], window: TimeWindow, skipped: Counter[str]) -> tuple[Readout, list[Session]]:
    """Sessions files as the profile reads them: every turn in the slice (the statistics) and the
    sessions that start in it."""
    groups = [turns for path in paths for turns in read_session_file(path)]
    turns = list(select_turns((t for g in groups for t in g), window, skipped))
    readout = Readout(turns, "sessions " + ", ".join(p.name for p in paths))
    return readout, in_window((session_of(g) for g in groups), window, skipped)


def _check_growth(path: Path, lineno: int, session: str | int, prev: TurnLengths, turn: TurnLengths,
                  prev_line: int) -> None:
    if turn.isl < prev.isl + prev.osl + 1:
        raise ProfileInputError(
            str(path), lineno, "isl",
            f"session {session!r}: the prefix does not grow: ISL {turn.isl} < previous turn's ISL {prev.isl} + OSL "
            f"{prev.osl} + 1 (line {prev_line}); a turn's ISL holds the previous prompt and answer and its new tokens")
    if turn.timestamp_s < prev.timestamp_s:
        raise ProfileInputError(str(path), lineno, "timestamp",
                                f"session {session!r}: earlier than the session's previous turn (line {prev_line})")


# ---- statistics and the pool -----------------------------------------------------------------


class SessionStats(Strict):
    """What the sessions of a profile look like (quantiles: numpy 'linear')."""

    rule: str  # how sessions were found
    sessions: int
    turns: int
    continuation_share: float  # turns that continue a session (all but the first of each)
    history_share: float  # input tokens that are earlier turns of the same session / all input tokens
    turns_per_session_mean: float
    turns_per_session_p50: float
    turns_per_session_p90: float
    turns_per_session_p99: float
    turns_per_session_max: int
    # Think time before each continuation (None: no session has a second turn).
    think_s_mean: float | None = None
    think_s_p50: float | None = None
    think_s_p90: float | None = None
    think_s_p99: float | None = None
    think_s_max: float | None = None


def history_share(sessions: Iterable[Sequence[SessionTurn]]) -> float:
    """Share of all prompt tokens that are earlier prompts and answers of the same session."""
    total = new = 0
    for turns in sessions:
        total += sum(prompt_tokens(turns))
        new += sum(t.new_input_tokens for t in turns)
    return (total - new) / total if total else 0.0


def session_stats(sessions: Sequence[Sequence[SessionTurn]], rule: str) -> SessionStats:
    counts = np.array([len(s) for s in sessions], dtype=np.int64)
    if counts.size == 0:
        raise ValueError("no sessions")
    think = np.array([t.think_s for s in sessions for t in s[1:]], dtype=np.float64)
    n50, n90, n99 = np.percentile(counts, [50, 90, 99])
    fields: dict[str, float | None] = {}
    if think.size:
        t50, t90, t99 = np.percentile(think, [50, 90, 99])
        fields = {"think_s_mean": float(think.mean()), "think_s_p50": float(t50), "think_s_p90": float(t90),
                  "think_s_p99": float(t99), "think_s_max": float(think.max())}
    return SessionStats(
        rule=rule, sessions=len(sessions), turns=int(counts.sum()),
        continuation_share=float((counts - 1).sum() / counts.sum()), history_share=history_share(sessions),
        turns_per_session_mean=float(counts.mean()), turns_per_session_p50=float(n50), turns_per_session_p90=float(n90),
        turns_per_session_p99=float(n99), turns_per_session_max=int(counts.max()), **fields,
    )


# Think times are kept to the millisecond in profiles: the data's own stamps are no finer.
THINK_DECIMALS = 3


def pool_rows(sessions: Sequence[Session], pool_turns: int, seed: int) -> list[list[tuple[int, int, float]]]:
    """The sessions a profile keeps for replay, as [[new input, output, think s], ...] per session:
    all of them when they hold at most `pool_turns` turns, else a seeded uniform subsample of
    sessions (in the data's order) that does."""
    picked = list(range(len(sessions)))
    if sum(len(s.turns) for s in sessions) > pool_turns:
        order = np.random.default_rng(seed).permutation(len(sessions))
        sizes = np.cumsum([len(sessions[i].turns) for i in order])
        picked = sorted(order[: int(np.searchsorted(sizes, pool_turns, side="right"))].tolist())
    return [[(t.new_input_tokens, t.output_tokens, round(t.think_s, THINK_DECIMALS)) for t in sessions[i].turns]
            for i in picked]


def cut_to_fit(turns: Sequence[SessionTurn], max_model_len: int) -> tuple[SessionTurn, ...]:
    """The turns before the first whose prompt and answer exceed `max_model_len`: a session is
    replayed only as far as the server can hold it."""
    for k, isl in enumerate(prompt_tokens(turns)):
        if isl + turns[k].output_tokens > max_model_len:
            return tuple(turns[:k])
    return tuple(turns)

