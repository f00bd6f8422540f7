"""`python -m pricing.profile` (`vllm-price-profile`): build a traffic profile from WildChat or a
lengths file and print its statistics; the profile itself is `pricing.workload.profile`."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from pricing.errors import EXIT_INPUT_ERROR, InputError, format_error
from pricing.workload.profile import (
    DEFAULT_POOL_SIZE,
    POLICIES,
    TrafficProfile,
    build_profile,
)
from pricing.workload.sessions import FILE_RULE, read_session_files, readout_sessions
from pricing.workload.sources import TimeWindow, read_turns


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pricing.profile",
                                description="Build a traffic profile from WildChat conversations, a lengths file or a sessions file.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", nargs="+", metavar="ID_OR_FILE",
                     help="hub dataset id (e.g. allenai/WildChat-1M) or local .jsonl/.parquet files, WildChat schema")
    src.add_argument("--lengths", nargs="+", type=Path, metavar="FILE",
                     help='precomputed {"timestamp","isl","osl"} JSONL files, rows in conversation order (sessions '
                          'are inferred from it: see pricing/workload/sessions.py)')
    src.add_argument("--sessions", nargs="+", type=Path, metavar="FILE",
                     help='chat sessions: {"session","timestamp","isl","osl"} JSONL lines, a session\'s turns in order, '
                          "each ISL holding the conversation so far")
    p.add_argument("--tokenizer", help="tokenizer for --dataset (required there); recorded only for --lengths")
    p.add_argument("--start", help="first UTC day (YYYY-MM-DD, inclusive) or ISO datetime")
    p.add_argument("--end", help="last UTC day (YYYY-MM-DD, inclusive) or ISO datetime (exclusive)")
    p.add_argument("--split", default="train")
    p.add_argument("--name", help="profile name (default: the output file's stem)")
    p.add_argument("--max-model-len", type=int, help="fit every turn into this context, by --policy")
    p.add_argument("--policy", choices=POLICIES, default="cap")
    p.add_argument("--pool-size", type=int, default=DEFAULT_POOL_SIZE, help="most (ISL, OSL) pairs kept for sampling")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool subsample")
    p.add_argument("--max-rows", type=int, help="stop after this many dataset rows (quick looks)")
    p.add_argument("-o", "--output", type=Path, required=True)
    return p


def _report(profile: TrafficProfile, output: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"traffic profile {profile.name}: {profile.turns:,} turns ({profile.source})")
    for col in ("", "mean", "p50", "p90", "p99", "max"):
        table.add_column(col, justify="right")
    for label, s in (("ISL tokens", profile.isl), ("OSL tokens", profile.osl)):
        table.add_row(label, f"{s.mean:,.1f}", f"{s.p50:,.0f}", f"{s.p90:,.0f}", f"{s.p99:,.0f}", f"{s.max:,}")
    console.print(table)
    if profile.skipped:
        console.print("left out: " + ", ".join(f"{k} {v:,}" for k, v in profile.skipped.items()))
    if (lim := profile.length_limit) is not None:
        console.print(f"[yellow]max-model-len {lim.max_model_len}: {lim.exceeding:,} turns "
                      f"({lim.fraction_exceeding:.1%}) exceed it; policy {lim.policy}: "
                      f"{lim.dropped:,} dropped, {lim.shortened:,} shortened[/]")
    over = ", ".join(f"{L}: {n:,}" for L, n in profile.exceeding_max_model_len.items())
    console.print(f"turns with ISL+OSL > max-model-len (before any policy): {over}")
    if (arr := profile.arrivals) is not None:
        console.print(f"arrivals {arr.window_start_utc} .. {arr.window_end_utc}: "
                      f"mean {arr.mean_requests_per_hour:,.4g}/h, peak {arr.peak_requests_per_hour:,}/h, "
                      f"peak-to-mean {arr.peak_to_mean:.2f}"
                      + (f"; gaps within an hour CV {arr.gap_cv:.2f} (Poisson 1: --burstiness profile = "
                         f"{arr.gamma_shape:.2f})" if arr.gap_cv is not None else ""))
    if (ses := profile.sessions) is not None:
        think = (f"think time p50 {ses.think_s_p50:,.0f} s, p90 {ses.think_s_p90:,.0f} s"
                 if ses.think_s_p50 is not None else "no second turns")
        console.print(f"sessions ({ses.rule}): {ses.sessions:,} of {ses.turns_per_session_mean:.2f} turns on average "
                      f"(p90 {ses.turns_per_session_p90:.0f}, max {ses.turns_per_session_max:,}); "
                      f"{ses.continuation_share:.1%} of turns continue one; {ses.history_share:.1%} of input tokens "
                      f"are history; {think}")
    size_mb = output.stat().st_size / 1e6
    console.print(f"wrote {output} ({size_mb:.2f} MB, {len(profile.pool_isl):,} pairs for sampling)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        window = TimeWindow.from_args(args.start, args.end)
        skipped: Counter[str] = Counter()
        if args.sessions:
            readout, sessions = read_session_files(args.sessions, window, skipped)
            rule = FILE_RULE
        else:
            readout = read_turns(args.lengths, args.dataset, args.tokenizer, args.split, window, skipped, args.max_rows)
            sessions, rule = readout_sessions(readout, window, skipped)
        profile = build_profile(
            readout.turns, name=args.name or args.output.stem, source=readout.source, window=window,
            tokenizer=args.tokenizer, skipped=dict(skipped), max_model_len=args.max_model_len, policy=args.policy,
            pool_size=args.pool_size, seed=args.seed, sessions=sessions, session_rule=rule,
        )
    except InputError as exc:
        print(format_error(exc), file=sys.stderr)
        return EXIT_INPUT_ERROR
    except ValueError as exc:  # e.g. --max-model-len 1
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(profile.model_dump_json())
    _report(profile, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
