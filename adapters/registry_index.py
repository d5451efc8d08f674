"""The registry's on-disk index: one sqlite3 file beside the adapter files.

The adapter files stay the truth (``<id>.safetensors`` + ``<id>.json``, see ``registry.py``);
the index is a cache of their records so that opening a registry of 10,000 adapters needs a
directory listing and a ``stat`` per file instead of reading every header, and so that lookups
and listings are queries instead of a dict of every record in memory.

Schema (``SCHEMA_VERSION`` 1)::

    meta(key TEXT PRIMARY KEY, value TEXT)   -- schema_version, linear_shapes (fingerprint)
    adapters(adapter_id TEXT PRIMARY KEY,    -- WITHOUT ROWID: the id is the b-tree key
             config TEXT, num_params INTEGER, nbytes INTEGER, stored_bytes INTEGER,
             created REAL,
             weights_size, weights_mtime_ns, weights_ino,   -- stat of <id>.safetensors
             record_size, record_mtime_ns, record_ino)      -- stat of <id>.json

A row is trusted while both files' (size, mtime_ns, inode) equal the stored ones; anything else
is re-read from the files (``AdapterRegistry._reconcile``). A ``meta`` mismatch (other schema or
base-model shapes) drops the table: everything is re-read. WAL journal: readers never wait on a
writer, and a process killed mid-transaction leaves the last committed state (sqlite rolls the
rest back on the next open). Losing the whole file costs one rebuild, nothing else.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

SCHEMA_VERSION = "1"
StatKey = tuple[int, int, int]  # (st_size, st_mtime_ns, st_ino)
_IDLE_READERS = 8  # reader connections kept open between queries (more are closed after use)
_CACHE_KIB = 1024  # sqlite page cache per connection

_COLUMNS = ("adapter_id", "config", "num_params", "nbytes", "stored_bytes", "created")
_STAT_COLUMNS = ("weights_size", "weights_mtime_ns", "weights_ino",
                 "record_size", "record_mtime_ns", "record_ino")
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_ADAPTERS = f"""
CREATE TABLE adapters (
    adapter_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    num_params INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    {", ".join(f"{name} INTEGER NOT NULL" for name in _STAT_COLUMNS)}
) WITHOUT ROWID
"""
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM adapters"


def stat_key(result: os.stat_result) -> StatKey:
    return (result.st_size, result.st_mtime_ns, result.st_ino)


@dataclass(frozen=True)
class AdapterRecord:
    """What the registry knows of one adapter without its tensors (an index row, or the
    ``<id>.json`` file it was read from)."""

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


def _row(values: tuple[Any, ...]) -> AdapterRecord:
    adapter_id, config, num_params, nbytes, stored_bytes, created = values
    return AdapterRecord(adapter_id, json.loads(config), num_params, nbytes, stored_bytes, created)


class RegistryIndex:
    """The sqlite3 index. Writes come from one thread at a time (the registry's lock); reads
    from any thread, each on a pooled connection of its own."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self._idle: list[sqlite3.Connection] = []
        self._writer = self._connect()
        try:
            self.created = self._prepare()
            self._count = self._count_rows()
        except BaseException:
            self._writer.close()
            raise

    # ---- connections -------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        return conn

    def _prepare(self) -> bool:
        """Create or check the schema; True when the table starts empty (new or reset)."""
        conn = self._writer
        # WAL where the file system allows it (readers never wait on the writer); sqlite's
        # rollback journal, as atomic, elsewhere.
        conn.execute("PRAGMA journal_mode=WAL")
        # Durable against a killed process (the OS keeps the journal); after a power cut the
        # last transactions may be gone, which only costs re-reading those files from disk.
        conn.execute("PRAGMA synchronous=NORMAL")
        with self._transaction(conn):
            conn.execute(_META)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            expected = {"schema_version": SCHEMA_VERSION, "linear_shapes": self.fingerprint}
            if all(meta.get(key) == value for key, value in expected.items()):
                return False
            conn.execute("DROP TABLE IF EXISTS adapters")  # another schema: start empty
            conn.execute(_ADAPTERS)
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             expected.items())
            return True

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._idle.pop()  # list.pop/append are atomic: no lock on the read path
        except IndexError:
            conn = self._connect()
        try:
            yield conn
        finally:
            if len(self._idle) < _IDLE_READERS:
                self._idle.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        self._writer.close()

    # ---- reads -------------------------------------------------------------------------
    def contains(self, adapter_id: str) -> bool:
        with self._reader() as conn:
            return conn.execute("SELECT 1 FROM adapters WHERE adapter_id = ?",
                                (adapter_id,)).fetchone() is not None

    def get(self, adapter_id: str) -> AdapterRecord | None:
        with self._reader() as conn:
            values = conn.execute(_SELECT + " WHERE adapter_id = ?", (adapter_id,)).fetchone()
        return _row(values) if values is not None else None

    def count(self) -> int:
        """Rows, as of this index's last write (``count(*)`` scans the table: 1 ms at 10,000
        rows, so it runs once per write instead of once per call)."""
        return self._count

    def _count_rows(self) -> int:
        return int(self._writer.execute("SELECT count(*) FROM adapters").fetchone()[0])

    def page(self, limit: int | None, after: str | None) -> list[AdapterRecord]:
        """Rows in id order (byte order), those after ``after`` (which need not exist)."""
        query, args = _SELECT, []
        if after is not None:
            query += " WHERE adapter_id > ?"
            args.append(after)
        query += " ORDER BY adapter_id"
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        with self._reader() as conn:
            return [_row(values) for values in conn.execute(query, args).fetchall()]

    def stat_keys(self) -> dict[str, tuple[StatKey, StatKey]]:
        """Every row's stored (weights, record) stat keys: what start-up compares with disk."""
        with self._reader() as conn:
            rows = conn.execute(f"SELECT adapter_id, {', '.join(_STAT_COLUMNS)} FROM adapters")
            return {row[0]: (tuple(row[1:4]), tuple(row[4:7])) for row in rows}

    # ---- writes (the registry's lock is held) ------------------------------------------
    def apply(self, upserts: Iterable[tuple[AdapterRecord, StatKey, StatKey]],
              removals: Iterable[str] = ()) -> None:
        """One transaction: insert or replace rows, delete ids."""
        conn = self._writer
        columns = _COLUMNS + _STAT_COLUMNS
        insert = (f"INSERT OR REPLACE INTO adapters ({', '.join(columns)}) "
                  f"VALUES ({', '.join('?' * len(columns))})")
        with self._transaction(conn):
            conn.executemany(insert, (
                (row.adapter_id, json.dumps(row.config), row.num_params, row.nbytes,
                 row.stored_bytes, row.created, *weights, *record)
                for row, weights, record in upserts))
            conn.executemany("DELETE FROM adapters WHERE adapter_id = ?",
                             ((adapter_id,) for adapter_id in removals))
            count = self._count_rows()
        self._count = count

    def remove(self, adapter_id: str) -> None:
        self.apply((), (adapter_id,))


def index_files(path: Path) -> list[Path]:
    """The database and its WAL/shared-memory companions."""
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
