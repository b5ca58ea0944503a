"""The node's content store: layers unpacked in place, verified, committed atomically.

Layers are keyed by their compressed (manifest) digest under ``PREWARM_ROOT`` (paths
in :mod:`prewarm.store.layout`); each layer's ``fs/`` is an overlay lowerdir in diff format
(:mod:`prewarm.store.layerfs`).  A layer reaches the store in one of two ways:

**Spans** (a zTOC splits the layer; many workers, many processes, any order)::

    prepare_layer   under the layer lock, once: validate the whole TOC (paths, sizes,
                    span chain), create the tree skeleton (directories, links, nodes and
                    pre-sized files that cross a span boundary), save the plan (what was
                    derived, with every entry's metadata), write work/state.json last
                    (boot id + zTOC fingerprint)
    land_span       (per span, after inflate_span checked the next checkpoint's window)
                    === the TOC against the real tar headers whose chains end in this
                        span (checkpoint window + output cover chains that straddle)
                    === files that lie inside the span created whole (data, owner, mode,
                        xattrs, mtime); pieces of the others pwritten into them (no lock:
                        disjoint); page-aligned data goes O_DIRECT (prewarm.store.directio)
                    === under the lock: the in-order sha256 of the compressed layer
                        advanced (or the span spooled to work/spool at its offset until
                        the spans before it are in), state saved with resumable_hash,
                        then the span's byte in work/landed set
                    === last span: digest compared, the rest's metadata applied, syncfs,
                        ``ready`` written atomically, work/ removed

**Whole** (no zTOC: small, zstd, uncompressed, no Range): :meth:`ContentStore.ingest_stream`
decompresses the blob as it streams, hashes the compressed bytes against the layer
digest and the tar stream against the diff_id, and writes entries with the same
:class:`~prewarm.store.layerfs.LayerWriter`.

Crash safety: ``ready`` is the only proof a layer is complete, and it is written after
the digest matched and ``syncfs`` returned.  ``work/landed`` is the truth about which
spans are in: a span's byte is set only after its data is written and its compressed
bytes hashed or spooled, so a re-run fetches exactly the spans whose byte is 0.  Page
cache survives a killed process but not a reboot, so a partial layer from an earlier
boot (``/proc/sys/kernel/random/boot_id``) starts again from zero.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import gc
import hashlib
import io
import json
import marshal
import os
import shutil
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from prewarm.store import landing
from prewarm.store.atomic import atomic_write
from prewarm.resolve.digest import parse_digest
from prewarm.store.directio import DirectWriter
from prewarm.errors import (
    BadSpan,
    BadZtoc,
    CorruptContent,
    DigestMismatch,
    InsufficientSpace,
    PrewarmError,
    StoreError,
)
from prewarm.store.layerfs import (
    EntryChecker,
    LayerWriter,
    Meta,
    Planned,
    check_archive,
    data_extents,
    entry_meta,
    parse_mod_time,
    split_name,
)
from prewarm.store.layout import Layout
from prewarm.store.resumable_hash import ResumableSha256
from prewarm.store.spanmap import SpanMap
from prewarm.index.tarindex import TarIndexer, parse_header_run
from prewarm.index.ztoc import WINDOW_SIZE, FileEntry, Span

LayerState = Literal["absent", "partial", "ready"]

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
#: Bytes read from the decompressor at a time on the whole-layer path (memory bound).
STREAM_READ = 1 << 20
_HASH_HEADER = struct.Struct("<QQ")  # next span to hash, compressed bytes hashed so far
_HEADER_ONLY = frozenset(("dir", "symlink", "hardlink", "char", "block", "fifo"))
#: Version of the saved plan (work/plan); another version is ignored and re-derived.
_PLAN_FORMAT = 4
#: Bytes of an entry key (see :func:`_entry_key`).
_KEY_SIZE = 16
#: The key of an entry whose header C checks (never a BLAKE2b digest in practice).
_NO_KEY = bytes(_KEY_SIZE)


class ZtocView(Protocol):
    """What the store reads from a zTOC (:class:`prewarm.index.ztoc.Ztoc` provides it)."""

    @property
    def files(self) -> Sequence[FileEntry]: ...

    @property
    def num_spans(self) -> int: ...

    @property
    def uncompressed_archive_size(self) -> int: ...

    def span(self, index: int) -> Span: ...


@dataclasses.dataclass(frozen=True)
class LandResult:
    """What :meth:`ContentStore.land_span` did; truthy when the layer is now ready."""

    ready: bool
    landed_now: bool

    def __bool__(self) -> bool:
        return self.ready


@dataclasses.dataclass(frozen=True, slots=True)
class _Range:
    """A span's byte ranges without its window (2,500 windows would be 80 MB)."""

    compressed_start: int
    compressed_end: int
    uncompressed_start: int
    uncompressed_end: int


def fetch_range(span: Span) -> tuple[int, int]:
    """The compressed bytes to fetch for ``span`` and hand to :meth:`ContentStore.land_span`.

    Span 0 of a gzip layer starts after the gzip header, which no span covers; the layer
    digest needs those bytes too, so span 0 is fetched from offset 0.  Verify the span
    digest and inflate over the last ``compressed_end - compressed_start`` bytes.
    """
    return (0 if span.index == 0 else span.compressed_start), span.compressed_end


