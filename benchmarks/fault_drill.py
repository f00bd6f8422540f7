"""Kill the server in the middle of a sweep's probe: how long until bench says so, how much
memory it took meanwhile, and whether a rerun resumes without losing a finished probe.

Two servers: the mock (attached with --url, as benchmarks/gpu_reference.sh attaches), and a real
vLLM CPU server with the tiny shape that bench starts itself (its log's tail goes into the error).
Per server: start it, run `python -m pricing.bench`, SIGKILL the server (its whole process group)
`--kill-after-s` into probe number `--kill-probe`, then check bench's exit code and error line,
the results file, and a rerun against a fresh server. Prints seconds to detect and peak RSS.

    python benchmarks/fault_drill.py                 # the mock only (about a minute)
    python benchmarks/fault_drill.py --server vllm   # vLLM on CPU: two starts, about 6 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from pricing.schema import SERVER_ABORTS  # noqa: E402
from pricing.testing.mock_server import LatencyModel, MockConfig, MockServerProcess  # noqa: E402

# TPOT grows with the running requests, so the search climbs a few levels before it settles.
MOCK_LATENCY = LatencyModel(ttft_base_s=0.005, tpot_base_s=0.004, tpot_per_seq_s=0.0004)
POLL_S = 0.05


@dataclass
class DrillResult:
    server: str
    detect_s: float | None  # kill -> bench's error line
    exit_s: float | None  # kill -> bench's exit
    exit_code: int | None  # None: still running at the drill's timeout, killed
    peak_rss_mb: float  # bench's own high-water mark (VmHWM), not its children's
    error_line: str
    kept_before_kill: int  # probe lines written before the kill
    lines_after: list[dict] = field(default_factory=list)  # the results file after the first run
    rerun_exit_code: int | None = None
    rerun_lines: list[dict] = field(default_factory=list)  # ... and after the rerun
    problems: list[str] = field(default_factory=list)


def _bench_args(url: str | None, out: Path, models_dir: Path, start: int, min_window_s: float,
                max_probes: int = 8, max_open_probes: int = 2) -> list[str]:
    serve = ["--url", url] if url else ["--model", "tiny-llama", "--max-model-len", "1024",
                                        "--models-dir", str(models_dir)]
    return [sys.executable, "-m", "pricing.bench", *serve, "--gpu", "cpu", "--profile", "fixed:256:32",
            "--tier", "Baseline", "--min-window-s", f"{min_window_s:g}", "--min-requests", "5", "--start", str(start),
            "--max-probes", str(max_probes), "--max-open-probes", str(max_open_probes), "--out", str(out)]


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _vm_hwm_mb(pid: int) -> float | None:
    """A process's own peak resident set (Linux /proc), in MB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class _Bench:
    """bench as a subprocess: its stderr lines with their arrival times, its peak RSS."""

    def __init__(self, args: list[str], repo: Path = REPO) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.proc = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[tuple[float, str]] = []
        self.peak_rss_mb = 0.0
        self.exited_at: float | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def poll(self) -> int | None:
        rss = _vm_hwm_mb(self.proc.pid)
        if rss is not None:
            self.peak_rss_mb = max(self.peak_rss_mb, rss)
        return self.proc.poll()

    def wait(self, timeout_s: float) -> int | None:
        """bench's exit code, or None when it ran past `timeout_s` (it is killed then)."""
        deadline = time.monotonic() + timeout_s
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                self._reader.join(timeout=5)
                return None
            time.sleep(POLL_S)
        self.exited_at = time.monotonic()
        self._reader.join(timeout=5)
        return code

    def error_line(self) -> tuple[float | None, str]:
        for at, line in self.lines:
            if line.startswith("error:"):
                return at, line
        return None, ""


