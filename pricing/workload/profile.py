"""Traffic profiles: the joint (ISL, OSL) distribution and arrival rate of a chat-traffic slice,
built from WildChat (or local files) and sampled reproducibly by the load client.

The committed default profile was generated, from the repo root, with:
    python -m pricing.profile --lengths ../shared/data/wildchat_turn_lengths_2024-03-17_23.jsonl \
        --start 2024-03-17 --end 2024-03-23 --tokenizer meta-llama/Llama-3.1-8B-Instruct \
        -o profiles/wildchat-2024-03-17_23.json
From the dataset itself (streams it; needs the hub):
    python -m pricing.profile --dataset allenai/WildChat-1M --start 2024-03-17 --end 2024-03-23 \
        --tokenizer meta-llama/Llama-3.1-8B-Instruct -o profiles/NAME.json

Statistics: means with numpy; quantiles with numpy's default 'linear' method (as schema.LatencyStats).
Max-model-len policies, for a limit L (both ISL and OSL stay >= 1):
  drop:     turns with ISL + OSL > L are removed; the sampler draws from the turns that fit.
  truncate: the prompt loses its oldest context: OSL' = min(OSL, L-1), ISL' = min(ISL, L - OSL').
  cap:      the prompt is kept where it fits and max_tokens is cut to the context left:
            ISL' = min(ISL, L-1), OSL' = min(OSL, L - ISL').
Sessions (workload.sessions) end before their first turn that does not fit, whatever the policy;
a first turn that does not fit is fitted by the policy on its own (drop: no session).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError, model_validator

from pricing.paths import profiles_dir
from pricing.schema import ProfileSummary, Strict
from pricing.workload.sessions import (
    Session,
    SessionStats,
    SessionTurn,
    cut_to_fit,
    history_share,
    pool_rows,
    prompt_tokens,
    session_stats,
)
from pricing.workload.sources import ProfileInputError, TimeWindow, TurnLengths

DEFAULT_PROFILE = "wildchat-2024-03-17_23"
Policy = Literal["drop", "truncate", "cap"]
POLICIES: tuple[Policy, ...] = ("drop", "truncate", "cap")
# Context lengths servers are commonly started with; the profile says how many turns each one would not fit.
COMMON_MAX_MODEL_LENS = (2048, 4096, 8192, 16384, 32768, 65536, 131072)
HIST_BINS_PER_OCTAVE = 4
DEFAULT_POOL_SIZE = 50_000  # a week of WildChat (~36k turns) is kept whole: ~0.3 MB of JSON
SUMMARY_PAIRS = 256  # ProfileSummary.sample_pairs max_length


class LengthStats(Strict):
    """Token-length statistics over every turn in the profile (quantiles: numpy 'linear')."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: int
    min: int


class JointHistogram(Strict):
    """Turn counts on log-spaced bins: counts[i][j] for isl_edges[i] <= ISL < isl_edges[i+1], same for OSL."""

    bins_per_octave: int
    isl_edges: list[float]
    osl_edges: list[float]
    counts: list[list[int]]


class LengthLimitReport(Strict):
    """What a max-model-len did to the traffic when the profile was built."""

    max_model_len: int
    policy: Policy
    exceeding: int  # turns with ISL + OSL > max_model_len, before the policy
    dropped: int
    shortened: int  # turns whose ISL or OSL the policy cut (truncate / cap)
    fraction_exceeding: float


class Arrivals(Strict):
    """Requests (user turns) per UTC hour over the slice, from the turns' own timestamps, and how
    bursty they are within an hour (gap_cv)."""

    window_start_utc: str
    window_end_utc: str
    hourly_counts: list[int]
    mean_requests_per_hour: float
    peak_requests_per_hour: int
    peak_to_mean: float
    # Coefficient of variation of the gaps between arrivals, each over its hour's mean gap (1 for
    # Poisson arrivals); None where too few hours hold enough arrivals, or in older profiles.
    gap_cv: float | None = Field(default=None, gt=0)

    @property
    def mean_rps(self) -> float:
        return self.mean_requests_per_hour / 3600.0

    @property
    def gamma_shape(self) -> float | None:
        """The gamma shape of open-loop gaps with this CV (load.arrivals: CV = 1 / sqrt(shape))."""
        return None if self.gap_cv is None else 1.0 / self.gap_cv**2


