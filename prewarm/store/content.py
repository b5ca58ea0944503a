"""The node's content store: layers unpacked in place, verified, committed atomically.

Layers are keyed by their compressed (manifest) digest under ``PREWARM_ROOT`` (paths
in :mod:`prewarm.store.layout`); each layer's ``fs/`` is an overlay lowerdir in diff format
(:mod:`prewarm.store.layerfs`).  This module is the store's lifecycle: the layer lock, the
state in ``work/``, and the commit; the work of each step lives next door, and
:class:`ContentStore` is the one face the other packages import.  A layer reaches the
store in one of two ways:

**Spans** (a zTOC splits the layer; many workers, many processes, any order)::

    prepare_layer   under the layer lock, once: validate the whole TOC (paths, sizes,
                    span chain), create the tree skeleton (directories, links, nodes and
                    pre-sized files that cross a span boundary), save the landing table
                    (prewarm.store.table: what was derived, with every entry's
                    metadata), write work/state.json last (boot id + zTOC fingerprint)
    land_span       (per span, after inflate_span checked the next checkpoint's window)
                    === the TOC against the real tar headers whose chains end in this
                        span (checkpoint window + output cover chains that straddle)
                    === files that lie inside the span created whole (data, owner, mode,
                        xattrs, mtime); pieces of the others pwritten into them (no lock:
                        disjoint); page-aligned data goes O_DIRECT (prewarm.store.spans,
                        prewarm.store.directio)
                    === under the lock: the in-order sha256s of the compressed layer
                        and of its decompressed stream advanced (or the span spooled to
                        work/spool at its offset until the spans before it are in, then
                        inflated again; prewarm.store.inorder), then the span's byte in
                        work/landed set
                    === last span: digest and diff_id compared, the rest's metadata
                        applied, syncfs, ``ready`` written atomically, work/ removed

Both paths commit a layer only when its decompressed stream hashes to the diff_id the
verified image config gives (as containerd's unpack does): chain IDs are built from
diff_ids, so a layer under a diff_id not its own would put one image's tree under
another image's chain.  A span layer prepared without a diff_id records the one it
computes.

**Whole** (no zTOC: small, zstd, uncompressed, no Range): :meth:`ContentStore.ingest_stream`
decompresses the blob as it streams, hashes the compressed bytes against the layer
digest and the tar stream against the diff_id, and writes entries with the same
:class:`~prewarm.store.layerfs.LayerWriter` (:mod:`prewarm.store.ingest`).

Crash safety: ``ready`` is the only proof a layer is complete, and it is written after
the digest and the diff_id matched and ``syncfs`` returned.  ``work/landed`` is the
truth about which spans are in: a span's byte is set only after its data is written and
its bytes hashed or spooled, so a re-run fetches exactly the spans whose byte is 0.  Page
cache survives a killed process but not a reboot, so a partial layer from an earlier
boot (``/proc/sys/kernel/random/boot_id``) starts again from zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from prewarm.errors import (
    BadSpan,
    BadZtoc,
    DiffIdMismatch,
    DigestMismatch,
    InsufficientSpace,
    StoreError,
)
from prewarm.index.ztoc import LazyFiles
from prewarm.resolve.digest import parse_digest
from prewarm.store import inorder, landing, spans
from prewarm.store.atomic import atomic_write
from prewarm.store.directio import DirectWriter
from prewarm.store.ingest import compression_of, unpack_stream
from prewarm.store.layerfs import LayerWriter
from prewarm.store.layout import Layout, secure_root
from prewarm.store.longlived import long_lived
from prewarm.store.spans import fetch_range
from prewarm.store.syscalls import syncfs
from prewarm.store.table import KIND_CODE, LandingTable, SpanRange, ZtocView, fingerprint_of
from prewarm.store.writeback import EarlyWriteback

__all__ = ["BOOT_ID_PATH", "ContentStore", "LandResult", "LayerState", "ZtocView", "current_boot_id", "fetch_range"]

LayerState = Literal["absent", "partial", "ready"]

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
#: Where a layer's landing table is saved in its work/ (the name predates "landing table";
#: kept so that layers prepared by an older prewarm keep theirs).
_TABLE_FILE = "plan"


@dataclasses.dataclass(frozen=True)
class LandResult:
    """What :meth:`ContentStore.land_span` did; truthy when the layer is now ready."""

    ready: bool
    landed_now: bool

    def __bool__(self) -> bool:
        return self.ready


def current_boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return "unknown"


class ContentStore:
    """The layers of one node under ``root`` (PREWARM_ROOT)."""

    def __init__(self, root: Path | str) -> None:
        """Open (or create) the store at ``root``, private to its owner (:func:`~prewarm.store.layout.secure_root`).

        Raises:
            StoreError: the root cannot be created or made private.
        """
        self.root = Path(root)
        secure_root(self.root)
        self.layout = Layout(self.root)
        self._tables: dict[str, LandingTable] = {}
        self._boot_id = current_boot_id()
        self._writer = DirectWriter()
        self._writeback = EarlyWriteback()

    # === queries

    def layer_state(self, digest: str) -> LayerState:
        if self.layout.layer_ready(digest).is_file():
            return "ready"
        if self.layout.layer_fs(digest).exists() or self.layout.layer_work(digest).exists():
            return "partial"
        return "absent"

    def is_ready(self, digest: str) -> bool:
        return self.layout.layer_ready(digest).is_file()

    def ready_info(self, digest: str) -> dict[str, Any]:
        """The ``ready`` record of a layer.

        Raises:
            StoreError: the layer is not ready.
        """
        try:
            return dict(json.loads(self.layout.layer_ready(digest).read_bytes()))
        except FileNotFoundError:
            raise StoreError(f"layer {digest} is not ready in {self.root}") from None

    def list_layers(self) -> list[str]:
        """Digests of every layer with anything in the store (ready or partial), sorted."""
        return sorted(self.layout.layer_digests())

    def check_space(self, bytes_needed: int) -> None:
        """Refuse early when the store's filesystem cannot take ``bytes_needed`` more bytes.

        Raises:
            InsufficientSpace: naming the root, the free and the needed bytes.
        """
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        st = os.statvfs(probe)
        free = st.f_bavail * st.f_frsize
        if free < bytes_needed:
            raise InsufficientSpace(f"not enough space in {self.root}: {free} bytes free, {bytes_needed} "
                                    "needed; free some space or point PREWARM_ROOT elsewhere")

    def missing_spans(self, digest: str, ztoc: ZtocView) -> list[int]:
        """Spans not landed yet (all of them for an unprepared layer, none for a ready one)."""
        if self.is_ready(digest):
            return []
        try:
            landed = self.layout.layer_work(digest).joinpath("landed").read_bytes()
        except FileNotFoundError:
            return list(range(ztoc.num_spans))
        return [i for i in range(ztoc.num_spans) if i >= len(landed) or not landed[i]]

    def span_landed(self, digest: str, index: int) -> bool:
        if self.is_ready(digest):
            return True
        try:
            with open(self.layout.layer_work(digest) / "landed", "rb") as f:
                f.seek(index)
                return f.read(1) == b"\x01"
        except FileNotFoundError:
            return False

    # === lifecycle

    @contextlib.contextmanager
    def _locked(self, digest: str, *, wait: bool = True) -> Iterator[bool]:
        """The layer's lock; with ``wait=False`` it yields False at once if another holds it."""
        lock = self.layout.layer_lock(digest)
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _disk_errors(self, digest: str) -> Iterator[None]:
        """A full disk (or quota) becomes InsufficientSpace naming the root and the layer."""
        try:
            yield
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientSpace(f"no space left in {self.root} while writing layer {digest}; free "
                                        "some space (prewarm rm IMAGE) or point PREWARM_ROOT elsewhere") from None
            raise

    def layer_lock(self, digest: str, *, wait: bool = True) -> contextlib.AbstractContextManager[bool]:
        """The layer's lock, for those outside the store that must see a layer stay as it is.

        gc holds it while it decides and removes; the shim while it hands a ready layer to
        containerd.  With ``wait=False`` it yields False at once if another holds it.
        """
        return self._locked(digest, wait=wait)

    def remove_layer(self, digest: str) -> None:
        """Remove a layer (ready or partial); ``ready`` goes first so nobody trusts a half-removed tree."""
        with self._locked(digest):
            self.remove_layer_locked(digest)

    def remove_layer_locked(self, digest: str) -> None:
        """:meth:`remove_layer` for a caller that holds :meth:`layer_lock` already."""
        self.layout.layer_ready(digest).unlink(missing_ok=True)
        self._wipe(digest)
        shutil.rmtree(self.layout.layer(digest), ignore_errors=True)
        self._tables.pop(digest, None)

    def _wipe(self, digest: str) -> None:
        for d in (self.layout.layer_work(digest), self.layout.layer_fs(digest)):
            if d.exists():
                shutil.rmtree(d)

    def _state(self, digest: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.layout.layer_work(digest) / "state.json").read_bytes()))
        except (FileNotFoundError, ValueError):
            return None

    def prepare_layer(self, digest: str, ztoc: ZtocView, *, diff_id: str | None = None,
                      wait: bool = True) -> bool:
        """Validate the zTOC and create the layer's skeleton; idempotent and concurrent-safe.

        A partial layer from an earlier boot, or from a different zTOC, starts again.
        With ``wait=False`` (preparing ahead) it returns False at once when another
        process holds the layer's lock; otherwise True once the layer is prepared or ready.
        ``diff_id`` (from the verified image config) is what the layer's decompressed
        stream must hash to when its last span lands; without one, the layer records the
        diff_id it computes.

        Raises:
            BadZtoc: the span chain or the TOC cannot describe a layer.
            DiffIdMismatch: the layer is already being landed for another diff_id (one of
                the two image configs names a diff_id that is not this layer's).
            StoreError: ``diff_id`` is not a sha256 digest.
            UnsafeArchive: an entry would write outside the layer (nothing is created).
            InsufficientSpace: the layer's files and spool cannot fit.
        """
        parse_digest(digest)
        if diff_id is not None and not diff_id.startswith("sha256:"):
            parse_digest(diff_id)
            raise StoreError(f"layer {digest}: diff_id {diff_id} is not sha256, the only diff_id a span "
                             "layer can be verified against; warm it as a whole layer")
        cached = self._tables.get(digest)
        if cached is not None and cached.ztoc is ztoc and self.layout.layer_work(digest).is_dir():
            return True
        if self.is_ready(digest):
            return True
        self._forget_finished()
        known = fingerprint_of(ztoc)
        with self._locked(digest, wait=wait) as locked:
            if not locked:
                return False
            if self.is_ready(digest):
                return True
            if known is not None:
                # Another process validated this very zTOC for this layer: load its table.
                with long_lived():
                    loaded = self._load_table(digest, ztoc, known)
                if loaded is not None:
                    self._claim_diff_id(digest, diff_id)
                    self._tables[digest] = loaded
                    return True
            # Validated under the lock: the node's other processes wait for this one and
            # load its table, instead of all checking the same 70,000 entries at once.
            try:
                with long_lived(), self._disk_errors(digest):
                    spill = self.layout.tmp()  # the table is built in a file there, not in memory
                    spill.mkdir(exist_ok=True)
                    table = LandingTable.derive(ztoc, spill)
            except BadZtoc as err:
                raise BadZtoc(f"layer {digest}: {err}") from None
            state = self._state(digest)
            if self._resumable(state, table.fingerprint):
                self._claim_diff_id(digest, diff_id)
                table.save(self._table_path(digest))  # missing or unusable: the next process loads this one
            else:
                self._wipe(digest)
                with self._disk_errors(digest):
                    try:
                        self._create_skeleton(digest, ztoc, table, diff_id)
                    except BaseException:
                        self._wipe(digest)
                        raise
            self._tables[digest] = self._mapped(digest, table)
            return True

    def _forget_finished(self) -> None:
        """Drop the tables of layers that are ready or gone (another process finished or removed them).

        Why: a worker keeps a table per layer it landed a span of; a layer that another
        process committed would keep its (deleted) table file mapped, its disk space held,
        for the life of the worker.
        """
        for digest in [d for d in self._tables if not self.layout.layer_work(d).is_dir()]:
            del self._tables[digest]

    def _mapped(self, digest: str, table: LandingTable) -> LandingTable:
        """The table just derived and saved, as the saved file mapped; the TOC's decoded entries dropped.

        Why: the preparing process (the embedded run, a worker preparing ahead) keeps both for
        the rest of its life otherwise, ~1.5 KB per entry of the layer, while landing needs
        only the mapped columns.
        """
        if isinstance(table.ztoc.files, LazyFiles):
            table.ztoc.files.forget()
        return LandingTable.load(self._table_path(digest), table.ztoc, table.fingerprint) or table

    def _create_skeleton(self, digest: str, ztoc: ZtocView, table: LandingTable, diff_id: str | None) -> None:
        """Create work/ and the tree; state.json last (its presence means prepared)."""
        compressed = table.spans[-1].compressed_end
        self.check_space(table.data_size + compressed)
        work, fs = self.layout.layer_work(digest), self.layout.layer_fs(digest)
        work.mkdir(parents=True)
        fs.mkdir(mode=0o755)
        born, placements = table.born, table.placements
        c = landing.backend()
        visit: Sequence[int] = (memoryview(c.skeleton_entries(table.records, table.heap, born)).cast("q")
                                if c is not None else range(len(born)))
        # C makes the nodes of fresh paths (directories, files, symlinks) and hands each other
        # entry back: Python makes those as before, or words their error
        python = bytearray(len(born))
        for k in table.made_at:
            python[k] = 1
        pos, end = 0, len(visit)
        with LayerWriter(fs) as writer:
            made = None  # the directory the last born files are in, made since the last other entry
            while pos < end:
                if c is not None:
                    pos = c.skeleton_nodes(writer.root_fd, table.records, table.heap, table.kinds, born, python,
                                           visit, pos, KIND_CODE["dir"], KIND_CODE["reg"], KIND_CODE["symlink"])
                    made = None
                    if pos == end:
                        break
                i = visit[pos]
                pos += 1
                placement = placements[i]
                if born[i]:
                    parent = placement.path.rpartition("/")[0]
                    if parent != made:
                        writer.make_parent(placement.path, table.name(i))  # the file comes with its span
                        made = parent
                else:  # (from its record: the TOC is not decoded here)
                    writer.create(table.node_entry(i), placement)
                    made = None
        (work / "landed").write_bytes(bytes(ztoc.num_spans))
        inorder.start(work)
        table.save(self._table_path(digest))
        state = {"digest": digest, "diff_id": diff_id, "boot_id": self._boot_id, "inorder": inorder.FORMAT,
                 "fingerprint": table.fingerprint, "num_spans": ztoc.num_spans,
                 "compressed_size": compressed, "uncompressed_size": ztoc.uncompressed_archive_size}
        atomic_write(work / "state.json", json.dumps(state).encode(), durable=False)

    def _table_path(self, digest: str) -> Path:
        return self.layout.layer_work(digest) / _TABLE_FILE

    def _load_table(self, digest: str, ztoc: ZtocView, fingerprint: str) -> LandingTable | None:
        """The saved table of this layer for this zTOC in this boot, or None (then derive it).

        Called under the layer lock; a table saved in another boot or for another zTOC
        is never used.
        """
        if not self._resumable(self._state(digest), fingerprint):
            return None
        return LandingTable.load(self._table_path(digest), ztoc, fingerprint)

    def _resumable(self, state: dict[str, Any] | None, fingerprint: str) -> bool:
        """A partial layer of this boot, for this zTOC, whose work/hash this prewarm can read."""
        return state is not None and state.get("boot_id") == self._boot_id \
            and state.get("fingerprint") == fingerprint and state.get("inorder") == inorder.FORMAT

    def _claim_diff_id(self, digest: str, diff_id: str | None) -> None:
        """Record ``diff_id`` in a prepared layer's state (under the lock) unless it has one.

        Raises:
            DiffIdMismatch: the state holds another diff_id.
        """
        if diff_id is None:
            return
        state = self._state(digest)
        if state is None:
            return
        held = state.get("diff_id")
        if held is None:
            atomic_write(self.layout.layer_work(digest) / "state.json",
                         json.dumps({**state, "diff_id": diff_id}).encode(), durable=False)
        elif held != diff_id:
            raise DiffIdMismatch(f"layer {digest} is being landed for diff_id {held}, and an image config "
                                 f"now says its diff_id is {diff_id}; one of the two configs is wrong (the "
                                 "layer commits only under the diff_id its bytes hash to)",
                                 expected=held, actual=diff_id)

    # === landing a span

    def land_span(self, digest: str, ztoc: ZtocView, index: int, compressed: bytes | memoryview,
                  uncompressed: bytes | bytearray | memoryview) -> LandResult:
        """Write one verified span into the layer; commit the layer if it was the last one.

        ``compressed`` must already match the span digest and ``uncompressed`` be its
        inflated output (window chain checked by ``inflate_span``).  For the last span,
        pass the output with the zero padding after the archive end
        (``inflate_span(..., is_last=True, keep_padding=True)``): the diff_id covers it;
        without it the store inflates the last span again to find it.  Landing the same
        span twice (a redelivered task) changes nothing and counts once.

        Raises:
            BadZtoc: the TOC disagrees with the tar headers in this span.
            BadSpan: the buffers do not have the span's sizes.
            DigestMismatch: all spans are in but the compressed bytes do not hash to
                ``digest``, or (DiffIdMismatch) the decompressed stream not to the
                layer's diff_id; the layer is wiped.
            StoreError: the layer is not prepared, or was restarted meanwhile.
        """
        if self.is_ready(digest):
            return LandResult(True, False)
        table = self._tables.get(digest)
        if table is None or table.ztoc is not ztoc:
            self.prepare_layer(digest, ztoc)
            table = self._tables[digest]
        if not 0 <= index < len(table.spans):
            raise BadSpan(f"span {index} does not exist in layer {digest} ({len(table.spans)} spans)")
        span = table.spans[index]
        if self.span_landed(digest, index):
            return LandResult(self.finish_if_complete(digest, ztoc), False)
        out, stream = spans.split_padding(digest, span, index, index == len(table.spans) - 1,
                                          memoryview(uncompressed))
        base = spans.compressed_base(digest, span, index, compressed, out)
        spans.check_headers(digest, table, ztoc.span(index), out)
        with self._disk_errors(digest):
            self._write_pieces(digest, table, span, out)
        self._writeback.start(self.layout.layer_fs(digest), self.layout.layer_work(digest))
        with self._locked(digest), self._disk_errors(digest):
            if self.is_ready(digest):
                # another process landed the last span meanwhile and committed the layer
                return LandResult(True, False)
            state = self._state(digest)
            if state is None or state.get("fingerprint") != table.fingerprint:
                self._tables.pop(digest, None)
                raise StoreError(f"layer {digest} was removed or restarted while span {index} was landing; "
                                 "retry the span")
            work = self.layout.layer_work(digest)
            landed_fd = os.open(work / "landed", os.O_RDWR | os.O_CLOEXEC)
            try:
                landed = bytearray(os.pread(landed_fd, len(table.spans), 0))
                if landed[index]:
                    return LandResult(self._finish_locked(digest, table, landed), False)
                spans.check_straddlers(digest, work, table, index, out)
                self._hash_or_spool(digest, table, index, compressed, base, stream, landed)
                os.pwrite(landed_fd, b"\x01", index)
                landed[index] = 1
            finally:
                os.close(landed_fd)
            return LandResult(self._finish_locked(digest, table, landed), True)

    # The two steps of landing that tests/test_store_crash.py kills a process right after.

    def _write_pieces(self, digest: str, table: LandingTable, span: SpanRange, out: memoryview) -> None:
        spans.write_pieces(digest, self.root, self.layout.layer_fs(digest), table, span, out, self._writer)

    def _hash_or_spool(self, digest: str, table: LandingTable, index: int, compressed: bytes | memoryview,
                       base: int, stream: memoryview | None, landed: bytearray) -> None:
        inorder.hash_or_spool(digest, self.layout.layer_work(digest), table.ztoc, table.spans, index, compressed,
                              base, stream, landed)

    def finish_if_complete(self, digest: str, ztoc: ZtocView) -> bool:
        """Commit the layer if every span is in (e.g. after a crash just before ``ready``).

        Raises:
            DigestMismatch: as :meth:`land_span`.
        """
        if self.is_ready(digest):
            return True
        table = self._tables.get(digest)
        if table is None or table.ztoc is not ztoc:
            self.prepare_layer(digest, ztoc)
            table = self._tables.get(digest)
            if table is None:
                return self.is_ready(digest)
        with self._locked(digest):
            try:
                landed = bytearray((self.layout.layer_work(digest) / "landed").read_bytes())
            except FileNotFoundError:
                return self.is_ready(digest)
            return self._finish_locked(digest, table, landed)

    def _finish_locked(self, digest: str, table: LandingTable, landed: bytearray) -> bool:
        if self.is_ready(digest):
            return True
        if not all(landed):
            return False
        p = inorder.load(self.layout.layer_work(digest))
        if p.next != len(table.spans):
            return False
        actual = "sha256:" + p.layer.hexdigest()
        if actual != digest:
            self._wipe(digest)
            self._tables.pop(digest, None)
            raise DigestMismatch(f"layer {digest}: its {p.upto} compressed bytes hash to {actual}; the layer "
                                 "was discarded and will be fetched again", expected=digest, actual=actual)
        state = self._state(digest) or {}
        diff_id = inorder.tar_digest(table.ztoc, p)
        claimed = state.get("diff_id")
        if claimed is not None and diff_id != claimed:
            self._wipe(digest)
            self._tables.pop(digest, None)
            raise DiffIdMismatch(f"layer {digest}: its decompressed stream hashes to {diff_id}, but the image "
                                 f"config says diff_id {claimed}; the layer was discarded (an image whose "
                                 "config names diff_ids that are not its layers' is refused)",
                                 expected=claimed, actual=diff_id)
        fs = self.layout.layer_fs(digest)
        with LayerWriter(fs) as writer:
            writer.apply_metadata(table.placements, table.meta, done=table.born)
            syncfs(writer.root_fd)
        why = EarlyWriteback.failure(self.layout.layer_work(digest))
        if why is not None:
            self._wipe(digest)
            self._tables.pop(digest, None)
            raise StoreError(f"layer {digest}: writing it back to disk failed while it landed ({why}); the layer "
                             "was discarded and will be fetched again")
        self._commit(digest, {"digest": digest, "diff_id": diff_id, "mode": "spans",
                              "size": p.upto, "uncompressed_size": table.ztoc.uncompressed_archive_size,
                              "files": len(table.ztoc.files), "spans": len(table.spans)})
        self._tables.pop(digest, None)
        return True

    def _commit(self, digest: str, info: dict[str, Any]) -> None:
        info = {**info, "boot_id": self._boot_id, "completed_at": time.time()}
        atomic_write(self.layout.layer_ready(digest), json.dumps(info, sort_keys=True).encode(), durable=True)
        shutil.rmtree(self.layout.layer_work(digest), ignore_errors=True)

    # === the whole-layer path

    def ingest_stream(self, digest: str, chunks: Iterable[bytes], *, media_type: str,
                      diff_id: str | None, max_uncompressed: int | None = None,
                      chunks_verify: bool = False) -> None:
        """Stream a whole layer blob into the store (no zTOC), verified twice.

        The compressed bytes must hash to ``digest`` and the tar stream to ``diff_id``
        (when given); memory stays bounded whatever the layer size, and so does the disk:
        the stream may unpack to ``max_uncompressed`` bytes at most, and free space is
        checked again while it is written.  ``chunks_verify``: the iterator raises
        DigestMismatch at its end if its bytes are not ``digest`` (the registry client's
        ``stream_blob``), so the store does not hash them a second time.

        Raises:
            ExpansionLimit: the layer unpacks to more than ``max_uncompressed`` (discarded).
            InsufficientSpace: the store filled up while writing (discarded).
            DigestMismatch: either hash differs (the layer is discarded).
            BadTarHeader, UnsafeArchive: the tar stream is broken or hostile (discarded).
            StoreError: unknown media type.
        """
        parse_digest(digest)
        compression = compression_of(media_type)
        with self._locked(digest):
            if self.is_ready(digest):
                return
            self._wipe(digest)
            fs = self.layout.layer_fs(digest)
            fs.mkdir(parents=True, mode=0o755)
            try:
                with self._disk_errors(digest):
                    info = unpack_stream(digest, fs, chunks, compression, diff_id, self._writer,
                                         max_uncompressed=max_uncompressed, check_space=self.check_space,
                                         chunks_verify=chunks_verify)
                self._commit(digest, info)
            except BaseException:
                self._wipe(digest)
                raise
