"""Shape-only model folders: true configs, a tokenizer that loads offline, idempotent writes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pricing.serving.shapes import (
    SHAPES,
    param_count,
    resolve_model,
    weight_bytes,
    write_shape,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shape("llama-3.1-8b", tmp_path_factory.mktemp("shapes") / "llama-3.1-8b")


def test_llama_3_1_8b_config_has_the_true_values(llama8b: Path) -> None:
    config = json.loads((llama8b / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (32, 4096, 14336)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (32, 8)
    assert config["vocab_size"] == 128256
    assert config["max_position_embeddings"] == 131072
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    assert config["torch_dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is False
    assert config["bos_token_id"] == 128000 and config["eos_token_id"] == [128001, 128008, 128009]


@pytest.mark.parametrize("name", ["tiny-llama", "llama-3.1-8b", "qwen2.5-7b"])  # one per tokenizer family
def test_tokenizer_loads_offline_and_matches_the_vocab(name: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = write_shape(name, tmp_path / name)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    spec = SHAPES[name]
    assert len(tokenizer) == spec.vocab_size
    assert tokenizer.eos_token_id == _first(spec.config["eos_token_id"])
    words = [i for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(spec.vocab_size))))
             if tok.startswith("\u0120") and len(tok) > 1]
    ids = random.Random(0).choices(words, k=64)
    assert tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids  # round trip
    assert tokenizer("Hello, world! 123 ünïcode")["input_ids"]  # any text encodes


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_shape_writes_a_tokenizer_of_config_vocab_size(name: str, tmp_path: Path) -> None:
    folder = write_shape(name, tmp_path / name)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    ids = set(tokenizer["model"]["vocab"].values()) | {t["id"] for t in tokenizer["added_tokens"]}
    assert ids == set(range(SHAPES[name].vocab_size))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "{{" in tokenizer_config["chat_template"]


def test_chat_template_renders_bos_then_the_contents(llama8b: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama8b), local_files_only=True)
    text = tokenizer.apply_chat_template([{"role": "user", "content": " ab cd"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|begin_of_text|> ab cd"
    words = tokenizer(" ab cd", add_special_tokens=False)["input_ids"]
    assert len(words) == 2
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == [128000, *words]


def test_write_shape_is_idempotent(tmp_path: Path) -> None:
    folder = write_shape("tiny-llama", tmp_path / "tiny")
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert write_shape("tiny-llama", tmp_path / "tiny") == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_write_shape_rewrites_a_folder_whose_config_differs(tmp_path: Path) -> None:
    folder = write_shape("tiny-llama", tmp_path / "m")
    write_shape("llama-3.2-1b", folder)
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 2048
    assert len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) == 128256


def test_quantization_config_is_stored_verbatim(tmp_path: Path) -> None:
    qcfg = {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int"}}},
            "ignore": ["lm_head"]}
    folder = write_shape("llama-3.1-8b", tmp_path / "w4a16", quantization_config=qcfg)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == qcfg
    assert weight_bytes(config) == param_count(config) // 2
    assert "quantization_config" not in json.loads(
        (write_shape("llama-3.1-8b", tmp_path / "w4a16") / "config.json").read_text())


def test_weight_bytes_of_8b_in_bf16_is_about_16_gb() -> None:
    assert weight_bytes(SHAPES["llama-3.1-8b"].config) == pytest.approx(16.06e9, rel=0.05)


@pytest.mark.parametrize(("name", "params"), [("llama-3.2-1b", 1.24e9), ("llama-3.2-3b", 3.21e9),
                                              ("llama-3.1-70b", 70.6e9), ("qwen2.5-7b", 7.62e9)])
def test_param_counts_match_the_published_sizes(name: str, params: float) -> None:
    assert param_count(SHAPES[name].config) == pytest.approx(params, rel=0.02)


def test_resolve_shape_name_writes_a_dummy_folder(tmp_path: Path) -> None:
    resolved = resolve_model("tiny-llama", tmp_path)
    assert resolved.load_format == "dummy" and resolved.shape == "tiny-llama"
    assert Path(resolved.model) == tmp_path / "tiny-llama"
    assert (resolved.vocab_size, resolved.max_position_embeddings) == (4096, 4096)
    assert resolved.weight_bytes and resolved.weight_bytes > 0


def test_resolve_local_folder_is_used_as_given(tmp_path: Path) -> None:
    folder = write_shape("llama-3.2-1b", tmp_path / "elsewhere")
    shape_only = resolve_model(str(folder), tmp_path / "models")
    assert (shape_only.model, shape_only.load_format, shape_only.vocab_size) == (str(folder), "dummy", 128256)
    (folder / "model.safetensors").write_bytes(b"")
    assert resolve_model(str(folder), tmp_path / "models").load_format == "auto"


def test_resolve_hf_id_is_used_as_given(tmp_path: Path) -> None:
    resolved = resolve_model("meta-llama/Llama-3.1-8B-Instruct", tmp_path)
    assert resolved.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert (resolved.load_format, resolved.vocab_size, resolved.weight_bytes) == ("auto", None, None)
    assert not any(tmp_path.iterdir())


def test_resolve_missing_path_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        resolve_model(str(tmp_path / "nope"), tmp_path)


def test_unknown_shape_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="tiny-llama"):
        write_shape("llama-9", tmp_path)


def _first(value: int | list[int]) -> int:
    return value[0] if isinstance(value, list) else value
