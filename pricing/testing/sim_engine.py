"""A continuous-batching engine as a pure state machine (no I/O, no clocks), shaped like vLLM V1's
scheduler with chunked prefill: the one model of a server that the offline truth (`sim_truth`) and
the mock server's engine mode both run.

The defaults' curve: closed loop, zero think time, on the committed profile wildchat-2024-03-17_23
capped at 4,096 tokens (profile.sample(50_000, seed=0, max_model_len=4096): ISL mean 1,306, p90 4,095;
OSL mean 326; 15% OSL 1), from `sim_truth.closed_loop_truth` (seed 1's pairs agree within 0.5%):

    concurrency  req/s  TTFT p90   TPOT p90   output tok/s
              1  0.369    57.5 ms    8.30 ms     120
              4  1.315    68.5 ms    9.46 ms     427
             16  3.664    79.3 ms   13.78 ms   1,189
             64  6.615   122.6 ms   30.54 ms   2,146
            128  7.637   195.4 ms   52.69 ms   2,479   (max_num_seqs: the batch is full)
            256  7.637  18.75 s     52.69 ms   2,479   (half the clients wait for a slot)

so the p90 tiers (TTFT, TPOT) (0.25 s, 10 ms), (0.5 s, 16.7 ms), (1 s, 50 ms) hold up to concurrency
5, 24 and 120 (1.59, 4.57 and 7.56 req/s), each bound by TPOT.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from pydantic import Field, model_validator

from pricing.schema import Frozen

# A step is planned this long after it starts, and requests that arrived by then join it (vLLM's
# loop, too, schedules what has reached it when it gets to schedule). A closed-loop client sends
# its next request a fraction of a millisecond after its last token, so it joins the next step
# as a zero-think-time client would; the truth, the replay and the mock all use this rule.
ADMIT_S = 0.004


class EngineModel(Frozen):
    """The engine's speed and limits: what one step costs and how much fits in it."""

    # weights read once per step: the decode floor; longer than ADMIT_S, or a step would be
    # planned after its own end
    step_base_s: float = Field(default=0.008, gt=ADMIT_S)
    step_per_seq_s: float = Field(default=0.0003, ge=0)  # per sequence in the batch (KV reads, sampling)
    step_per_prefill_token_s: float = Field(default=0.00001, ge=0)  # prompt tokens are compute-bound
    max_num_seqs: int = Field(default=128, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=1)  # the token budget of one step

    @model_validator(mode="after")
    def _every_decode_fits(self) -> EngineModel:
        # vLLM refuses this too: with fewer tokens than sequences a full batch could not decode.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs})")
        return self

    def step_s(self, seqs: int, prefill_tokens: int) -> float:
        """One step's duration, for the sequences in its batch and the prompt tokens it prefills."""
        return self.step_base_s + self.step_per_seq_s * seqs + self.step_per_prefill_token_s * prefill_tokens


@dataclass(frozen=True, slots=True)
class EngineStep:
    """One planned step and what happens at its end. Every id in `first_token` and `decoded` gets one
    output token; `finished` (a subset of the two) got its last one and has left the engine."""

    duration_s: float
    batch_seqs: int
    prefill_tokens: int
    first_token: tuple[Hashable, ...]  # prefill completed in this step
    decoded: tuple[Hashable, ...]  # decoded their next token
    finished: tuple[Hashable, ...]


class _Seq:
    __slots__ = ("rid", "osl", "left")

    def __init__(self, rid: Hashable, isl: int, osl: int) -> None:
        self.rid, self.osl, self.left = rid, osl, isl  # left: prompt tokens still to prefill


