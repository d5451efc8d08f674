"""Load a LLaMA-architecture base model into our LlamaModel, quantized, with its tokenizer.

Sources: ``None`` (the embedded default, converted once), a local Hugging Face directory
(config.json + *.safetensors, sharded or not) or a GGUF file (or a directory holding one).
Safetensors are read straight into the model built on the meta device: no transformers model
is instantiated and no random init is spent. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoTokenizer, GenerationConfig, LlamaConfig,
                          PreTrainedTokenizerBase, PreTrainedTokenizerFast)

from .default_model import DEFAULT_MODEL_NAME, cache_root, default_model_hf_dir
from .model import LlamaModel
from .quantize import (compute_dtype_for, load_dtype_for, model_nbytes, quantize_linear,
                       quantize_model)

SUPPORTED_MODEL_TYPES = ("llama",)
# Keys some checkpoints carry that the model recomputes instead of loading.
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: LlamaModel
    tokenizer: PreTrainedTokenizerBase
    hf_config: LlamaConfig
    name: str
    nbytes: int  # resident bytes: parameters, buffers, quantization state
    eos_token_ids: list[int]
    dtype: str = "nf4"  # the quantization option it was loaded with
    load_seconds: float = 0.0


@dataclass
class _Checkpoint:
    config: LlamaConfig
    state: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerBase
    generation: GenerationConfig | None
    name: str
    files: list[Path]  # the weight files, fingerprinted for the quantized-weights cache


def load_base_model(model: str | None = None, dtype: str = "nf4", device: str = "cpu",
                    cache_dir: Path | None = None) -> LoadedModel:
    """Load, quantize (``nf4``, ``int8``, ``bf16``, ``fp16`` or ``fp32``) and place the base
    model; it computes in ``quantize.compute_dtype_for(dtype, device)``."""
    started = time.perf_counter()
    target = _check_device(device)
    compute_dtype_for(dtype, target)  # validates dtype early, before any heavy work
    checkpoint = _read_checkpoint(model, cache_dir)
    llama = build_model(checkpoint.config, checkpoint.state, load_dtype_for(dtype))
    checkpoint.state = {}  # the model holds the weights now; let the rest go
    cache_file = quantized_cache_file(cache_root(cache_dir), checkpoint.name, checkpoint.files, dtype,
                                      target.type)
    quantize_model(llama, dtype, target, list(llama.linear_shapes()), cache_file)
    return LoadedModel(model=llama, tokenizer=checkpoint.tokenizer, hf_config=checkpoint.config,
                       name=checkpoint.name, nbytes=model_nbytes(llama),
                       eos_token_ids=eos_token_ids(checkpoint.config, checkpoint.generation,
                                                   checkpoint.tokenizer),
                       dtype=dtype, load_seconds=time.perf_counter() - started)


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``vocab_size`` tokens ``t0 t1 ...`` (``t0`` is also the end of
    sequence), for models with random weights: ids decode to text, nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    word_level = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="t0", unk_token="t0")


@torch.no_grad()  # not inference mode: the tensors stay usable everywhere
def random_base_model(config: LlamaConfig, dtype: str = "bf16", device: str = "cpu",
                      tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0,
                      name: str = "random", std: float = 0.02) -> LoadedModel:
    """A model of ``config``'s shapes with random weights (N(0, std), norms 1), built on the
    device one tensor at a time and each projection quantized as soon as it is drawn: a
    LLaMA2-7B-shaped nf4 model never holds more than one bf16 projection besides its nf4 ones,
    and nothing is read from disk or downloaded (benchmarks of shapes we hold no weights for)."""
    started = time.perf_counter()
    target = _check_device(device)
    compute = compute_dtype_for(dtype, target)
    with torch.device("meta"):
        model = LlamaModel(config)
    gen = torch.Generator(device=target).manual_seed(seed)
    linear_paths = list(model.linear_shapes())
    for module_name, module in list(model.named_modules()):
        for param_name, param in list(module.named_parameters(recurse=False)):
            if param_name == "weight" and module_name.endswith("norm"):
                value = torch.ones(param.shape, dtype=compute, device=target)
            else:
                value = torch.randn(param.shape, generator=gen, dtype=torch.float32, device=target)
                value = value.mul_(std).to(compute)
            setattr(module, param_name, torch.nn.Parameter(value, requires_grad=False))
        if module_name in linear_paths:
            quantize_linear(model, module_name, dtype, target)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    quantize_model(model, dtype, target, [], None)  # the rest: placement, eval, packing, warm-up
    tokenizer = tokenizer or synthetic_tokenizer(config.vocab_size)
    return LoadedModel(model=model, tokenizer=tokenizer, hf_config=config, name=name,
                       nbytes=model_nbytes(model), eos_token_ids=[], dtype=dtype,
                       load_seconds=time.perf_counter() - started)


def _check_device(device: str | torch.device) -> torch.device:
    try:
        target = torch.device(device)
    except RuntimeError:
        target = None
    if target is None or target.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    return target


def _read_checkpoint(model: str | None, cache_dir: Path | None) -> _Checkpoint:
    if model is None:
        return _read_hf_dir(default_model_hf_dir(cache_dir), DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _read_hf_dir(path, path.name)
    gguf = _find_gguf(path)
    if gguf is not None:
        return _read_gguf(gguf)
    raise FileNotFoundError(f"model {model!r} is neither a local Hugging Face directory "
                            "(config.json + *.safetensors) nor a GGUF file; nothing is downloaded")


def _find_gguf(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(found) > 1:
        raise ValueError(f"{path} holds several GGUF files; name one: {[f.name for f in found]}")
    return found[0] if found else None


def _read_hf_dir(directory: Path, name: str) -> _Checkpoint:
    config = _llama_config(AutoConfig.from_pretrained(directory), directory)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{directory} holds pre-quantized weights; give float weights "
                         "(quantization happens at load time)")
    generation = None
    if (directory / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(directory)
    files = _safetensors_files(directory)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file), device="cpu"))
    return _Checkpoint(config, state, AutoTokenizer.from_pretrained(directory), generation, name,
                       files)


def _read_gguf(gguf: Path) -> _Checkpoint:
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    dtype=torch.float32)
    config = _llama_config(hf_model.config, gguf)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized to float by transformers
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return _Checkpoint(config, hf_model.state_dict(), tokenizer, hf_model.generation_config,
                       gguf.stem, [gguf])


def _llama_config(config: object, source: Path) -> LlamaConfig:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported "
                         f"(supported: {SUPPORTED_MODEL_TYPES})")
    return config


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = sorted(p.name for p in directory.glob("*.safetensors"))
    if not names:
        raise FileNotFoundError(f"{directory} has no *.safetensors weights")
    return [directory / name for name in names]


def quantized_cache_file(root: Path, name: str, files: list[Path], dtype: str,
                         device_type: str = "cpu") -> Path | None:
    """Where the quantized weights of these exact files are cached (None for float dtypes).
    CUDA caches are separate files: a CPU cache may hold weights repacked for the CPU kernel."""
    if dtype not in ("nf4", "int8"):
        return None
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    device = "" if device_type == "cpu" else f"-{device_type}"
    return root / "quantized" / f"{safe_name}-{dtype}{device}-{digest.hexdigest()[:16]}.safetensors"


def build_model(config: LlamaConfig, state: dict[str, torch.Tensor],
                dtype: torch.dtype = torch.float32) -> LlamaModel:
    """A LlamaModel holding ``state`` (HF names), built without random initialisation."""
    with torch.device("meta"):
        model = LlamaModel(config)
    tied = bool(config.tie_word_embeddings)
    weights = {k: v.to(dtype) for k, v in state.items()
               if not k.endswith(IGNORED_KEY_SUFFIXES) and not (tied and k == "lm_head.weight")}
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(weights, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def eos_token_ids(config: LlamaConfig, generation: GenerationConfig | None,
                  tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-sequence ids from the generation config, the model config and the tokenizer."""
    found: list[int] = []
    for value in (getattr(generation, "eos_token_id", None), getattr(config, "eos_token_id", None),
                  tokenizer.eos_token_id):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and token not in found:
                found.append(token)
    return found
