"""The exact steady-state truth of the simulated engine (`sim_engine`) under a closed or open loop,
computed offline on a virtual clock, and the capacity per SLO tier it implies: what the probe
statistics and the capacity search are checked against. Results are cached on disk when asked.

Definitions. The cohort is the requests that arrive after the warm-up and before the cut (by arrival
order: the first warmup_frac of `horizon_requests` are warm-up, the cut is the horizon-th arrival),
each followed until it finishes while the load goes on, so no length is favoured. TTFT = arrival ->
first token; TPOT = (last token - first token) / (OSL - 1) for OSL >= 2; E2E = arrival -> last token;
percentiles: numpy's default 'linear'. Flows (request_rate_rps, input_tok_s, output_tok_s) are what
the engine completes, prefills and emits in steps ending in [warm-up, cut), over that span.

Cost, on this 2-core VM (one core), 40,000 requests, default EngineModel, WildChat pairs: a closed-loop
point takes ~1 s of CPU (quiet decode steps are jumped over: 13M steps at concurrency 1, 0.1M at 128),
an open-loop point 1.3-1.9 s; a capacity search 8-16 s closed (6-14 points), 17-21 s open (11-14).
Precision: p90s from two pairs draws (closed loop) or two arrival seeds (open loop, below 80% of
saturation) agree within 0.5%. Open-loop capacity moves a TPOT p90 that is flat in the rate, so it
agrees within ~1% across arrival seeds (0.972/0.978, 3.832/3.820, 7.109/7.178 req/s for the three
default tiers), coarser than the bisection's 0.5%; closed-loop capacity (an integer) is the same.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from pydantic import BaseModel, Field

from pricing.load.arrivals import think_time_s
from pricing.schema import Frozen, LatencyStats
from pricing.testing.sim_engine import ADMIT_S, EngineModel, EngineStep, SimEngine

TRUTH_VERSION = 7  # part of every cache key: bump when a definition changes
HORIZON_REQUESTS = 40_000
WARMUP_FRAC = 0.1
# Open loop: stable when the backlog grew by at most this share of the span's arrivals (a stable
# queue's backlog wanders by its own size, a few hundred requests at most, not with the span).
UNSTABLE_BACKLOG_FRAC = 0.02
Pairs = Sequence[tuple[int, int]]
_M = TypeVar("_M", bound=BaseModel)


class TruthPoint(Frozen):
    """The steady state of one load. Open loop past saturation: stable=False and no latencies."""

    mode: Literal["closed", "open"]
    concurrency: int | None = None
    think_s: float | None = None  # closed loop: mean think time between a client's requests
    offered_rate_rps: float | None = None
    burstiness: float | None = None
    stable: bool
    requests: int  # the cohort
    span_s: float
    request_rate_rps: float
    input_tok_s: float
    output_tok_s: float
    ttft_s: LatencyStats
    tpot_s: LatencyStats
    e2e_s: LatencyStats
    steps: int  # engine steps simulated, skipped ones included

    def latency(self, metric: Literal["ttft", "tpot", "e2e"], percentile: int) -> float | None:
        return getattr(getattr(self, f"{metric}_s"), f"p{percentile}")


class CapacityTruth(Frozen):
    """The highest load meeting a tier at one percentile: 0 when even the lightest load fails it."""

    mode: Literal["closed", "open"]
    tier_ttft_s: float
    tier_tpot_s: float
    percentile: Literal[50, 90, 99]
    level: float  # concurrency (closed) or offered request rate (open)
    request_rate_rps: float
    at_limit: bool = False  # the search stopped at its top load still passing
    point: TruthPoint | None = None  # the truth at `level`
    evaluated: list[tuple[float, bool]] = Field(default_factory=list)  # (level, passed) in search order


def latency_stats(values: np.ndarray) -> LatencyStats:
    if len(values) == 0:
        return LatencyStats(count=0)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return LatencyStats(count=len(values), mean=float(values.mean()), p50=float(p50), p90=float(p90),
                        p99=float(p99), max=float(values.max()))


@dataclass
class _Run:
    """One simulation's clock and records. Request ids are issue order (= arrival order)."""

    engine: SimEngine
    isl: list[int]
    osl: list[int]
    warm_n: int
    cut_n: int
    t_s: float = 0.0
    arrive_s: list[float] = field(default_factory=list)
    first_s: dict[int, float] = field(default_factory=dict)
    end_s: dict[int, float] = field(default_factory=dict)
    window: tuple[float, float] = (math.inf, math.inf)  # [warm-up, cut) once known
    done_in_window: int = 0
    in_tokens: int = 0
    out_tokens: int = 0
    cohort_left: int = 0

    def issue(self, t_s: float) -> None:
        rid = len(self.arrive_s)
        self.engine.add(rid, self.isl[rid % len(self.isl)], self.osl[rid % len(self.osl)], t_s)
        self.arrive_s.append(t_s)
        if rid == self.warm_n:
            self.window = (t_s, math.inf)
        elif rid == self.cut_n:
            self.window = (self.window[0], t_s)

    def skip(self, steps: int) -> None:
        """Quiet steps: count the ones ending in the window arithmetically (all alike)."""
        decoding, d_s = self.engine.decoding, self.engine.skip(steps)
        lo, hi = self.window
        if lo != math.inf:  # step j (1..steps) ends at t + j d; count those in [lo, hi)
            first = max(1, math.ceil((lo - self.t_s) / d_s))
            last = steps if hi == math.inf else min(steps, math.ceil((hi - self.t_s) / d_s) - 1)
            self.out_tokens += max(0, last - first + 1) * decoding
        self.t_s += steps * d_s

    def step(self) -> EngineStep | None:
        step = self.engine.step()
        if step is None:
            return None
        self.t_s += step.duration_s
        t_s, (lo, hi) = self.t_s, self.window
        inside = lo <= t_s < hi
        if inside:
            self.in_tokens += step.prefill_tokens
            self.out_tokens += len(step.first_token) + len(step.decoded)
            self.done_in_window += len(step.finished)
        for rid in step.first_token:
            self.first_s[rid] = t_s
        for rid in step.finished:
            self.end_s[rid] = t_s
            if self.warm_n <= rid < self.cut_n:
                self.cohort_left -= 1
        return step

    def truth(self, stable: bool = True, **load) -> TruthPoint:
        """The cohort's latencies and the span's flows; past saturation (not stable) the flows are
        the engine's most and latencies are left out: they would only measure the horizon."""
        span_s = self.window[1] - self.window[0]
        ttft = tpot = e2e = np.array([])
        if stable:
            ids = range(self.warm_n, self.cut_n)
            arrive = np.asarray(self.arrive_s[self.warm_n:self.cut_n])
            first, end = np.array([self.first_s[i] for i in ids]), np.array([self.end_s[i] for i in ids])
            osl = np.array([self.osl[i % len(self.osl)] for i in ids])
            multi = osl >= 2
            ttft, e2e = first - arrive, end - arrive
            tpot = (end[multi] - first[multi]) / (osl[multi] - 1)
        return TruthPoint(
            **load, stable=stable, requests=self.cut_n - self.warm_n, span_s=span_s,
            request_rate_rps=self.done_in_window / span_s, input_tok_s=self.in_tokens / span_s,
            output_tok_s=self.out_tokens / span_s, ttft_s=latency_stats(ttft), tpot_s=latency_stats(tpot),
            e2e_s=latency_stats(e2e), steps=self.engine.step_index)


