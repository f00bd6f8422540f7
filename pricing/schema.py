"""Pydantic contracts shared by every module: SLO tiers, per-request timing records,
window statistics, probe records (one JSONL line each) and profile summaries.

Units live in field names: `_ns` integer nanoseconds from `time.perf_counter_ns()`,
`_s` seconds, `_tok_s` tokens per second, `_rps` requests per second.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pricing.plausibility import (
    FLOW_REL_TOL,
    MAX_REQ_S,
    MAX_TOK_S,
    ORDER_SLACK,
    check_count,
    check_finite,
    check_lengths,
    implausible,
)

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)  # 1: no intervals, no per-request records

# One end of a 95% interval; None where the sample cannot bound it (e.g. a p90 of 30 requests
# has no upper bound at 95%).
Bound = float | None
Ci = tuple[Bound, Bound]


class Frozen(BaseModel):
    """Immutable and strict: the base of every value passed between modules."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Strict(BaseModel):
    """Strict but mutable: documents read from files and built up step by step."""

    model_config = ConfigDict(extra="forbid")


class SloTier(Frozen):
    """A latency SLO: at `percentile`, TTFT <= ttft_s and TPOT <= tpot_s, errors <= max_error_rate."""

    name: str
    ttft_s: float = Field(gt=0)
    tpot_s: float = Field(gt=0)
    # Every probe stores p50, p90 and p99; any other percentile is computed from the probe's
    # per-request records (schema 2).
    percentile: float = Field(default=90, gt=0, lt=100)
    max_error_rate: float = Field(default=0.01, ge=0, le=1)


# Defaults carried over from the seed calculator (p90).
DEFAULT_TIERS: tuple[SloTier, ...] = (
    SloTier(name="Baseline", ttft_s=1.0, tpot_s=0.050),
    SloTier(name="Fast", ttft_s=0.5, tpot_s=0.0167),
    SloTier(name="Instant", ttft_s=0.25, tpot_s=0.010),
)


# A request ended on purpose when the probe stops issuing (the drain): never counted as an error.
CANCELLED = "cancelled"


class RequestRecord(BaseModel):
    """Raw clocks of one request; every latency is derived later by pure functions.

    `chunk_ns` holds the arrival time of each streamed event that carried output
    (text or token); the usage-only and [DONE] events are not in it.
    `wall_time_s` is a wall-clock stamp for humans, never used for latency.
    """

    start_ns: int
    chunk_ns: list[int] = Field(default_factory=list)
    end_ns: int
    prompt_tokens: int | None = None  # from the server's usage, not counted by us
    completion_tokens: int | None = None
    target_input_tokens: int
    target_output_tokens: int
    error: str | None = None  # kind: "http_500", "timeout", "disconnect", "connect", "incomplete", ...
    response_id: str | None = None
    wall_time_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


STORED_PERCENTILES = (50, 90, 99)

class LatencyStats(Frozen):
    """Percentiles (numpy 'linear' method) of one latency, in seconds, with their 95% intervals
    (measure.intervals); None when no sample."""

    count: int = Field(ge=0)
    mean: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    p50: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    p90: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    p99: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    p50_ci: Ci | None = None
    p90_ci: Ci | None = None
    p99_ci: Ci | None = None

    @model_validator(mode="after")
    def _ordered(self) -> LatencyStats:
        """p50 <= p90 <= p99 <= max, and the mean within [0, max]: true of any one sample."""
        named = [(name, getattr(self, name)) for name in ("p50", "p90", "p99", "max")]
        present = [(name, value) for name, value in named if value is not None]
        for (low_name, low), (high_name, high) in zip(present, present[1:]):
            if low > high * (1 + ORDER_SLACK):
                raise implausible(high_name, f"{high:g} is below {low_name} {low:g}; percentiles must be ordered "
                                             "p50 <= p90 <= p99 <= max")
        if self.mean is not None and self.max is not None and self.mean > self.max * (1 + ORDER_SLACK):
            raise implausible("mean", f"{self.mean:g} is above max {self.max:g}")
        for p in STORED_PERCENTILES:
            ci = getattr(self, f"p{p}_ci")
            for end in ci or ():
                check_finite(f"p{p}_ci", end)
            if ci is not None and None not in ci and ci[0] > ci[1] * (1 + ORDER_SLACK):
                raise implausible(f"p{p}_ci", f"its low end {ci[0]:g} is above its high end {ci[1]:g}")
        return self

    def at(self, percentile: float) -> tuple[float | None, Ci | None]:
        """A stored percentile and its interval; (None, None) for one not stored."""
        if percentile not in STORED_PERCENTILES:
            return None, None
        p = int(percentile)
        return getattr(self, f"p{p}"), getattr(self, f"p{p}_ci")


