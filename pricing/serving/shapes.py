"""Shape-only model folders: config.json + a synthetic tokenizer that vLLM serves with
`--load-format dummy` (random weights, true architecture), so capacity can be measured
without downloading weights. Also resolves a `--model` spec to a path or Hugging Face id.
"""

from __future__ import annotations

import itertools
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

BYTES_PER_DTYPE: dict[str, float] = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1, "int8": 1, "int4": 0.5}

# Bump when the written files change, so folders written by older code are rewritten.
SHAPE_FORMAT = 1
MARKER_FILE = "shape.json"

# Keeps token counts predictable: BOS (when the tokenizer has one), then each message's
# content as sent; no role headers.
CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}{{ message['content'] }}{% endfor %}"
)

# Special tokens at their true ids (the ones the configs name, and the chat markers).
LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
                   128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>"}
QWEN2_SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}
TINY_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>"}

# transformers' Qwen2 split: letters with an optional leading space, single digits, ...
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                     r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    shifted = (chr(256 + n) for n in itertools.count())
    return {b: chr(b) if b in printable else next(shifted) for b in range(256)}


BYTE_TO_UNICODE = _bytes_to_unicode()


@dataclass(frozen=True)
class ShapeSpec:
    """The config.json of one architecture (true values for real models) and its special tokens."""

    config: dict[str, Any]
    specials: dict[int, str]  # token id -> text, for bos/eos and chat markers
    hf_id: str | None = None  # the real checkpoint this shape copies

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])


def _llama_config(*, version: str, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
                  rope_factor: float, tie: bool, head_dim: int | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu", "initializer_range": 0.02,
        "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 131072, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": rope_factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": tie, "torch_dtype": "bfloat16",
        "transformers_version": version, "use_cache": True, "vocab_size": 128256,
    }
    if head_dim is not None:
        config["head_dim"] = head_dim
    return config


def _llama3(hf_id: str, **kwargs: Any) -> ShapeSpec:
    return ShapeSpec(config=_llama_config(**kwargs), specials=LLAMA3_SPECIALS, hf_id=hf_id)


QWEN25_7B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "initializer_range": 0.02,
    "hidden_size": 3584, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}

TINY_LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02,
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.0", "use_cache": True, "vocab_size": 4096,
}

SHAPES: dict[str, ShapeSpec] = {
    "tiny-llama": ShapeSpec(config=TINY_LLAMA_CONFIG, specials=TINY_SPECIALS),
    "llama-3.2-1b": _llama3("meta-llama/Llama-3.2-1B-Instruct", version="4.45.0.dev0", layers=16, hidden=2048,
                            heads=32, kv_heads=8, intermediate=8192, rope_factor=32.0, tie=True, head_dim=64),
    "llama-3.2-3b": _llama3("meta-llama/Llama-3.2-3B-Instruct", version="4.45.0.dev0", layers=28, hidden=3072,
                            heads=24, kv_heads=8, intermediate=8192, rope_factor=32.0, tie=True, head_dim=128),
    "llama-3.1-8b": _llama3("meta-llama/Llama-3.1-8B-Instruct", version="4.43.0.dev0", layers=32, hidden=4096,
                            heads=32, kv_heads=8, intermediate=14336, rope_factor=8.0, tie=False),
    "llama-3.1-70b": _llama3("meta-llama/Llama-3.1-70B-Instruct", version="4.43.0.dev0", layers=80, hidden=8192,
                             heads=64, kv_heads=8, intermediate=28672, rope_factor=8.0, tie=False),
    "qwen2.5-7b": ShapeSpec(config=QWEN25_7B_CONFIG, specials=QWEN2_SPECIALS, hf_id="Qwen/Qwen2.5-7B-Instruct"),
}


@dataclass(frozen=True)
class ResolvedModel:
    """What `vllm serve` is given for a model spec, and what we know of its size."""

    model: str  # local folder path or Hugging Face id
    load_format: Literal["dummy", "auto"]
    shape: str | None = None  # the SHAPES key when synthetic
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    weight_bytes: int | None = None  # parameter count x bytes per parameter (None when unknown)
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_local(self) -> bool:
        return Path(self.model).is_dir()


def _shape_config(spec: ShapeSpec, quantization_config: dict[str, Any] | None) -> dict[str, Any]:
    config = dict(spec.config)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    return config


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _first_id(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, list) else value


def _word_tokens(count: int) -> list[str]:
    """The first `count` of " a", " b", ..., " aa", ... in byte-level form ("Ġa"): a
    prefix-closed set, so each word is reached by one chain of merges."""
    words: list[str] = []
    for length in range(1, 8):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            if len(words) == count:
                return words
            words.append("\u0120" + "".join(letters))
    return words


