"""Prompts of an exact token length that defeat prefix caching.

Completions get random token ids by default (vLLM accepts a list of ids as `prompt`): exact
length, no tokenizer needed, and no tokenizing on the server. Text prompts (chat, or
completions with prompt_format "text", as `vllm bench serve` and most real clients send them)
are random ids turned into text. With a local tokenizer (`ClientConfig.tokenizer`, the served
model's folder) that happens here, and the text is fitted to read back as the target length;
without one the server's `/detokenize` does it, which adds work to the server under test and
keeps the length only roughly (decoding random ids and encoding the text again does not round
trip: +7% for the tiny shape at 1,807 tokens). The chat template adds a few tokens; the
server's usage is the truth either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import aiohttp
import numpy as np


class PromptFactory:
    def __init__(self, cfg, seed: int | None = None) -> None:
        self._cfg = cfg
        # Fresh OS entropy per factory (one per probe) unless a seed is given: a sweep sends many
        # probes to one server, and probes replaying the same token sequences hit vLLM's prefix
        # cache (50-99% of prompt tokens cached from the second probe on, seen on an H200),
        # understating TTFT and the cost of prefill.
        self._rng = np.random.default_rng(seed)
        vocab = cfg.vocab_size
        # Keep clear of the ends of the vocabulary, where special tokens usually live.
        self._low, self._high = 1, vocab - min(256, vocab // 8)
        self._tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer and cfg.prompts != "token_ids" else None

    def token_ids(self, n: int) -> list[int]:
        return self._rng.integers(self._low, self._high, size=max(n, 1)).tolist()

    async def prompt(self, session: aiohttp.ClientSession, isl: int) -> list[int] | str:
        ids = self.token_ids(isl)
        if self._cfg.prompts == "token_ids":
            return ids
        if self._tokenizer is not None:
            return fitted_text(self._tokenizer, ids, isl, self.token_ids)
        url = f"{self._cfg.base_url.rstrip('/')}/detokenize"
        async with session.post(url, json={"model": self._cfg.model, "tokens": ids}) as resp:
            resp.raise_for_status()
            return (await resp.json())["prompt"]


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """A Hugging Face tokenizer from a folder or hub id (transformers comes with vLLM)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    tokenizer.model_max_length = 2**31  # only counting here: no "longer than the model" warnings
    return tokenizer


def fitted_text(tokenizer, ids: list[int], isl: int, more_ids: Callable[[int], list[int]], tries: int = 4) -> str:
    """Text the tokenizer reads back as `isl` tokens (or within a token or two): random ids
    decode to text that encodes again into a different count, so cut or extend and retry."""
    text = tokenizer.decode(ids)
    for _ in range(tries):
        again = tokenizer.encode(text, add_special_tokens=False)
        if len(again) == isl:
            break
        text = tokenizer.decode(again[:isl]) if len(again) > isl else text + tokenizer.decode(more_ids(isl - len(again)))
    return text