class SimEngine:
    """The scheduler's state: a FIFO waiting queue, sequences in prefill and sequences decoding.

    Each step: every decoding sequence decodes one token (one token of budget each); then sequences
    still in prefill continue it in chunks; then waiting requests are admitted in arrival order while
    fewer than max_num_seqs run and budget remains, each with a chunk of up to the budget left.
    A sequence's first token comes at the end of the step that completes its prefill, then one at the
    end of each later step; it leaves with its osl-th. Not modelled: KV-cache capacity (preemption),
    prefix caching, speculative decoding. A step costs ~9 us of CPU with 100 running (10^5 in 0.9 s).
    """

    def __init__(self, model: EngineModel) -> None:
        self.model = model
        self._waiting: deque[_Seq] = deque()
        self._prefilling: list[_Seq] = []  # running, in admission order
        self._decoding: dict[Hashable, int] = {}  # id -> the step that produces its last token
        self._finish_at: dict[int, list[Hashable]] = {}  # step -> ids finishing then (cancelled ones too)
        self._finish_steps: list[int] = []  # heap of _finish_at's keys
        self._known: set[Hashable] = set()
        self._last_arrival_s = float("-inf")
        self.step_index = 0  # steps done so far

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def decoding(self) -> int:
        return len(self._decoding)

    @property
    def running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._prefilling or self._decoding)

    def add(self, request_id: Hashable, isl: int, osl: int, now_s: float) -> None:
        """Enqueue a request arriving at now_s (the caller's clock; arrivals come in order): it joins
        the next step planned."""
        if isl < 1 or osl < 1:
            raise ValueError(f"request {request_id!r}: ISL and OSL must be >= 1, got {isl}, {osl}")
        if request_id in self._known:
            raise ValueError(f"request {request_id!r} is already in the engine")
        if now_s < self._last_arrival_s:
            raise ValueError(f"request {request_id!r} arrived at {now_s} before the last one ({self._last_arrival_s})")
        self._last_arrival_s = now_s
        self._known.add(request_id)
        self._waiting.append(_Seq(request_id, isl, osl))

    def cancel(self, request_id: Hashable) -> bool:
        """Remove a request wherever it is (a client went away); False if it was not in the engine."""
        if request_id not in self._known:
            return False
        self._known.discard(request_id)
        if self._decoding.pop(request_id, None) is None:  # (a decoding one's _finish_at entry is skipped later)
            self._prefilling = [s for s in self._prefilling if s.rid != request_id]
            self._waiting = deque(s for s in self._waiting if s.rid != request_id)
        return True

    def quiet_steps(self) -> int:
        """How many of the next steps are alike and eventless: decodes only, the same batch, no
        first token, nobody finishing (so `skip` may jump over them). Arrivals are the caller's."""
        if self._prefilling or not self._decoding or (self._waiting and self.running < self.model.max_num_seqs):
            return 0
        while self._finish_steps and not any(r in self._decoding for r in self._finish_at[self._finish_steps[0]]):
            del self._finish_at[heapq.heappop(self._finish_steps)]  # only cancelled ids were to finish then
        return self._finish_steps[0] - self.step_index

    def quiet_step_s(self) -> float:
        return self.model.step_s(len(self._decoding), 0)

    def skip(self, steps: int) -> float:
        """Do `steps` quiet steps at once (at most quiet_steps()); returns the duration of each."""
        if not 0 < steps <= self.quiet_steps():
            raise ValueError(f"cannot skip {steps} steps; {self.quiet_steps()} are quiet")
        self.step_index += steps
        return self.quiet_step_s()

    def step(self) -> EngineStep | None:
        """Plan and do one step; None when there is nothing to do (wait for an arrival)."""
        if self.idle:
            return None
        model, k = self.model, self.step_index
        decoded = tuple(self._decoding)
        budget = model.max_num_batched_tokens - len(decoded)
        running = len(decoded) + len(self._prefilling)
        batch, prefill_tokens = len(decoded), 0
        completed: list[_Seq] = []
        for seq in self._prefilling:  # running prefills first, in admission order
            if budget == 0:
                break
            chunk = min(seq.left, budget)
            seq.left -= chunk
            budget -= chunk
            prefill_tokens += chunk
            batch += 1
            if seq.left == 0:
                completed.append(seq)
        if completed:
            self._prefilling = [s for s in self._prefilling if s.left]
        while self._waiting and budget > 0 and running < model.max_num_seqs:
            seq = self._waiting.popleft()
            chunk = min(seq.left, budget)
            seq.left -= chunk
            budget -= chunk
            prefill_tokens += chunk
            batch += 1
            running += 1
            if seq.left == 0:
                completed.append(seq)
            else:
                self._prefilling.append(seq)
        # Those whose last token is this step's (cancelled ones are no longer decoding).
        finished = [r for r in self._finish_at.pop(k, ()) if self._decoding.pop(r, None) is not None]
        while self._finish_steps and self._finish_steps[0] <= k:
            heapq.heappop(self._finish_steps)
        for seq in completed:
            if seq.osl == 1:
                finished.append(seq.rid)
                continue
            last = k + seq.osl - 1  # one token now, one per later step
            self._decoding[seq.rid] = last
            if last not in self._finish_at:
                self._finish_at[last] = []
                heapq.heappush(self._finish_steps, last)
            self._finish_at[last].append(seq.rid)
        self._known.difference_update(finished)
        self.step_index = k + 1
        return EngineStep(model.step_s(batch, prefill_tokens), batch, prefill_tokens,
                          tuple(s.rid for s in completed), decoded, tuple(finished))


def replay(model: EngineModel, requests: Iterable[tuple[Hashable, float, int, int]]) -> dict[Hashable, list[float]]:
    """The engine's own timeline, step by step: each request's output token times (seconds, on the
    arrivals' clock) for requests (id, arrival_s, isl, osl). A request arriving up to ADMIT_S after a
    step boundary joins that step; an idle engine starts a step at the next arrival."""
    todo = sorted(requests, key=lambda r: r[1])
    engine, times = SimEngine(model), {r[0]: [] for r in todo}
    t_s, i = float("-inf"), 0
    while i < len(todo) or not engine.idle:
        if engine.idle and t_s < todo[i][1]:
            t_s = todo[i][1]
        while i < len(todo) and todo[i][1] <= t_s + ADMIT_S:
            rid, arrival_s, isl, osl = todo[i]
            engine.add(rid, isl, osl, arrival_s)
            i += 1
        step = engine.step()
        assert step is not None  # something arrived or was running
        t_s += step.duration_s
        for rid in step.first_token + step.decoded:
            times[rid].append(t_s)
    return times
