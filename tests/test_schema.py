"""Plausibility of probe records: what no measurement can produce is refused, naming file:line
and the field; every committed result file and every record the client measures still passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.pricing_builders import PROBES_FILE
from pydantic import ValidationError

from pricing.errors import InputError, from_validation_error
from pricing.measure.probe import open_loop_rate
from pricing.measure.requests import table_from_records
from pricing.measure.window import window_stats
from pricing.results import read_result_file
from pricing.schema import LatencyStats, LoadSpec, ProbeRecord, RequestRecord

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted(p for p in {*ROOT.glob("benchmark_results/**/*.jsonl"), *ROOT.glob("tests/fixtures/*.jsonl")}
                   if not p.name.endswith(".requests.jsonl"))  # per-request tables: read with their probes


def _line(**changes) -> dict:
    """The first fixture probe with `a__b=value` fields replaced."""
    obj = json.loads(PROBES_FILE.read_text().splitlines()[0])
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        target = obj
        for key in path:
            target = target[key]
        target[last] = value
    return obj


def _refusal(tmp_path: Path, obj: dict) -> InputError:
    path = tmp_path / "bad.jsonl"
    good = PROBES_FILE.read_text().splitlines()[1]
    path.write_text(good + "\n" + json.dumps(obj) + "\n")
    with pytest.raises(InputError) as err:
        read_result_file(path)
    assert err.value.file == str(path) and err.value.line == 2
    return err.value


@pytest.mark.parametrize(("changes", "field"), [
    ({"stats__window_s": -15}, "stats.window_s"),
    ({"stats__completed": -3}, "stats.completed"),
    ({"stats__request_rate_rps": 1e300, "stats__input_tok_s": 1e300, "stats__output_tok_s": 1e300},
     "stats.request_rate_rps"),
    ({"stats__output_tok_s": 1e300}, "stats.output_tok_s"),
    ({"stats__failed": -1}, "stats.failed"),
    ({"stats__ttft_s__p99": 0.05}, "stats.ttft_s.p99"),  # below its p90 of 0.1
    ({"stats__tpot_s__max": 0.001}, "stats.tpot_s.max"),
    ({"stats__e2e_s__mean": -0.1}, "stats.e2e_s.mean"),
    ({"stats__output_tokens": 10_000_000}, "stats.output_tokens"),  # 100 tok/s x 100 s = 10,000
    ({"stats__input_tokens": 1}, "stats.input_tokens"),
])
def test_absurd_records_are_refused_naming_the_field(tmp_path, changes, field):
    err = _refusal(tmp_path, _line(**changes))
    assert err.field == field, str(err)
    assert "\n" not in str(err)


def test_the_issues_three_records_each_get_one_line_and_exit_2(tmp_path):
    from io import StringIO

    from rich.console import Console

    from pricing.price import main

    for changes in ({"stats__window_s": -15}, {"stats__completed": -3},
                    {"stats__request_rate_rps": 1e300, "stats__input_tok_s": 1e300, "stats__output_tok_s": 1e300}):
        path = tmp_path / "absurd.jsonl"
        path.write_text(json.dumps(_line(**changes)) + "\n")
        out, err = StringIO(), StringIO()
        code = main([str(path)], out=Console(file=out), err=Console(file=err, width=300, soft_wrap=True))
        lines = err.getvalue().splitlines()
        assert code == 2 and out.getvalue() == ""
        assert lines[0].startswith(f"error: {path}:1: stats.") and "Traceback" not in err.getvalue()


def test_percentile_order_and_intervals():
    LatencyStats(count=3, mean=0.2, p50=0.1, p90=0.2, p99=0.3, max=0.3)  # ties are fine
    LatencyStats(count=0)
    with pytest.raises(ValidationError) as err:
        LatencyStats(count=3, p50=0.3, p90=0.2, p99=0.4, max=0.5)
    assert from_validation_error("f", 1, err.value).field == "p90"
    with pytest.raises(ValidationError) as err:
        LatencyStats(count=3, p50=0.1, p90=0.2, p99=0.3, max=0.4, p90_ci=(0.25, 0.15))
    assert from_validation_error("f", 1, err.value).field == "p90_ci"
    with pytest.raises(ValidationError):
        LatencyStats(count=3, p50=float("inf"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_result_file_still_reads(path):
    assert read_result_file(path)


def test_committed_files_include_both_schemas():
    versions = {json.loads(line).get("schema_version") for p in COMMITTED for line in p.read_text().splitlines()}
    assert {1, 2} <= versions


def _stream(start_s: float, tokens: int, tpot_s: float = 0.01, ttft_s: float = 0.05, error: str | None = None
            ) -> RequestRecord:
    start = int(start_s * 1e9)
    chunks = [start + int((ttft_s + i * tpot_s) * 1e9) for i in range(tokens)]
    return RequestRecord(start_ns=start, chunk_ns=chunks, end_ns=chunks[-1] + 1000 if chunks else start + 1000,
                         prompt_tokens=200, completion_tokens=tokens if error is None else None,
                         target_input_tokens=200, target_output_tokens=tokens, error=error)


def _record(stats, load: LoadSpec) -> dict:
    obj = _line()
    obj["stats"], obj["load"] = json.loads(stats.model_dump_json()), json.loads(load.model_dump_json())
    return obj


def test_what_the_client_measures_passes_the_checks():
    """Window statistics as measured (a flow, cut requests, failures), a capped open loop's counted
    arrivals, an open loop's offered rate where its server kept up, and an older record's, read
    back through the schema."""
    records = [_stream(t * 0.1, 20) for t in range(200)]
    records += [_stream(3.05, 7, error="cancelled"), _stream(2.0, 0, error="disconnect")]
    stats = window_stats(records, int(1e9), int(15e9), lengths=(200.0, 20.0))
    closed = LoadSpec(mode="closed", concurrency=8)
    ProbeRecord.model_validate(_record(stats, closed))
    opened = LoadSpec(mode="open", request_rate_rps=stats.request_rate_rps * 0.99)
    table = table_from_records(records, int(1e9), int(15e9))
    capped = opened.model_copy(update={"concurrency": 8})
    arrivals = open_loop_rate(stats, capped, table)
    assert arrivals.rate_source == "arrivals" and arrivals.request_rate_rps != stats.request_rate_rps
    ProbeRecord.model_validate(_record(arrivals, capped))
    assert open_loop_rate(stats, opened, table).rate_source == "arrivals"  # a request failed
    served = records[:200]
    kept_up = open_loop_rate(window_stats(served, int(1e9), int(15e9), lengths=(200.0, 20.0)), opened,
                             table_from_records(served, int(1e9), int(15e9)))
    assert kept_up.rate_source == "offered"
    ProbeRecord.model_validate(_record(kept_up, opened))
    # Older records set an open loop's rates to its offered rate where the flow kept up.
    offered = stats.model_copy(update={"request_rate_rps": opened.request_rate_rps, "rate_source": "offered",
                                       "output_tok_s": opened.request_rate_rps * 20.0,
                                       "input_tok_s": opened.request_rate_rps * 200.0})
    ProbeRecord.model_validate(_record(offered, opened))
    lying = _record(offered, opened.model_copy(update={"request_rate_rps": stats.request_rate_rps * 3}))
    with pytest.raises(ValidationError) as err:
        ProbeRecord.model_validate(lying)
    assert from_validation_error("f", 1, err.value).field == "stats.request_rate_rps"
