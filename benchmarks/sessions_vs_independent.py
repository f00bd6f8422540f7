"""Price one vLLM server two ways: the profile's turns as independent requests (fresh prompts,
nothing for the prefix cache), then the same turns replayed as chat sessions (each prompt holds
the last prompt and answer, so the prefix cache serves the history). One server, started once,
so the two sweeps differ only in the traffic. Then both are priced in one matrix.

    flock /tmp/vllm.lock python benchmarks/sessions_vs_independent.py --shape tiny-llama \
        --max-model-len 4096 --out-dir reports/sessions_cpu -- --min-window-s 8 --min-requests 20

Arguments after `--` go to both `python -m pricing.bench` runs. The profile is rebuilt from the
shared WildChat lengths file with `--policy drop` at the server's max-model-len: a session whose
next turn does not fit ends there, and a turn that does not fit is dropped, so both sweeps send
the same turns (a dropped turn's later turns do not fit either: each prompt holds the last one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pricing import bench, price
from pricing import profile as profiler
from pricing.serving.prepare import prepare_model
from pricing.serving.server import ServerSpec, VllmServer

LENGTHS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wildchat_turn_lengths_2024-03-17_23.jsonl"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny-llama")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu", default="cpu")
    p.add_argument("--think-scale", type=float, default=0.0, help="the sessions' think times x this (0: at once)")
    p.add_argument("--lengths", type=Path, default=LENGTHS)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("bench_args", nargs="*", help="after --: passed to both sweeps")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    profile = args.out_dir / f"wildchat-{args.max_model_len}-drop.json"
    if profiler.main(["--lengths", str(args.lengths), "--start", "2024-03-17", "--end", "2024-03-23",
                      "--max-model-len", str(args.max_model_len), "--policy", "drop", "--name", profile.stem,
                      "-o", str(profile)]) != 0:
        return 2
    resolved = prepare_model(args.shape, "base", args.out_dir / "models")
    spec = ServerSpec(model=resolved.model, load_format=resolved.load_format, max_model_len=args.max_model_len,
                      served_model_name=args.shape, env={"VLLM_CPU_KVCACHE_SPACE": "1"} if args.gpu == "cpu" else {})
    runs = {"independent": [], "sessions": ["--sessions", "--think-scale", f"{args.think_scale:g}"]}
    with VllmServer(spec, log_path=args.out_dir / "vllm.log", startup_timeout_s=1200) as server:
        for name, extra in runs.items():
            code = bench.main(["--url", server.base_url, "--model", args.shape, "--gpu", args.gpu, "--profile",
                               str(profile), "--max-model-len", str(args.max_model_len),
                               "--out", str(args.out_dir / f"{name}.jsonl"), *extra, *args.bench_args])
            if code != 0:
                print(f"{name} sweep exited {code}", file=sys.stderr)
                return code
    files = [str(args.out_dir / f"{name}.jsonl") for name in runs]
    return price.main([*files, "--json", str(args.out_dir / "prices.json"), "--html", str(args.out_dir / "report.html")])


if __name__ == "__main__":
    sys.exit(main())
