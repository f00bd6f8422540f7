"""Write a random-weight model of a shape (config + tokenizer from pricing.serving.shapes, weights drawn
from the config's initializer) so the quantizer can be run for real on an architecture whose
weights are not at hand, e.g. the Llama-3.1-8B shape on a GPU host with no hub access.

    python benchmarks/random_model.py llama-3.1-8b /root/models/llama-3.1-8b-random

The weights are random, so the checkpoint is good for speed and format checks, not for quality.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from pricing.serving.shapes import SHAPES, write_shape


def write_random_model(shape: str, out: Path, seed: int = 0) -> Path:
    if (out / "model.safetensors.index.json").is_file() or (out / "model.safetensors").is_file():
        print(f"reusing {out}")
        return out
    write_shape(shape, out)  # config.json + tokenizer files
    config = transformers.AutoConfig.from_pretrained(out)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 8B parameters on a CPU takes minutes
    t0 = time.monotonic()
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {params / 1e9:.2f}B random bf16 parameters in {time.monotonic() - t0:.0f} s on {device}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    write_random_model(args.shape, args.out, args.seed)


if __name__ == "__main__":
    main()
