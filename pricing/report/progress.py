"""Rich progress for a sweep: one bar per probe (window requests done), one line per finished probe."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from pricing.load.client import ProbePlan
from pricing.measure.server_metrics import cache_hit_share
from pricing.schema import SERVER_ABORTS, LoadSpec, ProbeRecord, RequestRecord


def describe_load(load: LoadSpec) -> str:
    level = f"concurrency {load.concurrency}" if load.mode == "closed" else f"{load.request_rate_rps:g} req/s"
    if load.sessions:
        level += " (sessions)" if load.mode == "closed" else " (as sessions)"
    return f"{load.kind} {level}"


def describe_probe(rec: ProbeRecord) -> str:
    s = rec.stats
    ttft = f"{s.ttft_s.p90 * 1e3:.0f} ms" if s.ttft_s.p90 is not None else "-"
    tpot = f"{s.tpot_s.p90 * 1e3:.1f} ms" if s.tpot_s.p90 is not None else "-"
    passed = "not judged (the server failed)" if rec.abort in SERVER_ABORTS else ", ".join(rec.tiers_passed) or "none"
    return (
        f"#{rec.probe_index} {describe_load(rec.load)}: {s.request_rate_rps:.2f} req/s"
        + (" (kept up: served as offered)" if s.rate_source == "offered" else "") + ", "
        f"{s.output_tok_s:.0f} out tok/s, p90 TTFT {ttft}, p90 TPOT {tpot}, errors {s.failed}; passes: {passed}"
        + (f" [{rec.note}]" if rec.note else "")
        + _cache_warning(rec)
        + "".join(f" [{w}]" for w in rec.warnings)
    )


def _cache_warning(rec: ProbeRecord) -> str:
    """A session replay: the share of prompt tokens that are history (the profile's) beside the
    share the server's prefix cache served in the window. Otherwise prompts are random, so the
    cache should serve almost none of them; if it does, something (another client, a replayed
    prompt set) is making TTFT look better than it is."""
    if rec.load.replays_sessions:
        hit = cache_hit_share(rec.server_metrics)
        served = f"{hit:.0%}" if hit is not None else "not reported"
        history = rec.profile.history_share
        return (f" [history {history:.0%} of prompt tokens (profile), prefix cache served {served} (server)]"
                if history is not None else f" [prefix cache served {served} (server)]")
    hit = (rec.server_metrics or {}).get("prefix_cache_hit_frac")
    return f" [prefix cache served {hit:.0%} of prompt tokens: TTFT understated]" if hit and hit > 0.05 else ""


class ProbeProgress:
    """SweepEvents + the client's on_record hook, drawn with rich."""

    def __init__(self, console: Console, plan: ProbePlan) -> None:
        self.console = console
        self.plan = plan
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(), console=console, transient=True,
        )
        self._task = None

    def __enter__(self) -> ProbeProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def probe_started(self, load: LoadSpec, index: int) -> None:
        self._task = self.progress.add_task(f"probe #{index} {describe_load(load)}", total=self.plan.min_requests, errors=0)

    def on_record(self, rec: RequestRecord) -> None:
        if self._task is None:
            return
        if rec.ok:
            self.progress.advance(self._task)
        elif rec.error != "cancelled":
            task = self.progress.tasks[-1]
            self.progress.update(self._task, errors=task.fields["errors"] + 1)

    def probe_finished(self, record: ProbeRecord, reused: bool) -> None:
        if self._task is not None:
            self.progress.remove_task(self._task)
            self._task = None
        # The line's own brackets ([notes], [warnings]) are text, not rich markup.
        line = Text("reused ", style="dim") if reused else Text()
        self.progress.console.print(line.append(describe_probe(record)), highlight=False)