@dataclasses.dataclass
class _Prepared:
    """Per-layer facts derived from its zTOC once per process (cheap repeated span calls)."""

    ztoc: ZtocView
    fingerprint: str
    plan: Sequence[Planned]
    spanmap: SpanMap
    data_starts: list[int]      # entry i's data offset (sorted)
    header_starts: list[int]    # where entry i's header chain starts
    archive_data_end: int       # padded end of the last entry: zeros from here on
    spans: list[_Range]
    windowed: bool              # spans carry checkpoint windows (gzip)
    keys: bytes                 # entry i's _entry_key at [16 i, 16 i + 16) (zeros: C checks it)
    born: bytes                 # born[i]: file i is created whole when its span lands
    meta: list[Meta]            # entry i's metadata (layerfs.entry_meta): no entry decoded to apply it
    table: bytes                # the landing table (prewarm.store.landing): b"" with the Python reference
    heap: bytes


class _PlanColumns(Sequence[Planned]):
    """A saved plan as its three columns; entry i's :class:`Planned` is made when asked for.

    Why: every worker process loads each layer's plan, and making 50,000 objects of
    which C landing reads none (it asks only for a piece it hands back, or an entry to
    name in an error) was most of a load's 0.16 s.
    """

    __slots__ = ("finals", "kinds", "paths")

    def __init__(self, kinds: list[str], paths: list[str], finals: list[bool]) -> None:
        self.kinds, self.paths, self.finals = kinds, paths, finals

    def __len__(self) -> int:
        return len(self.kinds)

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if isinstance(i, slice):
            return list(map(Planned, self.kinds[i], self.paths[i], self.finals[i]))
        return Planned(self.kinds[i], self.paths[i], self.finals[i])

    def __iter__(self) -> Iterator[Planned]:
        return map(Planned, self.kinds, self.paths, self.finals)


def _columns(plan: Sequence[Planned]) -> tuple[list[str], list[str], list[bool]]:
    if isinstance(plan, _PlanColumns):
        return plan.kinds, plan.paths, plan.finals
    return [p.kind for p in plan], [p.path for p in plan], [p.final for p in plan]


def current_boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return "unknown"


def _fingerprint_of(ztoc: ZtocView) -> str | None:
    """A cheap identity of a zTOC that came verified from the node's cache (its digest).

    Why: naming the TOC by hashing its 70,000 entries costs as much as checking them;
    the cache verified the zTOC's bytes against its digest, which names them all.
    None for a zTOC without a digest (built or parsed in-process): hash the entries.
    """
    ident = getattr(ztoc, "digest", None)
    if not ident:
        return None
    return hashlib.sha256(f"ztoc {ident} {ztoc.num_spans} {ztoc.uncompressed_archive_size} "
                          f"{len(ztoc.files)}".encode()).hexdigest()


def _padded(n: int) -> int:
    return n + (-n & 511)


def _data_len(e: FileEntry) -> int:
    return 0 if e.type in _HEADER_ONLY else e.uncompressed_size


