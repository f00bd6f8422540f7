"""benchmarks/fault_drill.py: the server is SIGKILLed during the sweep's fifth probe; bench must
say so within seconds, keep its memory, lose no finished probe, and resume on a rerun. The mock
drill runs in the default suite, rerun included; the vLLM one (bench starts vLLM itself) is marked
vllm and checks what only a real server shows, its death named with its log, not the rerun
(a second vLLM start, about two minutes of make test; `benchmarks/fault_drill.py --server vllm` has it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("fault_drill", Path(__file__).parents[1] / "benchmarks" / "fault_drill.py")
fault_drill = importlib.util.module_from_spec(spec)
sys.modules["fault_drill"] = fault_drill  # its dataclasses look their module up
spec.loader.exec_module(fault_drill)

MAX_DETECT_S = 10.0  # the bound
MAX_RSS_MB = 1024.0  # bench holds ~150 MB; the unbounded client reached 1.95 GB within 60 s of the kill


def _report(result) -> str:
    return (f"{result.server}: seconds to detect {result.detect_s}, exit {result.exit_code}, "
            f"peak RSS {result.peak_rss_mb:.0f} MB; {result.error_line}")


def test_mock_killed_mid_probe(tmp_path):
    # A 2 s window and the kill 0.5 s into the third probe: it lands in the probe, not in its tail;
    # 5 decode probes and an open one leave the rerun work to do.
    result = fault_drill.drill_mock(tmp_path, kill_probe=3, min_window_s=2.0, kill_after_s=0.5,
                                    max_detect_s=MAX_DETECT_S, max_rss_mb=MAX_RSS_MB, max_probes=5,
                                    max_open_probes=1)
    print(_report(result))
    assert not result.problems, result.problems
    # What _check holds, restated where it can be read: one line, the URL, the cause, exit 1.
    assert result.exit_code == 1 and result.detect_s is not None and result.detect_s <= MAX_DETECT_S
    assert " unreachable: " in result.error_line and "rerun the same command" in result.error_line
    assert result.kept_before_kill == 2 and len(result.rerun_lines) > len(result.lines_after) == 3


@pytest.mark.vllm
def test_vllm_cpu_server_bench_started_killed_mid_probe(vllm_lock, tmp_path):
    # Killed in the second probe: what only vLLM shows needs no more (the fifth took ~40 s longer).
    result = fault_drill.drill_vllm(tmp_path, kill_probe=2, max_detect_s=MAX_DETECT_S, max_rss_mb=MAX_RSS_MB, rerun=False)
    print(_report(result))
    assert not result.problems, result.problems
    assert "vLLM was killed (SIGKILL" in result.error_line and "(log: " in result.error_line
