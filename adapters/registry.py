"""The on-disk adapter store: validated uploads, atomic writes, small in-memory index.

Layout under ``root``: ``<id>.safetensors`` (single file, config in the safetensors metadata)
plus ``<id>.json`` (the index record; written last, so it is the commit marker). Uploads are
staged under ``root/.staging`` and only become visible after full validation against the base
model's linear shapes. At start-up only headers are checked (cheap for thousands of adapters);
the full check runs again whenever the weights are loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

from .config import AdapterConfigError
from .peft_config import is_lora_config, parse_config
from .state_dict import module_paths, tensor_key
from .weights import CompactAdapter

log = logging.getLogger(__name__)

ADAPTER_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
WEIGHTS_SUFFIX = ".safetensors"
RECORD_SUFFIX = ".json"
STAGING_DIR = ".staging"
CONFIG_METADATA_KEY = "adapter_config"
_COPY_CHUNK = 1 << 20


class RegistryError(Exception):
    """Base of the registry's errors; each maps to one HTTP status in the API."""


class InvalidAdapterIdError(RegistryError, ValueError):
    pass


class DuplicateAdapterError(RegistryError):
    pass


class UploadTooLargeError(RegistryError):
    pass


class InvalidAdapterError(RegistryError, ValueError):
    """The files are not a valid adapter for this base model (the message says why)."""