def build_tokenizer(spec: ShapeSpec):  # -> tokenizers.Tokenizer
    """A byte-level BPE with exactly config.vocab_size tokens: the 256 bytes, the special
    tokens at the ids the config names, and space-led lowercase words (" ab", " xyz") that
    each encode to one token. Any text encodes (no unknown token); decoding random word ids
    and encoding the text again gives the same ids, so prompts of a known length are easy.
    Pre-tokenizer and decoder match transformers' Qwen2Tokenizer, which rebuilds the
    pipeline from vocab and merges for model_type qwen2 (a word-level vocabulary breaks there)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    alphabet = [BYTE_TO_UNICODE[b] for b in range(256)]
    words = _word_tokens(spec.vocab_size - len(spec.specials) - len(alphabet))
    free_ids = (i for i in range(spec.vocab_size) if i not in spec.specials)
    vocab = {**{token: i for token, i in zip(alphabet + words, free_ids)},
             **{text: i for i, text in spec.specials.items()}}
    merges = [(word[:-1], word[-1]) for word in words]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False)
                                  for _, text in sorted(spec.specials.items())])
    bos_id = spec.config.get("bos_token_id")
    if _has_bos(spec):
        bos = spec.specials[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return tokenizer


def _has_bos(spec: ShapeSpec) -> bool:
    """Llama tokenizers prepend BOS; Qwen2's name one in config.json but never add it."""
    return spec.config.get("model_type") == "llama" and spec.config.get("bos_token_id") is not None


def _special_tokens_map(spec: ShapeSpec) -> dict[str, str]:
    cfg = spec.config
    tokens: dict[str, str] = {}
    eos_id = _first_id(cfg.get("eos_token_id"))
    if eos_id is not None:
        tokens["eos_token"] = spec.specials[eos_id]
        tokens["pad_token"] = spec.specials[eos_id]
    if _has_bos(spec):
        tokens["bos_token"] = spec.specials[cfg["bos_token_id"]]
    return tokens


def _tokenizer_config(spec: ShapeSpec) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": spec.config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "chat_template": CHAT_TEMPLATE,
        **_special_tokens_map(spec),
    }


def write_shape(name: str, out_dir: Path, quantization_config: dict[str, Any] | None = None) -> Path:
    """Write the shape `name` into `out_dir` (config, generation config, tokenizer) and return it.
    A folder whose config.json already matches is reused untouched."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")
    spec = SHAPES[name]
    config = _shape_config(spec, quantization_config)
    out_dir = Path(out_dir)
    marker = {"shape": name, "format": SHAPE_FORMAT}
    if read_json(out_dir / "config.json") == config and read_json(out_dir / MARKER_FILE) == marker:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER_FILE).unlink(missing_ok=True)
    build_tokenizer(spec).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(spec))
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map(spec))
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
    _write_json(out_dir / "generation_config.json", gen)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / MARKER_FILE, marker)  # last: marks a complete folder
    return out_dir


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def param_count(config: dict[str, Any]) -> int:
    """Parameters of a dense Llama/Qwen2-style decoder from its config.json."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_dim = config.get("num_key_value_heads", heads) * head_dim
    q_dim = heads * head_dim
    attn = hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden
    if config.get("attention_bias") or config.get("model_type") == "qwen2":
        attn += q_dim + 2 * kv_dim
    mlp = 3 * hidden * config["intermediate_size"]
    per_layer = attn + mlp + 2 * hidden  # two RMSNorm weights
    embed = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return config["num_hidden_layers"] * per_layer + embed + hidden  # final norm


def bytes_per_param(config: dict[str, Any]) -> float:
    """Bytes per weight: from the quantization config's weight bits when present, else torch_dtype."""
    bits = _quant_weight_bits(config.get("quantization_config"))
    if bits is not None:
        return bits / 8
    return BYTES_PER_DTYPE.get(str(config.get("torch_dtype", "bfloat16")), 2)


def _quant_weight_bits(qcfg: dict[str, Any] | None) -> int | None:
    if not qcfg:
        return None
    if "bits" in qcfg:  # gptq / awq style
        return int(qcfg["bits"])
    if qcfg.get("quant_method") == "fp8":
        return 8
    for group in (qcfg.get("config_groups") or {}).values():  # compressed-tensors
        weights = group.get("weights") or {}
        if "num_bits" in weights:
            return int(weights["num_bits"])
    return None


def weight_bytes(config: dict[str, Any]) -> int | None:
    """Estimated bytes of weights (parameters x bytes per parameter); None for unknown layouts.
    Quantized estimates ignore scales and unquantized embeddings/lm_head (a lower bound)."""
    try:
        return int(param_count(config) * bytes_per_param(config))
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def resolve_model(spec: str, models_dir: Path) -> ResolvedModel:
    """A shape name -> a written folder under models_dir served with dummy weights; an existing
    local folder -> used as given; anything else -> a Hugging Face id, loaded normally."""
    if spec in SHAPES:
        path = write_shape(spec, Path(models_dir) / spec)
        return _from_config(str(path), "dummy", read_json(path / "config.json") or {}, shape=spec)
    local = Path(spec).expanduser()
    if local.is_dir():
        load_format = "auto" if _has_weights(local) else "dummy"  # shape-only folders get dummy weights
        return _from_config(str(local), load_format, read_json(local / "config.json") or {})
    if local.exists() or spec.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model path {spec} is not a folder with a config.json; "
                                f"give a shape ({', '.join(SHAPES)}), a model folder or a Hugging Face id")
    return ResolvedModel(model=spec, load_format="auto")


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.pt"))


def _from_config(model: str, load_format: Literal["dummy", "auto"], config: dict[str, Any],
                 shape: str | None = None) -> ResolvedModel:
    return ResolvedModel(
        model=model, load_format=load_format, shape=shape,
        vocab_size=config.get("vocab_size"),
        max_position_embeddings=config.get("max_position_embeddings"),
        weight_bytes=weight_bytes(config) if config else None,
        config=config,
    )
