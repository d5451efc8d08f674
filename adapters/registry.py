"""The on-disk adapter store: validated uploads, atomic writes, an sqlite3 index beside them.

Layout under ``root``: ``<id>.safetensors`` (single file, config in the safetensors metadata)
plus ``<id>.json`` (the record; written last, so it is the commit marker). Uploads are staged
under ``root/.staging`` and only become visible after full validation against the base model's
linear shapes. The files are the truth; ``root/.index-<shapes>.sqlite3`` (``registry_index.py``)
caches their records so that start-up, lookups and listings cost queries, not memory or header
reads:

- **Consistent** means: every ``<id>.safetensors`` + ``<id>.json`` pair has a row whose stored
  (size, mtime_ns, inode) of both files equal what ``stat`` says now, and every row has its
  pair. Opening lists the directory and stats the files (no file is opened); pairs without a
  matching row are read again (record JSON + safetensors header against this base model's
  shapes, as before), rows without files are dropped. A missing or unreadable index, or one
  written for other shapes or another schema, is rebuilt from the files.
- **Crash safety**: an upload or delete first drops a marker ``root/.pending/<id>``, then
  moves the files, then updates the index, then removes the marker. Opening finds leftover
  markers: with no ``<id>.json`` (never committed, or deleted) the weights are removed; with
  it, the adapter stands. So after ``kill -9`` only committed adapters are visible, whatever the
  index holds.
- A ``.safetensors`` file dropped in by hand (no record, no marker) is validated fully once and
  gets its record.

One process writes a store at a time (opening clears ``.staging`` and settles markers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

from .config import AdapterConfigError
from .peft_config import is_lora_config, parse_config
from .registry_index import AdapterRecord, RegistryIndex, StatKey, index_files, stat_key
from .state_dict import module_paths, tensor_key
from .weights import CompactAdapter

log = logging.getLogger(__name__)

ADAPTER_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
WEIGHTS_SUFFIX = ".safetensors"
RECORD_SUFFIX = ".json"
STAGING_DIR = ".staging"
PENDING_DIR = ".pending"
INDEX_PREFIX, INDEX_SUFFIX = ".index-", ".sqlite3"
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
class RecordPage:
    """One page of ``AdapterRegistry.page``: records in id order, and whether more follow."""

    records: list[AdapterRecord]
    has_more: bool


@dataclass(frozen=True)
class OpenReport:
    """What opening the registry did (logged; benchmarks and tests read it)."""

    adapters: int  # listed after opening
    index_created: bool  # the index was missing, unreadable or for other shapes: rebuilt
    reread: int  # pairs whose files were read again (no row, or stat differs)
    dropped: int  # rows whose files are gone or no longer valid
    rolled_back: int  # interrupted uploads/deletes settled from .pending markers
    seconds: float


def shapes_fingerprint(linear_shapes: Mapping[str, tuple[int, int]]) -> str:
    canonical = json.dumps(sorted((path, [int(d) for d in dims]) for path, dims in linear_shapes.items()))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _format():
    # Imported on first use: the format module pulls in safetensors/torch.
    from . import format as adapter_format

    return adapter_format


class _WeightsReader:
    """What both registry kinds read weights files with: ``known_headers.KnownHeaders``, made on
    the first read (it imports torch, like ``_format``)."""

    def __init__(self, linear_shapes: Mapping[str, tuple[int, int]]) -> None:
        self.linear_shapes = dict(linear_shapes)
        self._known: Any = None

    def read(self, adapter_id: str, weights: Path) -> CompactAdapter:
        if self._known is None:
            from .known_headers import KnownHeaders

            self._known = KnownHeaders(self.linear_shapes)
        try:
            return self._known.load(weights)
        except FileNotFoundError:  # deleted between the lookup and the read
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist") from None


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterRegistry:
    """Thread-safe store of uploaded adapters; implements the engine's ``AdapterSource``.

    Records live in the index, not in memory: ``has_adapter``/``in``/``get``/``len`` and
    ``page``/``list(limit, after)`` are queries, so memory does not grow with the store."""

    def __init__(self, root: Path, linear_shapes: Mapping[str, tuple[int, int]],
                 max_upload_bytes: int = 1 << 30) -> None:
        if max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes must be >= 1, got {max_upload_bytes}")
        started = time.perf_counter()
        self.root = Path(root)
        self.linear_shapes = dict(linear_shapes)
        self.max_upload_bytes = max_upload_bytes
        self._weights = _WeightsReader(self.linear_shapes)
        self._lock = threading.Lock()  # one mutation at a time (uploads, deletes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._staging = self.root / STAGING_DIR
        shutil.rmtree(self._staging, ignore_errors=True)  # leftovers of an interrupted upload
        self._staging.mkdir()
        self._pending = self.root / PENDING_DIR
        self._pending.mkdir(exist_ok=True)
        fingerprint = shapes_fingerprint(self.linear_shapes)
        self.index_path = self.root / f"{INDEX_PREFIX}{fingerprint[:16]}{INDEX_SUFFIX}"
        self._index = self._open_index(fingerprint)
        try:
            counts = self._reconcile()
        except sqlite3.DatabaseError as err:  # damaged past what opening it showed
            self._index.close()
            self._index = self._open_index(fingerprint, damaged=err)
            counts = self._reconcile()
        self.open_report = OpenReport(len(self), self._index.created, *counts,
                                      seconds=time.perf_counter() - started)
        log.info("adapter registry %s: %d adapters (index %s, %d re-read, %d dropped, "
                 "%d interrupted changes settled) in %.2f s", self.root, self.open_report.adapters,
                 "rebuilt" if self._index.created else "present", counts[0], counts[1],
                 counts[2], self.open_report.seconds)

    def close(self) -> None:
        """Close the index's connections (the registry is unusable afterwards)."""
        self._index.close()

    # ---- AdapterSource ---------------------------------------------------------------
    def has_adapter(self, adapter_id: str) -> bool:
        return isinstance(adapter_id, str) and self._index.contains(adapter_id)

    def load_adapter(self, adapter_id: str) -> CompactAdapter:
        """Read and validate the weights (raises ``AdapterNotFoundError``); a file whose header
        was validated before has only its values checked (``known_headers.py``)."""
        self.get(adapter_id)
        return self._weights.read(adapter_id, self._weights_path(adapter_id))

    # ---- queries -----------------------------------------------------------------------
    def get(self, adapter_id: str) -> AdapterRecord:
        record = self._index.get(adapter_id) if isinstance(adapter_id, str) else None
        if record is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist")
        return record

    def page(self, limit: int, after: str | None = None) -> RecordPage:
        """Up to ``limit`` records in id order, starting after ``after``.

        ``after`` is a position, as in OpenAI's cursor lists: it must be a valid id but need not
        be registered (for instance one deleted while a client pages), so paging never fails,
        skips or repeats because of concurrent deletes. Past the last id the page is empty."""
        limit = _check_limit(limit)
        if after is not None:
            _check_after(after)
        records = self._index.page(limit + 1, after)
        return RecordPage(records[:limit], len(records) > limit)

    def list(self, limit: int | None = None, after: str | None = None) -> list[AdapterRecord]:
        """Records in id order; every one without ``limit`` (small stores and tests only:
        routes page with ``page``)."""
        if limit is None:
            if after is not None:
                _check_after(after)
            return self._index.page(None, after)
        return self.page(limit, after).records

    def iter_records(self, batch: int = 1000) -> Iterator[AdapterRecord]:
        """Every record in id order, ``batch`` rows per query (memory bounded by the batch)."""
        after = None
        while True:
            page = self.page(batch, after)
            yield from page.records
            if not page.has_more:
                return
            after = page.records[-1].adapter_id

    def __len__(self) -> int:
        return self._index.count()

    def __contains__(self, adapter_id: object) -> bool:
        return isinstance(adapter_id, str) and self._index.contains(adapter_id)

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
            self._mark_pending(adapter_id)
            self._record_path(adapter_id).unlink(missing_ok=True)  # un-commit first
            self._weights_path(adapter_id).unlink(missing_ok=True)
            self._index.remove(adapter_id)
            self._unmark_pending(adapter_id)
        return record

    # ---- internals ---------------------------------------------------------------------
    def _weights_path(self, adapter_id: str) -> Path:
        return self.root / (adapter_id + WEIGHTS_SUFFIX)

    def _record_path(self, adapter_id: str) -> Path:
        return self.root / (adapter_id + RECORD_SUFFIX)

    def _refuse_duplicate(self, adapter_id: str) -> None:
        if self._index.contains(adapter_id):
            raise DuplicateAdapterError(f"adapter {adapter_id!r} already exists")

    def _mark_pending(self, adapter_id: str) -> None:
        """Durably note that ``adapter_id``'s files are about to change (see the module doc)."""
        fd = os.open(self._pending / adapter_id, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self._pending)

    def _unmark_pending(self, adapter_id: str) -> None:
        (self._pending / adapter_id).unlink(missing_ok=True)

    def _open_index(self, fingerprint: str, damaged: Exception | None = None) -> RegistryIndex:
        if damaged is None:
            try:
                return RegistryIndex(self.index_path, fingerprint)
            except sqlite3.DatabaseError as err:
                damaged = err
        log.warning("adapter index %s is unreadable (%s): rebuilding it from the files",
                    self.index_path, damaged)
        for path in index_files(self.index_path):
            path.unlink(missing_ok=True)
        return RegistryIndex(self.index_path, fingerprint)

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
        weights, record_path = self._weights_path(adapter_id), self._record_path(adapter_id)
        with self._lock:
            self._refuse_duplicate(adapter_id)  # a concurrent upload may have won the race
            self._mark_pending(adapter_id)
            try:
                os.replace(staged, weights)
                _write_json_atomic(record_path, record.to_json())  # the commit point
                self._index.apply([(record, stat_key(weights.stat()), stat_key(record_path.stat()))])
            except BaseException:  # the caller gets an error: nothing of this upload stays
                record_path.unlink(missing_ok=True)
                weights.unlink(missing_ok=True)
                raise
            finally:
                self._unmark_pending(adapter_id)
        log.info("registered adapter %s (%d params)", adapter_id, record.num_params)
        return record

    def _reconcile(self) -> tuple[int, int, int]:
        """Bring the index in line with the files (see the module doc); returns
        (re-read, dropped, rolled back). Runs in ``__init__``, before any other use."""
        names = set(os.listdir(self.root))
        rolled_back = self._settle_pending(names)
        rows = self._index.stat_keys()
        upserts: list[tuple[AdapterRecord, StatKey, StatKey]] = []
        dropped: list[str] = []
        checked: dict[Any, str | None] = {}  # header checks by (config, shapes): one per kind
        prefix = os.path.join(os.fspath(self.root), "")  # str paths: 10,000 Paths cost 0.1 s
        for name in sorted(names):
            if not name.endswith(WEIGHTS_SUFFIX):
                continue
            adapter_id = name[: -len(WEIGHTS_SUFFIX)]
            row = rows.pop(adapter_id, None)
            record_name = adapter_id + RECORD_SUFFIX
            has_record = record_name in names
            try:
                validate_adapter_id(adapter_id)
                weights = stat_key(os.stat(prefix + name))
                stored = stat_key(os.stat(prefix + record_name)) if has_record else None
                if row is not None and row == (weights, stored):
                    continue  # consistent: nothing is read
                record = self._restore(adapter_id, self.root / name, has_record, checked)
                upserts.append((record, weights, stat_key(os.stat(prefix + record_name))))
            except Exception as err:  # noqa: BLE001 - one bad file must not stop the server
                log.warning("skipping stored adapter %s: %s", name, err)
                if row is not None:
                    dropped.append(adapter_id)
        dropped.extend(rows)  # rows whose weights are gone
        if upserts or dropped:
            self._index.apply(upserts, dropped)
        return len(upserts), len(dropped), rolled_back

    def _settle_pending(self, names: set[str]) -> int:
        """Finish what a killed process left between its marker and its index update."""
        settled = 0
        for adapter_id in os.listdir(self._pending):
            if ADAPTER_ID_PATTERN.fullmatch(adapter_id) and adapter_id not in (".", "..") \
                    and adapter_id + RECORD_SUFFIX not in names:  # never committed, or un-committed
                self._weights_path(adapter_id).unlink(missing_ok=True)
                names.discard(adapter_id + WEIGHTS_SUFFIX)
                log.warning("adapter %s: removed the files of an interrupted upload or delete",
                            adapter_id)
            settled += 1
            self._unmark_pending(adapter_id)
        return settled

    def _restore(self, adapter_id: str, weights: Path, has_record: bool,
                 checked: dict[Any, str | None]) -> AdapterRecord:
        record_path = self._record_path(adapter_id)
        if not has_record:  # dropped in by hand: validate fully once, then index it
            adapter = self._validate(weights)
            record = AdapterRecord(adapter_id, adapter.config.to_json_dict(), adapter.num_params,
                                   adapter.nbytes, weights.stat().st_size, weights.stat().st_mtime)
            _write_json_atomic(record_path, record.to_json())
            return record
        record = AdapterRecord.from_json(json.loads(record_path.read_text()))
        if record.adapter_id != adapter_id:  # a pair renamed by hand: the file name is the id
            record = dataclasses.replace(record, adapter_id=adapter_id)
        self._check_header(weights, record, checked)
        return record

    def _check_header(self, weights: Path, record: AdapterRecord,
                      checked: dict[Any, str | None] | None = None) -> None:
        """Cheap consistency check without reading tensor data: file size, header, config,
        and every tensor's shape against this base model's linear shapes. ``checked`` memoizes
        the config/shape part by (config, tensor shapes): stores hold many adapters of a kind."""
        if weights.stat().st_size != record.stored_bytes:
            raise InvalidAdapterError(f"size {weights.stat().st_size} differs from the recorded "
                                      f"{record.stored_bytes} bytes (truncated or replaced?)")
        metadata, shapes = _read_header(weights)
        key = (metadata.get(CONFIG_METADATA_KEY), tuple(sorted(shapes.items())))
        if checked is not None and key in checked:
            problem = checked[key]
        else:
            problem = self._shape_problem(metadata, shapes)
            if checked is not None:
                checked[key] = problem
        if problem is not None:
            raise InvalidAdapterError(problem)

    def _shape_problem(self, metadata: Mapping[str, str],
                       shapes: Mapping[str, tuple[int, ...]]) -> str | None:
        try:
            raw = json.loads(metadata[CONFIG_METADATA_KEY])
            lora = is_lora_config(raw)
            paths = module_paths(list(shapes), lora)
            config = parse_config(raw, paths)
        except Exception as err:  # noqa: BLE001 - reported as the file's problem
            return f"{type(err).__name__}: {err}"
        for path in paths:
            if path not in self.linear_shapes:
                return f"{path} is not a linear layer of this base model"
            spec = config.layer_spec(path, *self.linear_shapes[path])
            for name, shape in spec.tensor_shapes().items():
                key = tensor_key(path, name, lora)
                if 0 not in shape and shapes.get(key) != shape:
                    return (f"tensor {key} has shape {shapes.get(key)}, "
                            f"expected {shape} for this base model")
        return None


