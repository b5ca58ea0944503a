"""The zTOC: SOCI's per-layer index (gzip checkpoints plus the tar table of contents).

This module holds the data model (pure, no I/O).  Parsing, validation and
serialisation to soci's FlatBuffers layout are added here too; building lives in
``prewarm.index.ztoc_build`` and inflating a span in ``prewarm.index.inflate``.

CONTRACT (other modules rely on these names; extend, do not rename):

* ``FileEntry``: one tar entry from the TOC, fields as in soci's ``FileMetadata``.
* ``Checkpoint``: one zran access point.
* ``Span``: everything a worker needs to fetch, verify and inflate one span.
"""

from __future__ import annotations

import dataclasses

#: Bytes of deflate history stored with every checkpoint.
WINDOW_SIZE = 32768

#: Entry types as soci spells them in ``FileMetadata.type``.
ENTRY_TYPES = ("reg", "dir", "symlink", "hardlink", "char", "block", "fifo")


@dataclasses.dataclass(frozen=True, slots=True)
class FileEntry:
    """One tar entry of a layer, as recorded in the zTOC's TOC.

    ``uncompressed_offset`` is where the entry's DATA starts in the tar stream (its
    header(s) lie just before).  ``xattrs`` holds EVERY PAX record of the entry
    (``path``, ``linkpath``, ``SCHILY.xattr.*``, ...) as (key, value) pairs sorted by
    key, exactly as soci stores them; :attr:`real_xattrs` gives the file's xattrs.
    """

    name: str
    type: str
    uncompressed_offset: int
    uncompressed_size: int
    linkname: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mod_time: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, str], ...] = ()

    @property
    def real_xattrs(self) -> dict[str, str]:
        prefix = "SCHILY.xattr."
        return {k[len(prefix):]: v for k, v in self.xattrs if k.startswith(prefix)}


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """A zran access point: inflating may start here given ``window``.

    ``compressed_offset`` is the first whole byte after a deflate block boundary;
    when ``bits`` is not 0, that many high bits of the byte before it still belong
    to the stream.  ``window`` is the 32 KiB of output before ``uncompressed_offset``
    (zero-filled at the start of the stream).
    """

    compressed_offset: int
    uncompressed_offset: int
    bits: int
    window: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Span:
    """One unit of work: a compressed byte range and the uncompressed range it yields.

    ``compressed_start`` already includes the shared byte when ``bits`` is not 0
    (``checkpoint.compressed_offset - 1``); ``compressed_end`` is exclusive.
    ``digest`` is ``sha256:<hex>`` of exactly ``[compressed_start, compressed_end)``.
    """

    index: int
    compressed_start: int
    compressed_end: int
    uncompressed_start: int
    uncompressed_end: int
    digest: str
    checkpoint: Checkpoint | None  # None for uncompressed (TarZinfo) layers

# ==== zTOC reading, validation and serialisation =========================================

import bisect
import re
import struct
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, cast

from prewarm.errors import BadZtoc

#: Bytes of one checkpoint record in the gzip zinfo blob: in, out, bits, window.
CHECKPOINT_RECORD_SIZE = 8 + 8 + 1 + WINDOW_SIZE
#: Bytes before the first checkpoint record: count (int32) and span size (int64).
ZINFO_HEADER_SIZE = 12
#: What soci writes in ``Ztoc.version``.
ZTOC_VERSION = "0.9"
#: Compression names as used in :attr:`Ztoc.compression`.
COMPRESSIONS = ("gzip", "uncompressed")
#: Zero padding tolerated after the tar end marker.  soci's uncompressed size stops at
#: the end marker (where Go's tar reader stops), but tar writers may pad the stream to
#: a record size (GNU tar: 10 KiB), and checkpoints can fall into that padding.
MAX_TAR_PADDING = 1 << 20
#: TarZinfo ``version`` written by soci for uncompressed layers.
TAR_ZINFO_VERSION = 2

_ALGO_GZIP = 1
_ALGO_UNCOMPRESSED = 2
_MAX_NAME_BYTES = 1 << 16
_MAX_SHORT_STRING = 1 << 12
_MAX_INT64 = (1 << 63) - 1
_DIGEST_RE = re.compile(rb"sha256:[0-9a-f]{64}\Z")
_CP_HEAD = struct.Struct("<qqB")
_ZINFO_HEAD = struct.Struct("<iq")
_LEGACY_FIRST = (10, 0, 0)


