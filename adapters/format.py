"""Adapter files: read, validate and write the two on-disk forms (and in-memory uploads).

Forms (both load and save):
- a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT-like);
- one ``.safetensors`` file whose metadata key ``adapter_config`` holds the same JSON.

Both forms record every module's (in_features, out_features) in the safetensors metadata
key ``module_dims`` (``state_dict.DIMS_METADATA_KEY``): a compact JSON object
``{"<module path>": [in, out], ...}``. With u = 0 the tensors alone do not fix h and o;
files without the key (older or third-party) still load where the tensors or the base
model's shapes fix them.

PRoLoRA and plain PEFT LoRA files both load, the latter as PRoLoRA with u = r. Pickle
checkpoints (``.bin``/``.pt``/...) are never loaded: unpickling runs arbitrary code.
Key names and the per-tensor checks live in ``state_dict``; PEFT config fields in
``peft_config``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch

from .config import AdapterConfigError
from .errors import AdapterFormatError
from .peft_config import config_to_json, is_lora_config, parse_config
from .state_dict import (DIMS_METADATA_KEY, LinearShapes, adapter_from_state_dict,
                         adapter_to_state_dict, module_paths)
from .weights import CompactAdapter

__all__ = ["AdapterFormatError", "AdapterConfigError", "CONFIG_NAME", "WEIGHTS_NAME",
           "METADATA_KEY", "DIMS_METADATA_KEY", "load_adapter", "load_adapter_bytes",
           "save_adapter", "adapter_to_bytes", "write_adapter_files"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METADATA_KEY = "adapter_config"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_PICKLE_HINT = ("pickle checkpoints are refused (loading them can run arbitrary code); convert "
                "to safetensors, e.g. safetensors.torch.save_file(torch.load(path), "
                f"'{WEIGHTS_NAME}') in a trusted environment")


def load_adapter(path: str | Path, linear_shapes: LinearShapes | None = None) -> CompactAdapter:
    """Load and fully validate an adapter directory or single ``.safetensors`` file."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFormatError(f"{path}: {_PICKLE_HINT}")
    if path.is_dir():
        return _load_directory(path, linear_shapes)
    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such adapter file or directory")
    return load_adapter_bytes(None, read_file(path), linear_shapes, source=str(path))


def load_adapter_bytes(config_json: bytes | str | None, weights: bytes,
                       linear_shapes: LinearShapes | None = None,
                       source: str = "uploaded adapter") -> CompactAdapter:
    """Load an adapter from memory (HTTP uploads); never touches the disk.

    With ``config_json`` None the weights must be the single-file form (config in metadata).
    """
    tensors, metadata = _read_safetensors(weights, source)
    if config_json is None:
        raw = _config_from_metadata(metadata, source)
    else:
        raw = _parse_json(config_json, f"{source}: {CONFIG_NAME}")
    return _build(raw, tensors, metadata, linear_shapes, source)


def save_adapter(adapter: CompactAdapter, path: str | Path, single_file: bool = False) -> None:
    """Write the directory form (default) or one ``.safetensors`` file; files replace atomically."""
    write_adapter_files(path, adapter_to_state_dict(adapter), config_to_json(adapter.config),
                        adapter.linear_shapes(), single_file)


def adapter_to_bytes(adapter: CompactAdapter) -> bytes:
    """The single-file form in memory (config JSON in the safetensors metadata)."""
    return _single_file_bytes(adapter_to_state_dict(adapter), config_to_json(adapter.config),
                              adapter.linear_shapes())


def write_adapter_files(path: str | Path, tensors: dict[str, torch.Tensor],
                        config: Mapping[str, Any], module_dims: LinearShapes,
                        single_file: bool = False) -> None:
    """Write already-keyed tensors, a config dict and each module's (in, out) in either form."""
    path = Path(path)
    if single_file:
        if path.is_dir():
            raise AdapterFormatError(f"{path}: is a directory; expected a file path for single_file")
        atomic_write(path, _single_file_bytes(tensors, config, module_dims))
        return
    if path.exists() and not path.is_dir():
        raise AdapterFormatError(f"{path}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_NAME,
                 safetensors.torch.save(tensors, _tensor_metadata(module_dims)))
    atomic_write(path / CONFIG_NAME, _config_text(config).encode())