def _check_after(after: Any) -> None:
    try:
        validate_adapter_id(after)
    except InvalidAdapterIdError as err:
        err.param = "after"  # the API's 400 names the query parameter
        raise


def _check_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    return limit


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


class RegistryReader:
    """A read-only view of a store that another process writes (the scale-out replicas read the
    directory the ingress's ``AdapterRegistry`` writes): it never clears ``.staging``, settles
    markers or touches the index, so it cannot disturb an upload in flight.

    Lookups go to the files, not to an index opened once: ``<id>.json`` is the commit point of an
    upload (written last) and the first file a delete removes, so ``has_adapter`` is one ``stat``
    and sees every adapter committed after the reader was opened, and none deleted before the
    call. ``load_adapter`` reads and validates the weights as the registry does; ``version`` is
    the record's (size, mtime_ns, inode), which changes when an id is deleted and uploaded again.
    """

    def __init__(self, root: Path, linear_shapes: Mapping[str, tuple[int, int]]) -> None:
        self.root = Path(root)
        self.linear_shapes = dict(linear_shapes)
        self._weights = _WeightsReader(self.linear_shapes)

    def _path(self, adapter_id: str, suffix: str) -> Path | None:
        if not isinstance(adapter_id, str) or not ADAPTER_ID_PATTERN.fullmatch(adapter_id) \
                or adapter_id in (".", ".."):
            return None
        return self.root / (adapter_id + suffix)

    def version(self, adapter_id: str) -> StatKey | None:
        """The committed record's stat key, None when the id is not registered now."""
        path = self._path(adapter_id, RECORD_SUFFIX)
        try:
            return stat_key(path.stat()) if path is not None else None
        except FileNotFoundError:
            return None

    def has_adapter(self, adapter_id: str) -> bool:
        return self.version(adapter_id) is not None

    def __contains__(self, adapter_id: object) -> bool:
        return isinstance(adapter_id, str) and self.has_adapter(adapter_id)

    def load_adapter(self, adapter_id: str) -> CompactAdapter:
        """Read and validate the weights, as ``AdapterRegistry.load_adapter`` does."""
        weights = self._path(adapter_id, WEIGHTS_SUFFIX)
        if weights is None or not self.has_adapter(adapter_id):
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist")
        return self._weights.read(adapter_id, weights)

    def records(self) -> Iterator[AdapterRecord]:
        """The committed records, read from their files (unreadable ones are skipped)."""
        for name in sorted(os.listdir(self.root)):
            if name.endswith(RECORD_SUFFIX) and self._path(name[: -len(RECORD_SUFFIX)], "") is not None:
                try:
                    yield AdapterRecord.from_json(json.loads((self.root / name).read_text()))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
