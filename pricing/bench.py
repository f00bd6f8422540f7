"""`python -m pricing.bench`: serve a model with vLLM (or attach to one), sweep load per SLO
tier, append one JSON line per probe to benchmark_results/. `make bench` calls this."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pricing.capacity.search import SearchParams
from pricing.capacity.sweep import SweepOutcome, SweepSpec, run_sweep
from pricing.errors import EXIT_INPUT_ERROR, EXIT_SERVER_FAILED, InputError
from pricing.load import event_loop as aio
from pricing.load.client import ClientConfig, ProbePlan
from pricing.load.sessions import SessionTraffic
from pricing.measure.probe import ProbeResult, measured_probe
from pricing.measure.slo import parse_tiers
from pricing.measure.telemetry import open_gpu_meter
from pricing.report.console import describe_capacity
from pricing.report.progress import ProbeProgress
from pricing.schema import DeploymentConfig, LoadSpec
from pricing.serving.prepare import detect_gpu, prepare_model
from pricing.serving.server import (
    DIAGNOSE_LINES,
    ServerSpec,
    ServerStartError,
    VllmServer,
    attach,
    exit_cause,
    last_error_line,
    sigterm_as_exit,
)
from pricing.serving.shapes import SHAPES
from pricing.workload.profile import DEFAULT_PROFILE, TrafficProfile, load_profile
from pricing.workload.prompts import load_tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pricing.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama", help=f"shape ({', '.join(SHAPES)}), model folder or HF id")
    p.add_argument("--scheme", default="base", help="base (as served), fp8, w8a8, w4a16, w8a16")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="profile name, JSON path or fixed:ISL:OSL")
    p.add_argument("--gpu", default="auto", help="catalog GPU name for pricing; auto: from nvidia-smi, cpu without")
    p.add_argument("--url", help="attach to a running server instead of starting one")
    p.add_argument("--api-key", help="Bearer key for the server (never logged)")
    p.add_argument("--max-model-len", type=int, help="vLLM max-model-len; requests are capped to fit")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--prompt-format", choices=["token_ids", "text"], default="token_ids",
                   help="completions prompts as token ids (no tokenizing on the server) or text, as vllm bench "
                        "and most clients send them (the server's tokenizing then counts in TTFT)")
    p.add_argument("--tokenizer", help="local tokenizer (folder or HF id) that makes text prompts (default: the served "
                   "model's folder when it is local; else the server's /detokenize)")
    p.add_argument("--mode", choices=["closed", "open"], default="closed", help="sweep concurrency or request rate")
    p.add_argument("--tier", nargs="*", help="tiers to search: Baseline, Fast, Instant (default: all) or NAME:TTFT_S:TPOT_S[:P[:ERR]]")
    p.add_argument("--max-probes", type=int, default=10, help="decode probes of the first (--mode) search in this "
                   "run (rerun to continue)")
    p.add_argument("--max-open-probes", type=int, default=8, help="probes of the open-loop step in this run")
    p.add_argument("--no-open-loop", action="store_true", help="skip the open-loop (Poisson) step after a "
                   "closed-loop search; the pricer then prices on closed-loop capacity, with a warning")
    p.add_argument("--burstiness", default="1", help="open-loop arrivals: gamma shape of the gaps (1 = Poisson, "
                   "below 1 burstier), or 'profile': the profile's own, from its gaps within each hour")
    p.add_argument("--sessions", action="store_true", help="replay the profile's chat sessions: each turn's prompt is "
                   "the last prompt + its answer's token ids + new tokens, so vLLM's prefix cache serves the history; "
                   "concurrency counts active sessions, an open loop's rate arrives as sessions")
    p.add_argument("--think-scale", type=float, default=1.0, help="with --sessions: the data's think times (median "
                   "about 2 min in WildChat) x this before each next turn; 0 sends it as the answer ends")
    p.add_argument("--min-window-s", type=float, default=10.0, help="shortest steady-state window per probe "
                   "(an open-loop probe's: twice this)")
    p.add_argument("--window-e2e", type=float, default=2.0, help="a window lasts at least this many times the "
                   "p90 end-to-end latency of the probe's warm-up requests")
    p.add_argument("--min-requests", type=int, default=50, help="completed requests per probe window (50: the "
                   "fewest whose p90 has a 95%% upper bound)")
    p.add_argument("--max-probe-s", type=float, default=300.0, help="a probe whose window has not filled by then "
                   "fails; one that is still undecided then stops undecided")
    p.add_argument("--server-stall-s", type=float, default=10.0, help="stop with an error when requests are in flight "
                   "and the server sends not a byte for this long (hung); raise it for single prefills longer than that")
    p.add_argument("--start", type=float, default=1.0, help="first load level")
    p.add_argument("--max-level", type=float, default=1024.0, help="highest load level tried")
    p.add_argument("--no-prefill", action="store_true", help="skip the prefill-only probes of the price split")
    p.add_argument("--out", type=Path, help="results file (default benchmark_results/<model>_<gpu>.jsonl)")
    p.add_argument("--models-dir", type=Path, default=Path("models"), help="where shape folders are written")
    p.add_argument("--startup-timeout-s", type=float, default=1200.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-arg", action="append", default=[], help="passed to vllm serve as is (repeatable)")
    return p


def _text_tokenizer(args: argparse.Namespace, resolved) -> str | None:
    """The local tokenizer for text prompts, checked now so a bad one fails before any probe."""
    if args.prompt_format == "token_ids" and args.endpoint != "chat":
        return None
    name = args.tokenizer or (resolved.model if resolved is not None and resolved.is_local else None)
    if name is None:
        return None
    try:
        load_tokenizer(name)
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's one-line error
        raise ValueError(f"--tokenizer {name}: cannot load it ({type(exc).__name__}: {exc}); "
                         "name a tokenizer folder, or leave --tokenizer out to use the server's /detokenize") from None
    return name


def _vocab_size(model: str, resolved) -> int:
    """Random prompt ids stay below this: the served model's vocabulary, or a shape's when attached
    to a server of one (--url --model tiny-llama: its 4,096 ids), else 32,000, which most have."""
    if resolved is not None and resolved.vocab_size:
        return resolved.vocab_size
    return SHAPES[model].vocab_size if model in SHAPES else 32000


def _burstiness(arg: str, profile: TrafficProfile) -> float:
    """--burstiness as a gamma shape: a number, or the profile's arrivals' (Arrivals.gamma_shape)."""
    if arg == "profile":
        shape = profile.arrivals.gamma_shape if profile.arrivals is not None else None
        if shape is None:
            raise ValueError(f"--burstiness profile: profile {profile.name} has no arrival timestamps to estimate it "
                             "from (a fixed profile, or one built before gap CVs); give a gamma shape, e.g. 1")
        return round(shape, 3)  # probes compare burstiness exactly: one value per profile
    try:
        shape = float(arg)
    except ValueError:
        shape = -1.0
    if not shape > 0 or shape == float("inf"):
        raise ValueError(f"--burstiness must be a gamma shape > 0 (1 = Poisson) or 'profile', got {arg!r}")
    return shape


def run(args: argparse.Namespace, console: Console) -> int:
    tiers = parse_tiers(args.tier)
    profile = load_profile(args.profile)
    resolved = prepare_model(args.model, args.scheme, args.models_dir) if not args.url else None
    tokenizer = _text_tokenizer(args, resolved)
    if args.sessions and (args.endpoint != "completions" or args.prompt_format != "token_ids"):
        raise ValueError("--sessions sends token ids to /v1/completions (each prompt holds the last answer's exact "
                         "ids): leave out --endpoint chat and --prompt-format text")
    if args.think_scale < 0:
        raise ValueError(f"--think-scale must be >= 0, got {args.think_scale:g}")
    if args.sessions:
        profile.replay_sessions()  # a profile without sessions is a clear error before any server starts
    burstiness = _burstiness(args.burstiness, profile)
    gpu_name = detect_gpu() if args.gpu == "auto" else args.gpu
    model_label = Path(args.model).name if args.model not in SHAPES else args.model
    out = args.out or Path("benchmark_results") / f"{model_label}_{gpu_name}.jsonl"

    if args.url:
        server = attach(args.url, api_key=args.api_key)
    else:
        spec = ServerSpec(
            model=resolved.model, tensor_parallel_size=args.tp, max_model_len=args.max_model_len,
            load_format=resolved.load_format, served_model_name=model_label, api_key=args.api_key,
            extra_args=tuple(args.vllm_arg), env={"VLLM_CPU_KVCACHE_SPACE": "1"} if gpu_name == "cpu" else {},
        )
        server = VllmServer(spec, startup_timeout_s=args.startup_timeout_s)
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_as_exit())  # a killed bench stops the server it started
        with console.status(f"starting vLLM for {model_label} (TP={args.tp}); log: {getattr(server, 'log_path', '-')}"):
            stack.enter_context(server)
        max_len = args.max_model_len or server.max_model_len
        config = DeploymentConfig(
            model=model_label, scheme=args.scheme, tp=args.tp, gpu_name=gpu_name,
            gpu_count=args.tp,  # one server uses TP GPUs; replicas are priced by the pricer
            vllm_version=server.vllm_version, max_model_len=max_len,
        )
        client = ClientConfig(
            base_url=server.base_url, model=server.served_model_name or model_label, endpoint=args.endpoint,
            prompt_format=args.prompt_format, tokenizer=tokenizer,
            api_key=args.api_key, vocab_size=_vocab_size(args.model, resolved), seed=args.seed,
        )
        traffic = (SessionTraffic(profile.replay_sessions(max_len), seed=args.seed) if args.sessions
                   else profile.sample(50_000, seed=args.seed, max_model_len=max_len))
        plan = ProbePlan(min_window_s=args.min_window_s, window_e2e_multiple=args.window_e2e,
                         min_requests=args.min_requests, max_duration_s=args.max_probe_s,
                         server_stall_s=args.server_stall_s)
        summary = profile.summary(seed=args.seed, max_model_len=max_len, sessions=args.sessions)
        sweep = SweepSpec(
            config=config, profile=summary, tiers=tiers,
            search=SearchParams(start=args.start, max_level=args.max_level, integer=args.mode == "closed",
                                min_level=1.0 if args.mode == "closed" else 0.05),
            plan=plan, mode=args.mode, prompts=client.prompts, max_probes=args.max_probes,
            prefill_probes=not args.no_prefill, open_loop=not args.no_open_loop,
            max_open_probes=args.max_open_probes, burstiness=burstiness, sessions=args.sessions,
            think_scale=args.think_scale,
        )
        progress = ProbeProgress(console, plan)
        meter = stack.enter_context(_gpu_meter(gpu_name, console))

        async def probe(load: LoadSpec, index: int) -> ProbeResult:
            work = traffic if isinstance(traffic, SessionTraffic) else itertools.cycle(traffic)
            return await measured_probe(client, load, work, plan, meter, on_record=progress.on_record,
                                        tiers=tiers, lengths=(summary.isl_mean, summary.osl_mean))

        with progress:
            outcome = aio.run(run_sweep(sweep, probe, out, events=progress))
        # While the `with` still holds a server bench started: whether it exited, and its log.
        failure = _server_failure(outcome, server, out) if outcome.stop == "server_failed" else None
    _print_outcome(console, outcome, tiers, out)
    if outcome.stop == "too_few_requests":
        print(f"error: {outcome.stopped}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    if failure is None:
        return 0
    line, log_tail = failure
    for log_line in log_tail:
        console.print(f"  [dim]{log_line}[/dim]", highlight=False, markup=False)
    print(f"error: {line}", file=sys.stderr, flush=True)
    return EXIT_SERVER_FAILED


def _server_failure(outcome: SweepOutcome, server: VllmServer, out: Path) -> tuple[str, list[str]]:
    """One line saying which server failed, how, and what to do; and, for a server bench
    started, the end of its log (shown above the line)."""
    what = outcome.stopped or "a probe lost the server"
    if server.base_url not in what:
        what = f"server {server.base_url}: {what}"
    kept = len(outcome.records)
    todo = (f"{kept} finished probe(s) kept in {out}; rerun the same command to resume once the server is back "
            "(the failed probe is measured again)")
    if server.process is None:  # attached with --url
        return f"{what}. {todo}", []
    returncode = server.process.poll()
    tail = server.log_tail()
    if returncode is not None:
        cause = exit_cause(server.log_tail(DIAGNOSE_LINES), returncode)
        return f"{what}; vLLM {cause} (log: {server.log_path}). {todo}", tail
    error = last_error_line(server.log_tail(DIAGNOSE_LINES))
    return f"{what}; vLLM is still running{f', last error: {error}' if error else ''} (log: {server.log_path}). {todo}", tail


@contextlib.contextmanager
def _gpu_meter(gpu_name: str, console: Console):
    """An NVML energy meter with idle power measured once (None on CPU or without NVML)."""
    meter = open_gpu_meter() if gpu_name != "cpu" else None
    if meter is None:
        yield None
        return
    with meter:
        with console.status("measuring idle GPU power (3 s)"):
            meter.measure_idle(3.0)
        yield meter


def _print_outcome(console: Console, outcome: SweepOutcome, tiers, out: Path) -> None:
    table = Table(title="Capacity per SLO tier (95% intervals; the open loop prices)")
    for column in ("tier", "SLO", "closed loop (concurrency)", "open loop (Poisson)", "open / closed"):
        table.add_column(column)
    for t in tiers:
        closed, opened = outcome.closed[t.name], outcome.open[t.name]
        ratio = (f"{opened.rate_rps / closed.rate_rps:.2f}" if closed.kind == opened.kind == "found"
                 and opened.rate_rps and closed.rate_rps else "-")
        table.add_row(t.name, f"p{t.percentile:g} TTFT ≤ {t.ttft_s:g} s, TPOT ≤ {t.tpot_s * 1e3:g} ms",
                      describe_capacity(closed, "closed"), describe_capacity(opened, "open"), ratio)
    console.print(table)
    for warning in outcome.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    new = outcome.appended
    stopped = f"; stopped: {outcome.stopped}" if outcome.stopped and outcome.stop == "budget" else ""
    console.print(f"{new} new probe(s) appended to {out}{stopped}")


def main(argv: list[str] | None = None) -> int:
    console = Console(stderr=True, soft_wrap=True)
    args = _parser().parse_args(argv)
    try:
        return run(args, console)
    except ServerStartError as exc:
        for line in exc.log_tail:
            console.print(f"  [dim]{line}[/dim]", highlight=False)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SERVER_FAILED
    except (ValueError, FileNotFoundError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished probes are saved; rerun the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