def _new_run(model: EngineModel, pairs: Pairs, horizon_requests: int, warmup_frac: float) -> _Run:
    if not pairs:
        raise ValueError("no (ISL, OSL) pairs")
    if not 0 <= warmup_frac < 1 or horizon_requests < 2:
        raise ValueError(f"need horizon_requests >= 2 and 0 <= warmup_frac < 1, got {horizon_requests}, {warmup_frac}")
    warm_n = int(warmup_frac * horizon_requests)
    isl, osl = [int(p[0]) for p in pairs], [int(p[1]) for p in pairs]
    return _Run(SimEngine(model), isl, osl, warm_n, horizon_requests, cohort_left=horizon_requests - warm_n)


def _simulate_closed(model: EngineModel, pairs: Pairs, concurrency: int, horizon_requests: int,
                     warmup_frac: float, think_s: float = 0.0, seed: int = 0) -> TruthPoint:
    run = _new_run(model, pairs, horizon_requests, warmup_frac)
    _drive_closed(run, concurrency, think_s, seed)
    return run.truth(mode="closed", concurrency=concurrency, think_s=think_s)


def _drive_closed(run: _Run, concurrency: int, think_s: float, seed: int) -> None:
    """N clients into the run's engine until its cohort has finished (see closed_loop_truth)."""
    rng = np.random.default_rng(seed)
    thinking: list[float] = []  # when each thinking client sends again (a heap)
    for _ in range(concurrency):
        run.issue(0.0)
    while run.cohort_left or run.window[1] == math.inf:  # the cut is the horizon-th arrival
        if run.engine.idle and thinking and thinking[0] > run.t_s:
            run.t_s = thinking[0]
        while thinking and thinking[0] <= run.t_s + ADMIT_S:
            run.issue(heapq.heappop(thinking))
        quiet = run.engine.quiet_steps()
        if quiet and thinking:  # up to the step the next thinking client joins
            quiet = min(quiet, math.ceil((thinking[0] - ADMIT_S - run.t_s) / run.engine.quiet_step_s()))
        if quiet > 0:
            run.skip(quiet)
            continue
        step = run.step()
        for _ in step.finished if step is not None else ():
            if think_s <= 0:
                # The next request follows at once: a real client's turnaround is within ADMIT_S
                # at low concurrency, so it joins the step that starts at this boundary too.
                run.issue(run.t_s)
            else:
                heapq.heappush(thinking, run.t_s + think_time_s(rng, think_s))


