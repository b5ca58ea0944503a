"""Chain records: which OCI chain IDs the content store can serve as committed snapshots.

The pipeline writes one record per layer when an image is pre-warmed
(:func:`register_chains`); the shim reads them when containerd's unpacker asks for a
layer (:func:`lookup_chain`).  Both sides use this module so the file format lives in
one place::

    <root>/chains/sha256/<hex>.json
    {"chain_id": "sha256:..", "parent": "sha256:.." | null, "diff_id": "sha256:..",
     "layer_digest": "sha256:.."}

A record alone proves nothing.  The layer counts as pre-warmed only while the store's
``ready`` file for its layer digest exists, and only when that file, which the store
writes at commit after the layer's uncompressed stream hashed to its diff_id, names the
record's diff_id.  So a claimed diff_id is never enough, on either side: a chain is
registered only from diff_ids that each layer's own commit record proves, and a record
that disagrees with its layer (written by hand, or by an older prewarm that did not
check) is never served.  A record that points at a ready layer proving its diff_id is
never replaced by one that points elsewhere: the first verified tree of a chain stays
the one served (a later image cannot swap in its own blob, even an honest re-compression).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from prewarm.errors import StoreError
from prewarm.resolve.digest import is_digest
from prewarm.store.atomic import atomic_write
from prewarm.store.layout import Layout, chain_ids


@dataclasses.dataclass(frozen=True)
class PrewarmedLayer:
    """A chain ID whose layer is unpacked and verified in the content store."""

    chain_id: str
    parent: str | None
    diff_id: str
    layer_digest: str
    fs: Path

    @property
    def parent_name(self) -> str:
        """The parent as containerd names it: the parent chain ID, or "" for a base layer."""
        return self.parent or ""


def lookup_chain(layout: Layout, chain_id: str) -> PrewarmedLayer | None:
    """The pre-warmed layer for ``chain_id``, or None when it is unknown or not ready.

    None is the ordinary answer for a layer nobody pre-warmed (containerd then fetches
    and applies it itself), so anything unreadable is treated as absent, not raised.
    """
    if not is_digest(chain_id):
        return None
    try:
        record = json.loads(layout.chain(chain_id).read_text())
        layer_digest = str(record["layer_digest"])
        parent = record.get("parent")
        layer = PrewarmedLayer(
            chain_id=str(record["chain_id"]),
            parent=str(parent) if parent else None,
            diff_id=str(record["diff_id"]),
            layer_digest=layer_digest,
            fs=layout.layer_fs(layer_digest),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if layer.chain_id != chain_id or proven_diff_id(layout, layer_digest) != layer.diff_id:
        return None
    if not layer.fs.is_dir():
        return None
    return layer


def served_as(layout: Layout, layer: PrewarmedLayer, layer_digest: str) -> PrewarmedLayer | None:
    """``layer``'s chain served from the blob ``layer_digest`` that containerd names, or None.

    containerd's CRI unpacker says which compressed blob it would apply
    (``containerd.io/snapshot/cri.layer-digest``); the chain is served from that very blob
    when it is ready here and proves the chain's diff_id, and not at all otherwise.
    """
    if not is_digest(layer_digest) or proven_diff_id(layout, layer_digest) != layer.diff_id:
        return None
    fs = layout.layer_fs(layer_digest)
    return dataclasses.replace(layer, layer_digest=layer_digest, fs=fs) if fs.is_dir() else None


def proven_diff_id(layout: Layout, layer_digest: str) -> str | None:
    """The diff_id that the layer's own commit record proves, or None (not ready, unreadable).

    The store writes ``ready`` only after the layer's uncompressed stream hashed to this
    diff_id, so it is the one place a diff_id can be taken from.
    """
    try:
        info = json.loads(layout.layer_ready(layer_digest).read_bytes())
        diff_id = info.get("diff_id") if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None
    return diff_id if isinstance(diff_id, str) and is_digest(diff_id) else None


def register_chains(layout: Layout, layer_digests: Sequence[str], diff_ids: Sequence[str]) -> list[str]:
    """Write the chain records of an image's layers (bottom first); returns the chain IDs.

    Each record is written to a temporary file and renamed into place, so a reader sees
    a whole record or none.  Writing the same image twice is harmless.  A record that
    already serves its chain from a layer proving the same diff_id is kept as it is.

    Raises:
        StoreError: the two lists differ in length or hold something that is not a digest,
            or a layer's commit record does not prove the diff_id given for it (nothing
            is written then).
    """
    if len(layer_digests) != len(diff_ids):
        raise StoreError(
            f"register_chains: {len(layer_digests)} layer digests but {len(diff_ids)} diff_ids; "
            "pass one diff_id per layer, bottom layer first"
        )
    for value in (*layer_digests, *diff_ids):
        if not is_digest(value):
            raise StoreError(f"register_chains: {value!r} is not a digest (sha256:<hex>)")
    for layer_digest, diff_id in zip(layer_digests, diff_ids):
        proven = proven_diff_id(layout, layer_digest)
        if proven != diff_id:
            raise StoreError(
                f"layer {layer_digest} is not registered as diff_id {diff_id}: its commit record in "
                f"{layout.root} proves {proven or 'no diff_id'}; pre-warm the image again"
            )
    ids = chain_ids(list(diff_ids))
    for i, (chain_id, diff_id, layer_digest) in enumerate(zip(ids, diff_ids, layer_digests)):
        if lookup_chain(layout, chain_id) is not None:
            continue  # already served from a verified tree of this very chain
        record = {
            "chain_id": chain_id,
            "parent": ids[i - 1] if i else None,
            "diff_id": diff_id,
            "layer_digest": layer_digest,
        }
        atomic_write(layout.chain(chain_id), json.dumps(record, sort_keys=True).encode())
    return ids
