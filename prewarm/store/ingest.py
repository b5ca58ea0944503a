"""A whole layer blob, streamed into a layer tree and verified twice.

Why a second path: a layer without a zTOC (small, zstd, uncompressed, or a registry that
does not honour Range) cannot land in spans.  :func:`unpack_stream` decompresses the
blob as it streams, hashes the compressed bytes against the layer digest and the tar
stream against the diff_id, and writes entries with the same
:class:`~prewarm.store.layerfs.LayerWriter` the span path uses; memory stays bounded
whatever the layer size.  The layer's lock, its wipe on failure and its commit belong
to :meth:`prewarm.store.content.ContentStore.ingest_stream`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prewarm.errors import (
    CorruptContent,
    DiffIdMismatch,
    DigestMismatch,
    InsufficientSpace,
    PrewarmError,
    StoreError,
)
from prewarm.index.tarindex import TarIndexer
from prewarm.index.ztoc import FileEntry
from prewarm.resolve.digest import parse_digest
from prewarm.store.directio import DirectWriter
from prewarm.store.layerfs import EntryChecker, LayerWriter, entry_meta
from prewarm.store.syscalls import syncfs

#: Bytes read from the decompressor at a time (memory bound).
STREAM_READ = 1 << 20


def compression_of(media_type: str) -> str:
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


class ExpansionLimit(CorruptContent):
    """A layer that unpacks to more than its cap (a decompression bomb, or a cap set too low)."""


#: While unpacking, the store's free space is checked again after every this many bytes.
SPACE_CHECK_EVERY = 64 << 20


def unpack_stream(digest: str, fs: Path, chunks: Iterable[bytes], compression: str, diff_id: str | None,
                  direct: DirectWriter, *, max_uncompressed: int | None = None,
                  check_space: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write the layer streamed as ``chunks`` into the empty directory ``fs``; its ``ready`` record.

    ``max_uncompressed`` caps what the stream may unpack to (nothing else bounds a whole
    layer: a 261 KB gzip can inflate to gigabytes); ``check_space(n)`` is asked, every
    :data:`SPACE_CHECK_EVERY` bytes, whether the next ``n`` still fit.

    Raises:
        ExpansionLimit: the stream unpacks to more than ``max_uncompressed``.
        InsufficientSpace: from ``check_space``.
        DigestMismatch: the blob does not hash to ``digest``; DiffIdMismatch: its tar stream not to ``diff_id``.
        CorruptContent, BadTarHeader, UnsafeArchive: the tar stream is broken or hostile.
        OSError: ENOSPC or EDQUOT (the caller names the store).
    """
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
    # Without a diff_id to check, the one the stream hashes to is recorded (never a claim).
    tar_hash = hashlib.new(parse_digest(diff_id)[0] if diff_id else "sha256")
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
                if max_uncompressed is not None and offset + len(chunk) > max_uncompressed:
                    raise ExpansionLimit(f"layer {digest} unpacks to more than {max_uncompressed} bytes, the cap for "
                                         f"its size (PREWARM_MAX_EXPANSION times its compressed bytes); refused")
                if check_space is not None and offset // SPACE_CHECK_EVERY != (offset + len(chunk)) // SPACE_CHECK_EVERY:
                    check_space(SPACE_CHECK_EVERY)
                tar_hash.update(chunk)
                new = indexer.feed(chunk)
                mv = memoryview(chunk)
                end = offset + len(chunk)
                current = _write_from(direct, mv, offset, end, current)
                for e in new:
                    placement = checker.check(e)
                    writer.create(e, placement)
                    entries.append(e)
                    if placement.kind == "reg" and e.uncompressed_size:
                        if current is not None:
                            os.close(current[0])
                        fd = writer.open_data(placement.path)
                        current = _write_from(direct, mv, offset, end, (fd, e.uncompressed_offset,
                                                                        e.uncompressed_offset + e.uncompressed_size))
                offset = end
            indexer.finish()
            if current is not None:
                raise CorruptContent(f"layer {digest}: the tar stream ends inside a file's data")
        except Exception as err:
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            if isinstance(err, (ExpansionLimit, InsufficientSpace)):
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
        got = f"{tar_hash.name}:{tar_hash.hexdigest()}"
        if diff_id is not None and got != diff_id:
            raise DiffIdMismatch(f"layer {digest}: its tar stream hashes to {got}, the image config "
                                 f"says diff_id {diff_id}", expected=diff_id, actual=got)
        writer.apply_metadata(checker.placements, list(map(entry_meta, entries)))
        syncfs(writer.root_fd)
    return {"digest": digest, "diff_id": got, "mode": "whole", "size": raw.size,
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