def atomic_write(path: Path, data: bytes) -> None:
    """Write beside the target and rename: a crash never leaves a half-written file."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _single_file_bytes(tensors: dict[str, torch.Tensor], config: Mapping[str, Any],
                       module_dims: LinearShapes) -> bytes:
    metadata = {**_tensor_metadata(module_dims), METADATA_KEY: _config_text(config)}
    return safetensors.torch.save(tensors, metadata=metadata)


def _tensor_metadata(module_dims: LinearShapes) -> dict[str, str]:
    dims = {path: [int(h), int(o)] for path, (h, o) in sorted(module_dims.items())}
    return {"format": "pt", DIMS_METADATA_KEY: json.dumps(dims, separators=(",", ":"))}


def _config_text(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _load_directory(path: Path, linear_shapes: LinearShapes | None) -> CompactAdapter:
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        pickles = [p.name for p in sorted(path.iterdir()) if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise AdapterFormatError(f"{path}: has {pickles[0]} but no {WEIGHTS_NAME}; {_PICKLE_HINT}")
        raise AdapterFormatError(f"{path}: missing {WEIGHTS_NAME}")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFormatError(f"{path}: missing {CONFIG_NAME}")
    tensors, metadata = _read_safetensors(read_file(weights_path), str(weights_path))
    raw = _parse_json(read_file(config_path), str(config_path))
    return _build(raw, tensors, metadata, linear_shapes, str(path))


def _build(raw: Any, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str],
           linear_shapes: LinearShapes | None, source: str) -> CompactAdapter:
    """Config + tensors (+ recorded dims) -> validated adapter; errors keep their type and
    gain the source."""
    try:
        if not isinstance(raw, Mapping):
            raise AdapterConfigError("adapter config must be a JSON object")
        if not tensors:
            raise AdapterFormatError("adapter is empty: the file holds no tensors")
        config = parse_config(raw, module_paths(list(tensors), is_lora_config(raw)))
        return adapter_from_state_dict(config, tensors, linear_shapes, _recorded_dims(metadata))
    except (AdapterFormatError, AdapterConfigError) as err:
        raise type(err)(f"{source}: {err}") from None


def _recorded_dims(metadata: Mapping[str, str]) -> dict[str, tuple[int, int]] | None:
    """The ``module_dims`` metadata, checked for form only (``state_dict`` checks the values
    against the tensors and the base model); None when the file has none."""
    if DIMS_METADATA_KEY not in metadata:
        return None
    where = f"metadata {DIMS_METADATA_KEY!r}"
    dims = _parse_json(metadata[DIMS_METADATA_KEY], where)
    if not isinstance(dims, dict) or not dims:
        raise AdapterFormatError(f"{where} must be a non-empty JSON object of module path -> "
                                 "[in_features, out_features]")
    for path, value in dims.items():
        if not (isinstance(value, list) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
            raise AdapterFormatError(f"{where}: entry {path!r} must be [in_features, "
                                     f"out_features] with integers >= 1, got {value!r}")
    return {path: (value[0], value[1]) for path, value in dims.items()}


def read_file(path: Path) -> bytearray:
    """A file's bytes, or an AdapterFormatError saying why it cannot be read. Writable and read
    in place (one buffer, no copy): tensors are made over it (``torch.frombuffer``)."""
    try:
        with open(path, "rb") as file:
            data = bytearray(os.fstat(file.fileno()).st_size)
            del data[file.readinto(data):]
            data += file.read()  # grown since the size was taken
            return data
    except OSError as err:
        raise AdapterFormatError(f"{path}: cannot read ({err.strerror or err})") from None


def _read_safetensors(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    metadata = _safetensors_metadata(data, source)
    try:
        return safetensors.torch.load(bytes(data)), metadata
    except Exception as err:  # SafetensorError has no stable import path across versions
        raise AdapterFormatError(f"{source}: corrupt or truncated safetensors data ({err})") from None


def _safetensors_metadata(data: bytes, source: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (8-byte little-endian length + JSON)."""
    if len(data) < 8:
        raise AdapterFormatError(f"{source}: not a safetensors file (only {len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise AdapterFormatError(f"{source}: corrupt or truncated safetensors data (header of "
                                 f"{header_len} bytes in a {len(data)}-byte file)")
    header = _parse_json(data[8:8 + header_len], f"{source}: safetensors header")
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _config_from_metadata(metadata: Mapping[str, str], source: str) -> Any:
    if METADATA_KEY not in metadata:
        raise AdapterFormatError(f"{source}: single-file adapter has no {METADATA_KEY!r} key in "
                                 "its safetensors metadata (or upload the config separately)")
    return _parse_json(metadata[METADATA_KEY], f"{source}: metadata {METADATA_KEY!r}")


def _parse_json(text: bytes | str, source: str) -> Any:
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFormatError(f"{source}: invalid JSON ({err})") from None