class AdapterNotFoundError(RegistryError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown adapter"


def validate_adapter_id(adapter_id: Any) -> str:
    """Ids are file-name safe: ``[A-Za-z0-9._-]{1,64}``, never ``.`` or ``..``."""
    if not isinstance(adapter_id, str) or not ADAPTER_ID_PATTERN.fullmatch(adapter_id) \
            or adapter_id in (".", ".."):
        raise InvalidAdapterIdError(
            f"invalid adapter id {adapter_id!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "(not '.' or '..')")
    return adapter_id


@dataclass(frozen=True)
class AdapterRecord:
    """What the registry keeps in memory per adapter (no tensors)."""

    adapter_id: str
    config: dict[str, Any]
    num_params: int
    nbytes: int  # compact weight bytes at the stored dtype
    stored_bytes: int  # size of the file on disk
    created: float  # unix time

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "AdapterRecord":
        return cls(adapter_id=str(data["adapter_id"]), config=dict(data["config"]),
                   num_params=int(data["num_params"]), nbytes=int(data["nbytes"]),
                   stored_bytes=int(data["stored_bytes"]), created=float(data["created"]))


def _format():
    # Imported on first use: the format module pulls in safetensors/torch.
    from . import format as adapter_format

    return adapter_format


def _copy_limited(source: BinaryIO, target: Path, budget: int) -> int:
    """Copy a stream to ``target`` in chunks; refuse once more than ``budget`` bytes arrive."""
    written = 0
    with open(target, "wb") as out:
        while chunk := source.read(_COPY_CHUNK):
            written += len(chunk)
            if written > budget:
                raise UploadTooLargeError(f"upload is larger than the limit of {budget} bytes")
            out.write(chunk)
    return written


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    with os.fdopen(fd, "w") as out:
        json.dump(data, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


class AdapterRegistry:
    """Thread-safe store of uploaded adapters; implements the engine's ``AdapterSource``."""

    def __init__(self, root: Path, linear_shapes: Mapping[str, tuple[int, int]],
                 max_upload_bytes: int = 1 << 30) -> None:
        if max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes must be >= 1, got {max_upload_bytes}")
        self.root = Path(root)
        self.linear_shapes = dict(linear_shapes)
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()
        self._records: dict[str, AdapterRecord] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._staging = self.root / STAGING_DIR
        shutil.rmtree(self._staging, ignore_errors=True)  # leftovers of an interrupted upload
        self._staging.mkdir()
        self._scan()

    # ---- AdapterSource ---------------------------------------------------------------
    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self._records

    def load_adapter(self, adapter_id: str) -> CompactAdapter:
        """Read and fully validate the weights (raises ``AdapterNotFoundError``)."""
        self.get(adapter_id)
        try:
            return _format().load_adapter(self._weights_path(adapter_id), self.linear_shapes)
        except FileNotFoundError:  # deleted between the lookup and the read
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist") from None

    # ---- queries -----------------------------------------------------------------------
    def get(self, adapter_id: str) -> AdapterRecord:
        record = self._records.get(adapter_id)
        if record is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist")
        return record

    def list(self) -> list[AdapterRecord]:
        with self._lock:
            records = list(self._records.values())
        return sorted(records, key=lambda r: (r.created, r.adapter_id))

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._records

    # ---- mutations ---------------------------------------------------------------------
    def register_upload(self, adapter_id: str, *, file: BinaryIO | None = None,
                        config: BinaryIO | None = None,
                        weights: BinaryIO | None = None) -> AdapterRecord:
        """Register an upload: one safetensors ``file``, or a PEFT-style ``config`` + ``weights``."""
        validate_adapter_id(adapter_id)
        self._refuse_duplicate(adapter_id)
        single = file is not None and config is None and weights is None
        pair = file is None and config is not None and weights is not None
        if not (single or pair):
            raise InvalidAdapterError("send either 'file' (one .safetensors with the config in its "
                                      "metadata) or both 'config' and 'weights'")
        with tempfile.TemporaryDirectory(dir=self._staging) as staging:
            source = self._stage_upload(Path(staging), file, config, weights)
            return self._register_path(adapter_id, source)

    def register_path(self, adapter_id: str, path: Path) -> AdapterRecord:
        """Register an adapter from a local directory or single file (copied into the store)."""
        validate_adapter_id(adapter_id)
        self._refuse_duplicate(adapter_id)
        return self._register_path(adapter_id, Path(path))

    def register_directory(self, directory: Path) -> list[str]:
        """Register every adapter found in ``directory`` (``--register``); ids already present
        are skipped, invalid entries are logged and skipped. Returns the ids registered."""
        added = []
        for adapter_id, path in _discover(Path(directory)):
            if adapter_id in self:
                continue
            try:
                self.register_path(adapter_id, path)
                added.append(adapter_id)
            except (RegistryError, OSError) as err:
                log.warning("not registering %s: %s", path, err)
        return added

    def delete(self, adapter_id: str) -> AdapterRecord:
        with self._lock:
            record = self.get(adapter_id)
            self._record_path(adapter_id).unlink(missing_ok=True)  # un-commit first
            self._weights_path(adapter_id).unlink(missing_ok=True)
            del self._records[adapter_id]
        return record

    # ---- internals ---------------------------------------------------------------------
    def _weights_path(self, adapter_id: str) -> Path:
        return self.root / (adapter_id + WEIGHTS_SUFFIX)

    def _record_path(self, adapter_id: str) -> Path:
        return self.root / (adapter_id + RECORD_SUFFIX)

    def _refuse_duplicate(self, adapter_id: str) -> None:
        if adapter_id in self._records:
            raise DuplicateAdapterError(f"adapter {adapter_id!r} already exists")

    def _stage_upload(self, staging: Path, file: BinaryIO | None, config: BinaryIO | None,
                      weights: BinaryIO | None) -> Path:
        if file is not None:
            target = staging / ("upload" + WEIGHTS_SUFFIX)
            _copy_limited(file, target, self.max_upload_bytes)
            return target
        folder = staging / "upload"
        folder.mkdir()
        used = _copy_limited(config, folder / "adapter_config.json", self.max_upload_bytes)
        _copy_limited(weights, folder / "adapter_model.safetensors", self.max_upload_bytes - used)
        return folder

    def _validate(self, path: Path) -> CompactAdapter:
        fmt = _format()
        try:
            return fmt.load_adapter(path, self.linear_shapes)
        except (fmt.AdapterFormatError, AdapterConfigError) as err:
            raise InvalidAdapterError(str(err)) from None

    def _register_path(self, adapter_id: str, source: Path) -> AdapterRecord:
        if _upload_size(source) > self.max_upload_bytes:
            raise UploadTooLargeError(f"adapter is larger than the limit of {self.max_upload_bytes} bytes")
        adapter = self._validate(source)
        staged = Path(tempfile.mkdtemp(dir=self._staging)) / ("canonical" + WEIGHTS_SUFFIX)
        try:
            _format().save_adapter(adapter, staged, single_file=True)
            return self._commit(adapter_id, adapter, staged)
        finally:
            shutil.rmtree(staged.parent, ignore_errors=True)

    def _commit(self, adapter_id: str, adapter: CompactAdapter, staged: Path) -> AdapterRecord:
        record = AdapterRecord(adapter_id, adapter.config.to_json_dict(), adapter.num_params,
                               adapter.nbytes, staged.stat().st_size, time.time())
        with self._lock:
            self._refuse_duplicate(adapter_id)  # a concurrent upload may have won the race
            os.replace(staged, self._weights_path(adapter_id))
            _write_json_atomic(self._record_path(adapter_id), record.to_json())
            self._records[adapter_id] = record
        log.info("registered adapter %s (%d params)", adapter_id, record.num_params)
        return record

    def _scan(self) -> None:
        for weights in sorted(self.root.glob("*" + WEIGHTS_SUFFIX)):
            adapter_id = weights.name[: -len(WEIGHTS_SUFFIX)]
            try:
                validate_adapter_id(adapter_id)
                self._records[adapter_id] = self._restore(adapter_id, weights)
            except Exception as err:  # noqa: BLE001 - one bad file must not stop the server
                log.warning("skipping stored adapter %s: %s", weights.name, err)
        log.info("adapter registry %s: %d adapters", self.root, len(self._records))

    def _restore(self, adapter_id: str, weights: Path) -> AdapterRecord:
        record_path = self._record_path(adapter_id)
        if not record_path.exists():  # dropped in by hand: validate fully once, then index it
            adapter = self._validate(weights)
            record = AdapterRecord(adapter_id, adapter.config.to_json_dict(), adapter.num_params,
                                   adapter.nbytes, weights.stat().st_size, weights.stat().st_mtime)
            _write_json_atomic(record_path, record.to_json())
            return record
        record = AdapterRecord.from_json(json.loads(record_path.read_text()))
        self._check_header(weights, record)
        return record

    def _check_header(self, weights: Path, record: AdapterRecord) -> None:
        """Cheap consistency check without reading tensor data: file size, header, config,
        and every tensor's shape against this base model's linear shapes."""
        if weights.stat().st_size != record.stored_bytes:
            raise InvalidAdapterError(f"size {weights.stat().st_size} differs from the recorded "
                                      f"{record.stored_bytes} bytes (truncated or replaced?)")
        metadata, shapes = _read_header(weights)
        raw = json.loads(metadata[CONFIG_METADATA_KEY])
        lora = is_lora_config(raw)
        paths = module_paths(list(shapes), lora)
        config = parse_config(raw, paths)
        for path in paths:
            if path not in self.linear_shapes:
                raise InvalidAdapterError(f"{path} is not a linear layer of this base model")
            spec = config.layer_spec(path, *self.linear_shapes[path])
            for name, shape in spec.tensor_shapes().items():
                key = tensor_key(path, name, lora)
                if 0 not in shape and shapes.get(key) != shape:
                    raise InvalidAdapterError(f"tensor {key} has shape {shapes.get(key)}, "
                                              f"expected {shape} for this base model")


def _read_header(weights: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        return handle.metadata() or {}, shapes


def _upload_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _discover(directory: Path) -> Iterator[tuple[str, Path]]:
    """(id, path) for each adapter dir (with adapter_config.json) or .safetensors file."""
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and (entry / "adapter_config.json").is_file():
            yield entry.name, entry
        elif entry.is_file() and entry.name.endswith(WEIGHTS_SUFFIX):
            yield entry.name[: -len(WEIGHTS_SUFFIX)], entry