class TrafficProfile(Strict):
    """One traffic slice. `pool_isl`/`pool_osl` are the pairs the sampler draws from: every turn
    when there are at most `pool_size` of them, else a uniform subsample drawn with `pool_seed`."""

    profile_version: Literal[1] = 1
    name: str
    kind: Literal["empirical", "fixed"] = "empirical"
    source: str
    tokenizer: str | None = None
    turns: int  # turns in the statistics (after any drop)
    skipped: dict[str, int] = Field(default_factory=dict)  # reason -> turns or rows left out, never silent
    isl: LengthStats
    osl: LengthStats
    histogram: JointHistogram
    length_limit: LengthLimitReport | None = None
    exceeding_max_model_len: dict[int, int] = Field(default_factory=dict)  # L -> turns with ISL+OSL > L
    arrivals: Arrivals | None = None
    pool_seed: int = 0
    pool_isl: list[int]
    pool_osl: list[int]
    # Chat sessions (workload.sessions), absent from profiles built before them or from sources
    # without any: their statistics, and the sessions replayed, each [[new input, output, think s], ...].
    sessions: SessionStats | None = None
    session_pool: list[list[tuple[int, int, float]]] | None = None

    @model_validator(mode="after")
    def _pool_is_pairs(self) -> TrafficProfile:
        if len(self.pool_isl) != len(self.pool_osl) or not self.pool_isl:
            raise ValueError("pool_isl and pool_osl must be non-empty and of equal length")
        if self.session_pool is not None and not self.session_pool:
            raise ValueError("session_pool, when present, must hold sessions")
        return self

    def replay_sessions(self, max_model_len: int | None = None, policy: Policy = "cap") -> list[tuple[SessionTurn, ...]]:
        """The session pool, each session fitted into max_model_len (module docstring)."""
        if not self.session_pool:
            raise ValueError(f"profile {self.name} has no sessions to replay; build it with `python -m pricing.profile` "
                             "from a lengths file, conversations or a sessions file")
        sessions = [tuple(SessionTurn(*t) for t in s) for s in self.session_pool]
        if max_model_len is None:
            return sessions
        fitted = [f for s in sessions if (f := fit_session(s, max_model_len, policy)) is not None]
        if not fitted:
            raise ValueError(f"profile {self.name}: no session fits max_model_len={max_model_len}; use cap or truncate")
        return fitted

    def pool(self, max_model_len: int | None = None, policy: Policy = "cap") -> tuple[np.ndarray, np.ndarray]:
        """The sampling pool as int64 arrays, with the max-model-len policy applied."""
        isl, osl = np.asarray(self.pool_isl, dtype=np.int64), np.asarray(self.pool_osl, dtype=np.int64)
        if max_model_len is None:
            return isl, osl
        isl, osl, keep = apply_length_policy(isl, osl, max_model_len, policy)
        if not keep.any():
            raise ValueError(f"profile {self.name}: no turn fits max_model_len={max_model_len}; use cap or truncate")
        return isl[keep], osl[keep]

    def sample(
        self, n: int, seed: int, max_model_len: int | None = None, policy: Policy = "cap"
    ) -> list[tuple[int, int]]:
        """n (ISL, OSL) pairs drawn with replacement from the joint distribution; same seed, same draw.
        With a limit, every pair has ISL + OSL <= max_model_len (see the module docstring for policies)."""
        isl, osl = self.pool(max_model_len, policy)
        idx = np.random.default_rng(seed).integers(0, len(isl), size=n)
        return list(zip(isl[idx].tolist(), osl[idx].tolist(), strict=True))

    def summary(self, seed: int = 0, max_model_len: int | None = None, policy: Policy = "cap",
                sessions: bool = False) -> ProfileSummary:
        """What a probe record carries. With a limit, the statistics are of the traffic actually
        sent (the policy applied to the pool), since capacity was measured on that traffic. With
        `sessions`, the traffic is the session pool's turns, each prompt holding its history."""
        history = turns_per_session = None
        if sessions:
            replayed = self.replay_sessions(max_model_len, policy)
            isl_arr, osl_arr = session_turn_lengths(replayed)
            isl_s, osl_s = length_stats(isl_arr), length_stats(osl_arr)
            history, turns_per_session = history_share(replayed), len(isl_arr) / len(replayed)
            idx = np.random.default_rng(seed).integers(0, len(isl_arr), size=SUMMARY_PAIRS)
            pairs = list(zip(isl_arr[idx].tolist(), osl_arr[idx].tolist(), strict=True))
        else:
            if max_model_len is None:
                isl_s, osl_s = self.isl, self.osl
            else:
                isl_s, osl_s = (length_stats(a) for a in self.pool(max_model_len, policy))
            pairs = self.sample(1 if self.kind == "fixed" else SUMMARY_PAIRS, seed, max_model_len, policy)
        return ProfileSummary(
            name=self.name,
            kind=self.kind,
            isl_mean=isl_s.mean,
            osl_mean=osl_s.mean,
            isl_p50=isl_s.p50,
            isl_p90=isl_s.p90,
            isl_p99=isl_s.p99,
            osl_p50=osl_s.p50,
            osl_p90=osl_s.p90,
            osl_p99=osl_s.p99,
            sample_pairs=pairs,
            length_policy=policy if max_model_len is not None else None,
            max_model_len=max_model_len,
            history_share=history,
            turns_per_session=turns_per_session,
        )


