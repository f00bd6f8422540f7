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
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import numpy as np

# Threads that make text prompts. Fitting a 1,807-token prompt takes 5-15 ms (tiny shape,
# Llama-3 tokenizer), so one thread makes about 55 a second, below what a busy probe sends (c=256
# on the mock sends 190 req/s). The fast tokenizer lets go of the GIL while it encodes, so
# threads add up, as far as there are cores.
TEXT_THREADS = max(1, min(4, os.cpu_count() or 1))


class PromptFactory:
    def __init__(self, cfg, seed: int | None = None) -> None:
        self._cfg = cfg
        # Fresh OS entropy per factory (one per probe) unless a seed is given: a sweep sends many
        # probes to one server, and probes replaying the same token sequences hit vLLM's prefix
        # cache (50-99% of prompt tokens cached from the second probe on, seen on an H200),
        # understating TTFT and the cost of prefill.
        self._seeds = np.random.SeedSequence(seed)
        self._rng = np.random.default_rng(self._seeds.spawn(1)[0])
        vocab = cfg.vocab_size
        # Keep clear of the ends of the vocabulary, where special tokens usually live.
        self._low, self._high = 1, vocab - min(256, vocab // 8)
        self._tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer and cfg.prompts != "token_ids" else None
        # Text is made aside, so the event loop goes on sending and reading (on the loop, each
        # prompt held every stream ~5 ms). Each thread draws from its own generator: numpy's
        # are not to be shared between threads.
        self._text_threads = ThreadPoolExecutor(TEXT_THREADS, thread_name_prefix="prompts") if self._tokenizer else None
        self._thread_rng = threading.local()
        self._spawn_lock = threading.Lock()

    def __enter__(self) -> PromptFactory:
        return self

    def __exit__(self, *exc) -> None:
        if self._text_threads:
            self._text_threads.shutdown(wait=False, cancel_futures=True)

    @property
    def makers(self) -> int:
        """How many prompts can be in the making at once."""
        return TEXT_THREADS if self._text_threads else 1

    @property
    def kind(self) -> str:
        return self._cfg.prompts

    def token_ids(self, n: int, rng: np.random.Generator | None = None) -> list[int]:
        return (rng or self._rng).integers(self._low, self._high, size=max(n, 1)).tolist()

    async def prompt(self, session: aiohttp.ClientSession, isl: int) -> list[int] | str:
        if self._text_threads:
            return await asyncio.get_running_loop().run_in_executor(self._text_threads, self._fitted_text, isl)
        ids = self.token_ids(isl)
        if self._cfg.prompts == "token_ids":
            return ids
        url = f"{self._cfg.base_url.rstrip('/')}/detokenize"
        async with session.post(url, json={"model": self._cfg.model, "tokens": ids}) as resp:
            resp.raise_for_status()
            return (await resp.json())["prompt"]

    def _fitted_text(self, isl: int) -> str:
        rng = getattr(self._thread_rng, "rng", None)
        if rng is None:
            with self._spawn_lock:  # spawning counts children: one thread at a time
                rng = self._thread_rng.rng = np.random.default_rng(self._seeds.spawn(1)[0])
        return fitted_text(self._tokenizer, self.token_ids(isl, rng), isl, lambda n: self.token_ids(n, rng))


class PromptSource:
    """The next (input length, output length, prompt) of a probe.

    Token ids are drawn when asked (microseconds). Text takes milliseconds to make (or a
    /detokenize round trip), so it is made ahead, up to `ahead` prompts, as `vllm bench serve`
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
        self._makers: list[asyncio.Task] = []
        if factory.kind != "token_ids":
            self._ready = asyncio.Queue(maxsize=max(ahead, 1))
            self._makers = [asyncio.create_task(self._make_ahead()) for _ in range(factory.makers)]

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
        for maker in self._makers:
            maker.cancel()


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
    encode, decode = _codec(tokenizer)
    text = decode(ids)
    overshoots = 0
    for _ in range(tries):
        again = encode(text)
        if len(again) == isl:
            break
        if len(again) < isl:
            text += decode(more_ids(isl - len(again)))
        elif isl - overshoots >= 1:
            text = decode(again[:isl - overshoots])
            overshoots += 1
        else:  # nothing left to cut (a lone byte token reads back as 3): start afresh
            text, overshoots = decode(more_ids(isl)), 0
    return text


def _codec(tokenizer) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """Encode and decode without special tokens. A fast tokenizer's Rust backend is called
    directly: transformers' own `encode` resets truncation on the shared backend every call,
    which fails ("Already borrowed") when threads encode at once. Its batch calls, with a batch
    of one: they let go of the GIL while they work, and the single ones do not (a thread
    spinning beside `encode` of 8,000 tokens got 7% of its speed; beside `encode_batch`, 78%)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return (lambda text: tokenizer.encode(text, add_special_tokens=False)), tokenizer.decode
    return (lambda text: backend.encode_batch([text], add_special_tokens=False)[0].ids), (lambda ids: backend.decode_batch([ids])[0])
