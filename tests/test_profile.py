"""Tests of pricing.profile: statistics against numpy on the shared WildChat lengths file, the
sampler (marginals, joint, seeds, max-model-len policies), the loader, the real `datasets`
loading path on a tiny offline corpus and tokenizer, and one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from pricing.paths import profiles_dir
from pricing.profile import main
from pricing.schema import ProfileSummary
from pricing.workload.profile import (
    DEFAULT_PROFILE,
    POLICIES,
    apply_length_policy,
    build_profile,
    fixed_profile,
    gap_cv_within_hours,
    load_profile,
)
from pricing.workload.sources import ProfileInputError, TimeWindow, TurnLengths

REPO = Path(__file__).resolve().parents[1]
SHARED_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "wildchat_turn_lengths_2024-03-17_23.jsonl"
WEEK = ("2024-03-17", "2024-03-23")


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# ---- the shared lengths file --------------------------------------------------------------


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    """The shared file read directly (no pricing code): timestamps, ISL, OSL."""
    if not SHARED_FILE.is_file():
        pytest.skip(f"shared data not found at {SHARED_FILE}")
    recs = [json.loads(line) for line in SHARED_FILE.read_text().splitlines() if line.strip()]
    return {
        "ts": np.array([datetime.fromisoformat(r["timestamp"]).timestamp() for r in recs]),
        "isl": np.array([r["isl"] for r in recs]),
        "osl": np.array([r["osl"] for r in recs]),
    }


@pytest.fixture(scope="module")
def week(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inside = (raw["ts"] >= ts("2024-03-17T00:00")) & (raw["ts"] < ts("2024-03-24T00:00"))
    return {k: v[inside] for k, v in raw.items()}


@pytest.fixture(scope="module")
def week_profile(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "week.json"
    argv = ["--lengths", str(SHARED_FILE), "--start", WEEK[0], "--end", WEEK[1], "--name", DEFAULT_PROFILE,
            "--tokenizer", "meta-llama/Llama-3.1-8B-Instruct", "-o", str(out)]
    assert main(argv) == 0
    return load_profile(str(out))


def test_stats_match_numpy(week_profile, week, raw):
    p = week_profile
    assert p.turns == len(week["isl"]) and p.skipped["turns_outside_window"] == len(raw["isl"]) - len(week["isl"])
    assert set(p.skipped) == {"turns_outside_window", "sessions_outside_window"}  # the latter: test_sessions
    for stats_, values in ((p.isl, week["isl"]), (p.osl, week["osl"])):
        assert stats_.mean == np.mean(values)  # exact: same summation
        assert [stats_.p50, stats_.p90, stats_.p99] == np.percentile(values, [50, 90, 99], method="linear").tolist()
        assert (stats_.max, stats_.min, stats_.count) == (values.max(), values.min(), len(values))
    assert p.exceeding_max_model_len[4096] == int((week["isl"] + week["osl"] > 4096).sum())
    assert sum(sum(row) for row in p.histogram.counts) == p.turns
    hourly = np.bincount(((week["ts"] - ts("2024-03-17T00:00")) // 3600).astype(int), minlength=168)
    assert p.arrivals.hourly_counts == hourly.tolist() and len(hourly) == 168
    assert p.arrivals.peak_to_mean == pytest.approx(hourly.max() / hourly.mean())


def test_whole_file_matches_readme_figures(raw):
    """The data README's figures (rounded) come out of the whole file, no window."""
    turns = [TurnLengths(*t) for t in zip(raw["ts"], raw["isl"], raw["osl"], strict=True)]
    p = build_profile(turns, name="all", source="test")
    figures = lambda s: [round(v) for v in (s.mean, s.p50, s.p90, s.p99, s.max)]  # noqa: E731
    assert figures(p.isl) == [2433, 730, 6086, 29618, 111264]
    assert figures(p.osl) == [422, 401, 790, 1235, 4097]


