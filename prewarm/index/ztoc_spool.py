"""A zTOC built on disk: memory that does not grow with the layer's file count.

A zTOC stores every tar entry of its layer (name, metadata, xattrs), and soci's Go
FlatBuffers builder writes those entries from the LAST to the first.  Built in memory
(:class:`~prewarm.index.ztoc.Ztoc`, :func:`~prewarm.index.ztoc.serialize_ztoc`), a
layer of a million small files needs a Python object per entry and then the whole
187 MB zTOC two or three times over: issue 20 measured 943 MB.  Here instead:

1. While the layer is read, :class:`TocSpool` appends the entries, in batches, to an
   unnamed temporary file (each batch a ``marshal``-ed list of field tuples followed by
   its length, so the file can be read from its end), and the checkpoint blob to a
   second one.
2. :meth:`TocSpool.write` lays the zTOC out with serialize_ztoc's builder and in its
   order, reading the batches back from the last.  The builder's reversed output is
   spilled to a third temporary file every :data:`SPILL_BYTES`, and the position of
   each entry table (the TOC's offset vector wants them in the order they were made)
   to a fourth.
3. The reversed output is read back from its end into the zTOC, chunk by chunk and
   hashed on the way, under a temporary name beside the output, then renamed into
   place.  A failure removes it: the output is whole or absent.  (Before any of it, the
   checkpoints are checked as :class:`~prewarm.index.ztoc.Ztoc` checks them, read from
   their spool file by ``pread``: an mmap would fault in 64 KiB around each record.)

What stays in memory: one batch of entries, a few MiB of output, one (position, field
offsets) pair per distinct vtable (FlatBuffers shares them: 7 for the 160,000 files of
``bench.manyfiles``), and the span digests (one per span, whatever the file count).  The temporary files are unnamed
(``O_TMPFILE``), so they vanish when closed and when the process dies; they live beside
the output, whose folder needs room for about three times the zTOC while it is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import marshal
import operator
import os
import struct
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from prewarm.errors import BadZtoc, CorruptContent
from prewarm.index.ztoc import (
    FileEntry,
    Ztoc,
    _GoFlatBuilder,
    _write_entry,
    _write_root,
    _write_strings,
    _write_toc,
)

#: Entries per spooled batch: one ``marshal`` call each way.
BATCH_ENTRIES = 1024
#: Bytes of reversed output the builder holds before they go to disk; also the chunk
#: size of every read and write here.
SPILL_BYTES = 1 << 20
#: Entry table positions per read of the offsets file.
OFFSETS_BATCH = 1 << 16
#: FlatBuffers offsets are signed 32-bit: a buffer cannot grow past this.
MAX_FLATBUFFER_BYTES = (1 << 31) - 1

_LENGTH = struct.Struct("<I")
_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(FileEntry)))


@dataclasses.dataclass(frozen=True)
class ZtocFile:
    """A zTOC written to ``path``: what callers print, push and cache without reading it again.

    Attributes:
        path: the zTOC file.
        digest: ``sha256:<hex>`` of its bytes.
        size: its length in bytes.
        num_spans: spans (checkpoints) it lists.
        num_files: TOC entries it lists.
    """

    path: Path
    digest: str
    size: int
    num_spans: int
    num_files: int


class _FileSlices:
    """A file's bytes, read (``pread``) when sliced: a blob that is not in memory."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, key: slice, /) -> bytes:
        start, stop, step = key.indices(self._size)
        if step != 1:
            raise ValueError("a file is sliced with step 1 only")
        return _pread_exact(self._fd, max(0, stop - start), start)


def _pread_exact(fd: int, n: int, at: int) -> bytes:
    data = os.pread(fd, n, at)
    if len(data) != n:  # the spool files are ours: only a vanished disk gets here
        raise OSError(f"short read of a zTOC spool file: {len(data)} of {n} bytes at {at}")
    return data


