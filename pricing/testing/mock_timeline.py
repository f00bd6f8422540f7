"""What the mock server did, request by request (its `/mock/timeline`), as checks read it: the
kernel's arrival stamp of each request and the write of each of its chunks, in ns."""

from __future__ import annotations

import json
import urllib.request


def fetch_timeline(url: str) -> dict[str, dict]:
    """Response id -> {recv_ns, isl, osl, head, chunk_ns, ...}, for every request the mock served."""
    with urllib.request.urlopen(f"{url}/mock/timeline") as resp:
        return json.load(resp)


def server_ttft_s(entry: dict) -> float:
    """From the request's arrival to the write of its first chunk (the entry must have one)."""
    return (entry["chunk_ns"][0] - entry["recv_ns"]) / 1e9


def server_tpot_s(entry: dict) -> float | None:
    """Mean time between its chunk writes; None with fewer than two."""
    chunks = entry["chunk_ns"]
    return (chunks[-1] - chunks[0]) / 1e9 / (len(chunks) - 1) if len(chunks) > 1 else None