def test_pool_subsample_is_seeded_and_stats_use_every_turn(week):
    turns = [TurnLengths(*t) for t in zip(week["ts"], week["isl"], week["osl"], strict=True)]
    small = build_profile(turns, name="small", source="test", pool_size=1000, seed=5)
    again = build_profile(turns, name="small", source="test", pool_size=1000, seed=5)
    assert len(small.pool_isl) == 1000 and small == again
    assert small.turns == len(turns) and small.isl.mean == np.mean(week["isl"])
    assert stats.ks_2samp(small.pool_isl, week["isl"]).pvalue > 1e-3


def test_committed_default_profile_is_what_the_code_builds(week_profile):
    committed = load_profile(DEFAULT_PROFILE)
    assert committed == week_profile
    assert (profiles_dir() / f"{DEFAULT_PROFILE}.json").stat().st_size < 1_000_000


def test_arrival_burstiness_is_measured_within_hours():
    """Poisson arrivals whose rate swings 1:4 over the day have gaps of CV 1 within each hour
    (over the whole day, more); gamma gaps of shape 0.25 have CV 2; a few arrivals say nothing."""
    rng = np.random.default_rng(3)
    day = np.arange(24 * 3600.0)
    rate = 0.05 * (1.5 + np.sin(day / 86400 * 2 * np.pi) * 0.9)  # per second, 0.03 to 0.12
    counts = rng.poisson(rate)  # per second, each arrival anywhere in its second
    poisson = np.sort(np.repeat(day, counts) + rng.random(counts.sum()))
    gaps = np.diff(poisson)
    assert gaps.std() / gaps.mean() > 1.1
    assert gap_cv_within_hours(poisson) == pytest.approx(1.0, abs=0.05)
    bursty = np.cumsum(rng.gamma(0.25, 4 * 20.0, size=5000))
    assert gap_cv_within_hours(bursty) == pytest.approx(2.0, rel=0.1)
    assert gap_cv_within_hours(poisson[:150]) is None
    committed = load_profile(DEFAULT_PROFILE).arrivals
    assert committed.gap_cv == pytest.approx(1.03, abs=0.005) and committed.gamma_shape == pytest.approx(0.944, abs=0.001)


# ---- sampler --------------------------------------------------------------------------------


def joint_matches(pairs: list[tuple[int, int]], isl: np.ndarray, osl: np.ndarray) -> bool:
    """Marginals by two-sample KS, and the ISL-OSL rank correlation (0.34 in WildChat) within 0.03."""
    s_isl, s_osl = np.array(pairs).T
    ks_ok = all(stats.ks_2samp(a, b).pvalue > 1e-3 for a, b in ((s_isl, isl), (s_osl, osl)))
    rho_sample, rho_data = stats.spearmanr(s_isl, s_osl)[0], stats.spearmanr(isl, osl)[0]
    return ks_ok and abs(rho_sample - rho_data) < 0.03


def test_sample_reproduces_the_data(week_profile, week):
    pairs = week_profile.sample(20_000, seed=7)
    assert joint_matches(pairs, week["isl"], week["osl"])
    # The check has teeth: independent marginals, or a sampler that misses the long-prompt tail, fail it.
    rng = np.random.default_rng(7)
    independent = list(zip(rng.choice(week["isl"], 20_000), rng.choice(week["osl"], 20_000), strict=True))
    assert not joint_matches(independent, week["isl"], week["osl"])
    head = week["isl"] < np.percentile(week["isl"], 90)
    no_tail = list(zip(*(rng.choice(v[head], 20_000) for v in (week["isl"], week["osl"])), strict=True))
    assert not joint_matches(no_tail, week["isl"], week["osl"])


def test_same_seed_same_draw():
    p = load_profile(DEFAULT_PROFILE)
    assert p.sample(500, seed=3) == p.sample(500, seed=3)
    assert p.sample(500, seed=3) != p.sample(500, seed=4)
    assert all(isinstance(v, int) for pair in p.sample(10, seed=0) for v in pair)


