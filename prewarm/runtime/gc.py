"""Garbage collection of the node's store: remove what no image and no snapshot uses.

A layer is kept while an image record lists it or the snapshotter shim serves a snapshot
from it (a running container's lowerdir must never vanish).  Partial layers are kept
while a writer holds their lock or they changed in the last hour (a job is filling them).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from prewarm.runtime.images import list_records
from prewarm.store.layout import Layout
from prewarm.store.content import ContentStore

#: A partial layer untouched for this long, and unlocked, belongs to no running job.
PARTIAL_GRACE_SECONDS = 3600


def snapshot_sources(layout: Layout) -> set[str]:
    """Layer digests the shim serves snapshots from (read from its metadata)."""
    db = layout.snapshots() / "metadata.db"
    if not db.exists():
        return set()
    from prewarm.runtime.snapshot.metastore import MetaStore

    meta = MetaStore(db)
    try:
        with meta.transaction() as txn:
            sources = txn.sources()
    finally:
        meta.close()
    out = set()
    for source in sources:
        path = Path(source)  # <root>/layers/<algo>/<hex>/fs
        out.add(f"{path.parent.parent.name}:{path.parent.name}")
    return out


def layers_in_use(layout: Layout) -> set[str]:
    used = {d for record in list_records(layout) for d in record.layer_digests}
    return used | snapshot_sources(layout)


def _busy(layout: Layout, digest: str) -> bool:
    """A writer holds the layer's lock, or it changed recently."""
    lock = layout.layer_lock(digest)
    try:
        if time.time() - layout.layer(digest).stat().st_mtime < PARTIAL_GRACE_SECONDS:
            return True
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def collect(layout: Layout, *, dry_run: bool = False) -> list[str]:
    """Remove unused layers (and their chain records); returns the digests removed."""
    store = ContentStore(layout.root)
    used = layers_in_use(layout)
    removed = []
    for digest in sorted(store.list_layers()):
        if digest in used:
            continue
        if not store.is_ready(digest) and _busy(layout, digest):
            continue
        removed.append(digest)
        if not dry_run:
            store.remove_layer(digest)
    if not dry_run and layout.chains_dir().is_dir():
        import json

        for chain in layout.chains_dir().rglob("*.json"):
            try:
                if json.loads(chain.read_text()).get("layer_digest") in removed:
                    chain.unlink()
            except (OSError, ValueError):
                continue
    return removed