class ContentStore:
    """The layers of one node under ``root`` (PREWARM_ROOT)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.layout = Layout(self.root)
        self._prepared: dict[str, _Prepared] = {}
        self._boot_id = current_boot_id()
        self._writer = DirectWriter()

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
        """Digests of every layer with anything in the store (ready or partial)."""
        out = []
        base = self.layout.layers_dir()
        if base.is_dir():
            for algo in sorted(base.iterdir()):
                for d in sorted(algo.iterdir()):
                    out.append(f"{algo.name}:{d.name}")
        return out

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

    def remove_layer(self, digest: str) -> None:
        """Remove a layer (ready or partial); ``ready`` goes first so nobody trusts a half-removed tree."""
        with self._locked(digest):
            self.layout.layer_ready(digest).unlink(missing_ok=True)
            self._wipe(digest)
        shutil.rmtree(self.layout.layer(digest), ignore_errors=True)
        self._prepared.pop(digest, None)

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

        Raises:
            BadZtoc: the span chain or the TOC cannot describe a layer.
            UnsafeArchive: an entry would write outside the layer (nothing is created).
            InsufficientSpace: the layer's files and spool cannot fit.
        """
        parse_digest(digest)
        cached = self._prepared.get(digest)
        if cached is not None and cached.ztoc is ztoc and self.layout.layer_work(digest).is_dir():
            return True
        if self.is_ready(digest):
            return True
        known = _fingerprint_of(ztoc)
        with self._locked(digest, wait=wait) as locked:
            if not locked:
                return False
            if self.is_ready(digest):
                return True
            if known is not None:
                # Another process validated this very zTOC for this layer: load its plan.
                with _long_lived():
                    loaded = self._load_plan(digest, ztoc, known)
                if loaded is not None:
                    self._prepared[digest] = loaded
                    return True
            # Validated under the lock: the node's other processes wait for this one and
            # load its plan, instead of all checking the same 70,000 entries at once.
            try:
                with _long_lived():
                    prep = self._derive(ztoc)
            except BadZtoc as err:
                raise BadZtoc(f"layer {digest}: {err}") from None
            state = self._state(digest)
            if state and state.get("boot_id") == self._boot_id and state.get("fingerprint") == prep.fingerprint:
                self._save_plan(digest, prep)  # missing or unusable: the next process loads this one
                self._prepared[digest] = prep
                return True
            self._wipe(digest)
            with self._disk_errors(digest):
                try:
                    self._create_skeleton(digest, ztoc, prep, diff_id)
                except BaseException:
                    self._wipe(digest)
                    raise
            self._prepared[digest] = prep
            return True

    def _create_skeleton(self, digest: str, ztoc: ZtocView, prep: _Prepared, diff_id: str | None) -> None:
        """Create work/ and the tree; state.json last (its presence means prepared)."""
        spans = prep.spans
        compressed = spans[-1].compressed_end
        self.check_space(sum(n for _, n in data_extents(ztoc.files, prep.plan)) + compressed)
        work, fs = self.layout.layer_work(digest), self.layout.layer_fs(digest)
        work.mkdir(parents=True)
        fs.mkdir(mode=0o755)
        born = prep.born
        with LayerWriter(fs) as writer:
            for i, (entry, planned) in enumerate(zip(ztoc.files, prep.plan)):
                if born[i]:
                    writer.make_parent(planned.path, entry.name)  # the file comes with its span
                else:
                    writer.create(entry, planned)
        (work / "landed").write_bytes(bytes(ztoc.num_spans))
        self._save_hash(digest, 0, 0, ResumableSha256())
        self._save_plan(digest, prep)
        state = {"digest": digest, "diff_id": diff_id, "boot_id": self._boot_id,
                 "fingerprint": prep.fingerprint, "num_spans": ztoc.num_spans,
                 "compressed_size": compressed, "uncompressed_size": ztoc.uncompressed_archive_size}
        atomic_write(work / "state.json", json.dumps(state).encode(), durable=False)

    def _save_plan(self, digest: str, prep: _Prepared) -> None:
        """Persist what :meth:`_derive` found, so the node's other processes skip it.

        Written before state.json (or under the lock when state.json is already there);
        it is as trusted as the rest of work/, which only this store writes.
        """
        data = marshal.dumps((
            _PLAN_FORMAT, prep.fingerprint, *_columns(prep.plan),
            *prep.spanmap.arrays(), prep.data_starts, prep.header_starts, prep.archive_data_end,
            [r.compressed_start for r in prep.spans], [r.compressed_end for r in prep.spans],
            [r.uncompressed_start for r in prep.spans], [r.uncompressed_end for r in prep.spans],
            prep.windowed, prep.keys, prep.born, prep.meta, prep.table, prep.heap,
        ))
        atomic_write(self.layout.layer_work(digest) / "plan", data, durable=False)

    def _load_plan(self, digest: str, ztoc: ZtocView, fingerprint: str) -> _Prepared | None:
        """The saved plan of this layer for this zTOC in this boot, or None (then derive it).

        Called under the layer lock.  A plan that does not fit the zTOC (other counts,
        another format, unreadable) is ignored, never trusted.
        """
        state = self._state(digest)
        if not state or state.get("boot_id") != self._boot_id or state.get("fingerprint") != fingerprint:
            return None
        try:
            raw = (self.layout.layer_work(digest) / "plan").read_bytes()
            (fmt, fp, kinds, paths, finals, m_starts, m_ends, m_ids, data_starts, header_starts, data_end,
             cs, ce, us, ue, windowed, keys, born, meta, table, heap) = marshal.loads(raw)
            n, nspans = len(ztoc.files), ztoc.num_spans
            if (fmt != _PLAN_FORMAT or fp != fingerprint
                    or not len(kinds) == len(paths) == len(finals) == len(data_starts) == len(header_starts) == n
                    or not len(cs) == len(ce) == len(us) == len(ue) == nspans
                    or not isinstance(keys, bytes) or len(keys) != _KEY_SIZE * n
                    or not isinstance(born, bytes) or len(born) != n
                    or not isinstance(meta, list) or len(meta) != n
                    or not isinstance(table, bytes) or len(table) not in (0, landing.RECORD.size * n)
                    or not isinstance(heap, bytes) or bool(table) != (landing.backend() is not None)):
                return None
            smap = SpanMap.from_arrays(m_starts, m_ends, m_ids)
        except (OSError, ValueError, EOFError, TypeError, BadZtoc):
            return None
        if not all(isinstance(x, list) for x in (kinds, paths, finals)):
            return None
        plan = _PlanColumns(kinds, paths, finals)
        spans = list(map(_Range, cs, ce, us, ue))
        return _Prepared(ztoc, fingerprint, plan, smap, data_starts, header_starts, data_end, spans,
                         bool(windowed), keys, born, meta, table, heap)

    def _derive(self, ztoc: ZtocView) -> _Prepared:
        """Check the span chain and the TOC; index them for landing.

        Raises:
            BadZtoc, UnsafeArchive: as :meth:`prepare_layer`.
        """
        n = ztoc.num_spans
        usize = ztoc.uncompressed_archive_size
        if n < 1:
            raise BadZtoc("zTOC has no spans")
        if n * 1 > max(usize, 1) + 1:
            raise BadZtoc(f"zTOC claims {n} spans for {usize} uncompressed bytes")
        spans: list[_Range] = []
        windowed = True
        known = _fingerprint_of(ztoc)
        fp = hashlib.sha256(f"{n} {usize} {len(ztoc.files)}".encode())
        for i in range(n):
            full = ztoc.span(i)
            s = _Range(full.compressed_start, full.compressed_end, full.uncompressed_start,
                       full.uncompressed_end)
            spans.append(s)
            windowed = windowed and full.checkpoint is not None
            fp.update(full.digest.encode())
            del full
            fp.update(f"|{s.compressed_start},{s.compressed_end},{s.uncompressed_start},"
                      f"{s.uncompressed_end}".encode())
            prev_c = spans[i - 1].compressed_end if i else s.compressed_start
            prev_u = spans[i - 1].uncompressed_end if i else 0
            if s.uncompressed_start != prev_u or s.uncompressed_end < s.uncompressed_start:
                raise BadZtoc(f"span {i} covers uncompressed [{s.uncompressed_start}, {s.uncompressed_end}) "
                              f"but the previous span ends at {prev_u}")
            if s.compressed_start not in (prev_c, prev_c - 1) or s.compressed_end <= s.compressed_start:
                raise BadZtoc(f"span {i} covers compressed [{s.compressed_start}, {s.compressed_end}) "
                              f"but the previous span ends at {prev_c}")
        if spans[-1].uncompressed_end != usize:
            raise BadZtoc(f"spans end at {spans[-1].uncompressed_end}, the archive at {usize}")
        files = ztoc.files
        for e in files if known is None else ():  # a skeleton made from another TOC must not be reused
            fp.update(f"{e.name}\0{e.type}\0{e.uncompressed_offset}\0{e.uncompressed_size}\0{e.linkname}\0"
                      f"{e.mode}\0{e.uid}\0{e.gid}\0{e.mod_time}\0{e.devmajor}\0{e.devminor}\0{e.xattrs}\n"
                      .encode("utf-8", "surrogateescape"))
        checker = check_archive(files, usize)
        plan = checker.plan
        smap = SpanMap(data_extents(files, plan))
        data_starts, header_starts = [], []
        pos = 0
        for e in files:
            if e.uncompressed_offset < pos + 512:
                raise BadZtoc(f"tar entry {e.name!r} at {e.uncompressed_offset} leaves no room for its header "
                              f"after the previous entry (ends at {pos})")
            header_starts.append(pos)
            data_starts.append(e.uncompressed_offset)
            pos = e.uncompressed_offset + _padded(_data_len(e))
        if pos > usize:
            raise BadZtoc(f"the last tar entry ends at {pos}, past the {usize}-byte archive")
        born = _born_at_landing(files, plan, checker.fresh, spans)
        meta = list(map(entry_meta, files))
        table, heap = b"", b""
        if landing.backend() is None:
            keys = b"".join(map(_entry_key, files))
        else:
            # C checks the headers of the rest; a zero key only means "decode it if asked"
            table, heap = landing.build_table(files, plan, born, meta, header_starts)
            need = set(landing.unchecked_entries(table))
            for r in spans[1:]:  # header chains across a span boundary are checked in Python
                k = _straddler(data_starts, header_starts, r.uncompressed_start)
                if k is not None:
                    need.add(k)
            keys = b"".join(_entry_key(e) if i in need else _NO_KEY for i, e in enumerate(files))
        return _Prepared(ztoc, known or fp.hexdigest(), plan, smap, data_starts, header_starts, pos, spans,
                         windowed, keys, born, meta, table, heap)

    # === landing a span

    def land_span(self, digest: str, ztoc: ZtocView, index: int, compressed: bytes | memoryview,
                  uncompressed: bytes | bytearray | memoryview) -> LandResult:
        """Write one verified span into the layer; commit the layer if it was the last one.

        ``compressed`` must already match the span digest and ``uncompressed`` be its
        inflated output (window chain checked by ``inflate_span``).  Landing the same span
        twice (a redelivered task) changes nothing and counts once.

        Raises:
            BadZtoc: the TOC disagrees with the tar headers in this span.
            BadSpan: the buffers do not have the span's sizes.
            DigestMismatch: all spans are in but the compressed bytes do not hash to
                ``digest``; the layer is wiped so a retry starts over.
            StoreError: the layer is not prepared, or was restarted meanwhile.
        """
        if self.is_ready(digest):
            return LandResult(True, False)
        prep = self._prepared.get(digest)
        if prep is None or prep.ztoc is not ztoc:
            self.prepare_layer(digest, ztoc)
            prep = self._prepared[digest]
        if not 0 <= index < len(prep.spans):
            raise BadSpan(f"span {index} does not exist in layer {digest} ({len(prep.spans)} spans)")
        span = prep.spans[index]
        if self.span_landed(digest, index):
            return LandResult(self.finish_if_complete(digest, ztoc), False)
        body = span.compressed_end - span.compressed_start
        base = span.compressed_start
        if index == 0 and len(compressed) == span.compressed_end:
            base = 0  # the layer's first bytes (gzip header) come with span 0
        elif index == 0 and span.compressed_start > 0 and len(compressed) == body:
            raise BadSpan(f"span 0 of layer {digest} must come with the layer's first {span.compressed_start} "
                          "bytes (the gzip header) so the layer digest can be verified: fetch "
                          "store.fetch_range(span)")
        elif len(compressed) != body:
            raise BadSpan(f"span {index} of layer {digest}: {len(compressed)} compressed bytes, "
                          f"{body} expected")
        out = memoryview(uncompressed)
        if len(out) != span.uncompressed_end - span.uncompressed_start:
            raise BadSpan(f"span {index} of layer {digest}: {len(out)} bytes inflated, "
                          f"{span.uncompressed_end - span.uncompressed_start} expected")
        self._check_headers(digest, prep, ztoc.span(index), out)
        with self._disk_errors(digest):
            self._write_pieces(digest, prep, span, out)
        with self._locked(digest), self._disk_errors(digest):
            if self.is_ready(digest):
                # another process landed the last span meanwhile and committed the layer
                return LandResult(True, False)
            state = self._state(digest)
            if state is None or state.get("fingerprint") != prep.fingerprint:
                self._prepared.pop(digest, None)
                raise StoreError(f"layer {digest} was removed or restarted while span {index} was landing; "
                                 "retry the span")
            work = self.layout.layer_work(digest)
            landed_fd = os.open(work / "landed", os.O_RDWR | os.O_CLOEXEC)
            try:
                landed = bytearray(os.pread(landed_fd, len(prep.spans), 0))
                if landed[index]:
                    return LandResult(self._finish_locked(digest, prep, landed), False)
                self._check_straddlers(digest, prep, index, out)
                self._hash_or_spool(digest, prep, index, compressed, base, landed)
                os.pwrite(landed_fd, b"\x01", index)
                landed[index] = 1
            finally:
                os.close(landed_fd)
            return LandResult(self._finish_locked(digest, prep, landed), True)

    def _check_headers(self, digest: str, prep: _Prepared, span: Span, out: memoryview) -> None:
        """Every TOC entry whose header chain ends in this span must be what the headers say.

        Raises:
            BadZtoc: naming the entry and the difference.
        """
        ustart, uend = span.uncompressed_start, span.uncompressed_end
        window: bytes | memoryview = span.checkpoint.window if span.checkpoint is not None else b""
        c = landing.backend()
        todo: Iterable[int]
        if c is not None and prep.table:
            todo = landing.check_headers(c, prep.table, prep.heap, out, ustart)
        else:
            todo = range(bisect.bisect_right(prep.data_starts, ustart), bisect.bisect_right(prep.data_starts, uend))
        for k in todo:
            h = prep.header_starts[k]
            d = prep.data_starts[k]
            if h >= ustart:
                buf: bytes | memoryview = out[: d - ustart]
                pos, base = h - ustart, ustart
            else:
                back = ustart - h
                if back > len(window):
                    continue  # checked with the previous span's tail: _check_straddlers
                buf = bytes(window[len(window) - back:]) + bytes(out[: d - ustart])
                pos, base = 0, h
            _check_keyed_chain(digest, prep, k, buf, pos, base)
        end = prep.archive_data_end
        if end < uend:
            tail = out[max(end - ustart, 0):]
            if tail.nbytes and bytes(tail) != bytes(tail.nbytes):
                raise BadZtoc(f"layer {digest}: the TOC ends at stream offset {end} but span {span.index} has "
                              "non-zero bytes after it (entries missing from the TOC)")

    def _check_straddlers(self, digest: str, prep: _Prepared, index: int, out: memoryview) -> None:
        """Header chains across a span boundary that no checkpoint window covers.

        (Uncompressed layers have no windows; a PAX chain may be longer than 32 KiB.)
        Whichever of the two spans lands second checks the chain: the first leaves its
        part in work/ (``tail-<i>`` or ``head-<i+1>``).  Called under the layer lock.

        Raises:
            BadZtoc: the chain does not match the TOC, or is longer than a span.
        """
        work = self.layout.layer_work(digest)
        r = prep.spans[index]
        if index > 0:
            k = _straddler(prep.data_starts, prep.header_starts, r.uncompressed_start)
            if k is not None and not _window_covers(prep, r.uncompressed_start, k):
                head = bytes(out[: prep.data_starts[k] - r.uncompressed_start])
                tail_path = work / f"tail-{index - 1}"
                if tail_path.exists():
                    buf = tail_path.read_bytes() + head
                    _check_chain(digest, prep.ztoc.files[k], prep.header_starts[k], buf, 0,
                                 prep.header_starts[k])
                else:
                    atomic_write(work / f"head-{index}", head, durable=False)
        if index + 1 < len(prep.spans):
            b = r.uncompressed_end
            k = _straddler(prep.data_starts, prep.header_starts, b)
            if k is not None and not _window_covers(prep, b, k):
                h = prep.header_starts[k]
                if h < r.uncompressed_start:
                    raise BadZtoc(f"layer {digest}: the header chain of tar entry {prep.ztoc.files[k].name!r} is "
                                  f"longer than span {index}; use a larger span size")
                tail = bytes(out[h - r.uncompressed_start:])
                head_path = work / f"head-{index + 1}"
                if head_path.exists():
                    _check_chain(digest, prep.ztoc.files[k], h, tail + head_path.read_bytes(), 0, h)
                else:
                    atomic_write(work / f"tail-{index}", tail, durable=False)

    def _write_pieces(self, digest: str, prep: _Prepared, span: _Range, out: memoryview) -> None:
        ustart = span.uncompressed_start
        files = prep.ztoc.files
        born = prep.born
        c = landing.backend()
        with LayerWriter(self.layout.layer_fs(digest)) as writer:

            def write(extent: int, file_offset: int, stream_offset: int, length: int) -> None:
                off = stream_offset - ustart
                if born[extent]:
                    writer.create_whole(prep.plan[extent].path, out[off:off + length], self._writer,
                                        prep.meta[extent])
                    return
                fd = writer.open_data(prep.plan[extent].path)
                try:
                    self._writer.pwrite(fd, out[off:off + length], file_offset)
                finally:
                    os.close(fd)

            extent = -1
            try:
                if c is not None and prep.table:
                    landing.write_pieces(c, prep.table, prep.heap, writer.root_fd, out, ustart, self._writer,
                                         prep.plan, write)
                else:
                    for p in prep.spanmap.pieces(ustart, span.uncompressed_end):
                        extent = p.extent
                        write(p.extent, p.file_offset, p.stream_offset, p.length)
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    name = files[extent].name if extent >= 0 else err.filename
                    raise InsufficientSpace(f"no space left in {self.root} writing {name!r} of layer "
                                            f"{digest}") from None
                raise

    def _load_hash(self, digest: str) -> tuple[int, int, ResumableSha256]:
        raw = (self.layout.layer_work(digest) / "hash").read_bytes()
        nxt, upto = _HASH_HEADER.unpack_from(raw)
        return nxt, upto, ResumableSha256.from_state(raw[_HASH_HEADER.size:])

    def _save_hash(self, digest: str, nxt: int, upto: int, h: ResumableSha256) -> None:
        """Overwrite work/hash in place (once per span, under the layer lock).

        Why not a temp file and a rename: the record has a fixed size and lies in the file's
        first page, so one ``pwrite`` replaces it whole or not at all for a killed process
        (a fatal signal stops a write only between pages); a power loss restarts the layer
        anyway (boot id).  A rename per span cost a file creation and a journal entry.
        """
        fd = os.open(self.layout.layer_work(digest) / "hash", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, _HASH_HEADER.pack(nxt, upto) + h.state(), 0)
        finally:
            os.close(fd)

    def _hash_or_spool(self, digest: str, prep: _Prepared, index: int, compressed: bytes | memoryview, base: int,
                       landed: bytearray) -> None:
        """Advance the in-order layer hash with this span (and spooled followers), or spool it."""
        nxt, upto, h = self._load_hash(digest)
        if index < nxt:
            return  # hashed before a crash that came before its landed byte was set
        spool = self.layout.layer_work(digest) / "spool"
        if index > nxt:
            fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.pwrite(fd, compressed, base)
            finally:
                os.close(fd)
            return
        # Neighbouring spans share a byte when the checkpoint has bits: hash it once.
        if base > upto:
            raise BadZtoc(f"layer {digest}: span {index} starts at compressed offset {base}, but the bytes "
                          f"before it end at {upto}; the layer digest cannot be verified")
        h.update(compressed, upto - base)
        upto = prep.spans[index].compressed_end
        nxt = index + 1
        if nxt < len(landed) and landed[nxt]:
            fd = os.open(spool, os.O_RDONLY | os.O_CLOEXEC)
            try:
                while nxt < len(landed) and landed[nxt]:
                    s = prep.spans[nxt]
                    data = os.pread(fd, s.compressed_end - upto, upto)
                    if len(data) != s.compressed_end - upto:
                        raise StoreError(f"layer {digest}: spool is short for span {nxt}; remove the layer "
                                         "and warm it again")
                    h.update(data)
                    upto, nxt = s.compressed_end, nxt + 1
            finally:
                os.close(fd)
        self._save_hash(digest, nxt, upto, h)
        if nxt < len(landed) and spool.exists():
            _punch_hole(spool, upto)

    def finish_if_complete(self, digest: str, ztoc: ZtocView) -> bool:
        """Commit the layer if every span is in (e.g. after a crash just before ``ready``).

        Raises:
            DigestMismatch: as :meth:`land_span`.
        """
        if self.is_ready(digest):
            return True
        prep = self._prepared.get(digest)
        if prep is None or prep.ztoc is not ztoc:
            self.prepare_layer(digest, ztoc)
            prep = self._prepared.get(digest)
            if prep is None:
                return self.is_ready(digest)
        with self._locked(digest):
            try:
                landed = bytearray((self.layout.layer_work(digest) / "landed").read_bytes())
            except FileNotFoundError:
                return self.is_ready(digest)
            return self._finish_locked(digest, prep, landed)

    def _finish_locked(self, digest: str, prep: _Prepared, landed: bytearray) -> bool:
        if self.is_ready(digest):
            return True
        if not all(landed):
            return False
        nxt, upto, h = self._load_hash(digest)
        if nxt != len(prep.spans):
            return False
        actual = "sha256:" + h.hexdigest()
        if actual != digest:
            self._wipe(digest)
            self._prepared.pop(digest, None)
            raise DigestMismatch(f"layer {digest}: its {upto} compressed bytes hash to {actual}; the layer "
                                 "was discarded and will be fetched again", expected=digest, actual=actual)
        state = self._state(digest) or {}
        fs = self.layout.layer_fs(digest)
        with LayerWriter(fs) as writer:
            writer.apply_metadata(prep.plan, prep.meta, done=prep.born)
            _syncfs(writer.root_fd)
        self._commit(digest, {"digest": digest, "diff_id": state.get("diff_id"), "mode": "spans",
                              "size": upto, "uncompressed_size": prep.ztoc.uncompressed_archive_size,
                              "files": len(prep.ztoc.files), "spans": len(prep.spans)})
        self._prepared.pop(digest, None)
        return True

    def _commit(self, digest: str, info: dict[str, Any]) -> None:
        info = {**info, "boot_id": self._boot_id, "completed_at": time.time()}
        atomic_write(self.layout.layer_ready(digest), json.dumps(info, sort_keys=True).encode(), durable=True)
        shutil.rmtree(self.layout.layer_work(digest), ignore_errors=True)

    # === the whole-layer path

    def ingest_stream(self, digest: str, chunks: Iterable[bytes], *, media_type: str,
                      diff_id: str | None) -> None:
        """Stream a whole layer blob into the store (no zTOC), verified twice.

        The compressed bytes must hash to ``digest`` and the tar stream to ``diff_id``
        (when given); memory stays bounded whatever the layer size.

        Raises:
            DigestMismatch: either hash differs (the layer is discarded).
            BadTarHeader, UnsafeArchive: the tar stream is broken or hostile (discarded).
            StoreError: unknown media type.
        """
        parse_digest(digest)
        compression = _compression_of(media_type)
        with self._locked(digest):
            if self.is_ready(digest):
                return
            self._wipe(digest)
            fs = self.layout.layer_fs(digest)
            fs.mkdir(parents=True, mode=0o755)
            try:
                with self._disk_errors(digest):
                    info = self._ingest_locked(digest, fs, chunks, compression, diff_id)
                self._commit(digest, info)
            except BaseException:
                self._wipe(digest)
                raise

    def _ingest_locked(self, digest: str, fs: Path, chunks: Iterable[bytes], compression: str,
                       diff_id: str | None) -> dict[str, Any]:
        raw = _HashingReader(chunks, hashlib.new(parse_digest(digest)[0]))
        reader: io.RawIOBase | io.BufferedIOBase
        if compression == "gzip":
            from isal import igzip

            reader = igzip.IGzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
        elif compression == "zstd":
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[assignment,arg-type]
        else:
            reader = raw
        tar_hash = hashlib.new(parse_digest(diff_id)[0]) if diff_id else None
        indexer = TarIndexer()
        entries: list[FileEntry] = []
        checker = EntryChecker()
        offset = 0
        current: tuple[int, int, int] | None = None  # fd, data start, data end
        with LayerWriter(fs) as writer:
            try:
                while True:
                    chunk = reader.read(STREAM_READ)
                    if not chunk:
                        break
                    if tar_hash is not None:
                        tar_hash.update(chunk)
                    new = indexer.feed(chunk)
                    mv = memoryview(chunk)
                    end = offset + len(chunk)
                    current = _write_from(self._writer, mv, offset, end, current)
                    for e in new:
                        planned = checker.check(e)
                        writer.create(e, planned)
                        entries.append(e)
                        if planned.kind == "reg" and e.uncompressed_size:
                            if current is not None:
                                os.close(current[0])
                            fd = writer.open_data(planned.path)
                            current = _write_from(self._writer, mv, offset, end, (fd, e.uncompressed_offset,
                                                                      e.uncompressed_offset + e.uncompressed_size))
                    offset = end
                indexer.finish()
                if current is not None:
                    raise CorruptContent(f"layer {digest}: the tar stream ends inside a file's data")
            except Exception as err:
                if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise _blame(digest, raw, err) from err
            finally:
                if current is not None:
                    os.close(current[0])
            raw.drain()
            actual = f"{raw.hash.name}:{raw.hash.hexdigest()}"
            if actual != digest:
                raise DigestMismatch(f"layer {digest}: the blob ({raw.size} bytes) hashes to {actual}",
                                     expected=digest, actual=actual)
            if tar_hash is not None and diff_id is not None:
                got = f"{tar_hash.name}:{tar_hash.hexdigest()}"
                if got != diff_id:
                    raise DigestMismatch(f"layer {digest}: its tar stream hashes to {got}, the image config "
                                         f"says diff_id {diff_id}", expected=diff_id, actual=got)
            writer.apply_metadata(checker.plan, list(map(entry_meta, entries)))
            _syncfs(writer.root_fd)
        return {"digest": digest, "diff_id": diff_id, "mode": "whole", "size": raw.size,
                "uncompressed_size": offset, "files": len(entries)}