POLICY_CASES = [  # (isl, osl) -> expected under L = 4096: drop keeps?, truncate, cap
    ((100, 50), True, (100, 50), (100, 50)),
    ((4000, 96), True, (4000, 96), (4000, 96)),  # exactly L fits
    ((4000, 97), False, (3999, 97), (4000, 96)),
    ((5000, 100), False, (3996, 100), (4095, 1)),
    ((100, 5000), False, (1, 4095), (100, 3996)),
]


def test_policies_apply_as_documented():
    isl = np.array([c[0][0] for c in POLICY_CASES])
    osl = np.array([c[0][1] for c in POLICY_CASES])
    _, _, keep = apply_length_policy(isl, osl, 4096, "drop")
    assert keep.tolist() == [c[1] for c in POLICY_CASES]
    for policy, col in (("truncate", 2), ("cap", 3)):
        i2, o2, keep = apply_length_policy(isl, osl, 4096, policy)
        assert list(zip(i2.tolist(), o2.tolist(), strict=True)) == [c[col] for c in POLICY_CASES] and keep.all()


@settings(max_examples=200, deadline=None, database=None)  # no .hypothesis/ in the repo
@given(st.integers(1, 200_000), st.integers(1, 10_000), st.integers(2, 140_000), st.sampled_from(POLICIES))
def test_policy_invariants(isl, osl, limit, policy):
    i2, o2, keep = apply_length_policy(np.array([isl]), np.array([osl]), limit, policy)
    if isl + osl <= limit:
        assert (i2[0], o2[0], keep[0]) == (isl, osl, True)
    elif policy == "drop":
        assert not keep[0]
    else:
        assert keep[0] and i2[0] >= 1 and o2[0] >= 1 and i2[0] + o2[0] <= limit
        assert (o2[0] == min(osl, limit - 1)) if policy == "truncate" else (i2[0] == min(isl, limit - 1))


def test_profile_limit_is_counted_and_reported(capsys, tmp_path):
    lines = [{"timestamp": "2024-03-18T00:00:00+00:00", "isl": i, "osl": o} for (i, o), *_ in POLICY_CASES]
    src = tmp_path / "lengths.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    for policy, dropped, shortened, turns in (("drop", 3, 0, 2), ("cap", 0, 3, 5), ("truncate", 0, 3, 5)):
        out = tmp_path / f"{policy}.json"
        assert main(["--lengths", str(src), "--max-model-len", "4096", "--policy", policy, "-o", str(out)]) == 0
        p = load_profile(str(out))
        lim = p.length_limit
        assert (lim.exceeding, lim.dropped, lim.shortened, lim.policy) == (3, dropped, shortened, policy)
        assert p.turns == turns
        assert max(i + o for i, o in zip(p.pool_isl, p.pool_osl, strict=True)) <= 4096
        assert f"3 turns (60.0%) exceed it; policy {policy}" in " ".join(capsys.readouterr().out.split())


def test_sample_with_limit():
    p = load_profile(DEFAULT_PROFILE)
    free = p.sample(5000, seed=1)
    for policy in ("drop", "truncate", "cap"):
        pairs = p.sample(5000, seed=1, max_model_len=4096, policy=policy)
        assert len(pairs) == 5000 and max(i + o for i, o in pairs) <= 4096
    # cap and truncate change values, not which turns are drawn: same seed, same turns.
    i2, o2, _ = apply_length_policy(*(np.array(c) for c in zip(*free, strict=True)), 4096, "cap")
    assert p.sample(5000, seed=1, max_model_len=4096) == list(zip(i2.tolist(), o2.tolist(), strict=True))
    fits = {(i, o) for i, o in zip(p.pool_isl, p.pool_osl, strict=True) if i + o <= 4096}
    assert set(p.sample(2000, seed=2, max_model_len=4096, policy="drop")) <= fits


# ---- fixed profile, loader, summary ----------------------------------------------------------