class TocSpool:
    """The entries and checkpoint blob of a zTOC being built, kept in unnamed temporary files.

    The build (:func:`prewarm.index.ztoc_build.build_ztoc_file`) feeds it as the layer
    is read: :meth:`add_files` with the entries of each chunk of the tar stream, in
    stream order; :meth:`extend_checkpoints` and :meth:`patch_checkpoints` with the
    checkpoint blob (soci's zinfo, or the TarZinfo of an uncompressed layer).  Then
    :meth:`write` makes the zTOC file.  Use it as a context manager: closing removes
    the temporary files.
    """

    def __init__(self, folder: Path) -> None:
        """Open the spool files in ``folder`` (the output's folder: same disk, same quota).

        Raises:
            OSError: the folder is missing or not writable.
        """
        self.folder = folder
        self.num_files = 0
        with contextlib.ExitStack() as stack:
            self._entries = stack.enter_context(tempfile.TemporaryFile(dir=folder))
            self._checkpoints = stack.enter_context(tempfile.TemporaryFile(dir=folder))
            self._files = stack.pop_all()  # closed by close(); both closed here on an error
        self._batch: list[tuple[object, ...]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._files.close()

    # ---- while the layer is read --------------------------------------------------

    def add_files(self, files: Sequence[FileEntry]) -> None:
        """Append TOC entries, in tar stream order."""
        for f in files:
            self._batch.append(_FIELDS(f))
            if len(self._batch) == BATCH_ENTRIES:
                self._flush_batch()
        self.num_files += len(files)

    def _flush_batch(self) -> None:
        if self._batch:
            rec = marshal.dumps(self._batch)
            self._entries.write(rec)
            self._entries.write(_LENGTH.pack(len(rec)))
            self._batch = []

    def extend_checkpoints(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes to the checkpoint blob."""
        self._checkpoints.write(data)

    def patch_checkpoints(self, at: int, data: bytes) -> None:
        """Overwrite bytes of the checkpoint blob written before (its header)."""
        self._checkpoints.flush()
        os.pwrite(self._checkpoints.fileno(), data, at)

    # ---- reading back ---------------------------------------------------------------

    def files_backwards(self) -> Iterator[FileEntry]:
        """The entries from the last to the first, one batch in memory at a time."""
        self._flush_batch()
        f = self._entries
        f.flush()
        fd = f.fileno()
        pos = os.fstat(fd).st_size
        while pos:
            (n,) = _LENGTH.unpack(_pread_exact(fd, 4, pos - 4))
            pos -= 4 + n
            batch = marshal.loads(_pread_exact(fd, n, pos))
            for fields in reversed(batch):
                yield FileEntry(*fields)

    def _checkpoint_chunks_backwards(self) -> tuple[int, Iterator[bytes]]:
        """The checkpoint blob's size, and its bytes in chunks from the end, each reversed."""
        self._checkpoints.flush()
        fd = self._checkpoints.fileno()
        size = os.fstat(fd).st_size

        def chunks() -> Iterator[bytes]:
            pos = size
            while pos:
                k = min(SPILL_BYTES, pos)
                pos -= k
                yield _pread_exact(fd, k, pos)[::-1]

        return size, chunks()

    # ---- the zTOC -------------------------------------------------------------------

    def write(self, out: Path, *, version: str, build_tool_identifier: str, compressed_archive_size: int,
              uncompressed_archive_size: int, compression: str, span_digests: Sequence[str]) -> ZtocFile:
        """Write the zTOC to ``out`` (temporary name, checked, renamed); byte for byte what
        :func:`~prewarm.index.ztoc.serialize_ztoc` gives for the same entries and blob.

        Not fsynced: a zTOC is derived data, mostly pushed or copied on (the node cache
        copies it with an fsync, :meth:`~prewarm.store.ztoc_cache.ZtocCache.put_file`),
        and flushing hundreds of MB on a busy disk cost seconds.

        Raises:
            BadZtoc: the zTOC would pass FlatBuffers' 2 GiB.
            CorruptContent: the zTOC does not parse back (a builder bug).
            OSError: writing failed; ``out`` is as it was and no temporary file is left.
        """
        self._check(out, compressed_archive_size, uncompressed_archive_size, compression, span_digests)
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as dst, tempfile.TemporaryFile(dir=self.folder) as rev:
                self._lay_out(rev, version, build_tool_identifier, compressed_archive_size,
                              uncompressed_archive_size, compression, span_digests)
                digest, size = _copy_reversed(rev, dst)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ZtocFile(out, digest, size, len(span_digests), self.num_files)

    def _check(self, out: Path, csize: int, usize: int, compression: str, span_digests: Sequence[str]) -> None:
        """What :class:`Ztoc` checks of a built zTOC (checkpoints in order and inside the
        layer, one digest per span), the blob read from its spool file 17 bytes a record.

        Raises:
            CorruptContent: they disagree: a layer whose stream goes on far past its tar's
                end marker, say.
        """
        self._checkpoints.flush()
        fd = self._checkpoints.fileno()
        try:
            Ztoc.check_checkpoint_blob(_FileSlices(fd, os.fstat(fd).st_size), compressed_archive_size=csize,
                                       uncompressed_archive_size=usize, compression=compression,
                                       span_digests=span_digests)
        except BadZtoc as err:
            raise CorruptContent(f"built zTOC {out} is inconsistent: {err}") from err

    def _lay_out(self, rev: IO[bytes], version: str, tool: str, csize: int, usize: int, compression: str,
                 span_digests: Sequence[str]) -> None:
        """serialize_ztoc's sequence, with the reversed output spilled to ``rev``."""
        b = _GoFlatBuilder()

        def spill(force: bool = False) -> None:
            if force or len(b.rev) >= SPILL_BYTES:
                rev.write(b.spill())
                if b.base > MAX_FLATBUFFER_BYTES:
                    raise BadZtoc(f"the zTOC of this layer ({self.num_files} entries) would pass "
                                  f"FlatBuffers' 2 GiB limit: no zTOC can index it (pull it whole)")

        strings = _write_strings(b, version, tool)
        with tempfile.TemporaryFile(dir=self.folder) as positions:
            pending = array("I")
            for f in self.files_backwards():
                pending.append(_write_entry(b, f))
                spill()
                if len(pending) == OFFSETS_BATCH:
                    pending.tofile(positions)
                    pending = array("I")
            pending.tofile(positions)
            positions.seek(0)
            # the offset vector: StartVector(4, n, 4), then the tables from the last made
            n = self.num_files
            b.prep(4, 4 * n)
            left = n
            while left:
                tables = array("I")
                tables.fromfile(positions, min(OFFSETS_BATCH, left))
                left -= len(tables)
                b.prepend_uoffsets(tables)
                spill()
            b.rev += n.to_bytes(4, "big")
        toc = _write_toc(b, b.offset())
        # the checkpoint bytes, as create_byte_vector lays them out
        size, chunks = self._checkpoint_chunks_backwards()
        b.prep(4, size)
        for chunk in chunks:
            b.rev += chunk
            spill()
        b.rev += size.to_bytes(4, "big")
        checkpoints = b.offset()
        b.end(_write_root(b, strings, toc, checkpoints, span_digests, compression, csize, usize))
        spill(force=True)


def _copy_reversed(src: IO[bytes], dst: IO[bytes]) -> tuple[str, int]:
    """Write ``src`` to ``dst`` back to front; the sha256 digest and length of what was written."""
    src.flush()
    fd = src.fileno()
    size = pos = os.fstat(fd).st_size
    h = hashlib.sha256()
    while pos:
        k = min(SPILL_BYTES, pos)
        pos -= k
        chunk = _pread_exact(fd, k, pos)[::-1]
        h.update(chunk)
        dst.write(chunk)
    return "sha256:" + h.hexdigest(), size
