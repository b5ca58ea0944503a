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

import abc
import array
import bisect
import contextlib
import dataclasses
import functools
import hashlib
import marshal
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import BinaryIO, NamedTuple, Protocol, TypeVar

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
FORMAT = 6  # 6: one flat file of columns, mapped by the processes that load it
#: Bytes of an entry key (see :func:`entry_key`).
KEY_SIZE = 16
#: The key of an entry whose header C checks (never a BLAKE2b digest in practice).
_NO_KEY = bytes(KEY_SIZE)
_HEADER_ONLY = frozenset(("dir", "symlink", "hardlink", "char", "block", "fifo"))

_T = TypeVar("_T")


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


class LandingTable:
    """Per-layer facts derived from its zTOC once per node (cheap repeated span calls).

    Every column is a view of one flat buffer (see :func:`_encode`): a table derived here
    holds it in memory or maps the unnamed file it was built in (derive's ``spill``), one
    loaded from ``work/`` maps the saved file.  Why: a worker
    process landing a few spans of a layer of a million files touches only those spans'
    records, so its memory does not grow with the file count (a table of Python objects
    was ~1 KB per entry in every process).
    """

    __slots__ = (
        "_buf",
        "_smap",
        "archive_data_end",
        "born",
        "data_starts",
        "finals",
        "fingerprint",
        "header_starts",
        "heap",
        "keys",
        "kinds",
        "made_at",
        "meta",
        "placements",
        "records",
        "spans",
        "windowed",
        "ztoc",
    )

    def __init__(self, ztoc: ZtocView, buf: bytearray | mmap.mmap, fingerprint: str | None = None) -> None:
        """The table in ``buf`` (what :meth:`derive` encodes or :meth:`save` wrote) for ``ztoc``.

        Raises:
            _Unfit: ``buf`` is not a table of this format for this zTOC (and ``fingerprint``).
        """
        head, sections = _parse(buf)
        fp = head.fingerprint.decode("ascii", "replace")
        n, nspans = len(ztoc.files), ztoc.num_spans
        if fingerprint is not None and fp != fingerprint:
            raise _Unfit("another zTOC's table")
        if head.n != n or head.nspans != nspans:
            raise _Unfit(f"a table of {head.n} entries and {head.nspans} spans, the zTOC has {n} and {nspans}")
        if landing.backend() is None and not head.flags & _ALL_KEYS:
            raise _Unfit("keys for the C landing only")
        mv = memoryview(buf)
        col = {name: mv[a:b] for name, (a, b) in sections.items()}
        try:
            made_at, xattrs, override = marshal.loads(col["extras"])
        except (ValueError, EOFError, TypeError) as err:
            raise _Unfit(f"extras: {err}") from None
        if not all(isinstance(d, dict) for d in (made_at, xattrs, override)):
            raise _Unfit("extras are not three maps")
        if bytes(col["kinds"]).translate(None, _KIND_CODES):
            raise _Unfit("an unknown placement kind")
        self._buf = buf
        self.ztoc = ztoc
        self.fingerprint = fp
        self.windowed = bool(head.flags & _WINDOWED)
        self.archive_data_end: int = head.data_end
        self.records, self.heap, self.keys = col["records"], col["heap"], col["keys"]
        self.born, self.kinds, self.finals = col["born"], col["kinds"], col["finals"]
        fields = self.records.cast("q")
        self.data_starts: Sequence[int] = fields[0::_QS_PER_RECORD]
        self.header_starts: Sequence[int] = fields[1::_QS_PER_RECORD]
        s = col["spans"].cast("q")
        self.spans = list(map(SpanRange, s[0::4], s[1::4], s[2::4], s[3::4]))
        #: The entries whose node is made at another path than their own (``Placement.made_at``).
        self.made_at: dict[int, str] = made_at
        self.placements: Sequence[Placement] = _Placements(self, made_at)
        self.meta: Sequence[Meta] = _Metas(self, xattrs, override)
        self._smap: SpanMap | None = None

    @classmethod
    def derive(cls, ztoc: ZtocView, spill: Path | None = None) -> LandingTable:
        """Check the span chain and the TOC; index them for landing.

        With ``spill`` (a folder), the table is built in an unnamed file there and mapped,
        not in memory.

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
        if known is not None:
            fast = _derive_in_c(ztoc, known, spans, windowed, spill)
            if fast is not None:
                return cls(ztoc, fast)
        files = ztoc.files
        for e in files if known is None else ():  # a skeleton made from another TOC must not be reused
            fp.update(f"{e.name}\0{e.type}\0{e.uncompressed_offset}\0{e.uncompressed_size}\0{e.linkname}\0"
                      f"{e.mode}\0{e.uid}\0{e.gid}\0{e.mod_time}\0{e.devmajor}\0{e.devminor}\0{e.xattrs}\n"
                      .encode("utf-8", "surrogateescape"))
        checker = check_archive(files, usize)
        placements, fresh = checker.placements, checker.fresh
        del checker  # its maps of every path: ~70 B per entry not needed from here on
        smap = SpanMap(data_extents(files, placements))
        header_starts = []
        pos = 0
        for e in files:
            if e.uncompressed_offset < pos + 512:
                raise BadZtoc(f"tar entry {e.name!r} at {e.uncompressed_offset} leaves no room for its header "
                              f"after the previous entry (ends at {pos})")
            header_starts.append(pos)
            pos = e.uncompressed_offset + _padded(_data_len(e))
        if pos > usize:
            raise BadZtoc(f"the last tar entry ends at {pos}, past the {usize}-byte archive")
        born = _born_at_landing(files, placements, fresh, spans)
        meta = list(map(entry_meta, files))
        records, heap = landing.build_table(files, placements, born, meta, header_starts)
        all_keys = landing.backend() is None
        if all_keys:
            keys = b"".join(map(entry_key, files))
        else:
            # C checks the headers of the rest; a zero key only means "decode it if asked"
            need = set(landing.unchecked_entries(records))
            data_starts = memoryview(records).cast("q")[0::_QS_PER_RECORD]
            for r in spans[1:]:  # header chains across a span boundary are checked in Python
                k = _straddler(data_starts, header_starts, r.uncompressed_start)
                if k is not None:
                    need.add(k)
            keys = b"".join(entry_key(e) if i in need else _NO_KEY for i, e in enumerate(files))
        extras = ({i: p.made_at for i, p in enumerate(placements) if p.made_at},
                  {i: m[4] for i, m in enumerate(meta) if m[4]},
                  {i: meta[i] for i in _unset(records[RECORD_FLAGS::landing.RECORD.size], landing.F_PLAIN)})
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(tempfile.TemporaryFile(dir=spill)) if spill is not None else None
            buf = _encode(known or fp.hexdigest(), (_WINDOWED if windowed else 0) | (_ALL_KEYS if all_keys else 0),
                          pos, spans, records, heap, keys, born, smap.arrays(),
                          bytes(KIND_CODE[p.kind] for p in placements), bytes(p.final for p in placements),
                          marshal.dumps(extras), out)
        table = cls(ztoc, buf)
        table.placements = placements  # (objects already: the skeleton that comes next reads them all)
        return table

    @property
    def spanmap(self) -> SpanMap:
        """The data extents by stream offset (the Python landing's; C reads the records)."""
        if self._smap is None:
            self._smap = SpanMap.from_arrays(*_smap_arrays(self._buf))
        return self._smap

    def save(self, path: Path) -> None:
        """Persist the table at ``path``, so the node's other processes skip :meth:`derive`.

        The caller writes it before the layer's state.json (or under the layer lock when
        state.json is already there).
        """
        atomic_write(path, memoryview(self._buf), durable=False)

    @classmethod
    def load(cls, path: Path, ztoc: ZtocView, fingerprint: str) -> LandingTable | None:
        """The table saved at ``path`` for this zTOC, mapped (not read), or None (then :meth:`derive` it).

        A table that does not fit the zTOC (other counts, another format or backend,
        unreadable) is ignored, never trusted.
        """
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size < _HEAD.size:
                    return None
                buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        except (OSError, ValueError):
            return None
        try:
            return cls(ztoc, buf, fingerprint)
        except _Unfit:
            return None

    @property
    def data_size(self) -> int:
        """Bytes of file data the finished layer holds (what its files take on disk, before blocks)."""
        starts, ends, _ = _smap_arrays(self._buf)
        return sum(ends) - sum(starts)

    def node_entry(self, k: int) -> FileEntry:
        """Entry ``k`` as far as creating its node needs (name, type, size, link, devices, owner, mode).

        Why: the skeleton creates every node not born with its span (directories, empty
        files, links); decoding each of them from the zTOC cost ~400 B a piece, the record
        has them.  Without its mtime and xattrs (metadata comes from :attr:`meta`); an entry
        whose numbers its record cannot hold (no ``F_PLAIN``) is decoded from the zTOC.
        """
        r = landing.RECORD.unpack_from(self.records, landing.RECORD.size * k)
        if not r[16] & landing.F_PLAIN or r[15] not in _TYPE_OF_FLAG:
            return self.ztoc.files[k]
        heap = self.heap
        return FileEntry(bytes(heap[r[9]:r[9] + r[10]]).decode("utf-8", "surrogateescape"), _TYPE_OF_FLAG[r[15]], r[0],
                         r[2], bytes(heap[r[11]:r[11] + r[12]]).decode("utf-8", "surrogateescape"), r[3], r[7], r[8],
                         devmajor=r[4], devminor=r[5])

    def name(self, k: int) -> str:
        """Entry ``k``'s tar name, from its record (to name it in an error without decoding the TOC)."""
        off, size = _NAME_AT.unpack_from(self.records, landing.RECORD.size * k)
        return bytes(self.heap[off:off + size]).decode("utf-8", "surrogateescape")

    def key(self, k: int) -> bytes:
        """Entry ``k``'s :func:`entry_key` (zeros when C checks its header)."""
        return bytes(self.keys[KEY_SIZE * k:KEY_SIZE * (k + 1)])

    def straddler(self, boundary: int) -> int | None:
        """The entry whose header chain crosses stream offset ``boundary``, if any."""
        return _straddler(self.data_starts, self.header_starts, boundary)

    def window_covers(self, boundary: int, k: int) -> bool:
        """Whether the checkpoint window at ``boundary`` holds the start of entry k's header chain."""
        return self.windowed and boundary - self.header_starts[k] <= WINDOW_SIZE


class _Unfit(Exception):
    """A saved table that is not this format's, or not for this zTOC (derive it again)."""


#: Placement kinds by their one-byte code in the ``kinds`` column.
_KINDS = ("reg", "dir", "symlink", "hardlink", "char", "block", "fifo", "whiteout", "opaque", "skip")
#: A placement kind's one-byte code in the ``kinds`` column (C's skeleton is told the ones it makes).
KIND_CODE = {k: i for i, k in enumerate(_KINDS)}
_KIND_CODES = bytes(range(len(_KINDS)))
_MAGIC = b"PWLANDT\0"
_WINDOWED, _ALL_KEYS = 1, 2
#: magic, format, flags, entries, spans, span-map extents, archive data end, heap and extras sizes, fingerprint
_HEAD = struct.Struct("<8sIIQQQqQQ64s")


class _Head(NamedTuple):
    magic: bytes
    format: int
    flags: int
    n: int
    nspans: int
    m: int
    data_end: int
    heap_len: int
    extras_len: int
    fingerprint: bytes


_QS_PER_RECORD = landing.RECORD.size // 8
#: Where ``record_t.flags`` lies in a record; then its mode, mtime_ns, uid and gid; its path's offset and length.
RECORD_FLAGS = 89
_META_AT = struct.Struct("<24xq16xqII")
_PATH_AT = struct.Struct("<80xII")
_NAME_AT = struct.Struct("<64xII")
#: TOC entry types by the tar type flag a record holds.
_TYPE_OF_FLAG = {ord(flag): type_ for type_, flag in landing.TYPE_FLAGS.items()}


def _sections(h: _Head) -> dict[str, tuple[int, int]]:
    """Where each column lies in a table with header ``h`` (8-byte aligned, in this order)."""
    sizes = (("records", landing.RECORD.size * h.n), ("keys", KEY_SIZE * h.n), ("spans", 32 * h.nspans),
             ("smap", 24 * h.m), ("born", h.n), ("kinds", h.n), ("finals", h.n), ("heap", h.heap_len),
             ("extras", h.extras_len))
    out, at = {}, _HEAD.size + (-_HEAD.size & 7)
    for name, size in sizes:
        out[name] = (at, at + size)
        at += size + (-size & 7)
    out["end"] = (at, at)
    return out


def _parse(buf: bytearray | mmap.mmap) -> tuple[_Head, dict[str, tuple[int, int]]]:
    if len(buf) < _HEAD.size:
        raise _Unfit("shorter than its header")
    h = _Head(*_HEAD.unpack_from(buf, 0))
    if h.magic != _MAGIC or h.format != FORMAT:
        raise _Unfit("another format")
    if max(h.n, h.nspans, h.m, h.heap_len, h.extras_len) > len(buf):
        raise _Unfit("counts beyond its size")
    sections = _sections(h)
    if sections.pop("end")[0] != len(buf):
        raise _Unfit("its size is not what its header says")
    return h, sections


def _encode(fingerprint: str, flags: int, data_end: int, spans: Sequence[SpanRange], records: bytes, heap: bytes,
            keys: bytes, born: bytes, smap: tuple[Sequence[int], Sequence[int], Sequence[int]], kinds: bytes,
            finals: bytes, extras: bytes, spill: BinaryIO | None) -> bytearray | mmap.mmap:
    """The flat table: a header, then the columns where :func:`_sections` puts them.

    With ``spill`` (an empty temporary file) the table is written there and mapped: the
    columns are not copied into a second buffer in memory (~200 B per entry).
    """
    starts, ends, ids = smap
    h = _Head(_MAGIC, FORMAT, flags, len(born), len(spans), len(starts), data_end, len(heap), len(extras),
              fingerprint.encode("ascii"))
    where = _sections(h)
    end = where["end"][0]
    span_cols = array.array("q", [x for s in spans for x in (s.compressed_start, s.compressed_end,
                                                              s.uncompressed_start, s.uncompressed_end)])
    smap_cols = [_int64s(col) for col in (starts, ends, ids)]  # written one after the other, not joined
    columns = (("records", [records]), ("keys", [keys]), ("spans", [span_cols]), ("smap", smap_cols),
               ("born", [born]), ("kinds", [kinds]), ("finals", [finals]), ("heap", [heap]), ("extras", [extras]))
    buf = bytearray()
    write: Callable[[bytes | memoryview], object] = buf.extend if spill is None else spill.write
    write(_HEAD.pack(*h))
    at = _HEAD.size
    for name, parts in columns:  # (in the order _sections lays them out)
        a, b = where[name]
        write(bytes(a - at))
        for data in parts:
            write(memoryview(data).cast("B"))
        at = b
    write(bytes(end - at))
    if spill is None:
        return buf
    spill.flush()
    return mmap.mmap(spill.fileno(), 0, prot=mmap.PROT_READ)


def _derive_in_c(ztoc: ZtocView, fingerprint: str, spans: list[SpanRange], windowed: bool,
                 spill: Path | None) -> bytearray | mmap.mmap | None:
    """:meth:`LandingTable.derive`'s table, built in C from the zTOC buffer; None when Python must.

    Why: derived in Python, a TOC costs a decoded entry, a Placement and the checker's
    maps of every path, ~1.4 KB per entry while the table is built (1.4 GB for a layer of
    a million files).  C reads the entries where they lie in the zTOC, with no Python
    object per entry: 351 MB of peak RSS for a million, the zTOC's pages included.  It
    takes only what it can say as Python would: any entry it is not sure of
    (malformed, refused, an mtime beyond a record) makes it return None, and the Python
    derive then builds the table, or words the error.  Entries with xattrs are decoded here
    for their metadata, as are the few whose headers C does not check, for their keys.
    """
    files = ztoc.files
    c, tree = landing.backend(), _tree()
    vector = getattr(files, "vector", None)
    if c is None or tree is None or vector is None:
        return None
    buf, start, n, allowance = vector()
    usize = ztoc.uncompressed_archive_size
    if n * 512 > usize:
        return None
    # The tree check first (it also holds the TOC to the decoding budget, before anything is
    # kept per entry from names a zTOC may repeat), so its maps are gone before the records are
    # made.  A zTOC the node cache maps gives its pages back as each pass goes: a million entries
    # are ~190 MB of it, and each pass reads it all.
    file_backed = bool(getattr(files, "file_backed", False))
    checked = tree.check_toc(buf, start, n, usize, file_backed)
    _give_back(buf, file_backed)
    if checked is None:
        return None
    kinds, finals, fresh, paths, path_index, made_at, linked = checked
    del checked  # (each column goes as soon as it is used)
    built = c.toc_records(buf, start, n, usize, allowance, parse_mod_time, file_backed)
    if built is None:
        return None
    records, heap, rich, data_end = built
    del built
    ends = array.array("q", [s.uncompressed_end for s in spans])
    placed = c.place_records(records, heap, kinds, finals, fresh, linked, paths, path_index, ends)
    del fresh, linked, paths, path_index
    if placed is None:
        return None
    born, extents = placed
    del placed
    kept: dict[int, tuple[tuple[str, str], ...]] = {}
    size = landing.RECORD.size
    for k in rich:  # their PAX records: the kept xattrs are their metadata's, and keep them from C's creation
        xattrs = entry_meta(files[k])[4]
        if xattrs:
            kept[k] = xattrs
            records[size * k + RECORD_FLAGS] &= ~landing.F_CREATABLE
    need = set(_unset(records[RECORD_FLAGS::size], landing.F_CHECKABLE))  # (few: found at C speed)
    data_starts = memoryview(records).cast("q")[0::_QS_PER_RECORD]
    header_starts = memoryview(records).cast("q")[1::_QS_PER_RECORD]
    for r in spans[1:]:  # header chains across a span boundary are checked in Python
        k = _straddler(data_starts, header_starts, r.uncompressed_start)
        if k is not None:
            need.add(k)
    del data_starts, header_starts
    keys = bytearray(KEY_SIZE * n)
    for k in need:
        keys[KEY_SIZE * k:KEY_SIZE * (k + 1)] = entry_key(files[k])
    m = len(extents) // 24
    smap = memoryview(extents).cast("q")
    extras: tuple[dict[int, str], dict[int, tuple[tuple[str, str], ...]], dict[int, Meta]] = (
        {k: os.fsdecode(p) for k, p in made_at.items()}, kept, {})
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(tempfile.TemporaryFile(dir=spill)) if spill is not None else None
        return _encode(fingerprint, _WINDOWED if windowed else 0, data_end, spans, records, heap, keys, born,
                       (smap[:m], smap[m:2 * m], smap[2 * m:]), kinds, finals, marshal.dumps(extras), out)


def _give_back(buf: object, file_backed: bool) -> None:
    """Drop the pages of a zTOC that maps a file from this process (the page cache keeps them)."""
    mapping = memoryview(buf).obj if file_backed else None  # type: ignore[arg-type]
    if isinstance(mapping, mmap.mmap):
        mapping.madvise(mmap.MADV_DONTNEED)


@functools.cache
def _tree() -> ModuleType | None:
    """The C tree check (``prewarm.store._tree``), or None where it was not built."""
    try:
        from prewarm.store import _tree as tree  # type: ignore[attr-defined]
    except ImportError:
        return None
    return tree


def _int64s(column: Sequence[int]) -> memoryview | array.array[int]:
    """A column of int64 as bytes can be written from: itself when it already is one (no copy)."""
    if isinstance(column, memoryview) and column.format == "q":
        return column
    if isinstance(column, array.array) and column.typecode == "q":
        return column
    return array.array("q", column)


def _smap_arrays(buf: bytearray | mmap.mmap) -> tuple[Sequence[int], Sequence[int], Sequence[int]]:
    h, where = _parse(buf)
    a, b = where["smap"]
    q = memoryview(buf)[a:b].cast("q")
    return q[0:h.m], q[h.m:2 * h.m], q[2 * h.m:3 * h.m]


def _unset(column: bytes, bit: int) -> Iterator[int]:
    """Indices of the bytes in ``column`` without ``bit`` (few: found at C speed)."""
    marks = column.translate(bytes(0 if b & bit else 1 for b in range(256)))
    k = marks.find(1)
    while k >= 0:
        yield k
        k = marks.find(1, k + 1)


class _Column(Sequence[_T]):
    """A column of the table made of Python objects only when an entry is asked for (:meth:`_at`)."""

    __slots__ = ("_n",)

    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if isinstance(i, slice):
            return [self._at(k) for k in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"landing table entry {i} out of range ({self._n} entries)")
        return self._at(i)

    def __iter__(self) -> Iterator[_T]:
        return map(self._at, range(self._n))

    @abc.abstractmethod
    def _at(self, i: int) -> _T:
        """Entry i of the column (``0 <= i < len``)."""


class _Placements(_Column[Placement]):
    """Entry i's :class:`Placement`, made from the table's columns when asked for.

    Why: C landing reads none of them (it asks only for an entry to name in an error, or
    a piece it hands back), and a million Placement objects would be most of a worker's
    memory.
    """

    __slots__ = ("_heap", "_made_at", "_records", "finals", "kinds")

    def __init__(self, table: LandingTable, made_at: dict[int, str]) -> None:
        super().__init__(len(table.kinds))
        self._records, self._heap, self.kinds, self.finals = table.records, table.heap, table.kinds, table.finals
        self._made_at = made_at

    def _at(self, i: int) -> Placement:
        off, size = _PATH_AT.unpack_from(self._records, landing.RECORD.size * i)
        path = os.fsdecode(bytes(self._heap[off:off + size]))
        return Placement(_KINDS[self.kinds[i]], path, bool(self.finals[i]), self._made_at.get(i, ""))


class _Metas(_Column[Meta]):
    """Entry i's metadata (:func:`~prewarm.store.layerfs.entry_meta`), from its record.

    The rare entry whose numbers a record cannot hold (its flags lack ``F_PLAIN``), and
    the kept xattrs of every entry that has some, are kept aside by entry.
    """

    __slots__ = ("_override", "_records", "_xattrs")

    def __init__(self, table: LandingTable, xattrs: dict[int, tuple[tuple[str, str], ...]],
                 override: dict[int, Meta]) -> None:
        super().__init__(len(table.kinds))
        self._records, self._xattrs, self._override = table.records, xattrs, override

    def _at(self, i: int) -> Meta:
        m = self._override.get(i)
        if m is not None:
            return m
        mode, mtime_ns, uid, gid = _META_AT.unpack_from(self._records, landing.RECORD.size * i)
        return uid, gid, mode, mtime_ns, self._xattrs.get(i, ())


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


def _born_at_landing(files: Sequence[FileEntry], placements: Sequence[Placement], fresh: bytes | bytearray,
                     spans: Sequence[SpanRange]) -> bytes:
    """Which regular files are created whole by the span that holds all their data.

    Only files that replace nothing, are no hard link's target (the link is made in the
    skeleton, before any span lands) and lie inside one span; the rest are pre-sized in
    the skeleton and written piece by piece.
    """
    targets = {"/".join(split_name(e.linkname)) for e, p in zip(files, placements) if p.kind == "hardlink"}
    ends = [s.uncompressed_end for s in spans]
    born = bytearray(len(files))
    k = 0  # the span holding the entry's data start (entries are in stream order)
    for i, (e, p) in enumerate(zip(files, placements)):
        size = e.uncompressed_size
        if p.kind == "reg" and p.final and size > 0 and fresh[i] and p.created_at not in targets:
            d = e.uncompressed_offset
            while k + 1 < len(ends) and ends[k] <= d:
                k += 1
            if d + size <= ends[k]:
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
