"""Build a soci-compatible zTOC from a layer in ONE pass over its compressed bytes.

soci reads a layer three times (TOC, checkpoints, digests).  Here one loop does all
three: zlib-ng (or libz) inflates with ``Z_BLOCK`` (:mod:`prewarm.index.zran`) into a sliding output
buffer; at every block boundary soci's rule decides whether to record a checkpoint
(compressed offset, uncompressed offset, leftover bits, the 32 KiB before it); the
compressed bytes of each span are hashed as they go by; and the output is fed to a
:class:`~prewarm.index.tarindex.TarIndexer`, which reads only the tar headers.

Checkpoint rule (zlib's zran, as in soci's ``gzip_zinfo.c``): after each inflate call,
if the stream is at a block boundary (``data_type & 128``), not after the last block
(``data_type & 64`` clear), and either nothing was output yet or more than
``span_size`` bytes came out since the previous checkpoint, record one.  Concatenated
gzip members (pigz) continue the counts across members.

Between checkpoints no block boundary can qualify (fewer than ``span_size`` bytes came
out since the last one), so the inflater runs with ``Z_NO_FLUSH`` over megabytes at a time and
switches to ``Z_BLOCK`` only once a checkpoint is due.  The tar headers are parsed in
the same thread, straight from the output buffer before it slides.  (A second thread for
them was measured no faster on an idle 2-core machine: the two threads convoy on the GIL
each time inflate returns; and it cost 8% more CPU, which a busy node does not have.)

Memory is bounded by the output buffers plus the zTOC itself: a :class:`FileEntry` per
tar entry, 33 KB per span (:func:`build_ztoc`); or, with :func:`build_ztoc_file`, by
the output buffers and a few MiB whatever the layer's size and file count, the TOC and
checkpoints spooled to disk (:mod:`prewarm.index.ztoc_spool`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from prewarm.errors import BadZtoc, ConfigError, CorruptContent
from prewarm.index.tarindex import TarIndexer
from prewarm.index.zran import (
    DT_END_OF_BLOCK,
    DT_LAST_BLOCK,
    Z_BUF_ERROR,
    Z_OK,
    Z_STREAM_END,
    BlockInflater,
)
from prewarm.index.ztoc import (
    COMPRESSIONS,
    WINDOW_SIZE,
    ZINFO_HEADER_SIZE,
    ZTOC_VERSION,
    FileEntry,
    Ztoc,
    tar_zinfo_bytes,
)
from prewarm.index.ztoc_spool import TocSpool, ZtocFile

#: Uncompressed bytes inflated between two slides of the output buffer.
OUTPUT_CHUNK = 2 << 20
#: Bytes read from a file per chunk.
READ_CHUNK = 1 << 20

_CP_HEAD = struct.Struct("<qqB")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def detect_compression(head: bytes) -> str:
    """``"gzip"``, ``"zstd"`` or ``"uncompressed"`` from the first bytes of a layer."""
    if head[:2] == _GZIP_MAGIC:
        return "gzip"
    if head[:4] == _ZSTD_MAGIC:
        return "zstd"
    return "uncompressed"


def _check_span_size(span_size: int) -> None:
    if span_size < 1:
        raise ConfigError(f"span size {span_size} must be a positive number of bytes")


class _SpanHasher:
    """sha256 of each span's compressed bytes, fed chunk by chunk as they are inflated."""

    def __init__(self) -> None:
        self.digests: list[str] = []
        self._h: hashlib._Hash | None = None
        self._upto = 0  # stream offset hashed so far (valid once a span is open)
        self._last_byte = b""  # the byte just before the current chunk

    def begin_chunk(self, chunk_start: int, prev_chunk: bytes) -> None:
        if prev_chunk:
            self._last_byte = prev_chunk[-1:]

    def catch_up(self, chunk: bytes, chunk_start: int, upto: int) -> None:
        """Hash the current chunk's bytes up to stream offset ``upto``."""
        if self._h is not None and upto > self._upto:
            self._h.update(memoryview(chunk)[self._upto - chunk_start:upto - chunk_start])
            self._upto = upto

    def checkpoint(self, chunk: bytes, chunk_start: int, cin: int, bits: int) -> None:
        """Close the open span at ``cin`` and open the next at ``cin - (bits != 0)``."""
        self.catch_up(chunk, chunk_start, cin)
        if self._h is not None:
            self.digests.append("sha256:" + self._h.hexdigest())
        self._h = hashlib.sha256()
        self._upto = cin
        if bits:
            i = cin - 1 - chunk_start
            self._h.update(chunk[i:i + 1] if i >= 0 else self._last_byte)

    def finish(self) -> None:
        if self._h is not None:
            self.digests.append("sha256:" + self._h.hexdigest())
            self._h = None