def test_fixed_profile_and_loader(tmp_path, monkeypatch):
    fixed = load_profile("fixed:1807:449")
    assert fixed == fixed_profile(1807, 449) and fixed.kind == "fixed"
    assert fixed.sample(4, seed=9) == [(1807, 449)] * 4
    assert fixed.summary().sample_pairs == [(1807, 449)] and fixed.summary().isl_mean == 1807
    for bad in ("fixed:1807", "fixed:a:b", "no-such-profile", str(tmp_path / "missing.json")):
        with pytest.raises(ProfileInputError):
            load_profile(bad)
    # a bare name is looked up in ./profiles/ first, then in the repo's profiles/
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "mine.json").write_text(fixed_profile(10, 20).model_dump_json())
    monkeypatch.chdir(tmp_path)
    assert load_profile("mine").pool_isl == [10] and load_profile(DEFAULT_PROFILE).name == DEFAULT_PROFILE
    (tmp_path / "broken.json").write_text('{"name": "x"}')
    with pytest.raises(ProfileInputError, match="not a traffic profile"):
        load_profile(str(tmp_path / "broken.json"))


def test_summary_and_json_round_trip():
    p = load_profile(DEFAULT_PROFILE)
    s = p.summary(seed=0)
    assert isinstance(s, ProfileSummary) and len(s.sample_pairs) == 256 and s == p.summary(seed=0)
    assert (s.isl_mean, s.osl_p99, s.name) == (p.isl.mean, p.osl.p99, DEFAULT_PROFILE)
    capped = p.summary(seed=0, max_model_len=4096)  # means of the traffic actually sent
    assert capped.isl_mean < s.isl_mean and max(i + o for i, o in capped.sample_pairs) <= 4096
    assert type(p).model_validate_json(p.model_dump_json()) == p


# ---- the real datasets path on a tiny WildChat-schema corpus ---------------------------------


def _msg(role: str, content: str, at: str | None = None) -> dict:
    when = datetime.fromisoformat(at).replace(tzinfo=UTC) if at else None
    return {"role": role, "content": content, "timestamp": when}