class ByteSlices(Protocol):
    """Bytes read by slice: bytes, a memoryview (of an mmap), or a file read on demand."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: slice, /) -> bytes | bytearray | memoryview: ...


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class Ztoc:
    """A parsed (or freshly built) zTOC.

    The checkpoint windows stay in the buffer they came from (which may be an mmap of a
    cached zTOC): a 10 GB layer has about 2,500 windows of 32 KiB and a worker needs
    one or two of them per span, so they are sliced out only when asked for.  Only the
    (in, out, bits) triple of every checkpoint is kept as Python integers.

    Use :func:`parse_ztoc` for bytes from elsewhere; the constructor trusts its
    arguments as far as the TOC goes but checks the checkpoint table.
    """

    __slots__ = (
        "_cp_base",
        "_cp_bits",
        "_cp_in",
        "_cp_out",
        "build_tool_identifier",
        "checkpoints_blob",
        "compressed_archive_size",
        "compression",
        "digest",
        "files",
        "legacy_checkpoints",
        "span_digests",
        "span_size",
        "uncompressed_archive_size",
        "version",
    )

    def __init__(self, *, version: str, build_tool_identifier: str, compressed_archive_size: int,
                 uncompressed_archive_size: int, files: Sequence[FileEntry], compression: str,
                 span_digests: Sequence[str], checkpoints_blob: bytes | bytearray | memoryview) -> None:
        """Assemble a zTOC; ``checkpoints_blob`` is soci's zinfo blob (or TarZinfo).

        Raises:
            BadZtoc: the checkpoint blob does not agree with the rest.
        """
        self._assign(version, build_tool_identifier, compressed_archive_size, uncompressed_archive_size, files,
                     compression, span_digests)
        self.checkpoints_blob = checkpoints_blob
        self._load_checkpoints(checkpoints_blob)

    @classmethod
    def check_checkpoint_blob(cls, blob: ByteSlices, *, compressed_archive_size: int,
                              uncompressed_archive_size: int, compression: str, span_digests: Sequence[str]) -> None:
        """The constructor's checks of a checkpoint blob that is not in memory (a file read by
        slices: :mod:`prewarm.index.ztoc_spool`), keeping nothing.

        The blob is read by slices only: its header, then 17 bytes per 32 KiB checkpoint.

        Raises:
            BadZtoc: the checkpoint blob does not agree with the rest.
        """
        z = cls.__new__(cls)
        z._assign("", "", compressed_archive_size, uncompressed_archive_size, (), compression, span_digests)
        z._load_checkpoints(blob)

    def _assign(self, version: str, build_tool_identifier: str, compressed_archive_size: int,
                uncompressed_archive_size: int, files: Sequence[FileEntry], compression: str,
                span_digests: Sequence[str]) -> None:
        if compression not in COMPRESSIONS:
            raise BadZtoc(f"zTOC compression {compression!r} is not one of {COMPRESSIONS}")
        self.version = version
        self.build_tool_identifier = build_tool_identifier
        self.compressed_archive_size = compressed_archive_size
        self.uncompressed_archive_size = uncompressed_archive_size
        self.files: Sequence[FileEntry] = files if isinstance(files, LazyFiles) else tuple(files)
        #: The zTOC's content digest when it came from a verified cache (``ZtocCache``):
        #: an identity that names this exact TOC without hashing its entries.
        self.digest: str | None = None
        self.compression = compression
        self.span_digests: tuple[str, ...] = tuple(span_digests)
        self.legacy_checkpoints = False
        self._cp_in: list[int] = []
        self._cp_out: list[int] = []
        self._cp_bits: list[int] = []
        self._cp_base = ZINFO_HEADER_SIZE

    def _load_checkpoints(self, blob: ByteSlices) -> None:
        if self.compression == "gzip":
            self.span_size = self._read_zinfo(blob)
        else:
            self.span_size = self._read_tar_zinfo(bytes(blob[0:len(blob)]))

    # ---- checkpoint table ----------------------------------------------------------

    def _read_zinfo(self, blob: ByteSlices) -> int:
        if len(blob) < ZINFO_HEADER_SIZE:
            raise BadZtoc(f"zTOC checkpoint blob is {len(blob)} bytes, shorter than its "
                          f"{ZINFO_HEADER_SIZE}-byte header")
        count, span_size = _ZINFO_HEAD.unpack(blob[0:ZINFO_HEADER_SIZE])
        body = len(blob) - ZINFO_HEADER_SIZE
        if count < 1 or count > body // CHECKPOINT_RECORD_SIZE + 1:
            raise BadZtoc(f"zTOC says {count} checkpoints but its blob of {len(blob)} bytes "
                          f"cannot hold them")
        if body == count * CHECKPOINT_RECORD_SIZE:
            stored = count
        elif body == (count - 1) * CHECKPOINT_RECORD_SIZE:
            stored = count - 1
            self.legacy_checkpoints = True
        else:
            raise BadZtoc(f"zTOC checkpoint blob is {len(blob)} bytes; {count} checkpoints need "
                          f"{ZINFO_HEADER_SIZE + count * CHECKPOINT_RECORD_SIZE}")
        if span_size <= 0:
            raise BadZtoc(f"zTOC span size {span_size} is not positive")
        cin, cout, cbits = self._cp_in, self._cp_out, self._cp_bits
        if self.legacy_checkpoints:
            cin.append(_LEGACY_FIRST[0])
            cout.append(_LEGACY_FIRST[1])
            cbits.append(_LEGACY_FIRST[2])
        for i in range(stored):
            at = ZINFO_HEADER_SIZE + i * CHECKPOINT_RECORD_SIZE
            a, b, c = _CP_HEAD.unpack(blob[at:at + _CP_HEAD.size])
            cin.append(a)
            cout.append(b)
            cbits.append(c)
        self._check_checkpoints()
        return span_size

    def _check_checkpoints(self) -> None:
        n = len(self._cp_in)
        if n != len(self.span_digests):
            raise BadZtoc(f"zTOC has {n} checkpoints but {len(self.span_digests)} span digests")
        csize, usize = self.compressed_archive_size, self.uncompressed_archive_size
        if self._cp_out[0] != 0:
            raise BadZtoc(f"zTOC checkpoint 0 is at uncompressed offset {self._cp_out[0]}, not 0")
        prev_end = 0
        for i in range(n):
            cin, cout, bits = self._cp_in[i], self._cp_out[i], self._cp_bits[i]
            if bits > 7:
                raise BadZtoc(f"zTOC checkpoint {i} has {bits} leftover bits (at most 7)")
            start = cin - (1 if bits else 0)
            if start < 0 or cin > csize:
                raise BadZtoc(f"zTOC checkpoint {i} at compressed offset {cin} lies outside the "
                              f"{csize}-byte layer")
            if i and (cout <= self._cp_out[i - 1] or cin < self._cp_in[i - 1]):
                raise BadZtoc(f"zTOC checkpoints are not in order at checkpoint {i} "
                              f"(in {cin}, out {cout} after in {self._cp_in[i - 1]}, "
                              f"out {self._cp_out[i - 1]})")
            if cout > usize + MAX_TAR_PADDING:
                raise BadZtoc(f"zTOC checkpoint {i} at uncompressed offset {cout} lies past the "
                              f"uncompressed size {usize} (plus tar padding)")
            if i and start < prev_end - 1:
                raise BadZtoc(f"zTOC span {i} overlaps span {i - 1} by more than one byte")
            end = self._cp_in[i + 1] if i + 1 < n else csize
            if end <= start:
                raise BadZtoc(f"zTOC span {i} is empty or reversed ({start}..{end})")
            prev_end = end

    def _read_tar_zinfo(self, blob: bytes) -> int:
        version, span_size, size = _parse_tar_zinfo(blob)
        if version != TAR_ZINFO_VERSION:
            raise BadZtoc(f"zTOC TarZinfo version {version} is not {TAR_ZINFO_VERSION}")
        if span_size <= 0:
            raise BadZtoc(f"zTOC span size {span_size} is not positive")
        if size != self.compressed_archive_size:
            raise BadZtoc(f"zTOC TarZinfo size {size} differs from the archive size "
                          f"{self.compressed_archive_size}")
        n = -(-size // span_size)
        if n != len(self.span_digests):
            raise BadZtoc(f"zTOC of a {size}-byte tar with span size {span_size} needs {n} span "
                          f"digests, has {len(self.span_digests)}")
        return span_size

    # ---- spans -------------------------------------------------------------------

    @property
    def num_spans(self) -> int:
        return len(self.span_digests)

    @property
    def max_span_id(self) -> int:
        return self.num_spans - 1

    def checkpoint(self, i: int) -> Checkpoint:
        """Checkpoint ``i`` with its window (sliced from the underlying buffer now).

        Raises:
            IndexError: no such checkpoint (or the layer is uncompressed).
        """
        if self.compression != "gzip":
            raise IndexError("an uncompressed layer's zTOC has no checkpoints")
        if not 0 <= i < len(self._cp_in):
            raise IndexError(f"checkpoint {i} out of range (0..{len(self._cp_in) - 1})")
        if self.legacy_checkpoints:
            if i == 0:
                return Checkpoint(_LEGACY_FIRST[0], 0, 0, bytes(WINDOW_SIZE))
            rec = i - 1
        else:
            rec = i
        at = ZINFO_HEADER_SIZE + rec * CHECKPOINT_RECORD_SIZE + 17
        window = bytes(self.checkpoints_blob[at:at + WINDOW_SIZE])
        return Checkpoint(self._cp_in[i], self._cp_out[i], self._cp_bits[i], window)

    def span(self, i: int) -> Span:
        """Span ``i``: its compressed and uncompressed ranges, digest and checkpoint.

        Raises:
            IndexError: no such span.
        """
        n = self.num_spans
        if not 0 <= i < n:
            raise IndexError(f"span {i} out of range (0..{n - 1})")
        last = i == n - 1
        if self.compression != "gzip":
            # The layer's own bytes.  soci's uncompressed size stops at the tar end marker,
            # so the uncompressed ranges are clamped there: what lies after is record
            # padding (zeros), and spans wholly inside it yield nothing.
            start = i * self.span_size
            cend = self.compressed_archive_size if last else start + self.span_size
            usize = self.uncompressed_archive_size
            return Span(i, start, cend, min(start, usize), min(cend, usize),
                        self.span_digests[i], None)
        cp = self.checkpoint(i)
        return Span(
            index=i,
            compressed_start=cp.compressed_offset - (1 if cp.bits else 0),
            compressed_end=self.compressed_archive_size if last else self._cp_in[i + 1],
            uncompressed_start=cp.uncompressed_offset,
            uncompressed_end=(max(self.uncompressed_archive_size, cp.uncompressed_offset) if last
                              else self._cp_out[i + 1]),
            digest=self.span_digests[i],
            checkpoint=cp,
        )

    def spans(self) -> list[Span]:
        """Every span (windows included: meant for small zTOCs and tools)."""
        return [self.span(i) for i in range(self.num_spans)]

    def span_for_offset(self, uoffset: int) -> int:
        """Index of the span holding uncompressed offset ``uoffset``.

        Raises:
            IndexError: the offset is outside the uncompressed archive.
        """
        if not 0 <= uoffset < self.uncompressed_archive_size:
            raise IndexError(f"uncompressed offset {uoffset} is outside the archive "
                             f"(0..{self.uncompressed_archive_size})")
        if self.compression != "gzip":
            return min(uoffset // self.span_size, self.num_spans - 1)
        return bisect.bisect_right(self._cp_out, uoffset) - 1

    def checkpoint_offsets(self) -> list[tuple[int, int, int]]:
        """(compressed offset, uncompressed offset, bits) of every checkpoint."""
        return list(zip(self._cp_in, self._cp_out, self._cp_bits))


def _parse_tar_zinfo(blob: bytes) -> tuple[int, int, int]:
    """(version, span_size, size) from the TarZinfo FlatBuffer (or soci's older raw form)."""
    if len(blob) == 20 and not _looks_like_flatbuffer(blob):
        return struct.unpack("<iqq", blob)
    r = _Reader(blob, "TarZinfo")
    t = r.root()
    return (r.scalar(t, 0, "<i", 0), r.scalar(t, 1, "<q", 0), r.scalar(t, 2, "<q", 0))


def _looks_like_flatbuffer(blob: bytes) -> bool:
    root = struct.unpack_from("<I", blob, 0)[0]
    if not 4 <= root <= len(blob) - 4:
        return False
    vt = root - struct.unpack_from("<i", blob, root)[0]
    return 0 <= vt <= len(blob) - 4


def tar_zinfo_bytes(span_size: int, size: int) -> bytes:
    """The TarZinfo FlatBuffer soci writes as the checkpoints of an uncompressed layer."""
    b = _GoFlatBuilder()
    b.start_object(3)
    b.add_int(0, TAR_ZINFO_VERSION, 4)
    b.add_int(1, span_size, 8)
    b.add_int(2, size, 8)
    return b.finish(b.end_object())


# ---- FlatBuffers reading with bounds checks ---------------------------------------------

#: Ceiling on what decoding a zTOC may allocate, as a multiple of its size (plus
#: :data:`DECODE_BUDGET_BASE`).  FlatBuffers lets many references share one object, so
#: a small zTOC whose entries all point at one 64 KiB name (or whose xattr vectors all
#: point at one long value) would otherwise decode to gigabytes.  A TOC written by
#: soci's builder (or ours) stores every string once and costs at most about 4 bytes
#: per zTOC byte as counted here, so 8 leaves room without letting sharing multiply.
DECODE_BUDGET_PER_BYTE = 8
#: Bytes every zTOC may decode to regardless of its size.
DECODE_BUDGET_BASE = 1 << 20
#: What one decoded TOC entry, xattr pair and span digest count against the budget,
#: besides the bytes of their strings (the Python objects that hold them).
_ENTRY_COST = 256
_XATTR_COST = 128
_DIGEST_COST = 200  # the 71-character digest is counted in here


def decode_budget(ztoc_size: int) -> int:
    """Bytes a zTOC of ``ztoc_size`` bytes may decode to (entries, xattrs, digests)."""
    return DECODE_BUDGET_PER_BYTE * ztoc_size + DECODE_BUDGET_BASE


class _Reader:
    """Just enough FlatBuffers to read a zTOC, every offset checked against the buffer."""

    __slots__ = ("buf", "n", "what")

    def __init__(self, buf: bytes | bytearray | memoryview, what: str) -> None:
        self.buf = buf
        self.n = len(buf)
        self.what = what

    def _u32(self, at: int) -> int:
        if not 0 <= at <= self.n - 4:
            raise BadZtoc(f"{self.what}: offset {at} points outside the {self.n}-byte buffer")
        return int.from_bytes(self.buf[at:at + 4], "little")

    def root(self) -> int:
        return self.table_at(0)

    def table_at(self, ref_at: int) -> int:
        """Position of the table referenced by the uoffset stored at ``ref_at``."""
        t = ref_at + self._u32(ref_at)
        soff = self._u32(t)
        if soff >= 1 << 31:
            soff -= 1 << 32
        vt = t - soff
        if not 0 <= vt <= self.n - 4:
            raise BadZtoc(f"{self.what}: table at {t} has its vtable outside the buffer")
        return t

    def _field(self, t: int, i: int) -> int:
        soff = self._u32(t)
        if soff >= 1 << 31:
            soff -= 1 << 32
        vt = t - soff
        vsize = int.from_bytes(self.buf[vt:vt + 2], "little")
        slot = 4 + 2 * i
        if slot + 2 > vsize:
            return 0
        if vt + slot + 2 > self.n:
            raise BadZtoc(f"{self.what}: vtable at {vt} runs past the buffer")
        off = int.from_bytes(self.buf[vt + slot:vt + slot + 2], "little")
        if off:
            tsize = int.from_bytes(self.buf[vt + 2:vt + 4], "little")
            if off >= tsize:
                raise BadZtoc(f"{self.what}: field {i} lies outside its table")
        return t + off if off else 0

    def scalar(self, t: int, i: int, fmt: str, default: int) -> int:
        at = self._field(t, i)
        if not at:
            return default
        size = struct.calcsize(fmt)
        if at + size > self.n:
            raise BadZtoc(f"{self.what}: field {i} runs past the buffer")
        return struct.unpack_from(fmt, self.buf, at)[0]

    def vector(self, t: int, i: int, elem_size: int, max_len: int | None = None) -> tuple[int, int]:
        """(position of element 0, length) of a vector field; (0, 0) when absent."""
        at = self._field(t, i)
        if not at:
            return 0, 0
        v = at + self._u32(at)
        length = self._u32(v)
        if length * elem_size > self.n - v - 4:
            raise BadZtoc(f"{self.what}: vector of {length} elements at {v} runs past the buffer")
        if max_len is not None and length > max_len:
            raise BadZtoc(f"{self.what}: {length} elements is more than the {max_len} allowed")
        return v + 4, length

    def bytes_field(self, t: int, i: int, max_len: int | None = None) -> bytes:
        start, length = self.vector(t, i, 1, max_len)
        return bytes(self.buf[start:start + length])

    def string_at(self, at: int, max_len: int) -> bytes:
        """The string referenced by the uoffset at ``at`` (b"" when ``at`` is 0: absent).

        The one string reader: header strings, span digests and TOC entries all come
        through here.
        """
        if not at:
            return b""
        buf, n = self.buf, self.n
        if not 0 <= at <= n - 4:
            raise BadZtoc(f"{self.what}: string reference at {at} runs past the buffer")
        v = at + _U32(buf, at)[0]
        if v > n - 4:
            raise BadZtoc(f"{self.what}: string at {v} lies outside the {n}-byte buffer")
        length = _U32(buf, v)[0]
        if length > n - v - 4:
            raise BadZtoc(f"{self.what}: string at {v} runs past the buffer")
        if length > max_len:
            raise BadZtoc(f"{self.what}: string of {length} bytes is longer than {max_len}")
        return bytes(buf[v + 4:v + 4 + length])

    def string(self, t: int, i: int, max_len: int = _MAX_SHORT_STRING) -> bytes:
        return self.string_at(self._field(t, i), max_len)


def _check_name(raw: bytes, what: str) -> None:
    if not raw:
        raise BadZtoc(f"zTOC {what} has an empty name")
    if b"\x00" in raw:
        raise BadZtoc(f"zTOC {what} name {raw[:80]!r} contains a NUL byte")
    if b".." in raw and b".." in raw.split(b"/"):
        raise BadZtoc(f"zTOC {what} name {raw[:80]!r} has a '..' component (would escape the layer)")


_I32 = struct.Struct("<i").unpack_from
_U32 = struct.Struct("<I").unpack_from
_I64 = struct.Struct("<q").unpack_from
_U16X2 = struct.Struct("<HH").unpack_from

#: Bytes of each field of soci's ``FileMetadata`` table: name, type, offset, size,
#: linkname, mode, uid, gid, uname, gname, mod_time, devmajor, devminor, xattrs.
_ENTRY_WIDTHS = (4, 4, 8, 8, 4, 8, 4, 4, 4, 4, 4, 8, 8, 4)
#: Bytes of each field of an ``Xattr`` table: key, value.
_XATTR_WIDTHS = (4, 4)
_VTABLE_READERS = [struct.Struct(f"<{k}H").unpack_from for k in range(15)]


def _table_fields(r: _Reader, t: int, widths: tuple[int, ...]) -> tuple[int, ...]:
    """Offsets of a table's fields from the table's start (0 when absent), each checked.

    ``widths`` gives each field's size; a field must end inside its table, which lies
    inside the buffer, so the caller reads field ``i`` at ``t + offsets[i]`` without
    further checks.
    """
    buf, n = r.buf, r.n
    if not 0 <= t <= n - 4:
        raise BadZtoc(f"{r.what}: table at {t} lies outside the {n}-byte buffer")
    vt = t - _I32(buf, t)[0]
    if not 0 <= vt <= n - 4:
        raise BadZtoc(f"{r.what}: table at {t} has its vtable outside the buffer")
    vsize, tsize = _U16X2(buf, vt)
    if vt + vsize > n or t + tsize > n or tsize < 4:
        raise BadZtoc(f"{r.what}: table at {t} runs past the buffer")
    count = len(widths)
    k = min(count, max(0, (vsize - 4) // 2))  # fields past the vtable's end are absent
    offs = _VTABLE_READERS[k](buf, vt + 4)
    if k and max(offs) + 8 > tsize:  # some field may end past the table: check each
        for i, off in enumerate(offs):
            if off and off + widths[i] > tsize:
                raise BadZtoc(f"{r.what}: field {i} of the table at {t} runs past its end")
    return offs if k == count else offs + (0,) * (count - k)


def _budget_error(r: _Reader, what: str) -> BadZtoc:
    return BadZtoc(f"zTOC {what} takes the decoded TOC past {decode_budget(r.n)} bytes "
                   f"({DECODE_BUDGET_PER_BYTE} times the {r.n}-byte zTOC plus "
                   f"{DECODE_BUDGET_BASE}): its references repeat long strings, which no "
                   f"zTOC builder does")


def _read_xattrs(r: _Reader, at: int, index: int,
                 allowance: int) -> tuple[tuple[tuple[str, str], ...], int]:
    """Entry ``index``'s xattr (key, value) pairs from the vector referenced at ``at``,
    and what they cost (see :data:`DECODE_BUDGET_PER_BYTE`); the one xattr reader.

    Raises:
        BadZtoc: a pair is malformed, or they cost more than ``allowance``.
    """
    buf, n = r.buf, r.n
    v = at + _U32(buf, at)[0]  # ``at`` is a field checked by _table_fields
    if v > n - 4:
        raise BadZtoc(f"{r.what}: xattr vector of entry {index} at {v} lies outside the buffer")
    count = _U32(buf, v)[0]
    if not count:
        return (), 0
    if count * 4 > n - v - 4:
        raise BadZtoc(f"{r.what}: vector of {count} elements at {v} runs past the buffer")
    cost = count * _XATTR_COST
    if cost > allowance:
        raise _budget_error(r, f"entry {index}'s {count} xattrs")
    string = r.string_at
    pairs = []
    for j in range(count):
        ref = v + 4 + 4 * j
        t = ref + _U32(buf, ref)[0]
        ko, vo = _table_fields(r, t, _XATTR_WIDTHS)
        key = string(ko and t + ko, _MAX_SHORT_STRING)
        value = string(vo and t + vo, _MAX_NAME_BYTES)
        cost += len(key) + len(value)
        if cost > allowance:
            raise _budget_error(r, f"entry {index}'s xattrs")
        pairs.append((_text(key), _text(value)))
    return tuple(pairs), cost


def _read_entry(r: _Reader, t: int, index: int, allowance: int) -> tuple[FileEntry, int]:
    """Decode and check TOC entry ``index`` (the table at ``t``), and say what it cost.

    The one Python entry decoder; the C decoder (``prewarm.index._ztoc``) takes the
    entries it finds well-formed and leaves the rest here, which names the problem.
    Why it reads all fields from one vtable read: without C (or for entries C leaves)
    a TOC of 100,000 entries must not take seconds.

    Raises:
        BadZtoc: the entry is malformed, or it costs more than ``allowance`` bytes of the
            decoding budget (:data:`DECODE_BUDGET_PER_BYTE`).
    """
    o = _table_fields(r, t, _ENTRY_WIDTHS)
    string = r.string_at
    name = string(o[0] and t + o[0], _MAX_NAME_BYTES)
    if not name or b"\x00" in name or b".." in name:
        _check_name(name, f"entry {index}")  # names the problem (or accepts a harmless "..")
    type_raw = string(o[1] and t + o[1], 16)
    type_ = _TYPE_BY_RAW.get(type_raw)
    if type_ is None:
        raise BadZtoc(f"zTOC entry {index} ({_text(name)!r}) has unknown type {type_raw!r}")
    linkname = string(o[4] and t + o[4], _MAX_NAME_BYTES)
    if b"\x00" in linkname:
        raise BadZtoc(f"zTOC entry {index} link name contains a NUL byte")
    uname = string(o[8] and t + o[8], _MAX_SHORT_STRING)
    gname = string(o[9] and t + o[9], _MAX_SHORT_STRING)
    mod_time = string(o[10] and t + o[10], 64)
    cost = _ENTRY_COST + len(name) + len(linkname) + len(uname) + len(gname) + len(mod_time)
    if cost > allowance:
        raise _budget_error(r, f"entry {index} ({_text(name)[:80]!r})")
    xattrs: tuple[tuple[str, str], ...] = ()
    if o[13]:
        xattrs, xcost = _read_xattrs(r, t + o[13], index, allowance - cost)
        cost += xcost
    buf, i64, u32, enc = r.buf, _I64, _U32, "surrogateescape"
    return FileEntry(
        name.decode("utf-8", enc), type_, i64(buf, t + o[2])[0] if o[2] else 0,
        i64(buf, t + o[3])[0] if o[3] else 0, linkname.decode("utf-8", enc),
        i64(buf, t + o[5])[0] if o[5] else 0, u32(buf, t + o[6])[0] if o[6] else 0,
        u32(buf, t + o[7])[0] if o[7] else 0, uname.decode("utf-8", enc),
        gname.decode("utf-8", enc), mod_time.decode("utf-8", enc),
        i64(buf, t + o[11])[0] if o[11] else 0, i64(buf, t + o[12])[0] if o[12] else 0, xattrs,
    ), cost


_TYPE_BY_RAW = {t.encode(): t for t in ENTRY_TYPES}

try:
    from prewarm.index._ztoc import decode_entries as _decode_entries  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - built by setup.py; the Python decoder does it all then
    _decode_entries = None


def _read_entries(r: _Reader, start: int, count: int, allowance: int) -> tuple[list[FileEntry], int]:
    """The ``count`` entries of the TOC vector at ``start``, each checked as :func:`_read_entry`
    does, and what they cost together (at most ``allowance``).

    The C decoder takes the well-formed ones within the allowance; it leaves None for
    anything else, which :func:`_read_entry` decodes (or refuses, naming the problem).

    Raises:
        BadZtoc: an entry is malformed, or the entries cost more than ``allowance``.
    """
    if _decode_entries is not None:
        out, spent = _decode_entries(r.buf, start, count, FileEntry, _TYPE_BY_RAW, allowance)
    else:
        out, spent = [None] * count, 0
    buf = r.buf
    for k, e in enumerate(out):
        if e is None:
            at = start + 4 * k
            out[k], cost = _read_entry(r, at + _U32(buf, at)[0], k, allowance - spent)
            spent += cost
    return cast(list[FileEntry], out), spent


def _check_entries(files: Sequence[FileEntry], usize: int) -> None:
    """Entries lie inside the archive, in stream order, each after the previous one's data.

    soci sorts the TOC by offset and requires every entry's data to start at or after the
    previous entry's data (rounded up to a tar block); we also require room for the
    entry's own 512-byte header, as any real tar stream has.  Only regular files have
    data: a symlink, hardlink, device, FIFO or directory keeps its header's size field
    (Go's tar reader and both builders do), but the tar stream holds no data for it.
    """
    order = sorted(range(len(files)), key=lambda k: files[k].uncompressed_offset)
    next_header = 0
    for k in order:
        f = files[k]
        off, size = f.uncompressed_offset, f.uncompressed_size
        if size < 0 or off < 0:
            raise BadZtoc(f"zTOC entry {k} ({f.name!r}) at {off}+{size} lies outside the "
                          f"{usize}-byte uncompressed archive")
        data = size if f.type == "reg" else 0
        if off + data > usize:
            raise BadZtoc(f"zTOC entry {k} ({f.name!r}) at {off}+{data} lies outside the "
                          f"{usize}-byte uncompressed archive")
        if off < next_header + 512:
            raise BadZtoc(f"zTOC entry {k} ({f.name!r}) at offset {off} overlaps the entry before "
                          f"it (next header at {next_header})")
        next_header = off + data + (-data & 511)


class LazyFiles(Sequence[FileEntry]):
    """The TOC of a parsed zTOC, each entry decoded (and checked) when first asked for.

    Why: a worker process that lands a few spans of a 70,000-entry layer needs only the
    entries inside those spans; decoding all of them cost about a second per process
    and layer.  An entry is checked as :func:`parse_ztoc` checks it when it is decoded,
    and the entries decoded so far share the zTOC's decoding budget; iterating (or
    :meth:`materialize`) decodes every entry and then checks their order and bounds
    (``_check_entries``) once, raising BadZtoc as an eager parse would.
    """

    __slots__ = ("_all", "_allowance", "_cache", "_left", "_n", "_reader", "_start", "_usize", "decoded",
                 "file_backed")

    def __init__(self, reader: _Reader, start: int, n: int, usize: int, allowance: int) -> None:
        self._reader = reader
        self._start = start
        self._n = n
        self._usize = usize
        self._allowance = self._left = allowance
        self._cache: list[FileEntry | None] = [None] * n
        self._all: tuple[FileEntry, ...] | None = None
        #: Entries decoded so far, counting each decoding (what a process paid for its TOC).
        self.decoded = 0
        #: The buffer is a read-only mapping of a file (the node cache's): a reader of the whole
        #: TOC may give its pages back (MADV_DONTNEED), they are read again from the page cache.
        self.file_backed = False

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, k: Any) -> Any:
        """Entry ``k`` (decoded once); a slice gives a tuple of the checked entries.

        Raises:
            BadZtoc: the entry is malformed (or the entries decoded so far pass the budget).
            IndexError: ``k`` is out of range.
        """
        if isinstance(k, slice):
            return self.materialize()[k]
        if self._all is not None:
            return self._all[k]
        n = self._n
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"zTOC entry {k} out of range ({n} entries)")
        e = self._cache[k]
        if e is None:
            r = self._reader
            at = self._start + 4 * k
            if _decode_entries is not None:
                (e,), cost = _decode_entries(r.buf, at, 1, FileEntry, _TYPE_BY_RAW, self._left)
            if e is None:
                e, cost = _read_entry(r, at + _U32(r.buf, at)[0], k, self._left)
            self._left -= cost
            self._cache[k] = e
            self.decoded += 1
        return e

    def materialize(self) -> tuple[FileEntry, ...]:
        """Every entry, decoded and checked as a whole (order, bounds); cached.

        Raises:
            BadZtoc: as :func:`parse_ztoc`.
        """
        if self._all is None:
            entries = tuple(_read_entries(self._reader, self._start, self._n, self._allowance)[0])
            _check_entries(entries, self._usize)
            self._all = entries
            self.decoded += len(entries)
            self._cache = []  # the tuple holds them now
        return self._all

    def __iter__(self) -> Iterator[FileEntry]:
        return iter(self.materialize())

    def vector(self) -> tuple[bytes | bytearray | memoryview, int, int, int]:
        """The TOC in the zTOC buffer (the buffer, the vector's start, its count, the decoding
        allowance of all its entries), for C that walks it without decoding an entry to Python."""
        return self._reader.buf, self._start, self._n, self._allowance

    def forget(self) -> None:
        """Drop the decoded entries (they are decoded again if asked for).

        Why: the process that prepares a layer decodes its whole TOC once, ~400 B per
        entry; it keeps the zTOC (a node cache holds 16) but then asks for an entry only
        to name it in an error.
        """
        self._all = None
        self._cache = [None] * self._n

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (LazyFiles, tuple, list)):
            return self.materialize() == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def parse_ztoc(buf: bytes | bytearray | memoryview, *, lazy_files: bool = False) -> Ztoc:
    """Parse and validate a zTOC written by soci (or by us).

    Everything is checked before it is trusted: every offset against the buffer, every
    count against the bytes that would have to hold it (before anything is allocated),
    checkpoints in order and inside the layer, one digest per span, entries inside the
    archive and not overlapping, entry types known and names without NUL or ``..``.
    What the TOC decodes to is bounded by :func:`decode_budget` of the zTOC's size, as
    references may share one long string many times over.

    With ``lazy_files`` the TOC entries are checked when they are decoded instead
    (:class:`LazyFiles`): the header, checkpoints and span digests are still checked
    here, and iterating the files checks them all as an eager parse does.

    Raises:
        BadZtoc: naming the first problem found.
    """
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    if len(mv) < 8:
        raise BadZtoc(f"zTOC is {len(mv)} bytes: too short to be a zTOC")
    r = _Reader(mv, "zTOC")
    allowance = decode_budget(len(mv))
    z = r.root()
    version = r.string(z, 0, 64)
    if not version:
        raise BadZtoc("zTOC has no version string (not a zTOC?)")
    tool = r.string(z, 1, _MAX_SHORT_STRING)
    csize = r.scalar(z, 2, "<q", 0)
    usize = r.scalar(z, 3, "<q", 0)
    if csize < 0 or usize < 0:
        raise BadZtoc(f"zTOC archive sizes are negative ({csize}, {usize})")
    toc_at = r._field(z, 4)
    mstart = mlen = 0
    files: list[FileEntry] | LazyFiles = []
    if toc_at:
        toc = r.table_at(toc_at)
        mstart, mlen = r.vector(toc, 0, 4)
        if not lazy_files:
            files, spent = _read_entries(r, mstart, mlen, allowance)
            allowance -= spent
    ci_at = r._field(z, 5)
    if not ci_at:
        raise BadZtoc("zTOC has no compression info")
    ci = r.table_at(ci_at)
    algo = r.scalar(ci, 0, "<b", _ALGO_GZIP)
    if algo not in (_ALGO_GZIP, _ALGO_UNCOMPRESSED):
        raise BadZtoc(f"zTOC compression algorithm {algo} is not gzip (1) or uncompressed (2)")
    max_span_id = r.scalar(ci, 1, "<i", 0)
    dstart, dlen = r.vector(ci, 2, 4)
    if max_span_id + 1 != dlen:
        raise BadZtoc(f"zTOC max_span_id {max_span_id} does not match its {dlen} span digests")
    allowance -= dlen * _DIGEST_COST
    if allowance < 0:
        raise _budget_error(r, f"span digests ({dlen})")
    digests = []
    for k in range(dlen):
        d = r.string_at(dstart + 4 * k, 80)
        if not _DIGEST_RE.match(d):
            raise BadZtoc(f"zTOC span digest {k} {d[:80]!r} is not sha256:<64 hex digits>")
        digests.append(d.decode("ascii"))
    cstart, clen = r.vector(ci, 3, 1)
    blob = mv[cstart:cstart + clen]
    if lazy_files:
        files = LazyFiles(r, mstart, mlen, usize, allowance)
    else:
        _check_entries(files, usize)
    if algo == _ALGO_UNCOMPRESSED and not usize <= csize <= usize + MAX_TAR_PADDING:
        raise BadZtoc(f"zTOC of an uncompressed layer: the tar ends at {usize} but the layer "
                      f"is {csize} bytes (more than tar padding apart)")
    return Ztoc(
        version=_text(version), build_tool_identifier=_text(tool), compressed_archive_size=csize,
        uncompressed_archive_size=usize, files=files,
        compression="gzip" if algo == _ALGO_GZIP else "uncompressed", span_digests=digests,
        checkpoints_blob=blob,
    )


