"""Session replay: chat sessions (workload.sessions) sent as they arrive at a chat service. Turn
k+1's prompt is turn k's prompt token ids, plus turn k's answer token ids as streamed, plus new
random ids; it goes the data's think time x `LoadSpec.think_scale` after the answer. vLLM's
prefix cache can then serve the history, as it would a real chat's.

A closed loop keeps `concurrency` sessions active (a finished one is replaced at once); an open
loop starts sessions at the load's request rate / the mean turns per session. The answer's ids
come from vLLM's `return_token_ids` (>= 0.10; the mock server streams them too), so the prompt
holds exactly what the server generated, never a re-tokenized text of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pricing.load.client import ClientConfig, ProbePlan
from pricing.load.loops import Link, Sink, StopRule, Unit, WindowMark, run_units
from pricing.load.run_state import LoadRun, OnRecord
from pricing.load.settle import UnitShape
from pricing.schema import CANCELLED, LoadSpec
from pricing.workload.prompts import PromptFactory
from pricing.workload.sessions import SessionTurn, prompt_tokens

# A turn whose answer came without its token ids cannot be continued exactly.
NO_TOKEN_IDS = "no_token_ids"


@dataclass(frozen=True)
class SessionTraffic:
    """The sessions a probe replays (profile.replay_sessions), drawn with replacement, seeded."""

    sessions: Sequence[tuple[SessionTurn, ...]]
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sessions or not all(self.sessions):
            raise ValueError("session traffic needs sessions of at least one turn")

    @property
    def mean_turns(self) -> float:
        return sum(len(s) for s in self.sessions) / len(self.sessions)

    def draws(self) -> Iterator[tuple[SessionTurn, ...]]:
        rng = np.random.default_rng(self.seed)
        while True:
            for i in rng.integers(0, len(self.sessions), size=1024):
                yield self.sessions[i]

    def turn_pairs(self) -> Iterator[tuple[int, int]]:
        """(ISL, OSL) of each turn of the sessions drawn, as independent requests: the same lengths,
        fresh prompts (a session sweep's `prefill` probe, the cost of an uncached token)."""
        for turns in self.draws():
            yield from zip(prompt_tokens(turns), (t.output_tokens for t in turns), strict=True)


async def drive_sessions(
    cfg: ClientConfig,
    load: LoadSpec,
    traffic: SessionTraffic,
    plan: ProbePlan | None = None,
    on_record: OnRecord | None = None,
    clock: Callable[[], int] = time.perf_counter_ns,
    stop_rule: StopRule | None = None,
    mark: WindowMark | None = None,
) -> LoadRun:
    """Replay sessions at one load level (loops.run_units: warm-up until the closed loop has
    finished as many sessions as it has workers, the window, its tail)."""
    if cfg.endpoint != "completions" or cfg.prompts != "token_ids":
        raise ValueError("session replay sends token ids to /v1/completions: each prompt must hold the last answer's "
                         "exact token ids (use --endpoint completions --prompt-format token_ids)")
    with PromptFactory(cfg) as prompts:  # fresh entropy: no probe's sessions share a prefix with another's

        def make_unit(link: Link) -> tuple[Unit, Callable[[], None]]:
            return session_unit(link, load, traffic.draws(), prompts.token_ids), lambda: None

        return await run_units(cfg, load, make_unit, plan, on_record, clock, stop_rule, mark,
                               arrivals_per_request=1.0 / traffic.mean_turns)


def session_unit(link: Link, load: LoadSpec, sessions: Iterator[Sequence[SessionTurn]],
                 random_ids: Callable[[int], list[int]]) -> Unit:
    """One session, turn by turn. A prefill-only probe (max_tokens=1) extends the history with the
    streamed token and random ids standing for the rest of the answer, so its prompts have the
    session's lengths; the server never computed those ids, so they are new tokens to it."""
    prefill_only = load.prefill_only

    def new_ids(n: int) -> list[int]:
        return random_ids(n) if n > 0 else []

    async def play(sink: Sink, osl_fraction: float, rng: np.random.Generator) -> bool:
        history: list[int] = []
        rec = None
        turns = next(sessions)
        osls = [1 if prefill_only else max(1, round(t.output_tokens * (osl_fraction if k == 0 else 1.0)))
                for k, t in enumerate(turns)]
        link.planned(UnitShape(len(turns), sum(osls) - len(osls), load.think_scale * sum(t.think_s for t in turns[1:])))
        for k, turn in enumerate(turns):
            pause_s = turn.think_s * load.think_scale if k else 0.0
            if pause_s > 0:
                await asyncio.sleep(pause_s)
            prompt = history + new_ids(turn.new_input_tokens)
            osl = osls[k]
            reply = await link.send(prompt, len(prompt), osl, token_ids=True)
            rec = reply.record
            if rec.ok and not reply.token_ids:
                rec = rec.model_copy(update={"error": NO_TOKEN_IDS})
            sink.done(rec)
            if rec.error == CANCELLED:
                return False
            if not rec.ok:
                break  # no answer to build on: the user gives up on this chat
            answer = reply.token_ids or []
            if prefill_only:
                answer = answer + new_ids(turn.output_tokens - len(answer))
            history = prompt + answer
        if rec is not None:
            sink.warmed(rec)
        return True

    return play
