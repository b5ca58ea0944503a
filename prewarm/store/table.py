"""A layer's landing table: its zTOC checked once and indexed for landing spans.

Why a table: every span a worker lands needs the same facts about its layer (where each
entry's header chain and data lie, which spans hold them, what each entry becomes in the
layer dir, a key of its header, its metadata).  Deriving them means checking the whole
TOC, up to 100,000 entries; the process that prepares the layer does it once
(:meth:`LandingTable.derive`) and saves the table in the layer's ``work/``
(:meth:`LandingTable.save`), and the node's other worker processes load it
(:meth:`LandingTable.load`) instead of decoding a single TOC entry.

The C records of :mod:`prewarm.store.landing` (one per entry plus a heap of names) are
two of its columns.  A saved table is as trusted as the rest of ``work/``, which only the
store writes; one that does not fit the zTOC it is loaded for (another format, other
counts, unreadable) is ignored and derived again.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import marshal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from prewarm.errors import BadZtoc
from prewarm.index.ztoc import WINDOW_SIZE, FileEntry, Span
from prewarm.store import landing
from prewarm.store.atomic import atomic_write
from prewarm.store.layerfs import (
    Meta,
    Placement,
    check_archive,
    data_extents,
    entry_meta,
    parse_mod_time,
    split_name,
)
from prewarm.store.spanmap import SpanMap

#: Version of a saved table; another version is ignored and the table derived again.
FORMAT = 5  # 5: metadata without trusted.* / user.overlay.* xattrs; superseded hard-link targets
#: Bytes of an entry key (see :func:`entry_key`).
KEY_SIZE = 16
#: The key of an entry whose header C checks (never a BLAKE2b digest in practice).
_NO_KEY = bytes(KEY_SIZE)
_HEADER_ONLY = frozenset(("dir", "symlink", "hardlink", "char", "block", "fifo"))


class ZtocView(Protocol):
    """What the store reads from a zTOC (:class:`prewarm.index.ztoc.Ztoc` provides it)."""

    @property
    def files(self) -> Sequence[FileEntry]: ...

    @property
    def num_spans(self) -> int: ...

    @property
    def uncompressed_archive_size(self) -> int: ...

    def span(self, index: int) -> Span: ...


@dataclasses.dataclass(frozen=True, slots=True)
class SpanRange:
    """A span's byte ranges without its window (2,500 windows would be 80 MB)."""

    compressed_start: int
    compressed_end: int
    uncompressed_start: int
    uncompressed_end: int