CONVERSATIONS = [  # token counts (whitespace words) in comments
    {"timestamp": "2024-03-18T10:05", "conversation": [
        _msg("user", "hello there model", "2024-03-18T10:00"),  # 3
        _msg("assistant", "hi how can I help"),  # 5
        _msg("user", "tell me a joke please", "2024-03-18T10:05"),  # 5 -> ISL 3+5+5 = 13
        _msg("assistant", "why did the chicken cross the road")]},  # 7
    {"timestamp": "2024-03-25T01:00", "conversation": [_msg("user", "x y"), _msg("assistant", "z")]},  # after the slice
    {"timestamp": "2024-03-17T00:10", "conversation": [
        _msg("user", "a b", "2024-03-16T23:50"),  # 2, before the slice: context only
        _msg("assistant", "c d e"),  # 3
        _msg("user", "f", "2024-03-17T00:10"),  # 1 -> ISL 2+3+1 = 6
        _msg("assistant", "g h"),  # 2
        _msg("user", "i j k", "2024-03-17T00:11")]},  # unanswered: not a request
    {"timestamp": "2024-03-20T12:00", "conversation": [
        _msg("system", "you are helpful"), _msg("user", "hi"), _msg("assistant", "hello")]},  # ISL 3+1, OSL 1
    {"timestamp": "2024-03-21T08:00", "conversation": [_msg("user", "anyone there")]},
]
EXPECTED_PAIRS = ([3, 13, 6, 4], [5, 7, 2, 1])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w for c in CONVERSATIONS for m in c["conversation"] for w in m["content"].split()}
    vocab = {"[UNK]": 0} | {w: i for i, w in enumerate(sorted(words), start=1)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(out)
    return out


def _write(fmt: str, rows: list[dict], path: Path) -> None:
    if fmt == "jsonl":
        iso = lambda v: v.isoformat() if isinstance(v, datetime) else v  # noqa: E731
        path.write_text("".join(json.dumps(r, default=iso) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = [{**r, "timestamp": datetime.fromisoformat(r["timestamp"]).replace(tzinfo=UTC)} for r in rows]
        pq.write_table(pa.Table.from_pylist(table), path)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_conversations_through_datasets(fmt, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src, out = tmp_path / f"chats.{fmt}", tmp_path / "chats.json"
    _write(fmt, CONVERSATIONS, src)
    argv = ["--dataset", str(src), "--tokenizer", str(tokenizer_dir), "--start", WEEK[0], "--end", WEEK[1],
            "-o", str(out)]
    assert main(argv) == 0
    p = load_profile(str(out))
    assert (p.pool_isl, p.pool_osl) == EXPECTED_PAIRS
    assert p.arrivals.hourly_counts[24 + 10] == 2  # both turns of the first chat, 2024-03-18 10:xx
    # JSONL rows outside the slice are read and counted; Parquet's are filtered at the reader.
    outside = {"conversations_outside_window": 1} if fmt == "jsonl" else {}
    assert p.skipped == {"turns_outside_window": 1, "conversations_without_answer": 1,
                         "sessions_outside_window": 1} | outside
    # a session per conversation that starts in the slice; the first chat's answers are unstamped,
    # so its think time runs from the previous user turn (10:00 to 10:05)
    assert p.session_pool == [[(3, 5, 0.0), (13 - 3 - 5, 7, 300.0)], [(4, 1, 0.0)]]
    assert p.sessions.rule == "each conversation's answered user turns"


# ---- bad input: one line, file:line and field, exit code 2 -----------------------------------


def _lengths_lines(tmp_path: Path, bad_line: str) -> Path:
    good = json.dumps({"timestamp": "2024-03-18T00:00:00Z", "isl": 5, "osl": 3})
    path = tmp_path / "lengths.jsonl"
    path.write_text(f"{good}\n{good}\n{bad_line}\n{good}\n")
    return path


@pytest.mark.parametrize(("bad_line", "message"), [
    ('{"timestamp": "2024-03-18T00:00:00Z", "isl": 5}', ":3: osl: required field is missing"),
    ('{"timestamp": "2024-03-18T00:00:00Z", "isl": 5, "osl": "many"}',
     ":3: osl: expected a non-negative integer"),
    ('{"timestamp": "yesterday", "isl": 5, "osl": 3}', ":3: timestamp: not a timestamp"),
    ('{"timestamp": "2024-03-18T00:00:00Z", "isl": 5, "osl": ', ":3: malformed JSON"),
])
def test_bad_lengths_file(bad_line, message, tmp_path, capsys):
    path = _lengths_lines(tmp_path, bad_line)
    assert main(["--lengths", str(path), "-o", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}{message}") and "\n" not in err


@pytest.mark.parametrize(("row", "message"), [
    ('{"timestamp": "2024-03-18T00:00:00", "conversation": [{"role": "user", "content": "a"', ":2: malformed JSON"),
    ('{"conversation": [{"role": "user", "content": "a"}]}', ":2: timestamp: required field is missing"),
    ('{"timestamp": "2024-03-18T00:00:00", "conversation": [{"role": "user"}]}',
     ":2: conversation[0].content: required field is missing"),
])
def test_bad_conversation_file(row, message, tokenizer_dir, tmp_path, capsys):
    path = tmp_path / "chats.jsonl"
    _write("jsonl", CONVERSATIONS[:1], path)
    path.write_text(path.read_text() + row + "\n")
    assert main(["--dataset", str(path), "--tokenizer", str(tokenizer_dir), "-o", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}{message}") and "\n" not in err


def test_cli_exit_code_and_no_traceback(tmp_path):
    missing = tmp_path / "nope.jsonl"
    argv = [sys.executable, "-m", "pricing.profile", "--lengths", str(missing), "-o", str(tmp_path / "o.json")]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 2 and run.stderr.strip() == f"error: {missing}: no such file"


def test_time_window_bounds():
    w = TimeWindow.from_args(*WEEK)
    assert w.contains(ts("2024-03-17T00:00")) and w.contains(ts("2024-03-23T23:59:59"))
    assert not w.contains(ts("2024-03-24T00:00")) and not w.contains(ts("2024-03-16T23:59:59"))