class _TocSink(Protocol):
    """Where a build puts the TOC entries and checkpoint blob: memory or a :class:`TocSpool`."""

    def add_files(self, files: Sequence[FileEntry]) -> None: ...

    def extend_checkpoints(self, data: bytes | bytearray | memoryview) -> None: ...

    def patch_checkpoints(self, at: int, data: bytes) -> None: ...


class _MemoryToc:
    """The TOC and checkpoint blob in memory, for a :class:`Ztoc` object."""

    def __init__(self) -> None:
        self.files: list[FileEntry] = []
        self.blob = bytearray()

    def add_files(self, files: Sequence[FileEntry]) -> None:
        self.files.extend(files)

    def extend_checkpoints(self, data: bytes | bytearray | memoryview) -> None:
        self.blob += data

    def patch_checkpoints(self, at: int, data: bytes) -> None:
        self.blob[at:at + len(data)] = data


@dataclasses.dataclass(frozen=True)
class _Indexed:
    """What one pass over a layer found besides its TOC and checkpoints."""

    compressed_archive_size: int
    uncompressed_archive_size: int
    span_digests: list[str]


def build_ztoc(chunks: Iterable[bytes], *, span_size: int, build_tool_identifier: str) -> Ztoc:
    """Build the zTOC of a gzip tar layer from its compressed bytes, read once.

    The whole TOC is kept in memory (a :class:`FileEntry` per entry): for small layers
    and tools; :func:`build_ztoc_file` writes the same zTOC in bounded memory.

    Args:
        chunks: the layer's compressed bytes in order, in chunks of any size (a file,
            or a registry blob stream).
        span_size: uncompressed bytes between checkpoints, at least (soci: 4 MiB).
        build_tool_identifier: written into the zTOC.

    Raises:
        CorruptContent: the bytes are not a complete gzip stream.
        BadTarHeader: the uncompressed stream is not a tar archive soci can index.
        ConfigError: ``span_size`` is not positive.
    """
    toc = _MemoryToc()
    found = _index_gzip(chunks, span_size, toc)
    return _ztoc(found, toc, "gzip", build_tool_identifier)


def _ztoc(found: _Indexed, toc: _MemoryToc, compression: str, build_tool_identifier: str) -> Ztoc:
    try:
        return Ztoc(version=ZTOC_VERSION, build_tool_identifier=build_tool_identifier,
                    compressed_archive_size=found.compressed_archive_size,
                    uncompressed_archive_size=found.uncompressed_archive_size, files=toc.files,
                    compression=compression, span_digests=found.span_digests,
                    checkpoints_blob=bytes(toc.blob))
    except BadZtoc as err:  # pragma: no cover - would be a builder bug
        raise CorruptContent(f"built zTOC is inconsistent: {err}") from err


