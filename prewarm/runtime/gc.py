"""Garbage collection of the node's store: remove what no image and no snapshot uses.

A layer is kept while an image record lists it, the snapshotter shim serves a snapshot
from it (a running container's lowerdir must never vanish), or a running job pins it.
Partial layers are kept while a writer holds their lock or they changed in the last hour
(a job is filling them).

Races, and why they cannot tear anything:

* A job's layers are ready one by one and recorded in an image record only at its end.
  Its worker pins them (:func:`pin`, ``pins/<job>.json``, refreshed while tasks run)
  before it lands or trusts any of them, and unpins only once the image record exists;
  a pin nobody refreshed for :data:`PIN_TTL` belongs to a dead job and stops counting.
* gc decides about each layer again under the layer's lock, right before it removes it,
  so a pin, record or snapshot made after gc listed what is used still saves the layer;
  the shim takes the same lock while it hands a layer to containerd.
* What is left, a job that saw its layer ready just before gc took it: the image record
  is checked against the store after it is written (prewarm.runtime.images), so the job
  reports the missing layer instead of a success the store does not back.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from pathlib import Path

from prewarm.runtime.images import digests_in_unreadable_records, list_records
from prewarm.store.atomic import atomic_write
from prewarm.store.content import ContentStore
from prewarm.store.layout import Layout

#: A partial layer untouched for this long, and unlocked, belongs to no running job.
PARTIAL_GRACE_SECONDS = 3600
#: A pin not refreshed for this long belongs to a job that is no longer running here.
PIN_TTL = 3600.0
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def pin(layout: Layout, job_id: str, digests: Iterable[str]) -> None:
    """Keep ``digests`` from gc while the job ``job_id`` runs (call again to refresh)."""
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"job id {job_id!r} cannot name a pin")
    atomic_write(layout.pins_dir() / f"{job_id}.json", json.dumps(sorted(set(digests))).encode())


def unpin(layout: Layout, job_id: str) -> None:
    if _JOB_ID.fullmatch(job_id):
        (layout.pins_dir() / f"{job_id}.json").unlink(missing_ok=True)


def pinned(layout: Layout) -> set[str]:
    """Layers pinned by jobs whose pins are fresh."""
    out: set[str] = set()
    try:
        pins = list(layout.pins_dir().glob("*.json"))
    except OSError:
        return out
    now = time.time()
    for path in pins:
        try:
            if now - path.stat().st_mtime > PIN_TTL:
                continue
            digests = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(digests, list):
            out.update(d for d in digests if isinstance(d, str))
    return out


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
    return used | digests_in_unreadable_records(layout) | snapshot_sources(layout) | pinned(layout)


def _recently_changed(layout: Layout, digest: str) -> bool:
    try:
        return time.time() - layout.layer(digest).stat().st_mtime < PARTIAL_GRACE_SECONDS
    except FileNotFoundError:
        return False


def collect(layout: Layout, *, dry_run: bool = False, only: Iterable[str] | None = None) -> list[str]:
    """Remove unused layers (and their chain records); returns the digests removed.

    ``only``: consider these layers alone, partial ones included whatever their age (a job
    taking back what it made: :func:`prewarm.node.local` when its records cannot be written).
    """
    store = ContentStore(layout.root)
    used = layers_in_use(layout)
    removed = []
    candidates = set(store.list_layers()) if only is None else set(only) & set(store.list_layers())
    for digest in sorted(candidates):
        if digest in used:
            continue
        if only is None and not store.is_ready(digest) and _recently_changed(layout, digest):
            continue
        with store.layer_lock(digest, wait=False) as locked:
            # A writer holds it (a job is landing it), or, decided again under the lock, a
            # job pinned or recorded it since `used` was read.
            if not locked or digest in layers_in_use(layout):
                continue
            if not dry_run:
                store.remove_layer_locked(digest)
        removed.append(digest)
    if not dry_run and layout.chains_dir().is_dir():
        for chain in layout.chains_dir().rglob("*.json"):
            try:
                if json.loads(chain.read_text()).get("layer_digest") in removed:
                    chain.unlink()
            except (OSError, ValueError):
                continue
    return removed