class WindowStats(Frozen):
    """Steady-state statistics of one probe (see README: Definitions)."""

    window_s: float = Field(gt=0, allow_inf_nan=False)
    completed: int = Field(ge=0)  # requests of the latency sample that completed (schema 1: started and ended in the window)
    failed: int = Field(ge=0)  # errors among requests started in the window
    errors_by_kind: dict[str, int] = Field(default_factory=dict)
    input_tokens: int = Field(ge=0)  # prompt tokens of the completed requests
    output_tokens: int = Field(ge=0)  # schema 2: streamed in the window (schema 1: of the completed requests)
    request_rate_rps: float = Field(ge=0, le=MAX_REQ_S, allow_inf_nan=False)  # output flow / mean output tokens per request (schema 1: of the completions)
    input_tok_s: float = Field(ge=0, le=MAX_TOK_S, allow_inf_nan=False)
    output_tok_s: float = Field(ge=0, le=MAX_TOK_S, allow_inf_nan=False)
    ttft_s: LatencyStats
    tpot_s: LatencyStats
    itl_s: LatencyStats
    e2e_s: LatencyStats
    # Schema 2 (None in older records):
    issued: int | None = Field(default=None, ge=0)  # requests started in the window that ended, ok or failed
    request_rate_rps_ci: Ci | None = None
    input_tok_s_ci: Ci | None = None
    output_tok_s_ci: Ci | None = None
    measured_input_tok_s: float | None = Field(default=None, ge=0, le=MAX_TOK_S, allow_inf_nan=False)  # prompt tokens of requests whose first token came in the window
    lengths_mean: tuple[float, float] | None = None  # (ISL, OSL) per request the rates are derived with
    # flow: the output flow over lengths_mean; arrivals: an open loop's requests sent in the window;
    # offered: an uncapped open loop's nominal rate, where the server kept up with it (probe.open_loop_rate;
    # older records: where the flow did)
    rate_source: Literal["flow", "arrivals", "offered"] | None = None

    @model_validator(mode="after")
    def _plausible(self) -> WindowStats:
        """Counts, rates and the window agree with each other (see the constants above)."""
        for kind, count in self.errors_by_kind.items():
            if count < 0:
                raise implausible(f"errors_by_kind.{kind}", f"a count must be >= 0 (got {count})")
        if self.issued is not None and self.failed > self.issued:
            raise implausible("failed", f"{self.failed} failed of {self.issued} issued: more than were issued")
        for name in ("request_rate_rps_ci", "input_tok_s_ci", "output_tok_s_ci"):
            for end in getattr(self, name) or ():
                check_finite(name, end)
                if end is not None and end < 0:
                    raise implausible(name, f"an interval of a rate cannot reach below 0 (got {end:g})")
        if self.lengths_mean is not None:
            isl, osl = self.lengths_mean
            # An open loop's counted arrivals are not its flows' rate (a server falling behind
            # serves less): its flows are checked against each other.
            flow_rate = self.output_tok_s / osl if self.rate_source == "arrivals" and osl > 0 else self.request_rate_rps
            if osl > 0:
                check_lengths("output_tok_s", self.output_tok_s, flow_rate, osl)
            if isl > 0:
                check_lengths("input_tok_s", self.input_tok_s, flow_rate, isl)
        # An open loop's rates set to its offered rate are not the window's flow: ProbeRecord
        # checks them against the load instead.
        if self.rate_source != "offered":
            rule = "equal" if self.rate_source == "flow" else "loose"
            check_count("output_tokens", self.output_tokens, self.output_tok_s, self.window_s, rule)
        if self.measured_input_tok_s is not None:
            check_count("input_tokens", self.input_tokens, self.measured_input_tok_s, self.window_s, "at_most")
        else:
            check_count("input_tokens", self.input_tokens, self.input_tok_s, self.window_s, "loose")
        return self

    @property
    def error_rate(self) -> float:
        total = self.issued if self.issued is not None else self.completed + self.failed
        return self.failed / total if total else 0.0

    def latency(self, metric: Literal["ttft", "tpot", "itl", "e2e"], percentile: float) -> float | None:
        stats: LatencyStats = getattr(self, f"{metric}_s")
        return stats.at(percentile)[0]


# pass: the 95% interval is within the limit; fail: beyond it; undecided: it straddles the limit.
Outcome = Literal["pass", "fail", "undecided"]