def _kill_when(bench: _Bench, out: Path, kill_probe: int, kill_after_s: float, kill: Callable[[], None]
               ) -> tuple[float, int]:
    """Wait until probe `kill_probe` runs (kill_probe - 1 lines written), `kill_after_s` more, then
    kill. Returns (monotonic time of the kill, lines written before it)."""
    while len(_lines(out)) < kill_probe - 1:
        if bench.poll() is not None:
            raise RuntimeError(f"bench exited ({bench.proc.returncode}) before probe {kill_probe}: "
                               + " | ".join(line for _, line in bench.lines[-5:]))
        time.sleep(POLL_S)
    time.sleep(kill_after_s)
    kept = len(_lines(out))
    kill()
    return time.monotonic(), kept


def _check(result: DrillResult, url_hint: str, max_detect_s: float, max_rss_mb: float) -> None:
    p = result.problems
    if result.exit_code != 1:
        p.append(f"exit code {result.exit_code}, expected 1")
    if result.detect_s is None or result.detect_s > max_detect_s:
        p.append(f"seconds to detect {result.detect_s}, expected <= {max_detect_s:g}")
    if url_hint not in result.error_line:
        p.append(f"the error line does not name {url_hint}: {result.error_line!r}")
    if result.peak_rss_mb > max_rss_mb:
        p.append(f"peak RSS {result.peak_rss_mb:.0f} MB, expected <= {max_rss_mb:g}")
    after = result.lines_after
    finished = [r for r in after if r.get("abort") not in SERVER_ABORTS]
    failed = [r for r in after if r.get("abort") in SERVER_ABORTS]
    if len(finished) < result.kept_before_kill:
        p.append(f"{result.kept_before_kill} probes were written before the kill, {len(finished)} finished after it")
    if len(failed) != 1:
        p.append(f"{len(failed)} probes recorded as failed with the server's cause, expected 1")
    if result.rerun_exit_code is None:
        return
    if result.rerun_exit_code != 0:
        p.append(f"the rerun exited {result.rerun_exit_code}")
    if result.rerun_lines[:len(after)] != after:
        p.append("the rerun changed lines that were already written")
    new = result.rerun_lines[len(after):]
    levels = [(r["load"]["mode"], r["load"]["kind"], _level(r)) for r in finished]
    if any((r["load"]["mode"], r["load"]["kind"], _level(r)) in levels for r in new):
        p.append("the rerun measured a finished probe's load again")
    if failed and not any(_level(r) == _level(failed[0]) and r["load"]["kind"] == failed[0]["load"]["kind"]
                          for r in new):
        p.append(f"the rerun did not measure the failed probe's load ({_level(failed[0]):g}) again")


def _level(rec: dict) -> float:
    load = rec["load"]
    return float(load["concurrency"] if load["mode"] == "closed" else load["request_rate_rps"])


def drill_mock(work: Path, kill_probe: int = 5, kill_after_s: float = 1.0, start: int = 1, min_window_s: float = 3.0,
               max_detect_s: float = 10.0, max_rss_mb: float = 1024.0, rerun: bool = True,
               bench_timeout_s: float = 120.0, bench_repo: Path = REPO, max_probes: int = 8,
               max_open_probes: int = 2) -> DrillResult:
    """The mock, attached with --url: killed mid-probe, then a fresh mock for the rerun."""
    out = work / "mock_drill.jsonl"
    with MockServerProcess(MockConfig(latency=MOCK_LATENCY)) as mock:
        bench = _Bench(_bench_args(mock.url, out, work / "models", start, min_window_s, max_probes, max_open_probes), bench_repo)
        killed_at, kept = _kill_when(bench, out, kill_probe, kill_after_s, mock.proc.kill)  # type: ignore[union-attr]
        code = bench.wait(bench_timeout_s)
        url = mock.url
    result = _result("mock", bench, code, killed_at, kept, out)
    if rerun and code is not None:
        with MockServerProcess(MockConfig(latency=MOCK_LATENCY)) as fresh:
            again = _Bench(_bench_args(fresh.url, out, work / "models", start, min_window_s, max_probes, max_open_probes), bench_repo)
            result.rerun_exit_code = again.wait(300)
        result.rerun_lines = _lines(out)
    _check(result, url, max_detect_s, max_rss_mb)
    return result