class _GoFlatBuilder:
    """FlatBuffers writer that lays out bytes exactly as Go's ``flatbuffers.Builder``.

    soci writes zTOCs with the Go builder, and byte-identical output depends on its
    algorithm: back-to-front writing, the same alignment padding, and vtable
    deduplication that compares field offsets only (Go's ``vtableEqual``; the Python
    package also compares object sizes, which can differ).  Bytes are appended to a
    reversed buffer (prepending, in effect) with one operation per field, so a TOC of
    100,000 entries serialises in about a second.  Method names follow the builders.

    A position is the number of bytes written so far (Go's ``Offset()``).  :meth:`spill`
    hands over the bytes written so far and keeps counting from there, so a writer can
    move a large buffer to disk piece by piece between objects
    (:mod:`prewarm.index.ztoc_spool`); what stays in memory is the unspilled tail and one
    (position, field offsets) pair per distinct vtable.
    """

    __slots__ = ("base", "minalign", "object_end", "rev", "vt_list", "vtable", "vtables")

    def __init__(self) -> None:
        self.rev = bytearray()
        self.base = 0  # bytes handed over by spill() before rev
        self.minalign = 1
        self.vtable: list[int] = []
        self.object_end = 0
        self.vtables: dict[tuple[int, ...], int] = {}
        self.vt_list: list[tuple[int, tuple[int, ...]]] = []

    def offset(self) -> int:
        return self.base + len(self.rev)

    def spill(self) -> bytearray:
        """The bytes written since the last spill, reversed (the last byte of the buffer first).

        Only between objects: :meth:`end_object` patches the bytes of its own object.
        """
        out = self.rev
        self.base += len(out)
        self.rev = bytearray()
        return out

    def prep(self, size: int, additional: int) -> None:
        self.minalign = max(self.minalign, size)
        pad = -(self.base + len(self.rev) + additional) & (size - 1)
        if pad:
            self.rev += bytes(pad)

    def prepend_uoffset(self, off: int) -> None:
        self.prep(4, 0)
        self.rev += (self.base + len(self.rev) - off + 4).to_bytes(4, "big")

    def create_string(self, data: bytes) -> int:
        self.prep(4, len(data) + 1)
        self.rev += b"\0"
        self.rev += data[::-1]
        self.rev += len(data).to_bytes(4, "big")
        return self.base + len(self.rev)

    def create_byte_vector(self, data: bytes | bytearray | memoryview) -> int:
        self.prep(4, len(data))
        self.rev += bytes(data)[::-1]
        self.rev += len(data).to_bytes(4, "big")
        return self.base + len(self.rev)

    def offset_vector(self, offsets: Sequence[int]) -> int:
        """StartVector(4, n, 4), PrependUOffsetT of each from the last, EndVector."""
        n = len(offsets)
        self.prep(4, 4 * n)
        for off in reversed(offsets):
            self.prepend_uoffset(off)
        self.rev += n.to_bytes(4, "big")
        return self.base + len(self.rev)

    def start_object(self, numfields: int) -> None:
        self.vtable = [0] * numfields
        self.object_end = self.base + len(self.rev)

    def add_offset(self, slot: int, off: int) -> None:
        if off:
            self.prepend_uoffset(off)
            self.vtable[slot] = self.base + len(self.rev)

    def add_int(self, slot: int, value: int, size: int, default: int = 0) -> None:
        if value != default:
            self.prep(size, 0)
            self.rev += value.to_bytes(size, "big", signed=value < 0)
            self.vtable[slot] = self.base + len(self.rev)

    def end_object(self) -> int:
        self.prep(4, 0)
        self.rev += bytes(4)  # soffset to the vtable, patched below
        at = len(self.rev)
        obj = self.base + at
        vt = self.vtable
        n = len(vt)
        while n and not vt[n - 1]:
            n -= 1
        raw = vt[:n]
        key = tuple(obj - a if a else 0 for a in raw)
        existing = self._find_vtable(obj, raw, key)
        if existing is None:
            for off in reversed(key):
                self.prep(2, 0)
                self.rev += off.to_bytes(2, "big")
            self.prep(2, 0)
            self.rev += (obj - self.object_end).to_bytes(2, "big")
            self.prep(2, 0)
            self.rev += ((n + 2) * 2).to_bytes(2, "big")
            existing = self.base + len(self.rev)
            self.vtables.setdefault(key, existing)
            self.vt_list.append((existing, key))
        self.rev[at - 4:at] = (existing - obj).to_bytes(4, "big", signed=True)
        return obj

    def _find_vtable(self, obj: int, raw: list[int], key: tuple[int, ...]) -> int | None:
        if obj >= 1 << 16:
            # every stored voffset is < 2**16 <= obj, so Go's comparison is exact equality
            return self.vtables.get(key)
        for voff, other in reversed(self.vt_list):  # Go: newest first, vtableEqual
            if len(other) == len(raw) and all(
                    (x == 0 and a == 0) or x == obj - a for x, a in zip(other, raw)):
                return voff
        return None

    def prepend_uoffsets(self, offsets: Sequence[int]) -> None:
        """PrependUOffsetT of each of ``offsets`` in order, inside a vector of offsets.

        The vector's ``prep(4, 4 * n)`` aligned the builder to 4 bytes and each offset
        keeps it so, so no padding falls between them: one pack for the lot.
        """
        at = self.base + len(self.rev) + 4
        self.rev += struct.pack(f">{len(offsets)}I", *[at + 4 * j - off for j, off in enumerate(offsets)])

    def end(self, root: int) -> None:
        """Go's ``Finish`` without the copy: the root offset, aligned to the largest scalar."""
        self.prep(self.minalign, 4)
        self.prepend_uoffset(root)

    def finish(self, root: int) -> bytes:
        self.end(root)
        return bytes(self.rev[::-1])


