"""Prompts of an exact token length that defeat prefix caching.

Completions get random token ids by default (vLLM accepts a list of ids as `prompt`): exact
length, no tokenizer needed, and no tokenizing on the server. Text prompts (chat, or
completions with prompt_format "text", as `vllm bench serve` and most real clients send them)
are random ids turned into text by the server's `/detokenize`; tokenizing that text again may
not give the same count, and the chat template adds a few tokens, so the server's usage is the
truth.
"""

from __future__ import annotations

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

    def token_ids(self, n: int) -> list[int]:
        return self._rng.integers(self._low, self._high, size=max(n, 1)).tolist()

    async def prompt(self, session: aiohttp.ClientSession, isl: int) -> list[int] | str:
        ids = self.token_ids(isl)
        if self._cfg.prompts == "token_ids":
            return ids
        url = f"{self._cfg.base_url.rstrip('/')}/detokenize"
        async with session.post(url, json={"model": self._cfg.model, "tokens": ids}) as resp:
            resp.raise_for_status()
            return (await resp.json())["prompt"]