@dataclasses.dataclass
class LandingTable:
    """Per-layer facts derived from its zTOC once per node (cheap repeated span calls)."""

    ztoc: ZtocView
    fingerprint: str
    placements: Sequence[Placement]
    spanmap: SpanMap
    data_starts: list[int]      # entry i's data offset (sorted)
    header_starts: list[int]    # where entry i's header chain starts
    archive_data_end: int       # padded end of the last entry: zeros from here on
    spans: list[SpanRange]
    windowed: bool              # spans carry checkpoint windows (gzip)
    keys: bytes                 # entry i's entry_key at [16 i, 16 i + 16) (zeros: C checks it)
    born: bytes                 # born[i]: file i is created whole when its span lands
    meta: list[Meta]            # entry i's metadata (layerfs.entry_meta): no entry decoded to apply it
    records: bytes              # the C records (prewarm.store.landing): b"" with the Python reference
    heap: bytes

    @classmethod
    def derive(cls, ztoc: ZtocView) -> LandingTable:
        """Check the span chain and the TOC; index them for landing.

        Raises:
            BadZtoc: the span chain or the TOC cannot describe a layer.
            UnsafeArchive: an entry would write outside the layer.
        """
        n = ztoc.num_spans
        usize = ztoc.uncompressed_archive_size
        if n < 1:
            raise BadZtoc("zTOC has no spans")
        if n * 1 > max(usize, 1) + 1:
            raise BadZtoc(f"zTOC claims {n} spans for {usize} uncompressed bytes")
        spans: list[SpanRange] = []
        windowed = True
        known = fingerprint_of(ztoc)
        fp = hashlib.sha256(f"{n} {usize} {len(ztoc.files)}".encode())
        for i in range(n):
            full = ztoc.span(i)
            s = SpanRange(full.compressed_start, full.compressed_end, full.uncompressed_start,
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
        placements = checker.placements
        smap = SpanMap(data_extents(files, placements))
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
        born = _born_at_landing(files, placements, checker.fresh, spans)
        meta = list(map(entry_meta, files))
        records, heap = b"", b""
        if landing.backend() is None:
            keys = b"".join(map(entry_key, files))
        else:
            # C checks the headers of the rest; a zero key only means "decode it if asked"
            records, heap = landing.build_table(files, placements, born, meta, header_starts)
            need = set(landing.unchecked_entries(records))
            for r in spans[1:]:  # header chains across a span boundary are checked in Python
                k = _straddler(data_starts, header_starts, r.uncompressed_start)
                if k is not None:
                    need.add(k)
            keys = b"".join(entry_key(e) if i in need else _NO_KEY for i, e in enumerate(files))
        return cls(ztoc, known or fp.hexdigest(), placements, smap, data_starts, header_starts, pos, spans,
                   windowed, keys, born, meta, records, heap)

    def save(self, path: Path) -> None:
        """Persist the table at ``path``, so the node's other processes skip :meth:`derive`.

        The caller writes it before the layer's state.json (or under the layer lock when
        state.json is already there).
        """
        data = marshal.dumps((
            FORMAT, self.fingerprint, *_columns(self.placements),
            *self.spanmap.arrays(), self.data_starts, self.header_starts, self.archive_data_end,
            [r.compressed_start for r in self.spans], [r.compressed_end for r in self.spans],
            [r.uncompressed_start for r in self.spans], [r.uncompressed_end for r in self.spans],
            self.windowed, self.keys, self.born, self.meta, self.records, self.heap,
        ))
        atomic_write(path, data, durable=False)

    @classmethod
    def load(cls, path: Path, ztoc: ZtocView, fingerprint: str) -> LandingTable | None:
        """The table saved at ``path`` for this zTOC, or None (then :meth:`derive` it).

        A table that does not fit the zTOC (other counts, another format or backend,
        unreadable) is ignored, never trusted.
        """
        try:
            raw = path.read_bytes()
            (fmt, fp, kinds, paths, finals, made_at, m_starts, m_ends, m_ids, data_starts, header_starts,
             data_end, cs, ce, us, ue, windowed, keys, born, meta, records, heap) = marshal.loads(raw)
            n, nspans = len(ztoc.files), ztoc.num_spans
            if (fmt != FORMAT or fp != fingerprint
                    or not len(kinds) == len(paths) == len(finals) == len(data_starts) == len(header_starts) == n
                    or not len(cs) == len(ce) == len(us) == len(ue) == nspans
                    or not isinstance(keys, bytes) or len(keys) != KEY_SIZE * n
                    or not isinstance(born, bytes) or len(born) != n
                    or not isinstance(meta, list) or len(meta) != n
                    or not isinstance(records, bytes) or len(records) not in (0, landing.RECORD.size * n)
                    or not isinstance(heap, bytes) or bool(records) != (landing.backend() is not None)):
                return None
            smap = SpanMap.from_arrays(m_starts, m_ends, m_ids)
        except (OSError, ValueError, EOFError, TypeError, BadZtoc):
            return None
        if not all(isinstance(x, list) for x in (kinds, paths, finals)) or not isinstance(made_at, dict):
            return None
        placements = _PlacementColumns(kinds, paths, finals, made_at)
        spans = list(map(SpanRange, cs, ce, us, ue))
        return cls(ztoc, fingerprint, placements, smap, data_starts, header_starts, data_end, spans,
                   bool(windowed), keys, born, meta, records, heap)

    def key(self, k: int) -> bytes:
        """Entry ``k``'s :func:`entry_key` (zeros when C checks its header)."""
        return self.keys[KEY_SIZE * k:KEY_SIZE * (k + 1)]

    def straddler(self, boundary: int) -> int | None:
        """The entry whose header chain crosses stream offset ``boundary``, if any."""
        return _straddler(self.data_starts, self.header_starts, boundary)

    def window_covers(self, boundary: int, k: int) -> bool:
        """Whether the checkpoint window at ``boundary`` holds the start of entry k's header chain."""
        return self.windowed and boundary - self.header_starts[k] <= WINDOW_SIZE


class _PlacementColumns(Sequence[Placement]):
    """Saved placements as three columns; entry i's :class:`Placement` is made when asked for.

    Why: every worker process loads each layer's table, and making 50,000 objects of
    which C landing reads none (it asks only for a piece it hands back, or an entry to
    name in an error) was most of a load's 0.16 s.
    """

    __slots__ = ("finals", "kinds", "made_at", "paths")

    def __init__(self, kinds: list[str], paths: list[str], finals: list[bool], made_at: dict[int, str]) -> None:
        self.kinds, self.paths, self.finals, self.made_at = kinds, paths, finals, made_at

    def __len__(self) -> int:
        return len(self.kinds)

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self.kinds)))]
        if i < 0:
            i += len(self.kinds)
        return Placement(self.kinds[i], self.paths[i], self.finals[i], self.made_at.get(i, ""))

    def __iter__(self) -> Iterator[Placement]:
        if self.made_at:
            return (self[i] for i in range(len(self.kinds)))
        return map(Placement, self.kinds, self.paths, self.finals)


