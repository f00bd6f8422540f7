"""Prompts: random token ids, or text fitted with a local tokenizer to read back at the target length."""

import numpy as np
import pytest

from pricing.load.client import ClientConfig
from pricing.serving.shapes import resolve_model
from pricing.workload.prompts import PromptFactory, fitted_text, load_tokenizer

pytest.importorskip("transformers", reason="text prompts with a local tokenizer need transformers (installed with vLLM)")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return resolve_model("tiny-llama", tmp_path_factory.mktemp("models")).model


def test_fitted_text_reads_back_at_the_target_length_where_plain_decoding_does_not(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    rng = np.random.default_rng(0)
    more = lambda n: rng.integers(1, 3800, n).tolist()  # noqa: E731
    ids = more(1807)
    assert len(tok.encode(tok.decode(ids), add_special_tokens=False)) > 1850  # decoding alone drifts (+7%)
    misses = []
    for isl in (1, 2, 5, 64, 300, 1807):
        for _ in range(40):  # cuts that read back longer each time, and lone byte tokens, show within 40 draws
            misses.append(len(tok.encode(fitted_text(tok, more(isl), isl, more), add_special_tokens=False)) - isl)
    assert all(abs(m) <= 1 for m in misses) and misses.count(0) >= 0.98 * len(misses)


async def test_text_prompts_with_a_local_tokenizer_ask_the_server_nothing(tiny_tokenizer):
    # An unreachable server: a /detokenize call would fail, so the text must come from here.
    cfg = ClientConfig(base_url="http://127.0.0.1:9", model="m", prompt_format="text", tokenizer=tiny_tokenizer, vocab_size=4096)
    text = await PromptFactory(cfg).prompt(None, 300)  # type: ignore[arg-type]
    assert isinstance(text, str) and abs(len(load_tokenizer(tiny_tokenizer).encode(text, add_special_tokens=False)) - 300) <= 1
    ids = await PromptFactory(cfg.model_copy(update={"prompt_format": "token_ids"})).prompt(None, 300)  # type: ignore[arg-type]
    assert isinstance(ids, list) and len(ids) == 300


async def test_making_text_prompts_leaves_the_event_loop_free(tiny_tokenizer):
    # Each 8,000-token prompt takes ~20 ms of decoding and encoding. On the loop, that would hold
    # every other stream's sends that long; in the factory's own thread the loop keeps ticking.
    import asyncio
    import time

    cfg = ClientConfig(base_url="http://127.0.0.1:9", model="m", prompt_format="text", tokenizer=tiny_tokenizer, vocab_size=4096)
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker():
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.0005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    with PromptFactory(cfg) as prompts:
        started = time.perf_counter()
        for _ in range(8):
            await prompts.prompt(None, 8000)  # type: ignore[arg-type]
        per_prompt_s = (time.perf_counter() - started) / 8
    done.set()
    await tick
    assert per_prompt_s > 0.008  # the work is big enough that a blocked loop would show
    assert float(np.percentile(gaps, 90)) < per_prompt_s / 2


async def test_text_prompts_are_made_ahead_so_workers_never_wait_for_them(tiny_tokenizer, mock_server, monkeypatch):
    # Each prompt takes 15 ms to make and a request 50 ms to serve. Made on demand, 2 workers
    # would send every 65 ms at best (31 req/s); made ahead, every 50 ms (40 req/s).
    import itertools
    import time

    from pricing.load.client import ProbePlan
    from pricing.measure.probe import run_probe
    from pricing.schema import LoadSpec
    from pricing.testing.mock_server import LatencyModel, MockConfig
    from pricing.workload import prompts as prompts_module

    def slow_fitted_text(tokenizer, ids, isl, more_ids):
        time.sleep(0.015)
        return "word " * isl

    monkeypatch.setattr(prompts_module, "fitted_text", slow_fitted_text)
    mock = mock_server(MockConfig(latency=LatencyModel(ttft_base_s=0.010, tpot_base_s=0.005)))
    cfg = ClientConfig(base_url=mock.url, model="mock-model", prompt_format="text", tokenizer=tiny_tokenizer, vocab_size=4096)
    result = await run_probe(cfg, LoadSpec(mode="closed", concurrency=2), itertools.repeat((16, 9)),
                             ProbePlan(min_window_s=2.0, min_requests=20))
    assert result.stats.failed == 0
    e2e = result.stats.e2e_s.p50
    assert 0.045 < e2e < 0.060
    assert result.stats.request_rate_rps > 0.9 * 2 / e2e  # on demand it would be 2 / (e2e + 0.015): 0.77x
    assert result.warnings == []

    # 8 workers want 160 prompts/s; makers of 60 ms each (at most 4 threads) give 67 or fewer.
    def slower_fitted_text(tokenizer, ids, isl, more_ids):
        time.sleep(0.060)
        return "word " * isl

    monkeypatch.setattr(prompts_module, "fitted_text", slower_fitted_text)
    starved = await run_probe(cfg, LoadSpec(mode="closed", concurrency=8), itertools.repeat((16, 9)),
                              ProbePlan(min_window_s=2.0, min_requests=20))
    assert len(starved.warnings) == 1 and "waited" in starved.warnings[0] and "token ids" in starved.warnings[0]