def arrival_times_s(rate_rps: float, burstiness: float, seed: int) -> Iterator[float]:
    """Arrival times from 0 with gamma gaps of mean 1/rate (shape 1: Poisson, smaller: burstier),
    drawn as pricing.load.client draws its gaps."""
    rng, t_s = np.random.default_rng(seed), 0.0
    scale = 1.0 / (rate_rps * burstiness)
    while True:
        for gap_s in rng.gamma(burstiness, scale, size=4096).tolist():
            t_s += gap_s
            yield t_s


def _drive_open(run: _Run, rate_rps: float, burstiness: float, seed: int, stop_unstable: bool = True) -> bool:
    """Arrivals into the run's engine until its cohort has finished; False when it stopped at the
    cut because the span was unstable (`stop_unstable`)."""
    engine, arrivals, checked = run.engine, arrival_times_s(rate_rps, burstiness, seed), not stop_unstable
    next_s = next(arrivals)  # arrivals go on past the cut, keeping the load on while the cohort finishes
    while run.cohort_left or run.t_s < run.window[1]:  # at low load the cohort can finish before the cut
        if engine.idle and run.t_s < next_s:
            run.t_s = next_s
        while next_s <= run.t_s + ADMIT_S:  # arrivals during a step, or just after, join the next
            run.issue(next_s)
            next_s = next(arrivals)
        if not checked and run.t_s >= run.window[1]:
            checked = True
            if not _kept_up(run):
                return False
        quiet = engine.quiet_steps()
        if quiet:  # up to the step at whose end the next arrival joins
            run.skip(min(quiet, math.ceil((next_s - ADMIT_S - run.t_s) / engine.quiet_step_s())))
        else:
            run.step()
    return True


def _simulate_open(model: EngineModel, pairs: Pairs, rate_rps: float, burstiness: float, seed: int,
                   horizon_requests: int, warmup_frac: float) -> TruthPoint:
    run = _new_run(model, pairs, horizon_requests, warmup_frac)
    stable = _drive_open(run, rate_rps, burstiness, seed)
    return run.truth(stable=stable, mode="open", offered_rate_rps=rate_rps, burstiness=burstiness)


def open_loop_requests(model: EngineModel, pairs: Pairs, rate_rps: float, seed: int,
                       horizon_requests: int) -> dict[str, np.ndarray]:
    """Every request of one open-loop run from an empty engine, in arrival order: arrival, first
    and last token times (s) and OSL. For checking what windows of a real probe's length see."""
    run = _new_run(model, pairs, horizon_requests, 0.0)
    _drive_open(run, rate_rps, 1.0, seed, stop_unstable=False)
    return _requests(run)


def closed_loop_requests(model: EngineModel, pairs: Pairs, concurrency: int, think_s: float, seed: int,
                         horizon_requests: int) -> dict[str, np.ndarray]:
    """Every request of one closed-loop run from an empty engine, as open_loop_requests gives them."""
    run = _new_run(model, pairs, horizon_requests, 0.0)
    _drive_closed(run, concurrency, think_s, seed)
    return _requests(run)