class SloVerdict(Frozen):
    metric: str  # "ttft", "tpot", "error_rate"
    value: float | None
    limit: float
    passed: bool  # the point estimate meets the limit
    ci: Ci | None = None
    outcome: Outcome = "fail"

    @property
    def margin(self) -> float | None:
        """Headroom as a fraction of the limit (negative when violated)."""
        if self.value is None:
            return None
        return (self.limit - self.value) / self.limit if self.limit else None


class ProfileSummary(Frozen):
    """What a probe record carries of the traffic profile it was driven by, so a line prices alone."""

    name: str
    kind: Literal["empirical", "fixed"] = "empirical"
    isl_mean: float
    osl_mean: float
    isl_p50: float
    isl_p90: float
    isl_p99: float
    osl_p50: float
    osl_p90: float
    osl_p99: float
    # The max-model-len policy applied to the traffic sent (None: no limit applied).
    length_policy: Literal["drop", "truncate", "cap"] | None = None
    max_model_len: int | None = None
    # A seeded draw of (ISL, OSL) pairs for $/request percentiles; at most 256.
    sample_pairs: list[tuple[int, int]] = Field(default_factory=list, max_length=256)
    # Traffic of chat sessions (workload.sessions; None: independent requests): the share of
    # prompt tokens that are earlier turns of the same session, and the mean turns per session.
    history_share: float | None = Field(default=None, ge=0, le=1)
    turns_per_session: float | None = Field(default=None, ge=1)


# How prompts reach the server: token ids or text to /v1/completions, or chat messages. Text
# costs the server tokenizing on the request path (TTFT); token ids skip it.
PromptKind = Literal["token_ids", "text", "chat"]