def drill_vllm(work: Path, kill_probe: int = 5, kill_after_s: float = 1.0, start: int = 1, min_window_s: float = 3.0,
               max_detect_s: float = 10.0, max_rss_mb: float = 1024.0, rerun: bool = True,
               bench_timeout_s: float = 120.0, bench_repo: Path = REPO) -> DrillResult:
    """vLLM on CPU started by bench itself: its process group is killed mid-probe."""
    out = work / "vllm_drill.jsonl"
    args = _bench_args(None, out, work / "models", start, min_window_s)
    bench = _Bench(args, bench_repo)

    def kill_server() -> None:
        for child in _children(bench.proc.pid):  # the vLLM server bench started, in its own process group
            os.killpg(child, signal.SIGKILL)

    killed_at, kept = _kill_when(bench, out, kill_probe, kill_after_s, kill_server)
    code = bench.wait(bench_timeout_s)
    result = _result("vllm", bench, code, killed_at, kept, out)
    if rerun and code is not None:
        result.rerun_exit_code = _Bench(args, bench_repo).wait(900)
        result.rerun_lines = _lines(out)
    _check(result, "http://127.0.0.1:", max_detect_s, max_rss_mb)
    if "SIGKILL" not in result.error_line:
        result.problems.append("the error line does not say the server was killed")
    return result


def _result(server: str, bench: _Bench, code: int | None, killed_at: float, kept: int, out: Path) -> DrillResult:
    at, line = bench.error_line()
    return DrillResult(server=server, detect_s=None if at is None else at - killed_at,
                       exit_s=None if bench.exited_at is None else bench.exited_at - killed_at, exit_code=code,
                       peak_rss_mb=bench.peak_rss_mb, error_line=line, kept_before_kill=kept, lines_after=_lines(out))


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", choices=["mock", "vllm", "both"], default="mock")
    p.add_argument("--kill-probe", type=int, default=5, help="kill the server during this probe (1-based)")
    p.add_argument("--kill-after-s", type=float, default=1.0, help="... this long after it started")
    p.add_argument("--min-window-s", type=float, default=3.0)
    p.add_argument("--max-detect-s", type=float, default=10.0)
    p.add_argument("--max-rss-mb", type=float, default=1024.0)
    p.add_argument("--no-rerun", action="store_true")
    p.add_argument("--bench-timeout-s", type=float, default=120.0, help="kill bench if it has not exited this long "
                   "after the kill")
    p.add_argument("--bench-repo", type=Path, default=REPO, help="run bench from this checkout (e.g. an older one, "
                   "to compare)")
    p.add_argument("--work", type=Path, help="folder for results and models (default: a temporary one)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="fault_drill_"))
    work.mkdir(parents=True, exist_ok=True)
    kw = dict(kill_probe=args.kill_probe, kill_after_s=args.kill_after_s, min_window_s=args.min_window_s,
              max_detect_s=args.max_detect_s, max_rss_mb=args.max_rss_mb, rerun=not args.no_rerun,
              bench_timeout_s=args.bench_timeout_s, bench_repo=args.bench_repo)
    results = []
    if args.server in ("mock", "both"):
        results.append(drill_mock(work, **kw))
    if args.server in ("vllm", "both"):
        results.append(drill_vllm(work, **kw))
    for r in results:
        detect = f"{r.detect_s:.1f} s" if r.detect_s is not None else "never"
        exited = (f"exit {r.exit_code} after {r.exit_s:.1f} s" if r.exit_s is not None
                  else f"still running after {args.bench_timeout_s:g} s (killed)")
        print(f"{r.server}: killed during probe {args.kill_probe}; seconds to detect {detect}, {exited}, "
              f"peak RSS {r.peak_rss_mb:.0f} MB; {r.kept_before_kill} probe(s) written before the kill, "
              f"{len(r.lines_after)} after it, {len(r.rerun_lines)} after the rerun (exit {r.rerun_exit_code})")
        print(f"  {r.error_line}")
        for problem in r.problems:
            print(f"  PROBLEM: {problem}")
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
