"""Overlay snapshots on disk, after containerd's overlay snapshotter; see :mod:`.snapshotter`.

::

    <root>/snapshots/metadata.db        sqlite (:mod:`.metastore`)
    <root>/snapshots/snapshots/<id>/fs  the snapshot's files (upperdir when active)
    <root>/snapshots/snapshots/<id>/work  overlay workdir (active snapshots)
    <root>/snapshots/snapshots/new-*    being created (renamed to <id> in the transaction)
    <root>/snapshots/snapshots/rm-<id>  being removed (deleted after the transaction)

A snapshot answered from the content store keeps the same shape, but its ``fs`` is a
symlink to the store's layer directory, so the overlay lowerdir *is* the store's copy
(no bytes copied) and mount options stay as short as containerd's own, which matters at
128 layers where containerd has to compact the ``lowerdir=`` list below a page.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from prewarm.errors import FailedPrecondition, InvalidSnapshotRequest, SnapshotExists
from prewarm.runtime.snapshot.filters import matches_any, parse_filters
from prewarm.runtime.snapshot.metastore import MetaStore, Record, Transaction
from prewarm.runtime.snapshot.prewarmed import PrewarmedLayer, lookup_chain, served_as
from prewarm.runtime.snapshot.snapshotter import (
    LABEL_CRI_LAYER_DIGEST,
    LABEL_PREWARMED_LAYER,
    LABEL_SNAPSHOT_REF,
    Info,
    Kind,
    Mount,
    Usage,
)
from prewarm.store.content import ContentStore
from prewarm.store.layout import Layout, secure_root

log = logging.getLogger(__name__)

#: Usage of a snapshot answered from the store before anyone asked for it.  Walking a
#: multi-gigabyte layer's files inside the unpacker's Prepare would add seconds to every
#: pull of a pre-warmed image, the very latency pre-warming removes.
UNMEASURED = -1


def disk_usage(path: Path) -> Usage:
    """Bytes in allocated blocks and distinct inodes under ``path`` (containerd's ``fs.DiskUsage``).

    ``path`` itself may be a symlink (a pre-warmed snapshot's ``fs``); nothing below it
    is followed.
    """
    seen: set[tuple[int, int]] = set()
    size = 0
    top = os.path.realpath(path)
    if not os.path.isdir(top):
        return Usage()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in (*dirnames, *filenames))):
            try:
                st = os.lstat(name)
            except FileNotFoundError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            size += st.st_blocks * 512
    return Usage(size=size, inodes=len(seen))


class OverlaySnapshotter:
    """The :class:`~prewarm.runtime.snapshot.snapshotter.Snapshotter` of one ``PREWARM_ROOT``."""

    def __init__(self, root: Path | str, *, clock: Callable[[], int] = time.time_ns) -> None:
        self.layout = Layout(root)
        secure_root(self.layout.root)  # the shim may be the first to open the store
        self.home = self.layout.snapshots()
        self.dirs = self.home / "snapshots"
        self.dirs.mkdir(parents=True, exist_ok=True)
        self.meta = MetaStore(self.home / "metadata.db")
        self._clock = clock

    # === paths and mounts

    def _dir(self, snapshot_id: int) -> Path:
        return self.dirs / str(snapshot_id)

    def _fs(self, snapshot_id: int) -> str:
        return str(self._dir(snapshot_id) / "fs")

    def _mounts(self, record: Record, ancestors: Sequence[Record]) -> list[Mount]:
        if not ancestors:
            mode = "ro" if record.kind == Kind.VIEW else "rw"
            return [Mount("bind", self._fs(record.id), (mode, "rbind"))]
        if record.kind == Kind.VIEW and len(ancestors) == 1:
            return [Mount("bind", self._fs(ancestors[0].id), ("ro", "rbind"))]
        options = ["index=off"]
        if record.kind == Kind.ACTIVE:
            options += [f"workdir={self._dir(record.id) / 'work'}", f"upperdir={self._fs(record.id)}"]
        options.append("lowerdir=" + ":".join(self._fs(a.id) for a in ancestors))
        return [Mount("overlay", "overlay", tuple(options))]

    # === creating snapshots

    def prepare(self, namespace: str, key: str, parent: str = "",
                labels: Mapping[str, str] | None = None) -> list[Mount]:
        labels = dict(labels or {})
        ref = labels.get(LABEL_SNAPSHOT_REF, "")
        if ref:
            layer = lookup_chain(self.layout, ref)
            wanted = labels.get(LABEL_CRI_LAYER_DIGEST)
            if layer is not None and wanted and wanted != layer.layer_digest:
                layer = served_as(self.layout, layer, wanted)
                if layer is None:
                    log.info("prepare %s: containerd asks for layer %s, which is not pre-warmed as %s; "
                             "preparing normally", key, wanted, ref)
            if layer is not None:
                self._provide(namespace, key, parent, layer, labels)
        return self._create(namespace, key, parent, labels, Kind.ACTIVE)

    def view(self, namespace: str, key: str, parent: str = "",
             labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(namespace, key, parent, dict(labels or {}), Kind.VIEW)

    def _create(self, namespace: str, key: str, parent: str, labels: Mapping[str, str],
                kind: Kind) -> list[Mount]:
        placed: Path | None = None
        with self.meta.transaction() as txn:
            tmp = Path(tempfile.mkdtemp(prefix="new-", dir=self.dirs))
            try:
                (tmp / "fs").mkdir(mode=0o755)
                os.chmod(tmp / "fs", 0o755)
                if kind == Kind.ACTIVE:
                    (tmp / "work").mkdir(mode=0o711)
                record = txn.create(namespace, key, kind, parent, labels, self._clock())
                ancestors = txn.ancestors(record)
                if ancestors:
                    # As containerd does: the new upper belongs to whoever owns the parent's root.
                    st = os.stat(self._fs(ancestors[0].id))
                    os.chown(tmp / "fs", st.st_uid, st.st_gid)
                placed = self._dir(record.id)
                os.rename(tmp, placed)
            except BaseException:
                shutil.rmtree(placed or tmp, ignore_errors=True)
                raise
        return self._mounts(record, ancestors)

    def _provide(self, namespace: str, key: str, parent: str, layer: PrewarmedLayer,
                 labels: Mapping[str, str]) -> None:
        """The remote-snapshot handshake: commit the store's layer as ``layer.chain_id``.

        Returns normally (and the caller prepares as usual) when the layer hangs under a
        different parent than the one asked for.

        Raises:
            SnapshotExists: always when the layer was provided, or was already there.
        """
        with ContentStore(self.layout.root).layer_lock(layer.layer_digest):
            # Under the lock gc takes to remove a layer: still ready, it stays so until committed.
            if not self.layout.layer_ready(layer.layer_digest).is_file():
                log.info("prepare %s: layer %s was removed meanwhile; preparing normally", key, layer.layer_digest)
                return
            self._provide_locked(namespace, key, parent, layer, labels)

    def _provide_locked(self, namespace: str, key: str, parent: str, layer: PrewarmedLayer,
                        labels: Mapping[str, str]) -> None:
        placed: Path | None = None
        with self.meta.transaction() as txn:
            if not self._parent_matches(txn, namespace, parent, layer):
                log.info("prepare %s: pre-warmed %s has parent %s, not %r; preparing normally",
                         key, layer.chain_id, layer.parent_name or "(none)", parent)
                return
            if txn.find(namespace, layer.chain_id) is not None:
                raise SnapshotExists(f"snapshot {layer.chain_id} already exists in namespace {namespace!r}")
            tmp = Path(tempfile.mkdtemp(prefix="new-", dir=self.dirs))
            try:
                os.symlink(layer.fs, tmp / "fs")
                kept = {**labels, LABEL_PREWARMED_LAYER: layer.layer_digest}
                record = txn.create(namespace, layer.chain_id, Kind.COMMITTED, parent, kept, self._clock(),
                                    source=str(layer.fs), size=UNMEASURED, inodes=UNMEASURED)
                placed = self._dir(record.id)
                os.rename(tmp, placed)
            except BaseException:
                shutil.rmtree(placed or tmp, ignore_errors=True)
                raise
        log.info("prepare %s: layer %s is pre-warmed; committed %s in namespace %s, answering ALREADY_EXISTS",
                 key, layer.layer_digest, layer.chain_id, namespace)
        raise SnapshotExists(
            f"snapshot {layer.chain_id} provided from the pre-warmed layer {layer.layer_digest}"
        )

    @staticmethod
    def _parent_matches(txn: Transaction, namespace: str, parent: str, layer: PrewarmedLayer) -> bool:
        """Whether ``parent`` (containerd's name for it) is the layer's parent chain.

        containerd names snapshots it unpacked itself after its own metadata keys, but the
        unpacker commits them with the chain ID in :data:`LABEL_SNAPSHOT_REF`, so either
        the name or that label identifies the chain.
        """
        if not parent:
            return layer.parent is None
        if layer.parent is None:
            return False
        record = txn.find(namespace, parent)
        if record is None or record.kind != Kind.COMMITTED:
            return False
        return layer.parent in (record.key, record.labels.get(LABEL_SNAPSHOT_REF))

    def commit(self, namespace: str, name: str, key: str,
               labels: Mapping[str, str] | None = None) -> None:
        with self.meta.transaction() as txn:
            record = txn.get(namespace, key)
            if record.kind != Kind.ACTIVE:
                raise FailedPrecondition(
                    f"snapshot {key!r} is {record.kind.label}, not active: only active snapshots can be committed"
                )
            usage = disk_usage(Path(self._fs(record.id)))
            txn.commit_active(namespace, key, name, dict(labels or {}), usage.size, usage.inodes,
                              self._clock())

    # === reading and changing metadata

    def stat(self, namespace: str, key: str) -> Info:
        with self.meta.transaction() as txn:
            return txn.get(namespace, key).info()

    def update(self, namespace: str, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        with self.meta.transaction() as txn:
            record = txn.get(namespace, info.name)
            if not fieldpaths:
                labels = dict(info.labels)
            else:
                labels = dict(record.labels)
                for path in fieldpaths:
                    if path.startswith("labels."):
                        name = path[len("labels."):]
                        labels[name] = info.labels.get(name, "")
                    elif path == "labels":
                        labels = dict(info.labels)
                    else:
                        raise InvalidSnapshotRequest(
                            f"cannot update field {path!r} of snapshot {info.name!r}: only labels and "
                            "labels.<key> can change"
                        )
            labels = {k: v for k, v in labels.items() if v != ""}
            return txn.set_labels(record, labels, self._clock()).info()

    def usage(self, namespace: str, key: str) -> Usage:
        with self.meta.transaction() as txn:
            record = txn.get(namespace, key)
        if record.kind == Kind.ACTIVE:
            return disk_usage(Path(self._fs(record.id)))
        if record.size == UNMEASURED:
            # A snapshot answered from the store: measured on first demand, then remembered.
            usage = disk_usage(Path(self._fs(record.id)))
            with self.meta.transaction() as txn:
                txn.set_usage(record.id, usage.size, usage.inodes)
            return usage
        return Usage(size=record.size, inodes=record.inodes)

    def mounts(self, namespace: str, key: str) -> list[Mount]:
        with self.meta.transaction() as txn:
            record = txn.get(namespace, key)
            if record.kind == Kind.COMMITTED:
                raise FailedPrecondition(
                    f"snapshot {key!r} is committed and has no mounts; View or Prepare a child of it"
                )
            ancestors = txn.ancestors(record)
        return self._mounts(record, ancestors)

    def walk(self, namespace: str, filters: Sequence[str] = ()) -> Iterator[Info]:
        parsed = parse_filters(filters)
        with self.meta.transaction() as txn:
            infos = [record.info() for record in txn.all(namespace)]
        return iter([info for info in infos if matches_any(parsed, info)])

    # === removing

    def remove(self, namespace: str, key: str) -> None:
        doomed: Path | None = None
        current: Path | None = None
        try:
            with self.meta.transaction() as txn:
                record = txn.delete(namespace, key)
                current = self._dir(record.id)
                if current.exists():
                    doomed = self.dirs / f"rm-{record.id}"
                    os.rename(current, doomed)
        except BaseException:
            if doomed is not None and current is not None and doomed.exists():
                os.rename(doomed, current)  # the metadata still has it: put its files back
            raise
        if doomed is not None:
            # A pre-warmed snapshot's fs is a symlink: rmtree unlinks it, the store's layer stays.
            shutil.rmtree(doomed, ignore_errors=True)

    def cleanup(self) -> None:
        with self.meta.transaction() as txn:
            known = txn.ids()
            orphans = [entry for entry in self.dirs.iterdir()
                       if not (entry.name.isdigit() and int(entry.name) in known)]
            for entry in orphans:
                log.info("cleanup: removing %s, which no snapshot owns", entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def close(self) -> None:
        self.meta.close()