def session_turn_lengths(sessions: Sequence[Sequence[SessionTurn]]) -> tuple[np.ndarray, np.ndarray]:
    """(ISL, OSL) of every turn of the sessions as replayed, each prompt holding its history."""
    isl = np.array([n for s in sessions for n in prompt_tokens(s)], dtype=np.int64)
    return isl, np.array([t.output_tokens for s in sessions for t in s], dtype=np.int64)


def fit_session(turns: Sequence[SessionTurn], max_model_len: int, policy: Policy) -> tuple[SessionTurn, ...] | None:
    """The session up to its first turn that does not fit; a first turn that does not fit is
    fitted by `policy` on its own (drop: None, no session)."""
    first = turns[0]
    if first.new_input_tokens + first.output_tokens <= max_model_len:
        return cut_to_fit(turns, max_model_len)
    isl, osl, keep = apply_length_policy(np.array([first.new_input_tokens]), np.array([first.output_tokens]),
                                         max_model_len, policy)
    return (SessionTurn(int(isl[0]), int(osl[0]), 0.0),) if keep[0] else None


def apply_length_policy(
    isl: np.ndarray, osl: np.ndarray, max_model_len: int, policy: Policy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ISL', OSL', keep) after fitting each pair into max_model_len; pairs that fit are unchanged."""
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2 (one prompt and one output token), got {max_model_len}")
    if policy == "drop":
        return isl, osl, isl + osl <= max_model_len
    if policy == "truncate":
        osl2 = np.minimum(osl, max_model_len - 1)
        return np.minimum(isl, max_model_len - osl2), osl2, np.ones(len(isl), dtype=bool)
    if policy == "cap":
        isl2 = np.minimum(isl, max_model_len - 1)
        return isl2, np.minimum(osl, max_model_len - isl2), np.ones(len(isl), dtype=bool)
    raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")


def length_stats(values: np.ndarray) -> LengthStats:
    p50, p90, p99 = np.percentile(values, [50, 90, 99])  # numpy default method: 'linear'
    return LengthStats(
        count=len(values),
        mean=float(np.mean(values)),
        p50=float(p50),
        p90=float(p90),
        p99=float(p99),
        max=int(values.max()),
        min=int(values.min()),
    )


def log_edges(max_value: int, bins_per_octave: int = HIST_BINS_PER_OCTAVE) -> np.ndarray:
    """Edges 2**(k/bins_per_octave) from 1 until past max_value (lengths are >= 1)."""
    n_bins = max(1, int(np.ceil(np.log2(max_value + 1) * bins_per_octave)))
    return 2.0 ** (np.arange(n_bins + 1) / bins_per_octave)


def joint_histogram(isl: np.ndarray, osl: np.ndarray) -> JointHistogram:
    isl_edges, osl_edges = log_edges(int(isl.max())), log_edges(int(osl.max()))
    counts, _, _ = np.histogram2d(isl, osl, bins=[isl_edges, osl_edges])
    return JointHistogram(
        bins_per_octave=HIST_BINS_PER_OCTAVE,
        isl_edges=[round(e, 4) for e in isl_edges.tolist()],
        osl_edges=[round(e, 4) for e in osl_edges.tolist()],
        counts=counts.astype(np.int64).tolist(),
    )


# Hours with fewer arrivals than this say little of their gaps; fewer gaps in all than
# GAP_CV_MIN_GAPS give no CV.
GAP_CV_MIN_PER_HOUR, GAP_CV_MIN_GAPS = 20, 200


def gap_cv_within_hours(ts_s: np.ndarray) -> float | None:
    """CV of the gaps between consecutive arrivals, each divided by the mean gap of its UTC hour:
    the day's rise and fall (and any stretch the data lack) would otherwise count as burstiness.
    WildChat 2024-03-17..23: 1.03 within hours (the raw gaps of the week: 1.11)."""
    t = np.sort(np.asarray(ts_s, dtype=np.float64))
    gaps, hours = np.diff(t), (t[:-1] // 3600).astype(np.int64)
    scaled = []
    for hour in np.unique(hours):
        g = gaps[hours == hour]
        if g.size >= GAP_CV_MIN_PER_HOUR and g.mean() > 0:
            scaled.append(g / g.mean())
    if not scaled or sum(s.size for s in scaled) < GAP_CV_MIN_GAPS:
        return None
    x = np.concatenate(scaled)
    return float(x.std() / x.mean())


def hourly_arrivals(ts_s: np.ndarray, window: TimeWindow) -> Arrivals:
    """Counts per hour from the window start (or the first turn's hour) to its end (or the last turn's)."""
    start_s = window.start_s if window.start_s is not None else float(np.floor(ts_s.min() / 3600) * 3600)
    end_s = window.end_s if window.end_s is not None else float(np.floor(ts_s.max() / 3600) * 3600 + 3600)
    n_hours = max(1, int(np.ceil((end_s - start_s) / 3600)))
    hours = np.clip(((ts_s - start_s) // 3600).astype(np.int64), 0, n_hours - 1)
    counts = np.bincount(hours, minlength=n_hours)
    mean = len(ts_s) / n_hours
    iso = lambda s: datetime.fromtimestamp(s, UTC).isoformat()  # noqa: E731
    return Arrivals(
        window_start_utc=iso(start_s),
        window_end_utc=iso(end_s),
        hourly_counts=counts.tolist(),
        mean_requests_per_hour=mean,
        peak_requests_per_hour=int(counts.max()),
        peak_to_mean=float(counts.max() / mean),
        gap_cv=gap_cv_within_hours(ts_s),
    )


def build_profile(
    turns: Iterable[TurnLengths],
    *,
    name: str,
    source: str,
    window: TimeWindow = TimeWindow(),
    tokenizer: str | None = None,
    skipped: dict[str, int] | None = None,
    max_model_len: int | None = None,
    policy: Policy = "cap",
    pool_size: int = DEFAULT_POOL_SIZE,
    seed: int = 0,
    sessions: Sequence[Session] | None = None,
    session_rule: str | None = None,
) -> TrafficProfile:
    """Statistics, histogram, arrivals and sampling pool of the turns (consumed once), and of the
    sessions when given (found by `session_rule`).

    With max_model_len the policy is applied before the statistics, so they describe the traffic
    a server with that limit would see; arrivals always count every turn (users still sent it)."""
    table = np.asarray(list(turns), dtype=np.float64).reshape(-1, 3)  # float64 holds token counts exactly
    if len(table) == 0:
        raise ProfileInputError(source, None, None, f"no usable turns (left out: {dict(skipped or {})})")
    ts_s, isl, osl = table[:, 0], table[:, 1].astype(np.int64), table[:, 2].astype(np.int64)
    exceeding = {L: int((isl + osl > L).sum()) for L in COMMON_MAX_MODEL_LENS}
    arrivals = hourly_arrivals(ts_s, window)
    limit = None
    if max_model_len is not None:
        isl2, osl2, keep = apply_length_policy(isl, osl, max_model_len, policy)
        n_exceeding = int((isl + osl > max_model_len).sum())
        limit = LengthLimitReport(
            max_model_len=max_model_len,
            policy=policy,
            exceeding=n_exceeding,
            dropped=int((~keep).sum()),
            shortened=int((keep & ((isl2 != isl) | (osl2 != osl))).sum()),
            fraction_exceeding=n_exceeding / len(isl),
        )
        isl, osl = isl2[keep], osl2[keep]
        if len(isl) == 0:
            problem = f"every turn exceeds max_model_len={max_model_len}; use cap or truncate"
            raise ProfileInputError(source, None, None, problem)
    pool_idx = np.arange(len(isl))
    if len(isl) > pool_size:  # sorted so the pool keeps the data's order
        pool_idx = np.sort(np.random.default_rng(seed).choice(len(isl), size=pool_size, replace=False))
    stats = pool = None
    if sessions:  # kept apart from the turns above: a session's turns may lie past the slice's end
        if max_model_len is not None:
            sessions = [Session(s.start_s, turns) for s in sessions
                        if (turns := fit_session(s.turns, max_model_len, policy)) is not None]
        stats = session_stats([s.turns for s in sessions], session_rule or "given")
        pool = pool_rows(sessions, pool_size, seed)
    return TrafficProfile(
        name=name,
        source=source,
        tokenizer=tokenizer,
        turns=len(isl),
        skipped={k: v for k, v in sorted((skipped or {}).items()) if v},
        isl=length_stats(isl),
        osl=length_stats(osl),
        histogram=joint_histogram(isl, osl),
        length_limit=limit,
        exceeding_max_model_len=exceeding,
        arrivals=arrivals,
        pool_seed=seed,
        pool_isl=isl[pool_idx].tolist(),
        pool_osl=osl[pool_idx].tolist(),
        sessions=stats,
        session_pool=pool,
    )


def fixed_profile(isl: int, osl: int) -> TrafficProfile:
    """Every request is (isl, osl): runs comparable with the seed calculator (ISL 1807, OSL 449)."""
    if isl < 1 or osl < 1:
        raise ValueError(f"fixed profile needs ISL >= 1 and OSL >= 1, got {isl}, {osl}")
    one = lambda v: LengthStats(count=1, mean=v, p50=v, p90=v, p99=v, max=v, min=v)  # noqa: E731
    return TrafficProfile(
        name=f"fixed:{isl}:{osl}",
        kind="fixed",
        source=f"fixed ISL {isl}, OSL {osl}",
        turns=1,
        isl=one(isl),
        osl=one(osl),
        histogram=joint_histogram(np.array([isl]), np.array([osl])),
        pool_isl=[isl],
        pool_osl=[osl],
    )


def load_profile(spec: str) -> TrafficProfile:
    """`fixed:ISL:OSL`, a path to a profile JSON, or a bare name looked up as NAME.json in
    ./profiles/ and then in the repo's profiles/. Raises ProfileInputError (a ValueError)."""
    if spec.startswith("fixed:"):
        parts = spec.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
            raise ProfileInputError(spec, None, None, "expected fixed:ISL:OSL with integer lengths, e.g. fixed:1807:449")
        return fixed_profile(int(parts[1]), int(parts[2]))
    candidates = [Path(spec)]
    if Path(spec).name == spec and not spec.endswith(".json"):
        candidates = list(dict.fromkeys([Path.cwd() / "profiles" / f"{spec}.json", profiles_dir() / f"{spec}.json"]))
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ProfileInputError(spec, None, None, f"no profile found (looked at {', '.join(map(str, candidates))})")
    try:
        return TrafficProfile.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        raise ProfileInputError(str(path), None, field, f"not a traffic profile: {err['msg']}") from None
