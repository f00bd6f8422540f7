"""Prompts: random token ids, or text fitted with a local tokenizer to read back at the target length."""

import numpy as np
import pytest

from pricing.client import ClientConfig
from pricing.prompts import PromptFactory, fitted_text, load_tokenizer
from pricing.shapes import resolve_model

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
    for isl in (1, 64, 1807):
        assert abs(len(tok.encode(fitted_text(tok, more(isl), isl, more), add_special_tokens=False)) - isl) <= 1


async def test_text_prompts_with_a_local_tokenizer_ask_the_server_nothing(tiny_tokenizer):
    # An unreachable server: a /detokenize call would fail, so the text must come from here.
    cfg = ClientConfig(base_url="http://127.0.0.1:9", model="m", prompt_format="text", tokenizer=tiny_tokenizer, vocab_size=4096)
    text = await PromptFactory(cfg).prompt(None, 300)  # type: ignore[arg-type]
    assert isinstance(text, str) and abs(len(load_tokenizer(tiny_tokenizer).encode(text, add_special_tokens=False)) - 300) <= 1
    ids = await PromptFactory(cfg.model_copy(update={"prompt_format": "token_ids"})).prompt(None, 300)  # type: ignore[arg-type]
    assert isinstance(ids, list) and len(ids) == 300
