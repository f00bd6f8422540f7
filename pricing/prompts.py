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

import asyncio
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

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
        # Fitting text costs a few ms of encoding per prompt (2 ms at 1,807 tokens, tiny shape).
        # On the event loop that would hold up every other stream's sends; the fast tokenizer
        # lets go of the GIL while it encodes, so one thread makes them aside. One thread: the
        # tokenizer and the random generator are not shared safely between threads.
        self._text_thread = ThreadPoolExecutor(1, thread_name_prefix="prompts") if self._tokenizer else None

    def __enter__(self) -> PromptFactory:
        return self

    def __exit__(self, *exc) -> None:
        if self._text_thread:
            self._text_thread.shutdown(wait=False, cancel_futures=True)

    @property
    def kind(self) -> str:
        return self._cfg.prompts

    def token_ids(self, n: int) -> list[int]:
        return self._rng.integers(self._low, self._high, size=max(n, 1)).tolist()

    async def prompt(self, session: aiohttp.ClientSession, isl: int) -> list[int] | str:
        if self._text_thread:
            return await asyncio.get_running_loop().run_in_executor(self._text_thread, self._fitted_text, isl)
        ids = self.token_ids(isl)
        if self._cfg.prompts == "token_ids":
            return ids
        url = f"{self._cfg.base_url.rstrip('/')}/detokenize"
        async with session.post(url, json={"model": self._cfg.model, "tokens": ids}) as resp:
            resp.raise_for_status()
            return (await resp.json())["prompt"]

    def _fitted_text(self, isl: int) -> str:
        return fitted_text(self._tokenizer, self.token_ids(isl), isl, self.token_ids)


class PromptSource:
    """The next (input length, output length, prompt) of a probe.

    Token ids are drawn when asked (microseconds). Text takes milliseconds to make (or a
    /detokenize round trip), so it is made ahead, up to `depth` prompts, as `vllm bench serve`
    makes every prompt before it starts: a closed-loop worker then sends its next request the
    moment its last one ends. Made on demand, a lockstep round of N workers waited for N
    prompts from one thread: on the 2-core VM, 8 streams of 1,807 tokens delivered 26% less
    than `vllm bench` on the same server (benchmarks/peer_check.py). A prompt that could not be
    made comes out as the exception, for the caller to record as a failed request.
    """

    def __init__(self, factory: PromptFactory, session: aiohttp.ClientSession, pairs: Iterator[tuple[int, int]],
                 ahead: int) -> None:
        self._factory, self._session, self._pairs = factory, session, pairs
        self._ready: asyncio.Queue | None = None
        self._maker: asyncio.Task | None = None
        if factory.kind != "token_ids":
            self._ready = asyncio.Queue(maxsize=max(ahead, 1))
            self._maker = asyncio.create_task(self._make_ahead())

    async def _made(self, isl: int) -> list[int] | str | Exception:
        try:
            return await self._factory.prompt(self._session, isl)
        except Exception as exc:  # noqa: BLE001 - handed to the request that needed it
            return exc

    async def _make_ahead(self) -> None:
        for isl, osl in self._pairs:
            await self._ready.put((isl, osl, await self._made(isl)))
        await self._ready.put((0, 0, RuntimeError("the probe ran out of (input, output) length pairs")))

    async def next(self) -> tuple[int, int, list[int] | str | Exception]:
        if self._ready is None:
            isl, osl = next(self._pairs)
            return isl, osl, await self._made(isl)
        return await self._ready.get()

    def close(self) -> None:
        if self._maker:
            self._maker.cancel()


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """A Hugging Face tokenizer from a folder or hub id (transformers comes with vLLM)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    tokenizer.model_max_length = 2**31  # only counting here: no "longer than the model" warnings
    return tokenizer


def fitted_text(tokenizer, ids: list[int], isl: int, more_ids: Callable[[int], list[int]], tries: int = 8) -> str:
    """Text the tokenizer reads back as `isl` tokens (or within a token): random ids decode to
    text that encodes again into a different count, so cut or extend and retry. A cut can land
    where the text's tail reads back one token longer every time (a fixed point), so each cut
    that overshoots again keeps one token fewer than the last."""
    text = tokenizer.decode(ids)
    overshoots = 0
    for _ in range(tries):
        again = tokenizer.encode(text, add_special_tokens=False)
        if len(again) == isl:
            break
        keep = isl - overshoots
        if len(again) > isl and keep >= 1:
            text = tokenizer.decode(again[:keep])
            overshoots += 1
        elif len(again) > isl:  # nothing left to cut (a lone byte token reads back as 3): start afresh
            text, overshoots = tokenizer.decode(more_ids(isl)), 0
        else:
            text += tokenizer.decode(more_ids(isl - len(again)))
    return text