def _index_gzip(chunks: Iterable[bytes], span_size: int, toc: _TocSink) -> _Indexed:
    """The one pass over a gzip layer: entries and checkpoints go to ``toc``."""
    _check_span_size(span_size)
    hist = WINDOW_SIZE
    out = (ctypes.c_ubyte * (hist + OUTPUT_CHUNK))()
    out_addr = ctypes.addressof(out)
    out_mv = memoryview(out).cast("B")
    wpos = fed = hist
    indexer = TarIndexer()
    hasher = _SpanHasher()
    toc.extend_checkpoints(bytes(ZINFO_HEADER_SIZE))  # count and span size, patched at the end
    count = 0
    totin = totout = last = 0
    chunk_start = 0
    member_done = False
    started = False
    prev: bytes = b""
    inf = BlockInflater()
    try:
        for raw in chunks:
            chunk = raw if isinstance(raw, bytes) else bytes(raw)
            if not chunk:
                continue
            hasher.begin_chunk(chunk_start, prev)
            keep = ctypes.c_char_p(chunk)  # keeps the address valid for this chunk
            addr = ctypes.cast(keep, ctypes.c_void_p).value or 0
            inf.set_input(addr, len(chunk))
            while inf.avail_in:
                if member_done:
                    inf.reset()
                    member_done = False
                if wpos == len(out_mv):
                    toc.add_files(indexer.feed(out_mv[fed:wpos]))
                    ctypes.memmove(out_addr, out_addr + wpos - hist, hist)
                    wpos = fed = hist
                room = len(out_mv) - wpos
                # a boundary can only qualify once more than span_size bytes came out
                due = count == 0 or totout - last >= span_size
                if not due:
                    room = min(room, last + span_size - totout)
                before_in = inf.avail_in
                inf.set_output(out_addr + wpos, room)
                ret = inf.inflate_block() if due else inf.inflate()
                totin += before_in - inf.avail_in
                produced = room - inf.avail_out
                totout += produced
                wpos += produced
                if ret == Z_STREAM_END:
                    member_done = True
                    continue
                if ret != Z_OK and ret != Z_BUF_ERROR:
                    raise CorruptContent(f"layer is not valid gzip at compressed offset {totin}: "
                                         f"{inf.message()} (zlib code {ret})")
                dt = inf.data_type
                if due and dt & DT_END_OF_BLOCK and not dt & DT_LAST_BLOCK and (
                        totout == 0 or totout - last > span_size):
                    bits = dt & 7
                    hasher.checkpoint(chunk, chunk_start, totin, bits)
                    toc.extend_checkpoints(_CP_HEAD.pack(totin, totout, bits))
                    toc.extend_checkpoints(out_mv[wpos - hist:wpos])
                    count += 1
                    last = totout
                    started = True
            if started:
                hasher.catch_up(chunk, chunk_start, chunk_start + len(chunk))
            chunk_start += len(chunk)
            prev = chunk
        if not member_done:
            raise CorruptContent(f"gzip stream ends early: {chunk_start} compressed bytes, "
                                 f"no gzip trailer (truncated layer?)")
        toc.add_files(indexer.feed(out_mv[fed:wpos]))
        toc.add_files(indexer.finish())
    finally:
        inf.close()
    hasher.finish()
    if count == 0:
        raise CorruptContent("gzip stream has no deflate data to index")
    toc.patch_checkpoints(0, struct.pack("<iq", count, span_size))
    usize = indexer.ended_at if indexer.ended_at is not None else indexer.offset
    return _Indexed(chunk_start, usize, hasher.digests)


def build_tar_ztoc(chunks: Iterable[bytes], *, span_size: int,
                   build_tool_identifier: str) -> Ztoc:
    """Build the zTOC of an uncompressed tar layer (TarZinfo form: fixed-size spans).

    Raises:
        BadTarHeader: the bytes are not a tar archive soci can index.
        ConfigError: ``span_size`` is not positive.
    """
    toc = _MemoryToc()
    found = _index_tar(chunks, span_size, toc)
    return _ztoc(found, toc, "uncompressed", build_tool_identifier)