def _requests(run: _Run) -> dict[str, np.ndarray]:
    """The run's finished requests in arrival order: arrival, first and last token times (s), OSL."""
    ids = [i for i in range(len(run.arrive_s)) if i in run.end_s]
    return {"arrive_s": np.asarray([run.arrive_s[i] for i in ids]), "first_s": np.asarray([run.first_s[i] for i in ids]),
            "end_s": np.asarray([run.end_s[i] for i in ids]),
            "osl": np.asarray([run.osl[i % len(run.osl)] for i in ids])}


def _kept_up(run: _Run) -> bool:
    """Whether completions kept up with arrivals over the span (a queue past saturation grows with it)."""
    arrived = run.cut_n - run.warm_n
    return arrived - run.done_in_window <= UNSTABLE_BACKLOG_FRAC * arrived


def pairs_digest(pairs: Pairs) -> str:
    return hashlib.sha256(np.asarray(pairs, dtype=np.int64).tobytes()).hexdigest()


def _cached(cache_dir: Path | str | None, cls: type[_M], key: dict, compute: Callable[[], _M]) -> _M:
    """compute(), or what it returned before for this key (JSON under cache_dir, named by the key's hash)."""
    if cache_dir is None:
        return compute()
    digest = hashlib.sha256(json.dumps({"version": TRUTH_VERSION, **key}, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir) / f"{key['kind']}-{digest[:24]}.json"
    if path.is_file():
        return cls.model_validate_json(path.read_bytes())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent writers of one key write the same bytes
    tmp.write_text(result.model_dump_json())
    tmp.replace(path)
    return result


def closed_loop_truth(model: EngineModel, pairs: Pairs, concurrency: int, *, think_s: float = 0.0, seed: int = 0,
                      horizon_requests: int = HORIZON_REQUESTS, warmup_frac: float = WARMUP_FRAC,
                      cache_dir: Path | str | None = None, digest: str | None = None) -> TruthPoint:
    """N clients, each sending its next request when its last one ends, after a think time of mean
    think_s drawn as the load client draws it (0: at once); request i is pairs[i % len].

    With no think time the clients send at step boundaries, and a real client's turnaround (2-3 ms
    at 4 streams, 10 ms for 24 in lockstep, on 2 cores) decides which step a request joins: no
    offline truth can know that, so checks of a real client against this truth give the clients
    a think time, which spreads their arrivals over the steps as they are in the truth."""
    if not 1 <= concurrency <= int(warmup_frac * horizon_requests):
        # The first wave arrives all at once at 0: the warm-up must outlast it.
        raise ValueError(f"concurrency must be >= 1 and at most the warm-up's {int(warmup_frac * horizon_requests)} "
                         f"requests, got {concurrency}")
    key = dict(kind="closed", model=model.model_dump(), pairs=digest or pairs_digest(pairs), concurrency=concurrency,
               horizon_requests=horizon_requests, warmup_frac=warmup_frac, think_s=think_s,
               seed=seed if think_s > 0 else None)
    return _cached(cache_dir, TruthPoint, key,
                   lambda: _simulate_closed(model, pairs, concurrency, horizon_requests, warmup_frac, think_s, seed))


def open_loop_truth(model: EngineModel, pairs: Pairs, rate_rps: float, seed: int = 0, *, burstiness: float = 1.0,
                    horizon_requests: int = HORIZON_REQUESTS, warmup_frac: float = WARMUP_FRAC,
                    cache_dir: Path | str | None = None, digest: str | None = None) -> TruthPoint:
    """Gamma arrivals at rate_rps (burstiness is the shape: 1 is Poisson, smaller is burstier), seeded;
    request i is pairs[i % len]. Past saturation the result says stable=False and has no latencies."""
    if rate_rps <= 0 or burstiness <= 0:
        raise ValueError(f"rate_rps and burstiness must be > 0, got {rate_rps}, {burstiness}")
    key = dict(kind="open", model=model.model_dump(), pairs=digest or pairs_digest(pairs), rate_rps=rate_rps,
               seed=seed, burstiness=burstiness, horizon_requests=horizon_requests, warmup_frac=warmup_frac)
    return _cached(cache_dir, TruthPoint, key,
                   lambda: _simulate_open(model, pairs, rate_rps, burstiness, seed, horizon_requests, warmup_frac))


def meets(point: TruthPoint, tier_ttft_s: float, tier_tpot_s: float, percentile: int) -> bool:
    """Both percentiles within the tier (a cohort without multi-token replies has no TPOT to fail)."""
    if not point.stable:
        return False
    ttft, tpot = point.latency("ttft", percentile), point.latency("tpot", percentile)
    return ttft is not None and ttft <= tier_ttft_s and (tpot is None or tpot <= tier_tpot_s)


def capacity_truth(model: EngineModel, pairs: Pairs, tier_ttft_s: float, tier_tpot_s: float,
                   percentile: Literal[50, 90, 99] = 90, mode: Literal["closed", "open"] = "closed", *,
                   seed: int = 0, burstiness: float = 1.0, think_s: float = 0.0,
                   horizon_requests: int = HORIZON_REQUESTS, warmup_frac: float = WARMUP_FRAC, rel_tol: float = 0.005,
                   max_concurrency: int = 1024, cache_dir: Path | str | None = None) -> CapacityTruth:
    """The highest load at which both p-th percentiles meet the tier: an integer concurrency (closed)
    or an offered rate found by bisection to rel_tol (open). Assumes latency grows with load: the
    search doubles the load until it fails, then bisects between the last pass and the first fail."""
    digest = pairs_digest(pairs)
    common = dict(horizon_requests=horizon_requests, warmup_frac=warmup_frac, cache_dir=cache_dir, digest=digest)
    key = dict(kind="capacity", model=model.model_dump(), pairs=digest, tier=[tier_ttft_s, tier_tpot_s],
               percentile=percentile, mode=mode, seed=seed if mode == "open" else None,
               burstiness=burstiness if mode == "open" else None, horizon_requests=horizon_requests,
               warmup_frac=warmup_frac, rel_tol=rel_tol if mode == "open" else None,
               max_concurrency=max_concurrency if mode == "closed" else None,
               think_s=think_s if mode == "closed" else None)
    points: dict[float, TruthPoint] = {}

    def at(level: float) -> TruthPoint:
        if level not in points:
            points[level] = (closed_loop_truth(model, pairs, int(level), think_s=think_s, seed=seed, **common)
                             if mode == "closed" else
                             open_loop_truth(model, pairs, level, seed, burstiness=burstiness, **common))
        return points[level]

    def between(lo: float, hi: float) -> float | None:
        """The next load to try, None once the bracket is as narrow as asked."""
        if mode == "closed":
            return float((lo + hi) // 2) if hi - lo > 1 else None
        return (lo + hi) / 2 if hi - lo > rel_tol * lo else None

    def search() -> CapacityTruth:
        evaluated: list[tuple[float, bool]] = []

        def passes(level: float) -> bool:
            ok = meets(at(level), tier_ttft_s, tier_tpot_s, percentile)
            evaluated.append((level, ok))
            return ok

        if mode == "closed":
            start, top = 1.0, float(min(max_concurrency, int(warmup_frac * horizon_requests)))  # see closed_loop_truth
        else:  # one request at a time: the closed loop's rate at concurrency 1
            start, top = closed_loop_truth(model, pairs, 1, **common).request_rate_rps, math.inf
        lo, hi = _bracket(passes, start, top, integer=mode == "closed")
        while hi is not None and (mid := between(lo, hi)) is not None:
            lo, hi = (mid, hi) if passes(mid) else (lo, mid)
        point = at(lo) if lo > 0 else None
        return CapacityTruth(mode=mode, tier_ttft_s=tier_ttft_s, tier_tpot_s=tier_tpot_s, percentile=percentile,
                             level=lo, request_rate_rps=point.request_rate_rps if point else 0.0,
                             at_limit=hi is None, point=point, evaluated=evaluated)

    return _cached(cache_dir, CapacityTruth, key, search)


def _bracket(passes: Callable[[float], bool], start: float, top: float, integer: bool) -> tuple[float, float | None]:
    """(a passing load or 0, a failing one or None at the top): doubling from start, or halving
    down from it when it fails (open loop; closed loop has nothing below concurrency 1)."""
    if passes(start):
        lo = start
        while lo < top:
            hi = min(lo * 2, top)
            if not passes(hi):
                return lo, hi
            lo = hi
        return lo, None
    hi = start
    for _ in range(0 if integer else 20):
        lo = hi / 2
        if passes(lo):
            return lo, hi
        hi = lo
    return 0.0, hi