def _blame(digest: str, raw: _HashingReader, err: Exception) -> Exception:
    """What a failure in the middle of a streamed layer means.

    A decompressor or tar error is most often the blob corrupted in transit: drain the rest
    and hash it.  If the blob does not match its digest, that is the error (DigestMismatch,
    which the worker retries); if it does, the layer itself is broken (never retried).
    """
    if raw.source_error is not None:
        # The registry stream itself failed (429, unavailable, ...): that is the error, with
        # its own retry policy; the bytes that did arrive prove nothing.
        failed = raw.source_error
        return failed if isinstance(failed, PrewarmError) else CorruptContent(f"layer {digest}: {failed}")
    try:
        raw.drain()
    except DigestMismatch as mismatch:  # the registry client's own end-of-stream check
        return mismatch
    except Exception:  # noqa: BLE001 - the stream itself failed; the first error is the story
        return err if isinstance(err, PrewarmError) else CorruptContent(f"layer {digest}: {err}")
    actual = f"{raw.hash.name}:{raw.hash.hexdigest()}"
    if actual != digest:
        return DigestMismatch(f"layer {digest}: the blob ({raw.size} bytes) hashes to {actual} "
                              f"({type(err).__name__}: {err})", expected=digest, actual=actual)
    return err if isinstance(err, PrewarmError) else CorruptContent(f"layer {digest}: {err}")