def serialize_ztoc(z: Ztoc) -> bytes:
    """The zTOC as soci's Go writer lays it out, byte for byte.

    FlatBuffers output depends on the order objects are created in, so this follows
    soci's ``ztocToFlatbuffer``: version and build tool strings; the file tables from the
    last to the first; the checkpoint bytes; the digest strings; the tables.  (The same
    order, entries read back from disk, is :meth:`prewarm.index.ztoc_spool.TocSpool.write`.)
    """
    b = _GoFlatBuilder()
    strings = _write_strings(b, z.version, z.build_tool_identifier)
    offsets = [0] * len(z.files)
    for k in range(len(z.files) - 1, -1, -1):
        offsets[k] = _write_entry(b, z.files[k])
    toc = _write_toc(b, b.offset_vector(offsets))
    checkpoints = b.create_byte_vector(z.checkpoints_blob)
    return b.finish(_write_root(b, strings, toc, checkpoints, z.span_digests, z.compression,
                                z.compressed_archive_size, z.uncompressed_archive_size))


def _write_strings(b: _GoFlatBuilder, version: str, build_tool_identifier: str) -> tuple[int, int]:
    """The zTOC's first objects: its version and build tool strings."""
    return b.create_string(_raw(version)), b.create_string(_raw(build_tool_identifier))


