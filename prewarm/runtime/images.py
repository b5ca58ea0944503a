"""Records of pre-warmed images on a node: which layers make the image, in which order.

A record is written when every layer of an image is ready in the node's store, together
with the chain-ID index the snapshotter shim reads; ``prewarm images`` lists them,
``prewarm rm`` removes one, and ``prewarm gc`` removes layers no record uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path

from prewarm.errors import CorruptContent, DiffIdMismatch, StoreError
from prewarm.fleet.plan import ImagePlan
from prewarm.store.atomic import atomic_write, write_failed
from prewarm.store.layout import Layout, chain_ids

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    name: str
    reference: str
    manifest_digest: str
    config_digest: str
    platform: str
    layer_digests: tuple[str, ...]
    diff_ids: tuple[str, ...]
    sizes: tuple[int, ...]
    created: float

    @property
    def chain_ids(self) -> list[str]:
        return chain_ids(list(self.diff_ids))

    @property
    def size(self) -> int:
        return sum(self.sizes)


def write_record(layout: Layout, record: ImageRecord) -> None:
    atomic_write(layout.image(record.name), json.dumps(dataclasses.asdict(record), indent=1).encode())


def read_record(path: Path) -> ImageRecord:
    """Raises: CorruptContent: the record is not one we wrote (naming its file)."""
    try:
        raw = json.loads(path.read_text())
        for key in ("layer_digests", "diff_ids", "sizes"):
            raw[key] = tuple(raw[key])
        return ImageRecord(**raw)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CorruptContent(f"image record {path} is corrupt ({type(err).__name__}: {err}); remove it "
                             "and schedule the image again") from None


def list_records(layout: Layout) -> list[ImageRecord]:
    """Every readable image record; a corrupt one is skipped with a warning naming its file."""
    out = []
    if layout.images_dir().is_dir():
        for path in sorted(layout.images_dir().glob("*.json")):
            try:
                out.append(read_record(path))
            except CorruptContent as err:
                log.warning("skipping it: %s", err)
    return sorted(out, key=lambda r: r.name)


def digests_in_unreadable_records(layout: Layout) -> set[str]:
    """Every digest written anywhere in an image record that does not parse.

    gc keeps these: a corrupt record's image cannot be listed, but its layers are not
    garbage for that (what can still be read of it names them).
    """
    out: set[str] = set()
    if not layout.images_dir().is_dir():
        return out
    for path in layout.images_dir().glob("*.json"):
        try:
            read_record(path)
        except CorruptContent:
            try:
                out.update(_DIGEST.findall(path.read_bytes().decode("utf-8", "replace")))
            except OSError:
                continue
    return out


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def find_record(layout: Layout, name: str) -> ImageRecord | None:
    """The record whose name, reference or manifest digest is ``name``."""
    path = layout.image(name)
    if path.is_file():
        return read_record(path)
    for rec in list_records(layout):
        if name in (rec.reference, rec.manifest_digest) or rec.reference.startswith(name + "@"):
            return rec
    return None


def remove_record(layout: Layout, record: ImageRecord) -> None:
    layout.image(record.name).unlink(missing_ok=True)


def new_record(name: str, reference: str, manifest_digest: str, config_digest: str, platform: str,
               layer_digests: list[str], diff_ids: list[str], sizes: list[int]) -> ImageRecord:
    return ImageRecord(name, reference, manifest_digest, config_digest, platform,
                       tuple(layer_digests), tuple(diff_ids), tuple(sizes), time.time())


def record_prewarmed_image(layout: Layout, name: str, plan: ImagePlan) -> ImageRecord:
    """Write the chain-ID index and the image record once every layer of ``plan`` is ready.

    Idempotent: several workers may finish the same image at once.  A layer made ready for
    one image is reused by every image that lists its digest: here its verified diff_id (its
    commit record's) must be the one this image's chain IDs are built from.  The layers are
    checked again after the record is written: a ``prewarm gc`` that took one of them
    before it could see the record makes this fail, so a job never reports an image the
    store no longer holds (the record then keeps the layers from the next gc, and a new
    schedule fetches what is missing).

    Raises:
        DiffIdMismatch: a layer's commit record holds another diff_id than the image config
            gives for it (nothing is written).
        StoreError: a layer is not ready (removed while the job ran), or the record could
            not be written (InsufficientSpace for a full disk); the previous record, if
            any, is left whole (atomic_write).
    """
    from prewarm.runtime.snapshot.prewarmed import proven_diff_id, register_chains

    digests = [plan.layers[i].digest for i in plan.layer_order]
    for digest, diff_id in zip(digests, plan.diff_ids):
        held = proven_diff_id(layout, digest)
        if held is None:
            raise StoreError(f"image {name}: layer {digest} is not ready in {layout.root} (removed while the job "
                             "ran, by a concurrent prewarm gc?); schedule the image again")
        if held != diff_id:
            raise DiffIdMismatch(f"image {name}: layer {digest} is on this node with diff_id {held}, but the "
                                 f"image config says {diff_id}; no chain or image record was written (an image "
                                 "config that names diff_ids that are not its layers' is refused)",
                                 expected=diff_id, actual=held)
    sizes = [plan.layers[i].size for i in plan.layer_order]
    record = new_record(name, plan.reference, plan.manifest_digest, plan.config_digest, plan.platform,
                        digests, list(plan.diff_ids), sizes)
    existing = find_record(layout, name)
    try:
        register_chains(layout, digests, list(plan.diff_ids))
        if existing is None or existing.manifest_digest != plan.manifest_digest or existing.name != name:
            write_record(layout, record)
        else:
            record = existing
    except OSError as err:  # a full disk, a read-only remount: the old record (if any) stays whole
        raise write_failed(Path(err.filename or layout.image(name)), err, layout.root) from None
    missing = [d for d in digests if not layout.layer_ready(d).is_file()]
    if missing:
        raise StoreError(f"image {name}: layer(s) {', '.join(missing)} were removed from {layout.root} while "
                         "the job ran (a concurrent prewarm gc?); schedule the image again")
    return record
