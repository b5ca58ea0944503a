"""Snapshot metadata in sqlite, changed only inside :meth:`MetaStore.transaction`.

containerd keeps its snapshot metadata in bolt (``snapshots/storage/metastore.go``); we
keep the same facts in one sqlite file under ``Layout(root).snapshots()``, so the shim
can be killed at any moment and restart with every snapshot intact.  Each snapshot has
an integer id that never gets reused (``AUTOINCREMENT``); its directory is
``snapshots/<id>``.  Commit keeps the id and renames the key, exactly as containerd
does, so a committed snapshot's files never move.

The one transaction helper serialises writers with a lock and ``BEGIN IMMEDIATE``, and
rolls back on any exception: callers do their filesystem work inside it and undo that
work in their own ``except`` (temp dir + rename, deferred cleanup).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from prewarm.errors import (
    FailedPrecondition,
    InvalidSnapshotRequest,
    SnapshotExists,
    SnapshotNotFound,
)
from prewarm.runtime.snapshot.snapshotter import MAX_LABEL_SIZE, Info, Kind

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace   TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    kind        INTEGER NOT NULL,
    parent_id   INTEGER REFERENCES snapshots(id),
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0,
    source      TEXT,
    UNIQUE (namespace, key)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots (parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key         TEXT    NOT NULL,
    value       TEXT    NOT NULL,
    PRIMARY KEY (snapshot_id, key)
);
"""


@dataclasses.dataclass(frozen=True)
class Record:
    """One snapshot row with its labels and its parent's key.

    ``source`` is set for snapshots answered from the content store: the store's layer
    directory that ``snapshots/<id>/fs`` points at.
    """

    id: int
    namespace: str
    key: str
    kind: Kind
    parent_id: int | None
    parent: str
    created_ns: int
    updated_ns: int
    size: int
    inodes: int
    source: str | None
    labels: Mapping[str, str]

    def info(self) -> Info:
        return Info(name=self.key, kind=self.kind, parent=self.parent, labels=dict(self.labels),
                    created_ns=self.created_ns, updated_ns=self.updated_ns)


def validate_labels(labels: Mapping[str, str]) -> None:
    """containerd's label rule: key and value together at most :data:`MAX_LABEL_SIZE` bytes.

    Raises:
        InvalidSnapshotRequest: naming the label that is too long.
    """
    for key, value in labels.items():
        if not key:
            raise InvalidSnapshotRequest("snapshot label with an empty key; give every label a name")
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_SIZE:
            raise InvalidSnapshotRequest(
                f"snapshot label {key[:64]!r} is longer than {MAX_LABEL_SIZE} bytes (key + value); shorten it"
            )


