"""Chat sessions (pricing.workload.sessions): the inference rule by hand and, against an
independent numpy count, on the shared WildChat file; sessions files and their errors; fitting
into a max-model-len; the profile's session statistics, summary and backward compatibility."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from pricing.profile import main
from pricing.workload.profile import DEFAULT_PROFILE, TrafficProfile, build_profile, fit_session, load_profile
from pricing.workload.sessions import (
    SessionTurn,
    cut_to_fit,
    history_share,
    infer_sessions,
    prompt_tokens,
    read_session_file,
    session_of,
)
from pricing.workload.sources import ProfileInputError, TimeWindow, TurnLengths

REPO = Path(__file__).resolve().parents[1]
SHARED_FILE = SHARED_DATA / "wildchat_turn_lengths_2024-03-17_23.jsonl"
T0 = datetime(2024, 3, 18, tzinfo=UTC).timestamp()


def row(at_s: float, isl: int, osl: int) -> TurnLengths:
    return TurnLengths(T0 + at_s, isl, osl)


# ---- the inference rule, by hand ---------------------------------------------------------------

ROWS = [
    row(0, 10, 5),  # starts session A
    row(60, 16, 4),  # 16 >= 10 + 5 + 1, 60 s later: continues A with 1 new token
    row(100, 40, 8),  # 40 >= 16 + 4 + 1: continues A, 20 new tokens
    row(100 + 3601, 60, 2),  # grows, but 3,601 s later: starts B
    row(5000, 62, 3),  # 62 < 60 + 2 + 1: starts C
    row(4990, 80, 1),  # grows, but 10 s *before* the last row: starts D
    row(5000, 82, 0),  # no answer: ends D, left out
    row(5001, 90, 4),  # starts E (the row before it was left out)
]


def test_inference_rule_by_hand():
    groups = list(infer_sessions(ROWS))
    assert [len(g) for g in groups] == [3, 1, 1, 1, 1]
    a = session_of(groups[0])
    assert a.turns == (SessionTurn(10, 5, 0.0), SessionTurn(1, 4, 60.0), SessionTurn(20, 8, 40.0))
    assert a.start_s == T0
    assert prompt_tokens(a.turns) == [10, 16, 40]  # the data's ISLs come back exactly
    assert prompt_tokens(a.turns, answer_tokens=1) == [10, 12, 33]  # a prefill-only replay's
    # history: 10 + 5 of turn 2, 16 + 4 of turn 3, out of 10 + 16 + 40 input tokens
    assert history_share([a.turns]) == pytest.approx((15 + 20) / 66)


def test_think_time_runs_from_the_answer_where_answers_are_stamped():
    turns = [row(0, 10, 5), row(300, 20, 5), row(400, 30, 5)]
    s = session_of(turns, answered_s=[T0 + 45, None, None])
    assert [t.think_s for t in s.turns] == [0.0, 255.0, 100.0]  # 300 - 45; then the turn's own stamp
    # clocks that disagree give no negative think time
    assert session_of(turns, answered_s=[T0 + 500, None, None]).turns[1].think_s == 0.0


def test_cut_and_fit_into_a_context_limit():
    turns = (SessionTurn(100, 50, 0.0), SessionTurn(20, 30, 5.0), SessionTurn(10, 10, 1.0))
    # prompts 100, 170, 210; prompt + answer 150, 200, 220
    assert cut_to_fit(turns, 220) == turns
    assert cut_to_fit(turns, 219) == turns[:2]
    assert cut_to_fit(turns, 150) == turns[:1]
    assert fit_session(turns, 120, "cap") == (SessionTurn(100, 20, 0.0),)  # the first turn, capped, alone
    assert fit_session(turns, 120, "drop") is None


# ---- the shared WildChat file: the profile against an independent count ------------------------


@pytest.fixture(scope="module")
def raw():
    if not SHARED_FILE.is_file():
        pytest.skip(f"shared data not found at {SHARED_FILE} (a worktree beside ../shared)")
    recs = [json.loads(line) for line in SHARED_FILE.read_text().splitlines() if line.strip()]
    return {"ts": np.array([datetime.fromisoformat(r["timestamp"]).timestamp() for r in recs]),
            "isl": np.array([r["isl"] for r in recs]), "osl": np.array([r["osl"] for r in recs])}


@pytest.fixture(scope="module")
def week_profile(raw, tmp_path_factory) -> TrafficProfile:
    out = tmp_path_factory.mktemp("sessions") / "week.json"
    assert main(["--lengths", str(SHARED_FILE), "--start", "2024-03-17", "--end", "2024-03-23", "-o", str(out)]) == 0
    return load_profile(str(out))


def test_sessions_of_the_shared_file_match_an_independent_count(raw, week_profile):
    ts, isl, osl = raw["ts"], raw["isl"], raw["osl"]
    assert (isl > 0).all() and (osl > 0).all()  # no unusable rows to break sessions
    gap = np.diff(ts)
    cont = np.r_[False, (isl[1:] >= isl[:-1] + osl[:-1] + 1) & (gap >= 0) & (gap <= 3600)]
    sid = np.cumsum(~cont) - 1
    start_ts = ts[~cont]
    kept = (start_ts >= datetime(2024, 3, 17, tzinfo=UTC).timestamp()) & (
        start_ts < datetime(2024, 3, 24, tzinfo=UTC).timestamp())
    mine = kept[sid]  # rows of sessions that start in the week
    history = np.where(cont, np.r_[0, isl[:-1] + osl[:-1]], 0)
    s = week_profile.sessions
    assert s is not None and s.sessions == int(kept.sum()) and s.turns == int(mine.sum())
    assert s.continuation_share == pytest.approx(cont[mine].mean())
    assert s.history_share == pytest.approx(history[mine].sum() / isl[mine].sum())
    per_session = np.bincount(sid)[kept]
    assert s.turns_per_session_mean == pytest.approx(per_session.mean())
    assert s.turns_per_session_p90 == np.percentile(per_session, 90)
    think = np.r_[0, gap][cont & mine]
    assert [s.think_s_p50, s.think_s_p90] == pytest.approx(np.percentile(think, [50, 90]).tolist())
    assert week_profile.skipped["sessions_outside_window"] == int((~kept).sum())
    # the issue's own count of the whole file: 59% of turns continue a session, 83% of input is history
    assert 0.58 <= cont.mean() <= 0.60 and 0.82 <= history[cont].sum() / isl.sum() <= 0.84
    # replayed as sessions, the prompts are the data's ISLs
    replayed = week_profile.replay_sessions()
    assert sorted(n for t in replayed for n in prompt_tokens(t)) == sorted(isl[mine].tolist())


def test_session_summary_describes_the_traffic_replayed(week_profile):
    summary = week_profile.summary(seed=0, sessions=True)
    replayed = week_profile.replay_sessions()
    prompts = [n for t in replayed for n in prompt_tokens(t)]
    assert summary.isl_mean == pytest.approx(np.mean(prompts))
    assert summary.history_share == pytest.approx(week_profile.sessions.history_share)
    assert summary.turns_per_session == pytest.approx(len(prompts) / len(replayed))
    capped = week_profile.summary(seed=0, max_model_len=4096, sessions=True)
    assert capped.isl_mean < summary.isl_mean and max(i + o for i, o in capped.sample_pairs) <= 4096
    assert capped.history_share < summary.history_share  # the long histories are cut first
    plain = week_profile.summary(seed=0)
    assert plain.history_share is None and plain.turns_per_session is None


def test_committed_profiles_from_before_sessions_still_load(tmp_path):
    old = subprocess.run(["git", "show", f"b38d31f:profiles/{DEFAULT_PROFILE}.json"], cwd=REPO, capture_output=True)
    if old.returncode != 0:
        pytest.skip("the commit before sessions is not in this clone")
    path = tmp_path / "old.json"
    path.write_bytes(old.stdout)
    profile = load_profile(str(path))
    assert profile.sessions is None and profile.session_pool is None
    assert profile.summary().history_share is None
    with pytest.raises(ValueError, match="has no sessions to replay"):
        profile.summary(sessions=True)


def test_committed_default_profile_carries_its_sessions():
    profile = load_profile(DEFAULT_PROFILE)
    assert profile.sessions is not None and profile.session_pool
    assert sum(len(s) for s in profile.session_pool) == profile.sessions.turns


# ---- sessions files --------------------------------------------------------------------------


def _session_file(tmp_path: Path, lines: list[dict]) -> Path:
    path = tmp_path / "sessions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def turn_line(session, at_s, isl, osl) -> dict:
    return {"session": session, "timestamp": datetime.fromtimestamp(T0 + at_s, UTC).isoformat(), "isl": isl, "osl": osl}


GOOD = [turn_line("a", 0, 10, 5), turn_line("b", 5, 7, 3), turn_line("a", 60, 16, 4), turn_line("b", 70, 30, 9),
        turn_line("a", 90, 25, 2)]


def test_a_sessions_file_becomes_a_profile(tmp_path):
    src, out = _session_file(tmp_path, GOOD), tmp_path / "p.json"
    assert main(["--sessions", str(src), "-o", str(out)]) == 0
    p = load_profile(str(out))
    assert p.turns == 5 and sorted(p.pool_isl) == [7, 10, 16, 25, 30]
    assert p.session_pool == [[(10, 5, 0.0), (1, 4, 60.0), (5, 2, 30.0)], [(7, 3, 0.0), (20, 9, 65.0)]]
    assert p.sessions.sessions == 2 and p.sessions.continuation_share == pytest.approx(3 / 5)
    assert p.sessions.history_share == pytest.approx((15 + 20 + 10) / (10 + 16 + 25 + 7 + 30))


@pytest.mark.parametrize(("bad", "message"), [
    (turn_line("a", 60, 15, 4), ":3: isl: session 'a': the prefix does not grow: ISL 15 < previous turn's ISL 10 + "
                                "OSL 5 + 1 (line 1)"),
    (turn_line("a", -1, 16, 4), ":3: timestamp: session 'a': earlier than the session's previous turn (line 1)"),
    ({**turn_line("a", 60, 16, 4), "tokens": 3}, ":3: tokens: Extra inputs are not permitted"),
    ({"session": "a", "timestamp": "then", "isl": 16, "osl": 4}, ":3: timestamp: not a timestamp"),
    ({"session": "a", "timestamp": "2024-03-18T00:00:00Z", "isl": 0, "osl": 4}, ":3: isl: Input should be greater"),
])
def test_a_sessions_file_whose_prefixes_do_not_grow_is_one_clear_error(bad, message, tmp_path, capsys):
    src = _session_file(tmp_path, [GOOD[0], GOOD[1], bad])
    assert main(["--sessions", str(src), "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {src}{message}") and "\n" not in err, err
    with pytest.raises(ProfileInputError):
        read_session_file(src)


def test_malformed_line_in_a_sessions_file(tmp_path, capsys):
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps(GOOD[0]) + "\n" + '{"session": "a", "isl": \n')
    assert main(["--sessions", str(src), "-o", str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {src}:2: malformed JSON")


def test_a_profile_without_sessions_in_its_source_has_none():
    turns = [row(0, 10, 5), row(10, 20, 5)]
    p = build_profile(turns, name="t", source="test", window=TimeWindow())
    assert p.sessions is None and p.session_pool is None
    assert list(infer_sessions([row(0, 0, 5)])) == []