def _columns(placements: Sequence[Placement]) -> tuple[list[str], list[str], list[bool], dict[int, str]]:
    """The placements as columns; ``made_at`` (rare: hard-linked nodes whose path was replaced) sparse."""
    if isinstance(placements, _PlacementColumns):
        return placements.kinds, placements.paths, placements.finals, placements.made_at
    return ([p.kind for p in placements], [p.path for p in placements], [p.final for p in placements],
            {i: p.made_at for i, p in enumerate(placements) if p.made_at})


def fingerprint_of(ztoc: ZtocView) -> str | None:
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


def entry_key(e: FileEntry) -> bytes:
    """A digest of every field the span checks compare (mtime as parsed).

    Why: a process landing a span compares the real tar headers with these keys, kept in
    the layer's table, instead of decoding the TOC entries from the zTOC (the larger part
    of the cost of checking headers).  16 bytes of BLAKE2b: equal keys mean equal fields.

    Raises:
        BadZtoc: the entry's modification time is not an RFC 3339 time.
    """
    fields = (e.name, e.type, e.uncompressed_offset, e.uncompressed_size, e.linkname, e.mode, e.uid, e.gid,
              e.devmajor, e.devminor, tuple(map(tuple, e.xattrs)), parse_mod_time(e.mod_time))
    return hashlib.blake2b(repr(fields).encode("utf-8", "surrogateescape"), digest_size=KEY_SIZE).digest()


def _born_at_landing(files: Sequence[FileEntry], placements: Sequence[Placement], fresh: Sequence[bool],
                     spans: Sequence[SpanRange]) -> bytes:
    """Which regular files are created whole by the span that holds all their data.

    Only files that replace nothing, are no hard link's target (the link is made in the
    skeleton, before any span lands) and lie inside one span; the rest are pre-sized in
    the skeleton and written piece by piece.
    """
    targets = {"/".join(split_name(e.linkname)) for e, p in zip(files, placements) if p.kind == "hardlink"}
    starts = [s.uncompressed_start for s in spans]
    born = bytearray(len(files))
    for i, (e, p) in enumerate(zip(files, placements)):
        size = e.uncompressed_size
        if p.kind == "reg" and p.final and size > 0 and fresh[i] and p.created_at not in targets:
            d = e.uncompressed_offset
            if bisect.bisect_right(starts, d) == bisect.bisect_right(starts, d + size - 1):
                born[i] = 1
    return bytes(born)


def _straddler(data_starts: Sequence[int], header_starts: Sequence[int], boundary: int) -> int | None:
    k = bisect.bisect_right(data_starts, boundary)
    if k < len(data_starts) and header_starts[k] < boundary:
        return k
    return None


def _padded(n: int) -> int:
    return n + (-n & 511)


def _data_len(e: FileEntry) -> int:
    return 0 if e.type in _HEADER_ONLY else e.uncompressed_size