def _write_from(writer: DirectWriter, mv: memoryview, start: int, end: int,
                current: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    """pwrite the part of ``mv`` (stream [start, end)) that is the current file's data."""
    if current is None:
        return None
    fd, dstart, dend = current
    lo, hi = max(start, dstart), min(end, dend)
    if lo < hi:
        writer.pwrite(fd, mv[lo - start:hi - start], lo - dstart)
    if dend <= end:
        os.close(fd)
        return None
    return current


class _HashingReader(io.RawIOBase):
    """A file-like view of an iterable of chunks that hashes what passes through."""

    def __init__(self, chunks: Iterable[bytes], h: hashlib._Hash) -> None:
        self._it = iter(chunks)
        self._buf = memoryview(b"")
        self.hash = h
        self.size = 0
        #: What the chunk source raised, if it failed (not the decompressor or tar parser).
        self.source_error: Exception | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                chunk = next(self._it, None)
            except Exception as err:
                self.source_error = err
                raise
            if chunk is None:
                return 0
            self.hash.update(chunk)
            self.size += len(chunk)
            self._buf = memoryview(chunk).cast("B")
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def drain(self) -> None:
        """Hash whatever the decompressor did not read (trailing bytes still count)."""
        self._buf = memoryview(b"")
        for chunk in self._it:
            self.hash.update(chunk)
            self.size += len(chunk)


def _compression_of(media_type: str) -> str:
    """gzip / zstd / none from an OCI or Docker layer media type.

    Raises:
        StoreError: a media type that is not a tar layer.
    """
    mt = media_type.lower()
    if "zstd" in mt:
        return "zstd"
    if "gzip" in mt:
        return "gzip"
    if mt.endswith("tar") or "rootfs.diff.tar" in mt:
        return "none"
    raise StoreError(f"layer media type {media_type!r} is not a tar layer (gzip, zstd or plain tar)")


def _born_at_landing(files: Sequence[FileEntry], plan: Sequence[Planned], fresh: Sequence[bool],
                     spans: Sequence[_Range]) -> bytes:
    """Which regular files are created whole by the span that holds all their data.

    Only files that replace nothing, are no hard link's target (the link is made in the
    skeleton, before any span lands) and lie inside one span; the rest are pre-sized in
    the skeleton and written piece by piece.
    """
    targets = {"/".join(split_name(e.linkname)) for e, p in zip(files, plan) if p.kind == "hardlink"}
    starts = [s.uncompressed_start for s in spans]
    born = bytearray(len(files))
    for i, (e, p) in enumerate(zip(files, plan)):
        size = e.uncompressed_size
        if p.kind == "reg" and p.final and size > 0 and fresh[i] and p.path not in targets:
            d = e.uncompressed_offset
            if bisect.bisect_right(starts, d) == bisect.bisect_right(starts, d + size - 1):
                born[i] = 1
    return bytes(born)


def _straddler(data_starts: Sequence[int], header_starts: Sequence[int], boundary: int) -> int | None:
    """The entry whose header chain crosses stream offset ``boundary``, if any."""
    k = bisect.bisect_right(data_starts, boundary)
    if k < len(data_starts) and header_starts[k] < boundary:
        return k
    return None


def _window_covers(prep: _Prepared, boundary: int, k: int) -> bool:
    """Whether the checkpoint window at ``boundary`` holds the start of entry k's header chain."""
    return prep.windowed and boundary - prep.header_starts[k] <= WINDOW_SIZE


def _entry_key(e: FileEntry) -> bytes:
    """A digest of every field :func:`_compare_entry` compares (mtime as parsed).

    Why: a process landing a span compares the real tar headers with these keys, kept in
    the layer's plan, instead of decoding the TOC entries from the zTOC (the larger part
    of the cost of checking headers).  16 bytes of BLAKE2b: equal keys mean equal fields.

    Raises:
        BadZtoc: the entry's modification time is not an RFC 3339 time.
    """
    fields = (e.name, e.type, e.uncompressed_offset, e.uncompressed_size, e.linkname, e.mode, e.uid, e.gid,
              e.devmajor, e.devminor, tuple(map(tuple, e.xattrs)), parse_mod_time(e.mod_time))
    return hashlib.blake2b(repr(fields).encode("utf-8", "surrogateescape"), digest_size=_KEY_SIZE).digest()


def _check_keyed_chain(digest: str, prep: _Prepared, k: int, buf: bytes | memoryview, pos: int,
                       base: int) -> None:
    """:func:`_check_chain` for TOC entry ``k``, decoding the entry only when its key differs.

    Raises:
        BadZtoc: no valid chain there, or it says something else than the TOC.
    """
    try:
        real, _ = parse_header_run(buf, pos, base)
    except CorruptContent as err:
        raise BadZtoc(f"layer {digest}: no tar header where the TOC puts entry {prep.ztoc.files[k].name!r} "
                      f"(stream offset {prep.header_starts[k]}): {err}") from None
    try:
        same = _entry_key(real) == prep.keys[_KEY_SIZE * k:_KEY_SIZE * (k + 1)]
    except BadZtoc:
        same = False
    if not same:
        _compare_entry(digest, prep.ztoc.files[k], real)  # names the field that differs


def _check_chain(digest: str, entry: FileEntry, h: int, buf: bytes | memoryview, pos: int, base: int) -> None:
    """Parse the real header chain at ``buf[pos:]`` (stream offset ``h``) and compare it with the TOC.

    Raises:
        BadZtoc: no valid chain there, or it says something else than the TOC.
    """
    try:
        real, _ = parse_header_run(buf, pos, base)
    except CorruptContent as err:
        raise BadZtoc(f"layer {digest}: no tar header where the TOC puts entry {entry.name!r} "
                      f"(stream offset {h}): {err}") from None
    _compare_entry(digest, entry, real)


def _compare_entry(digest: str, toc: FileEntry, real: FileEntry) -> None:
    """The TOC entry must say what the tar header says (fields the tree depends on).

    Raises:
        BadZtoc: naming the entry and the first field that differs.
    """
    for field in ("name", "type", "uncompressed_offset", "uncompressed_size", "linkname", "mode", "uid",
                  "gid", "devmajor", "devminor", "xattrs"):
        a, b = getattr(toc, field), getattr(real, field)
        if a != b:
            raise BadZtoc(f"layer {digest}: the TOC says {field}={a!r} for tar entry {toc.name!r}, "
                          f"the tar header says {b!r}")
    if toc.mod_time != real.mod_time and parse_mod_time(toc.mod_time) != parse_mod_time(real.mod_time):
        raise BadZtoc(f"layer {digest}: the TOC says mod_time={toc.mod_time!r} for tar entry {toc.name!r}, "
                      f"the tar header says {real.mod_time!r}")


@contextlib.contextmanager
def _long_lived() -> Iterator[None]:
    """Build a layer's plan (objects for each of up to 100,000 entries) out of the GC's sight.

    Why: the cyclic GC ran every 700 allocations while they were built, and every full
    collection afterwards walked them all again: 5% of a cold pre-warm's CPU (perf).  They
    hold no reference cycles, so they are built with the GC off, and then, after one
    collection (which frees what was garbage, so nothing cyclic is kept for good), moved
    to the permanent generation (``gc.freeze``); reference counting still frees them.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        gc.freeze()
        if was_enabled:
            gc.enable()


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    """syncfs(2) on the filesystem of ``fd`` (os.syncfs needs Python 3.12).

    Raises:
        StoreError: the filesystem reported a write-back error (the layer is not committed).
    """
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise StoreError(f"syncfs failed: {os.strerror(err)}; the layer was not committed")


def _punch_hole(path: Path, upto: int) -> None:
    """Give back the spool's already-hashed prefix (best effort; the spool is removed at the end)."""
    libc = _libc
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, ctypes.c_int64(0), ctypes.c_int64(upto))
    finally:
        os.close(fd)
