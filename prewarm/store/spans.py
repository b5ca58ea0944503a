"""Landing one span's bytes: its sizes, the tar headers it holds, and its file data.

A span arrives verified against its digest and inflated (``inflate_span`` checked the
next checkpoint's window), but the zTOC that placed it is untrusted: before any byte
counts, every TOC entry whose header chain ends in the span is compared with the real
tar headers (:func:`check_headers`, with the C checker of :mod:`prewarm.store.landing`
for the common one-block headers), and chains that cross a span boundary beyond a
checkpoint window are checked by whichever neighbour lands second
(:func:`check_straddlers`).  :func:`write_pieces` then creates the files born whole in
this span and pwrites pieces of the others, without a lock: spans are disjoint.

Everything here reads the layer's :class:`~prewarm.store.table.LandingTable`; the
layer's lock, its ``landed`` bytes and its commit belong to :mod:`prewarm.store.content`.
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Iterable
from pathlib import Path

from prewarm.errors import BadSpan, BadZtoc, CorruptContent, InsufficientSpace
from prewarm.index.tarindex import parse_header_run
from prewarm.index.ztoc import MAX_TAR_PADDING, FileEntry, Span
from prewarm.store import landing
from prewarm.store.atomic import atomic_write
from prewarm.store.directio import DirectWriter
from prewarm.store.layerfs import LayerWriter, parse_mod_time
from prewarm.store.table import LandingTable, SpanRange, entry_key


def fetch_range(span: Span) -> tuple[int, int]:
    """The compressed bytes to fetch for ``span`` and hand to :meth:`ContentStore.land_span`.

    Span 0 of a gzip layer starts after the gzip header, which no span covers; the layer
    digest needs those bytes too, so span 0 is fetched from offset 0.  Verify the span
    digest and inflate over the last ``compressed_end - compressed_start`` bytes.
    """
    return (0 if span.index == 0 else span.compressed_start), span.compressed_end


def split_padding(digest: str, span: SpanRange, index: int, is_last: bool,
                  uncompressed: memoryview) -> tuple[memoryview, memoryview | None]:
    """(the span's own bytes, its part of the decompressed stream for the diff_id, or None).

    The last span's output may carry the zero padding after the archive end, which the
    diff_id covers but no file does.  None: the last span came without it, so whether
    the stream has padding is not known here (the store inflates the span again).

    Raises:
        BadSpan: more bytes than the span holds, or padding that is not zeros.
    """
    want = span.uncompressed_end - span.uncompressed_start
    extra = uncompressed.nbytes - want
    if extra <= 0:
        return uncompressed, None if is_last else uncompressed
    if not is_last or extra > MAX_TAR_PADDING:
        raise BadSpan(f"span {index} of layer {digest}: {uncompressed.nbytes} bytes inflated, {want} expected")
    if bytes(uncompressed[want:]).count(0) != extra:
        raise BadSpan(f"span {index} of layer {digest}: the {extra} bytes after the archive end are not "
                      "zero padding")
    return uncompressed[:want], uncompressed


def compressed_base(digest: str, span: SpanRange, index: int, compressed: bytes | memoryview,
                    uncompressed: memoryview) -> int:
    """The layer offset of ``compressed[0]``, once both buffers have the span's sizes.

    Raises:
        BadSpan: a buffer of another size, or span 0 without the layer's first bytes.
    """
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
    if len(uncompressed) != span.uncompressed_end - span.uncompressed_start:
        raise BadSpan(f"span {index} of layer {digest}: {len(uncompressed)} bytes inflated, "
                      f"{span.uncompressed_end - span.uncompressed_start} expected")
    return base


def check_headers(digest: str, table: LandingTable, span: Span, out: memoryview) -> None:
    """Every TOC entry whose header chain ends in this span must be what the headers say.

    Raises:
        BadZtoc: naming the entry and the difference.
    """
    ustart, uend = span.uncompressed_start, span.uncompressed_end
    window: bytes | memoryview = span.checkpoint.window if span.checkpoint is not None else b""
    c = landing.backend()
    todo: Iterable[int]
    if c is not None and table.records:
        todo = landing.check_headers(c, table.records, table.heap, out, ustart)
    else:
        todo = range(bisect.bisect_right(table.data_starts, ustart), bisect.bisect_right(table.data_starts, uend))
    for k in todo:
        h = table.header_starts[k]
        d = table.data_starts[k]
        if h >= ustart:
            buf: bytes | memoryview = out[: d - ustart]
            pos, base = h - ustart, ustart
        else:
            back = ustart - h
            if back > len(window):
                continue  # checked with the previous span's tail: check_straddlers
            buf = bytes(window[len(window) - back:]) + bytes(out[: d - ustart])
            pos, base = 0, h
        _check_keyed_chain(digest, table, k, buf, pos, base)
    end = table.archive_data_end
    if end < uend:
        tail = out[max(end - ustart, 0):]
        if tail.nbytes and bytes(tail) != bytes(tail.nbytes):
            raise BadZtoc(f"layer {digest}: the TOC ends at stream offset {end} but span {span.index} has "
                          "non-zero bytes after it (entries missing from the TOC)")


def check_straddlers(digest: str, work: Path, table: LandingTable, index: int, out: memoryview) -> None:
    """Header chains across a span boundary that no checkpoint window covers.

    (Uncompressed layers have no windows; a PAX chain may be longer than 32 KiB.)
    Whichever of the two spans lands second checks the chain: the first leaves its
    part in ``work`` (``tail-<i>`` or ``head-<i+1>``).  Call it under the layer lock.

    Raises:
        BadZtoc: the chain does not match the TOC, or is longer than a span.
    """
    r = table.spans[index]
    if index > 0:
        k = table.straddler(r.uncompressed_start)
        if k is not None and not table.window_covers(r.uncompressed_start, k):
            head = bytes(out[: table.data_starts[k] - r.uncompressed_start])
            tail_path = work / f"tail-{index - 1}"
            if tail_path.exists():
                buf = tail_path.read_bytes() + head
                _check_chain(digest, table.ztoc.files[k], table.header_starts[k], buf, 0, table.header_starts[k])
            else:
                atomic_write(work / f"head-{index}", head, durable=False)
    if index + 1 < len(table.spans):
        b = r.uncompressed_end
        k = table.straddler(b)
        if k is not None and not table.window_covers(b, k):
            h = table.header_starts[k]
            if h < r.uncompressed_start:
                raise BadZtoc(f"layer {digest}: the header chain of tar entry {table.ztoc.files[k].name!r} is "
                              f"longer than span {index}; use a larger span size")
            tail = bytes(out[h - r.uncompressed_start:])
            head_path = work / f"head-{index + 1}"
            if head_path.exists():
                _check_chain(digest, table.ztoc.files[k], h, tail + head_path.read_bytes(), 0, h)
            else:
                atomic_write(work / f"tail-{index}", tail, durable=False)


def write_pieces(digest: str, root: Path, fs: Path, table: LandingTable, span: SpanRange, out: memoryview,
                 direct: DirectWriter) -> None:
    """Write the span's file data into the layer tree ``fs`` (no lock: spans are disjoint).

    Files born in this span are created whole with their metadata; pieces of the others
    are pwritten into the files the skeleton pre-sized.

    Raises:
        InsufficientSpace: the disk filled up (naming the store ``root`` and the file).
        UnsafeArchive: the tree is not what the TOC says.
    """
    ustart = span.uncompressed_start
    files = table.ztoc.files
    born = table.born
    c = landing.backend()
    with LayerWriter(fs) as writer:

        def write(extent: int, file_offset: int, stream_offset: int, length: int) -> None:
            off = stream_offset - ustart
            if born[extent]:
                writer.create_whole(table.placements[extent].path, out[off:off + length], direct, table.meta[extent])
                return
            fd = writer.open_data(table.placements[extent].path)
            try:
                direct.pwrite(fd, out[off:off + length], file_offset)
            finally:
                os.close(fd)

        extent = -1
        try:
            if c is not None and table.records:
                landing.write_pieces(c, table.records, table.heap, writer.root_fd, out, ustart, direct,
                                     table.placements, write)
            else:
                for p in table.spanmap.pieces(ustart, span.uncompressed_end):
                    extent = p.extent
                    write(p.extent, p.file_offset, p.stream_offset, p.length)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                name = files[extent].name if extent >= 0 else err.filename
                raise InsufficientSpace(f"no space left in {root} writing {name!r} of layer "
                                        f"{digest}") from None
            raise


def _check_keyed_chain(digest: str, table: LandingTable, k: int, buf: bytes | memoryview, pos: int,
                       base: int) -> None:
    """:func:`_check_chain` for TOC entry ``k``, decoding the entry only when its key differs.

    Raises:
        BadZtoc: no valid chain there, or it says something else than the TOC.
    """
    try:
        real, _ = parse_header_run(buf, pos, base)
    except CorruptContent as err:
        raise BadZtoc(f"layer {digest}: no tar header where the TOC puts entry {table.ztoc.files[k].name!r} "
                      f"(stream offset {table.header_starts[k]}): {err}") from None
    try:
        same = entry_key(real) == table.key(k)
    except BadZtoc:
        same = False
    if not same:
        _compare_entry(digest, table.ztoc.files[k], real)  # names the field that differs


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
