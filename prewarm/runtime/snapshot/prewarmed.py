"""Chain records: which OCI chain IDs the content store can serve as committed snapshots.

The pipeline writes one record per layer when an image is pre-warmed
(:func:`register_chains`); the shim reads them when containerd's unpacker asks for a
layer (:func:`lookup_chain`).  Both sides use this module so the file format lives in
one place::

    <root>/chains/sha256/<hex>.json
    {"chain_id": "sha256:..", "parent": "sha256:.." | null, "diff_id": "sha256:..",
     "layer_digest": "sha256:.."}

A record alone proves nothing: the layer counts as pre-warmed only while the store's
``ready`` file for its layer digest exists, so a half-written or removed layer is
never handed to containerd.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from prewarm.resolve.digest import is_digest
from prewarm.errors import StoreError
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
    if layer.chain_id != chain_id or not layout.layer_ready(layer_digest).is_file():
        return None
    if not layer.fs.is_dir():
        return None
    return layer


def register_chains(layout: Layout, layer_digests: Sequence[str], diff_ids: Sequence[str]) -> list[str]:
    """Write the chain records of an image's layers (bottom first); returns the chain IDs.

    Each record is written to a temporary file and renamed into place, so a reader sees
    a whole record or none.  Writing the same image twice is harmless.

    Raises:
        StoreError: the two lists differ in length or hold something that is not a digest.
    """
    if len(layer_digests) != len(diff_ids):
        raise StoreError(
            f"register_chains: {len(layer_digests)} layer digests but {len(diff_ids)} diff_ids; "
            "pass one diff_id per layer, bottom layer first"
        )
    for value in (*layer_digests, *diff_ids):
        if not is_digest(value):
            raise StoreError(f"register_chains: {value!r} is not a digest (sha256:<hex>)")
    ids = chain_ids(list(diff_ids))
    for i, (chain_id, diff_id, layer_digest) in enumerate(zip(ids, diff_ids, layer_digests)):
        record = {
            "chain_id": chain_id,
            "parent": ids[i - 1] if i else None,
            "diff_id": diff_id,
            "layer_digest": layer_digest,
        }
        atomic_write(layout.chain(chain_id), json.dumps(record, sort_keys=True).encode())
    return ids