class Transaction:
    """The queries of one transaction; obtained from :meth:`MetaStore.transaction` only."""

    _SELECT = """
        SELECT s.id, s.namespace, s.key, s.kind, s.parent_id, COALESCE(p.key, ''), s.created_ns,
               s.updated_ns, s.size, s.inodes, s.source
        FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def _record(self, row: tuple) -> Record:  # type: ignore[type-arg]
        labels = dict(self._conn.execute(
            "SELECT key, value FROM labels WHERE snapshot_id = ?", (row[0],)).fetchall())
        return Record(id=row[0], namespace=row[1], key=row[2], kind=Kind(row[3]), parent_id=row[4],
                      parent=row[5], created_ns=row[6], updated_ns=row[7], size=row[8],
                      inodes=row[9], source=row[10], labels=labels)

    def find(self, namespace: str, key: str) -> Record | None:
        row = self._conn.execute(self._SELECT + " WHERE s.namespace = ? AND s.key = ?",
                                 (namespace, key)).fetchone()
        return self._record(row) if row else None

    def get(self, namespace: str, key: str) -> Record:
        """The snapshot ``key``.

        Raises:
            SnapshotNotFound: naming the key and namespace.
        """
        record = self.find(namespace, key)
        if record is None:
            raise SnapshotNotFound(f"snapshot {key!r} does not exist in namespace {namespace!r}")
        return record

    def by_id(self, snapshot_id: int) -> Record:
        row = self._conn.execute(self._SELECT + " WHERE s.id = ?", (snapshot_id,)).fetchone()
        if row is None:
            raise SnapshotNotFound(f"snapshot id {snapshot_id} is missing from the metadata")
        return self._record(row)

    def ancestors(self, record: Record) -> list[Record]:
        """The parents of ``record``, nearest first (the overlay lowerdir order)."""
        out: list[Record] = []
        parent_id = record.parent_id
        while parent_id is not None:
            parent = self.by_id(parent_id)
            out.append(parent)
            parent_id = parent.parent_id
        return out

    def all(self, namespace: str) -> list[Record]:
        rows = self._conn.execute(self._SELECT + " WHERE s.namespace = ? ORDER BY s.id", (namespace,))
        return [self._record(row) for row in rows.fetchall()]

    def sources(self) -> set[str]:
        """Store layer directories that snapshots of any namespace are served from."""
        return {row[0] for row in self._conn.execute("SELECT DISTINCT source FROM snapshots WHERE source IS NOT NULL")}

    def ids(self) -> set[int]:
        return {row[0] for row in self._conn.execute("SELECT id FROM snapshots").fetchall()}

    def create(self, namespace: str, key: str, kind: Kind, parent: str, labels: Mapping[str, str],
               now_ns: int, *, source: str | None = None, size: int = 0, inodes: int = 0) -> Record:
        """Record a new snapshot.

        Raises:
            SnapshotExists: ``key`` is taken in ``namespace``.
            SnapshotNotFound: ``parent`` does not exist.
            InvalidSnapshotRequest: ``parent`` is not committed, or a label is too long.
        """
        validate_labels(labels)
        if self.find(namespace, key) is not None:
            raise SnapshotExists(f"snapshot {key!r} already exists in namespace {namespace!r}")
        parent_id: int | None = None
        if parent:
            parent_record = self.find(namespace, parent)
            if parent_record is None:
                raise SnapshotNotFound(f"parent snapshot {parent!r} does not exist in namespace {namespace!r}")
            if parent_record.kind != Kind.COMMITTED:
                raise InvalidSnapshotRequest(
                    f"parent {parent!r} is a {parent_record.kind.label} snapshot; only committed "
                    "snapshots can be parents: commit it first"
                )
            parent_id = parent_record.id
        cur = self._conn.execute(
            "INSERT INTO snapshots (namespace, key, kind, parent_id, created_ns, updated_ns, size, inodes,"
            " source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (namespace, key, int(kind), parent_id, now_ns, now_ns, size, inodes, source))
        snapshot_id = int(cur.lastrowid)  # type: ignore[arg-type]
        self._set_labels(snapshot_id, labels)
        return self.by_id(snapshot_id)

    def commit_active(self, namespace: str, key: str, name: str, labels: Mapping[str, str],
                      size: int, inodes: int, now_ns: int) -> Record:
        """Turn the active ``key`` into committed ``name``, keeping its id (and directory).

        Raises:
            SnapshotNotFound: ``key`` does not exist.
            SnapshotExists: ``name`` is taken.
            FailedPrecondition: ``key`` is not active.
        """
        validate_labels(labels)
        record = self.get(namespace, key)
        if record.kind != Kind.ACTIVE:
            raise FailedPrecondition(
                f"snapshot {key!r} is {record.kind.label}, not active: only active snapshots can be committed"
            )
        if self.find(namespace, name) is not None:
            raise SnapshotExists(f"snapshot {name!r} already exists in namespace {namespace!r}")
        self._conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_ns = ?, updated_ns = ?, size = ?, inodes = ?"
            " WHERE id = ?", (name, int(Kind.COMMITTED), now_ns, now_ns, size, inodes, record.id))
        self._conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (record.id,))
        self._set_labels(record.id, labels)
        return self.by_id(record.id)

    def set_labels(self, record: Record, labels: Mapping[str, str], now_ns: int) -> Record:
        validate_labels(labels)
        self._conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (record.id,))
        self._set_labels(record.id, labels)
        self._conn.execute("UPDATE snapshots SET updated_ns = ? WHERE id = ?", (now_ns, record.id))
        return self.by_id(record.id)

    def set_usage(self, snapshot_id: int, size: int, inodes: int) -> None:
        self._conn.execute("UPDATE snapshots SET size = ?, inodes = ? WHERE id = ?", (size, inodes, snapshot_id))

    def _set_labels(self, snapshot_id: int, labels: Mapping[str, str]) -> None:
        self._conn.executemany("INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
                               [(snapshot_id, k, v) for k, v in labels.items()])

    def delete(self, namespace: str, key: str) -> Record:
        """Forget the snapshot ``key``; returns what it was.

        Raises:
            SnapshotNotFound: ``key`` does not exist.
            FailedPrecondition: another snapshot has it as parent.
        """
        record = self.get(namespace, key)
        child = self._conn.execute("SELECT key FROM snapshots WHERE parent_id = ? LIMIT 1",
                                   (record.id,)).fetchone()
        if child is not None:
            raise FailedPrecondition(
                f"snapshot {key!r} is the parent of {child[0]!r}; remove its children first"
            )
        self._conn.execute("DELETE FROM snapshots WHERE id = ?", (record.id,))
        return record


class MetaStore:
    """The sqlite database of one snapshotter root."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.executescript(_SCHEMA)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One serialised read-write transaction, committed on success, rolled back on error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