def _index_tar(chunks: Iterable[bytes], span_size: int, toc: _TocSink) -> _Indexed:
    """The one pass over an uncompressed layer: entries and the TarZinfo go to ``toc``."""
    _check_span_size(span_size)
    indexer = TarIndexer()
    digests: list[str] = []
    h = hashlib.sha256()
    in_span = 0
    total = 0
    for raw in chunks:
        if not raw:
            continue
        toc.add_files(indexer.feed(raw))
        mv = memoryview(raw)
        while len(mv):
            take = min(len(mv), span_size - in_span)
            h.update(mv[:take])
            mv = mv[take:]
            in_span += take
            if in_span == span_size:
                digests.append("sha256:" + h.hexdigest())
                h = hashlib.sha256()
                in_span = 0
        total += len(raw)
    toc.add_files(indexer.finish())
    if in_span:
        digests.append("sha256:" + h.hexdigest())
    toc.extend_checkpoints(tar_zinfo_bytes(span_size, total))
    # as soci: the layer's size for the spans, the tar end marker's for the archive
    usize = indexer.ended_at if indexer.ended_at is not None else indexer.offset
    return _Indexed(total, usize, digests)


def build_ztoc_file(chunks: Iterable[bytes], out: Path, *, span_size: int, build_tool_identifier: str,
                    compression: str = "gzip") -> ZtocFile:
    """Build the zTOC of a layer into the file ``out``, in memory bounded whatever its file count.

    The same one pass, and the same bytes, as :func:`build_ztoc` (or
    :func:`build_tar_ztoc` with ``compression="uncompressed"``) then
    :func:`~prewarm.index.ztoc.serialize_ztoc`; but the entries wait in temporary files
    beside ``out`` instead of in memory (:mod:`prewarm.index.ztoc_spool`), so a layer of
    a million files costs a few MiB, not a GiB.  ``out`` is written under a temporary
    name and renamed: it is whole or as it was.

    Raises:
        CorruptContent: the bytes are not a complete gzip stream.
        BadTarHeader: the uncompressed stream is not a tar archive soci can index.
        ConfigError: ``span_size`` is not positive, ``compression`` is neither
            ``"gzip"`` nor ``"uncompressed"``, or ``out`` (or its temporary files beside
            it) cannot be written.
    """
    if compression not in COMPRESSIONS:
        raise ConfigError(f"zTOC compression {compression!r} is not one of {COMPRESSIONS}")
    _check_span_size(span_size)
    index = _index_gzip if compression == "gzip" else _index_tar
    try:
        with TocSpool(out.parent) as spool:
            found = index(chunks, span_size, spool)
            return spool.write(out, version=ZTOC_VERSION, build_tool_identifier=build_tool_identifier,
                               compressed_archive_size=found.compressed_archive_size,
                               uncompressed_archive_size=found.uncompressed_archive_size,
                               compression=compression, span_digests=found.span_digests)
    except OSError as err:  # the registry client turns its own into RegistryError: these are files
        raise ConfigError(f"cannot write zTOC {out}: {err.strerror or err} (its folder needs room for "
                          f"about three times the zTOC while it is built)") from err


def read_chunks(path: Path, chunk_size: int = READ_CHUNK) -> Iterable[bytes]:
    """The file's bytes in chunks (a generator: the file is read once, sequentially)."""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            yield chunk


def _layer_kind(p: Path) -> str:
    """"gzip" or "uncompressed" from a local layer's first bytes.

    Raises:
        ConfigError: the file cannot be read, or it is zstd.
    """
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise ConfigError(f"cannot read layer {p}: {err.strerror or err}") from err
    kind = detect_compression(head)
    if kind == "zstd":
        raise ConfigError(f"layer {p} is zstd-compressed: SOCI builds no zTOC for zstd layers "
                          f"(they are pulled whole)")
    return kind