class LoadSpec(Frozen):
    """The load of one probe: closed loop (concurrency) or open loop (request rate)."""

    mode: Literal["closed", "open"]
    concurrency: int | None = Field(default=None, ge=1)  # closed loop; cap on in-flight for open loop
    request_rate_rps: float | None = Field(default=None, gt=0, le=MAX_REQ_S, allow_inf_nan=False)  # open loop
    burstiness: float = Field(default=1.0, gt=0)  # gamma shape; 1.0 = Poisson
    think_s: float = Field(default=0.0, ge=0)  # closed loop: mean pause before a client's next request (gamma, load.client)
    # decode: the traffic as it is. prefill: max_tokens=1 and fresh prompts, the input rate of the
    # price split. prefill_cached: max_tokens=1 replaying sessions, so part of each prompt is a
    # prefix-cache hit: the cost of a cached input token (cost.split).
    kind: Literal["decode", "prefill", "prefill_cached"] = "decode"
    prompts: PromptKind = "token_ids"
    # Chat sessions (load.sessions): each turn's prompt is the last prompt + its answer + new tokens,
    # sent the data's think time x think_scale after the answer. A closed loop's concurrency is
    # then the active sessions; an open loop's request rate arrives as sessions.
    sessions: bool = False
    think_scale: float = Field(default=1.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _cached_prefill_replays_sessions(self) -> LoadSpec:
        if self.kind == "prefill_cached" and not self.sessions:
            raise ValueError("a prefill_cached probe replays sessions: set sessions")
        return self

    @property
    def level(self) -> float:
        """The number the capacity search moves."""
        return float(self.concurrency if self.mode == "closed" else self.request_rate_rps)  # type: ignore[arg-type]

    @property
    def prefill_only(self) -> bool:
        return self.kind != "decode"

    @property
    def independent_arrivals(self) -> bool:
        """An open loop of independent requests at its rate, nothing capping those in flight: a
        server that keeps up serves the offered rate in the long run."""
        return self.mode == "open" and not self.sessions and not self.concurrency

    @property
    def replays_sessions(self) -> bool:
        """Prompts that extend the session's last prompt and answer (a session sweep's `prefill`
        probe sends the same lengths as fresh prompts: the cost of an uncached token)."""
        return self.sessions and self.kind != "prefill"


class DeploymentConfig(Frozen):
    """What is being measured and priced: one vLLM server."""

    model: str
    scheme: str = "base"  # base (as served, e.g. BF16), fp8, w8a8, w4a16, w8a16
    tp: int = Field(default=1, ge=1)
    gpu_name: str = "cpu"  # catalog key, e.g. "H100-SXM", "H200", "cpu"
    gpu_count: int = Field(default=1, ge=1)
    vllm_version: str | None = None
    max_model_len: int | None = None

    @property
    def key(self) -> str:
        return f"{self.model}|{self.scheme}|tp{self.tp}|{self.gpu_count}x{self.gpu_name}"

    @property
    def label(self) -> str:
        return config_label(self.model, self.scheme, self.tp, self.gpu_count, self.gpu_name)


def config_label(model: str, scheme: str, tp: int, gpu_count: int, gpu_name: str) -> str:
    """How a config is named in tables and plots."""
    return f"{model} · {scheme} · TP{tp} · {gpu_count}x{gpu_name}"


class EnergyStats(Frozen):
    """GPU energy over the probe window; absent when not measured (never zero for 'unknown')."""

    energy_j: float
    idle_power_w: float | None = None
    mean_power_w: float | None = None
    source: Literal["nvml_counter", "nvml_power_integral"] = "nvml_counter"


# Why a probe ended before its window could be judged. window_not_filled: the server was too slow
# to fill the window in --max-probe-s, an honest fail of every tier. The others say nothing about
# latency, so no tier is judged on them and a rerun measures the load again: server_failing, its
# first requests all failed (HTTP errors); server_unreachable, connections were refused or reset
# and nothing came back for seconds (the server is gone); server_stalled, requests were in flight
# and not a byte came back for seconds (the server is hung).
AbortKind = Literal["window_not_filled", "server_failing", "server_unreachable", "server_stalled"]
SERVER_ABORTS: frozenset[str] = frozenset({"server_failing", "server_unreachable", "server_stalled"})


def _legacy_abort(note: str | None) -> AbortKind | None:
    """The abort kind of a record written before `abort` existed, from its note's fixed wording."""
    if note is None:
        return None
    if note.startswith("max_duration_s"):
        return "window_not_filled"
    return "server_failing" if note.startswith("first ") and "requests failed" in note else None


class ProbeRecord(BaseModel):
    """One JSONL line of benchmark_results/: everything needed to price this probe alone."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1, 2] = SCHEMA_VERSION
    run_id: str
    probe_index: int = Field(ge=0)
    timestamp_utc: str
    config: DeploymentConfig
    profile: ProfileSummary
    load: LoadSpec
    stats: WindowStats
    energy: EnergyStats | None = None
    server_metrics: dict[str, float] | None = None
    # SLO verdicts at record time; the pricer recomputes them for whatever tiers it is given.
    tiers_passed: list[str] = Field(default_factory=list)
    abort: AbortKind | None = None
    note: str | None = None  # the abort, or anything else, for people
    warnings: list[str] = Field(default_factory=list)  # about the measurement (e.g. the client fell behind)
    # Schema 2: the per-request records, a file beside this one (measure.requests), and whether
    # the probe's verdicts were still undecided when it reached its time cap.
    requests_file: str | None = None
    undecided_at_cap: bool = False
    # An open loop whose window opened at its warm-up's cap, before the server had filled (load.settle).
    warmup_capped: bool = False

    @model_validator(mode="before")
    @classmethod
    def _abort_of_old_records(cls, data):
        if isinstance(data, dict) and "abort" not in data:
            data = {**data, "abort": _legacy_abort(data.get("note"))}
        return data

    @model_validator(mode="after")
    def _offered_rate_is_the_loads(self) -> ProbeRecord:
        """An older open-loop record's rates set to its offered rate are that rate."""
        offered = self.load.request_rate_rps
        if self.stats.rate_source == "offered" and (
                offered is None or abs(self.stats.request_rate_rps - offered) > FLOW_REL_TOL * offered):
            raise implausible("stats.request_rate_rps", f"{self.stats.request_rate_rps:g} is marked as the offered "
                                                        f"rate, but the load offered {offered}")
        return self

    @property
    def sessions_too_few(self) -> bool:
        """A session replay whose window never filled: its think times left too few requests,
        which says nothing about the server (capacity.sweep stops on it, and measures it again
        on resume)."""
        return self.abort == "window_not_filled" and self.load.replays_sessions

    @property
    def workload(self) -> str:
        """The profile, whether its sessions were replayed (and their think-time scale), how prompts
        were sent unless as token ids, and a closed loop's think time or an open loop's
        burstiness unless none: probes are compared and priced only within one."""
        extras = [f"sessions, think x{self.load.think_scale:g}"] if self.load.sessions else []
        extras += [self.load.prompts] if self.load.prompts != "token_ids" else []
        if self.load.mode == "closed" and self.load.think_s > 0:
            extras.append(f"think {self.load.think_s:g} s")
        if self.load.mode == "open" and self.load.burstiness != 1.0:
            extras.append(f"burstiness {self.load.burstiness:g}")
        return f"{self.profile.name} ({', '.join(extras)})" if extras else self.profile.name
