"""`python -m pricing.quantize` (`vllm-price-quantize`): quantize a Hugging Face model with
llmcompressor `oneshot` and a recipe from quant_recipes/ into a checkpoint folder, or reuse a
matching one (the work is `pricing.serving.quantization`).

    python -m pricing.quantize --model ID_OR_PATH --scheme w8a8 -o checkpoints/NAME-w8a8

llmcompressor lives in its own virtualenv (.venv-quant): run this with that venv's python.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from pricing.serving.calibration import DEFAULT_DATASET, CalibrationError
from pricing.serving.quantization import (
    RECIPE_DIR,
    SCHEMES,
    QuantizeError,
    QuantizeRequest,
    quantize,
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pricing.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local model folder or Hugging Face id")
    p.add_argument("--scheme", required=True, help=f"one of {', '.join(SCHEMES)}")
    p.add_argument("-o", "--output", required=True, type=Path, help="checkpoint folder to write (or reuse)")
    p.add_argument("--calibration", default=DEFAULT_DATASET,
                   help="chat data: a .jsonl/.json/.parquet file, a profile JSON, a HF dataset id, or 'synthetic' "
                        f"(default {DEFAULT_DATASET}; synthetic tokens with a warning when unreachable)")
    p.add_argument("--samples", type=int, default=512, help="calibration samples (default 512)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="tokens per calibration sample (default 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe-dir", type=Path, default=RECIPE_DIR, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, log_path=False)

    def fail(msg: str, rc: int) -> int:
        console.print("[red]error:[/] " + escape(msg), soft_wrap=True, highlight=False)
        return rc

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.scheme not in SCHEMES:
            raise QuantizeError(f"unknown scheme {args.scheme!r}: choose one of {', '.join(SCHEMES)}")
        req = QuantizeRequest(model=args.model, scheme=args.scheme, output_dir=args.output,
                              calibration=args.calibration, samples=args.samples, max_seq_len=args.max_seq_len,
                              seed=args.seed, recipe_dir=args.recipe_dir)
        result = quantize(req, progress=lambda msg: console.log(escape(msg)))
    except ValidationError as exc:
        err = exc.errors()[0]
        return fail(f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}", 2)
    except (QuantizeError, CalibrationError) as exc:
        return fail(str(exc), 2)
    except Exception as exc:  # llmcompressor / torch failures: one line unless --debug
        if args.debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        return fail(f"quantization failed: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", 1)
    prov = result.provenance
    verb = "reusing" if result.reused else "wrote"
    print(f"{verb} {result.output_dir} ({prov.scheme}, calibration: {prov.calibration_source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