def build_ztoc_from_file(path: str | Path, *, span_size: int,
                         build_tool_identifier: str) -> Ztoc:
    """Build the zTOC of a local layer file, gzip or uncompressed tar.

    Raises:
        ConfigError: the file cannot be read, or it is zstd (soci indexes no zstd layer).
        CorruptContent: the layer is not a valid gzip stream or tar archive.
    """
    p = Path(path)
    build = build_ztoc if _layer_kind(p) == "gzip" else build_tar_ztoc
    return build(read_chunks(p), span_size=span_size, build_tool_identifier=build_tool_identifier)


def build_ztoc_file_from_file(path: str | Path, out: Path, *, span_size: int,
                              build_tool_identifier: str) -> ZtocFile:
    """Build the zTOC of a local layer file (gzip or tar) into ``out``, as :func:`build_ztoc_file`.

    Raises:
        ConfigError: the layer cannot be read, or it is zstd (soci indexes no zstd layer).
        CorruptContent: the layer is not a valid gzip stream or tar archive.
        ConfigError: also when ``out`` cannot be written.
    """
    p = Path(path)
    return build_ztoc_file(read_chunks(p), out, span_size=span_size,
                           build_tool_identifier=build_tool_identifier, compression=_layer_kind(p))


# ==== checking a zTOC against a layer =====================================================

def verify_ztoc(z: Ztoc, path: str | Path) -> int:
    """Check a zTOC (ours or soci's) against a local layer file, span by span.

    Each span's compressed bytes must match its digest and inflate, from its checkpoint
    alone, to exactly its uncompressed size, ending in the next checkpoint's window; the
    last must end the gzip stream.  The inflated stream, indexed again, must give the
    zTOC's TOC entry for entry.  Memory stays at about one span.

    Returns:
        The number of spans checked.

    Raises:
        ConfigError: the layer cannot be read.
        DigestMismatch: a span's bytes do not match its digest (names the span).
        BadSpan: a span does not inflate as the zTOC says.
        BadZtoc: sizes or the TOC do not match the layer (names the first difference).
    """
    from prewarm.index.inflate import inflate_span
    from prewarm.resolve.digest import verify

    p = Path(path)
    try:
        f = open(p, "rb")  # noqa: SIM115 - opened apart, so that only its own failure is "cannot read"
    except OSError as err:
        raise ConfigError(f"cannot read layer {p}: {err.strerror or err}") from err
    with f:
        size = f.seek(0, 2)
        if size != z.compressed_archive_size:
            raise BadZtoc(f"layer {p} is {size} bytes but the zTOC is for "
                           f"{z.compressed_archive_size} bytes")
        indexer = TarIndexer()
        files: list[FileEntry] = []
        for i in range(z.num_spans):
            s = z.span(i)
            f.seek(s.compressed_start)
            data = f.read(s.compressed_end - s.compressed_start)
            verify(data, s.digest, what=f"span {i} of {p}")
            last = i == z.num_spans - 1
            nxt = z.checkpoint(i + 1).window if not last and z.compression == "gzip" else None
            out = inflate_span(s, data, next_window=nxt, is_last=last)
            files.extend(indexer.feed(out))
        files.extend(indexer.finish())
    usize = indexer.ended_at if indexer.ended_at is not None else indexer.offset
    for k, (want, got) in enumerate(zip(z.files, files)):
        if want != got:
            raise BadZtoc(f"TOC entry {k} ({want.name!r}) differs from the layer's tar header "
                           f"({got.name!r}): {_first_difference(want, got)}")
    if len(files) != len(z.files):
        raise BadZtoc(f"the zTOC lists {len(z.files)} files, the layer has {len(files)}")
    if usize != z.uncompressed_archive_size:
        raise BadZtoc(f"the tar stream ends at {usize}, the zTOC says "
                       f"{z.uncompressed_archive_size}")
    return z.num_spans


def _first_difference(a: FileEntry, b: FileEntry) -> str:
    import dataclasses

    for field in dataclasses.fields(FileEntry):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if x != y:
            return f"{field.name} is {x!r} in the zTOC, {y!r} in the layer"
    return "no difference"