def _write_toc(b: _GoFlatBuilder, metadata: int) -> int:
    """The TOC table around the vector of entry tables."""
    b.start_object(1)
    b.add_offset(0, metadata)
    return b.end_object()


def _write_root(b: _GoFlatBuilder, strings: tuple[int, int], toc: int, checkpoints: int,
                span_digests: Sequence[str], compression: str, compressed_archive_size: int,
                uncompressed_archive_size: int) -> int:
    """The zTOC's last objects, after the checkpoint bytes: digests, compression info, root."""
    digests = b.offset_vector([b.create_string(d.encode("ascii")) for d in span_digests])
    b.start_object(4)
    b.add_int(1, len(span_digests) - 1, 4)
    b.add_offset(2, digests)
    b.add_offset(3, checkpoints)
    b.add_int(0, _ALGO_GZIP if compression == "gzip" else _ALGO_UNCOMPRESSED, 1, _ALGO_GZIP)
    info = b.end_object()
    b.start_object(6)
    b.add_offset(0, strings[0])
    b.add_offset(1, strings[1])
    b.add_offset(4, toc)
    b.add_int(2, compressed_archive_size, 8)
    b.add_int(3, uncompressed_archive_size, 8)
    b.add_offset(5, info)
    return b.end_object()


def _write_entry(b: _GoFlatBuilder, f: FileEntry) -> int:
    name = b.create_string(_raw(f.name))
    type_ = b.create_string(_raw(f.type))
    link = b.create_string(_raw(f.linkname))
    uname = b.create_string(_raw(f.uname))
    gname = b.create_string(_raw(f.gname))
    mtime = b.create_string(_raw(f.mod_time))
    xs = []
    for k, v in sorted(f.xattrs):
        ko = b.create_string(_raw(k))
        vo = b.create_string(_raw(v))
        b.start_object(2)
        b.add_offset(0, ko)
        b.add_offset(1, vo)
        xs.append(b.end_object())
    xattrs = b.offset_vector(xs)
    b.start_object(14)
    b.add_offset(0, name)
    b.add_offset(1, type_)
    b.add_int(2, f.uncompressed_offset, 8)
    b.add_int(3, f.uncompressed_size, 8)
    b.add_offset(4, link)
    b.add_int(5, f.mode, 8)
    b.add_int(6, f.uid & 0xFFFFFFFF, 4)
    b.add_int(7, f.gid & 0xFFFFFFFF, 4)
    b.add_offset(8, uname)
    b.add_offset(9, gname)
    b.add_offset(10, mtime)
    b.add_int(11, f.devmajor, 8)
    b.add_int(12, f.devminor, 8)
    b.add_offset(13, xattrs)
    return b.end_object()
