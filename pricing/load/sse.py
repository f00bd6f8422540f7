"""Server-sent-events parsing, done after a stream ends so the read loop stays cheap.

Each network read carries one arrival stamp; an event is stamped with the read that
completed it (events that arrive together share a stamp, as they really did).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import accumulate


@dataclass
class ParsedStream:
    chunk_ns: list[int] = field(default_factory=list)  # events that carried output
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    response_id: str | None = None
    error: str | None = None  # "stream_error" (server sent an error event), "incomplete" (no [DONE])
    token_ids: list[int] | None = None  # the answer's ids, where asked for (vLLM's return_token_ids)


def _carries_output(choice: dict, chat: bool) -> bool:
    """One event per generated step counts, even with empty text (a token that is part of a
    multi-byte character decodes to ""). Chat's role-only first delta does not: it is sent
    before prefill ends, and counting it would hide prefill from TTFT."""
    if chat:
        delta = choice.get("delta") or {}
        if "role" in delta and not (delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")):
            return choice.get("finish_reason") is not None
    return True


def parse_stream(reads_ns: list[int], reads: list[bytes], chat: bool = False) -> ParsedStream:
    out = ParsedStream()
    if not reads:
        return out
    blob = b"".join(reads)
    read_ends = list(accumulate(len(r) for r in reads))
    done = False
    pos = 0
    while (sep := blob.find(b"\n\n", pos)) != -1:
        event, pos = blob[pos:sep], sep + 2
        stamp = reads_ns[bisect_left(read_ends, sep + 2)]
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            try:
                obj = json.loads(payload)
            except json.JSONDecodeError:
                out.error = "stream_error"
                continue
            _apply_event(out, obj, stamp, chat)
    if out.error is None and not done:
        out.error = "incomplete"
    return out


def _apply_event(out: ParsedStream, obj: dict, stamp: int, chat: bool) -> None:
    if "error" in obj or obj.get("object") == "error":
        out.error = "stream_error"
        return
    out.response_id = out.response_id or obj.get("id")
    if usage := obj.get("usage"):
        out.prompt_tokens = usage.get("prompt_tokens", out.prompt_tokens)
        out.completion_tokens = usage.get("completion_tokens", out.completion_tokens)
    choices = obj.get("choices") or ()  # usage-only events have none
    if any(_carries_output(c, chat) for c in choices):
        out.chunk_ns.append(stamp)
    for choice in choices:
        if (ids := choice.get("token_ids")) is not None:
            out.token_ids = out.token_ids if out.token_ids is not None else []
            out.token_ids.extend(ids)
