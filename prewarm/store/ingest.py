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

import dataclasses
import errno
import hashlib
import io
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Self

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
from prewarm.resolve.digest import new_hasher, parse_digest
from prewarm.store import landing
from prewarm.store.directio import DirectWriter
from prewarm.store.layerfs import EntryChecker, LayerWriter, Meta, Placement, apply_meta, entry_meta
from prewarm.store.syscalls import syncfs
from prewarm.store.writeback import EarlyWriteback

#: Bytes read from the decompressor at a time (memory bound).
STREAM_READ = 1 << 20
#: Chunks (of the blob or its tar stream, at most 1 MiB each) waiting to be hashed (memory bound).
HASH_DEPTH = 8
#: Chunks of the registry stream (1 MiB each) read ahead of the inflate (memory bound).
READ_AHEAD = 4
#: Chunks of STREAM_READ bytes inflated ahead of the landing (memory bound: 32 MiB).  Why so many: the
#: landing is slow on runs of small files and fast on big ones, the inflate steady; 8 left each waiting
#: for the other in turn (1-layer AI image: the inflate 1.5 s, the landing 2.4 s).
PIPELINE_DEPTH = 32
#: Files at least this large have their data written by a lane (:class:`_DataLanes`).
LANE_MIN_FILE = 256 << 10
#: Bytes queued in the lanes at most (the chunks they keep alive; memory bound).
LANE_BYTES = 32 << 20
#: Bytes the small files waiting for the creating thread keep alive at most: the chunks their data is
#: in, and :data:`CREATE_FILE_COST` each.
CREATE_BYTES = 8 << 20
#: What one file waiting for the creating thread holds besides its data (its name, a memoryview, a tuple).
CREATE_FILE_COST = 512
#: Small files, and bytes they keep alive, handed to the creating thread in one batch at most.
CREATE_BATCH, CREATE_BATCH_BYTES = 256, 4 << 20
#: Tar bytes between two early write-backs of the layer (:mod:`prewarm.store.writeback`).
WRITEBACK_EVERY = 64 << 20
#: Threads creating a whole layer's new small files (:class:`_Creator`): one per core, as
#: the kernel's file creation is what they spend their time in.
CREATORS = max(1, min(4, os.cpu_count() or 1))


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
                  check_space: Callable[[int], None] | None = None, chunks_verify: bool = False) -> dict[str, Any]:
    """Write the layer streamed as ``chunks`` into the empty directory ``fs``; its ``ready`` record.

    ``max_uncompressed`` caps what the stream may unpack to (nothing else bounds a whole
    layer: a 261 KB gzip can inflate to gigabytes); ``check_space(n)`` is asked, every
    :data:`SPACE_CHECK_EVERY` bytes, whether the next ``n`` still fit.  ``chunks_verify``: the
    chunks' iterator itself raises DigestMismatch at its end if they are not ``digest``
    (:meth:`~prewarm.resolve.registry.client.RegistryClient.stream_blob` does), so they are
    not hashed a second time here; the blob is still checked whole before the layer counts.

    Raises:
        ExpansionLimit: the stream unpacks to more than ``max_uncompressed``.
        InsufficientSpace: from ``check_space``.
        DigestMismatch: the blob does not hash to ``digest``; DiffIdMismatch: its tar stream not to ``diff_id``.
        CorruptContent, BadTarHeader, UnsafeArchive: the tar stream is broken or hostile.
        OSError: ENOSPC or EDQUOT (the caller names the store).
    """
    source = _ReadAhead(chunks)
    hasher = _Hasher()
    raw = _HashingReader(source, None if chunks_verify else new_hasher(digest), hasher)
    # Without a diff_id to check, the one the stream hashes to is recorded (never a claim).
    tar_hash = hashlib.new(parse_digest(diff_id)[0] if diff_id else "sha256")
    indexer = TarIndexer()
    # The metadata of the entries whose node gets it last (directories, links, devices): every regular
    # file gets its own when its data is in (and is marked done), so only those are kept by entry.
    metas: dict[int, Meta] = {}
    done = bytearray()  # entries whose metadata is on already (files, when their data was in)
    checker = EntryChecker()
    offset = 0
    current: _OpenFile | None = None
    inflater = _Inflater(raw, compression, tar_hash, hasher, digest, max_uncompressed)
    lanes = _DataLanes(direct.enabled)
    fast = landing.backend()
    creator = _Creator(fast, direct) if fast is not None else None
    early = EarlyWriteback()
    # The read-ahead is the stream's only reader, to the end: _blame and drain() read the rest through it.
    with source, LayerWriter(fs) as writer:
        try:
            hasher.start()
            inflater.start()
            lanes.start()
            if creator is not None:
                creator.start()
            for chunk in inflater:
                if check_space is not None and offset // SPACE_CHECK_EVERY != (offset + len(chunk)) // SPACE_CHECK_EVERY:
                    check_space(SPACE_CHECK_EVERY)
                if offset // WRITEBACK_EVERY != (offset + len(chunk)) // WRITEBACK_EVERY:
                    early.start(fs)
                new = indexer.feed(chunk)
                mv = memoryview(chunk)
                end = offset + len(chunk)
                lanes.check()
                current = _write_from(direct, lanes, mv, offset, end, current, done)
                chunk_held = False  # whether a file queued for the creating thread keeps this chunk alive
                for e in new:
                    placement = checker.check(e)
                    meta = entry_meta(e)
                    k = len(done)
                    done.append(0)
                    if creator is not None and (not checker.fresh[-1] or placement.kind == "hardlink"):
                        creator.drain()  # it replaces, or links to, what may still be waiting to be created
                    if placement.kind != "reg":
                        if placement.kind not in ("skip", "opaque", "hardlink"):  # (those get none)
                            metas[k] = meta
                        writer.create(e, placement)
                        continue
                    if current is not None:  # (the tar parser yields an entry only after the data before it)
                        raise CorruptContent(f"layer {digest}: tar entry {e.name!r} begins inside another "
                                             "file's data")
                    if fast is not None and e.uncompressed_offset + e.uncompressed_size <= end \
                            and e.uncompressed_size < LANE_MIN_FILE and _plain(meta):
                        at = e.uncompressed_offset - offset
                        data = mv[at:at + e.uncompressed_size]
                        if creator is not None and checker.fresh[-1]:
                            creator.add(*writer.parent_dir(e, placement), placement, data, meta,
                                        CREATE_FILE_COST + (0 if chunk_held else len(chunk)))
                            chunk_held = True
                        else:
                            _create_small_file(fast, writer, direct, e, placement, data, meta)
                        done[-1] = 1
                        continue
                    # (current before the first write: a write that fails leaves it for the finally to close)
                    current = _OpenFile(writer.create_file(e, placement), e.uncompressed_offset,
                                        e.uncompressed_offset + e.uncompressed_size, k, meta,
                                        lanes.lane_for(e.uncompressed_size))
                    current = _write_from(direct, lanes, mv, offset, end, current, done)
                offset = end
            indexer.finish()
            if current is not None:
                raise CorruptContent(f"layer {digest}: the tar stream ends inside a file's data")
            lanes.stop()  # every file's data and metadata are on (or its error is raised)
            if creator is not None:
                creator.stop()  # every small file is created (or its error is raised)
        except Exception as err:
            inflater.stop()  # before anything else reads the registry stream
            hasher.close(check=False)  # what it was given is hashed: _blame's drain hashes the rest inline
            # its syncfs holds the layer's folder open: the caller removes the layer next (and
            # a store on its own small filesystem could not be unmounted while it runs)
            early.join()
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            if isinstance(err, (ExpansionLimit, InsufficientSpace)):
                raise
            raise _blame(digest, raw, err) from err
        finally:
            inflater.stop(timeout=5.0)  # (already stopped, unless a BaseException is on its way out)
            hasher.close(check=False)
            lanes.stop(check=False)
            if creator is not None:
                creator.stop(check=False)
            if current is not None:  # (its lane, if it has one, is stopped: nobody else closes it now)
                current.close()
        hasher.close()  # both hashes have every chunk given to them; the drain hashes inline
        raw.drain()  # (with chunks_verify, the iterator's own check raises here, or raised in the try)
        if raw.hash is not None:
            actual = f"{raw.hash.name}:{raw.hash.hexdigest()}"
            if actual != digest:
                raise DigestMismatch(f"layer {digest}: the blob ({raw.size} bytes) hashes to {actual}",
                                     expected=digest, actual=actual)
        got = f"{tar_hash.name}:{tar_hash.hexdigest()}"
        if diff_id is not None and got != diff_id:
            raise DiffIdMismatch(f"layer {digest}: its tar stream hashes to {got}, the image config "
                                 f"says diff_id {diff_id}", expected=diff_id, actual=got)
        writer.apply_metadata(checker.placements, metas, done=done)
        syncfs(writer.root_fd)
        why = early.join()
        if why is not None:  # (a write-back error the kernel reported to that syncfs alone)
            raise StoreError(f"layer {digest}: writing it back to disk failed while it landed ({why})")
    return {"digest": digest, "diff_id": got, "mode": "whole", "size": raw.size,
            "uncompressed_size": offset, "files": len(done)}


class _Stage(threading.Thread):
    """A thread that hands what it makes to one reader through a bounded queue.

    Its ``run`` gives each item to :meth:`_put`, then None at its end, or the error it
    failed with, which the reader's iteration raises.  :meth:`stop` halts it: a put that
    waits for room gives up, and a reader that waits for an item gets StoreError instead
    of waiting forever.
    """

    def __init__(self, name: str, depth: int) -> None:
        super().__init__(name=name, daemon=True)
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
        self._halt = threading.Event()

    def _put(self, item: bytes | BaseException | None) -> bool:
        """Queue ``item`` when there is room; False if the stage was stopped first."""
        while not self._halt.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._halt.is_set():
                    raise StoreError(f"the layer's {self.name} stage was stopped") from None
                continue
            if item is None:
                self._halt.set()
                return
            if isinstance(item, BaseException):
                self._halt.set()
                raise item
            yield item

    def stop(self, timeout: float | None = None) -> None:
        """Halt the stage and wait for it (``timeout``: at most that long)."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout)


class _Inflater(_Stage):
    """The first stage of a whole layer: read it from the registry, hash it, inflate it, hash the tar.

    Why a thread: a whole layer was one stream on one core (download, sha256, inflate,
    sha256 again, then tar parsing and the file writes, one after the other), slower than
    ``curl | pigz -d | tar -x``, which is three processes.  ISA-L's inflate releases the
    GIL, so this stage runs beside the landing (tar headers, file creation, ``pwrite``) in
    the caller's thread.  At most :data:`PIPELINE_DEPTH` chunks wait between the two:
    memory stays bounded.  The reads are :class:`_ReadAhead`'s and the hashes
    :class:`_Hasher`'s, each on a thread of its own: this one only inflates.
    """

    def __init__(self, raw: _HashingReader, compression: str, tar_hash: hashlib._Hash, hasher: _Hasher,
                 digest: str, max_uncompressed: int | None) -> None:
        super().__init__("prewarm-inflate", PIPELINE_DEPTH)
        self._raw, self._compression, self._tar_hash, self._hasher = raw, compression, tar_hash, hasher
        self._digest, self._max = digest, max_uncompressed

    def _read(self) -> Iterator[bytes]:
        """The tar stream, inflated."""
        if self._compression == "gzip":
            yield from _gunzip(self._raw.chunks())
            return
        reader: io.RawIOBase | io.BufferedIOBase = self._raw
        if self._compression == "zstd":
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(self._raw, read_across_frames=True)  # type: ignore[assignment,arg-type]
        while chunk := reader.read(STREAM_READ):
            yield chunk

    def run(self) -> None:
        try:
            produced = 0
            for chunk in self._read():
                if self._halt.is_set():
                    return
                produced += len(chunk)
                if self._max is not None and produced > self._max:
                    raise ExpansionLimit(f"layer {self._digest} unpacks to more than {self._max} bytes, the cap "
                                         "for its size (PREWARM_MAX_EXPANSION times its compressed bytes); refused")
                self._hasher.update(self._tar_hash, chunk)
                self._put(chunk)
            self._put(None)
        except BaseException as err:  # noqa: BLE001 - handed to the landing thread, which raises it
            self._put(err)


class _ReadAhead(_Stage):
    """The registry stream, read on a thread of its own, :data:`READ_AHEAD` chunks ahead of its reader.

    Why: the socket reads and the registry client's digest check (its sha256 of the blob)
    were 1.2 s of the inflating thread (1-layer AI image, 407 MB of gzip), which was the
    whole-layer path's serial stage; both release the GIL.  It is the stream's only reader
    from :meth:`__enter__` to :meth:`__exit__`, which stops it (a failure's ``_blame``
    reads the rest of the stream through it, in between).
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        super().__init__("prewarm-read", READ_AHEAD)
        self._chunks = chunks

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop reading and wait for a read in progress to return.

        Without a timeout: the caller closes the stream next (``stream_blob``'s generator),
        which it cannot do while this thread is inside it; the registry client's read
        timeout bounds the wait.
        """
        self.stop()

    def run(self) -> None:
        try:
            for chunk in self._chunks:
                if not self._put(chunk):
                    return
            self._put(None)
        except BaseException as err:  # noqa: BLE001 - raised to the reader, where the stream's errors belong
            self._put(err)


class _Hasher(threading.Thread):
    """The blob's and its tar stream's hashes, updated on a thread of their own.

    Why: the inflating thread read the registry, hashed the blob, inflated it and hashed
    the tar stream, one after the other, and it was the whole-layer path's serial stage
    (1-layer AI image, 407 MB of gzip, 1.6 GB of tar: busy 6.3 s of a 7.7 s task, the
    landing thread waiting 3.2 s for it).  The two hashes were 2 s of that, and hashlib
    releases the GIL, so they run here, beside the inflate.  One FIFO keeps each hash's
    chunks in order; at most :data:`HASH_DEPTH` chunks wait (memory bound).  The chunks
    are ``bytes``, never changed once given.  Once :meth:`close` d, it hashes what it is
    given inline, after all it had queued (the rest of a stream that a failure drains).
    """

    def __init__(self) -> None:
        super().__init__(name="prewarm-hash", daemon=True)
        self._queue: queue.Queue[tuple[hashlib._Hash, bytes] | None] = queue.Queue(HASH_DEPTH)
        self._error: BaseException | None = None
        self._closed = False

    def update(self, h: hashlib._Hash, data: bytes) -> None:
        """Hash ``data`` into ``h`` after every chunk given before it (waits while :data:`HASH_DEPTH` wait)."""
        if self._error is not None:
            raise self._error
        if self._closed:
            h.update(data)
            return
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put((h, data), timeout=0.1)
                return
            except queue.Full:
                if not self.is_alive():
                    raise StoreError("the layer's hashing thread stopped") from None

    def run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:
                    item[0].update(item[1])
            except BaseException as err:  # noqa: BLE001 - raised to whoever gives or waits next
                self._error = err

    def close(self, check: bool = True) -> None:
        """Hash every chunk given, end the thread; with ``check``, raise what hashing failed with."""
        if self.is_alive():
            self._queue.put(None)
            self.join()
        self._closed = True
        if check and self._error is not None:
            raise self._error


def _gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Inflate a gzip stream of one or more members (pigz, concatenated layers) with ISA-L.

    Each call inflates a whole registry chunk into at most :data:`STREAM_READ` bytes with
    the GIL released; the file-object stack of ``igzip.IGzipFile`` over a reader of the
    chunks spent as long in the interpreter per MiB as ISA-L did inflating it.  Trailer
    CRC and length are checked for every member (``wbits=31``); zero padding after the
    last member is allowed, as gzip(1) and Python's ``gzip`` allow it; anything else after
    a member must be another member.

    Raises:
        CorruptContent: corrupt deflate data, a bad header or trailer, the stream ends
            inside a member or has none.
    """
    from isal import isal_zlib

    try:
        yield from _gunzip_members(chunks, isal_zlib)
    except isal_zlib.error as err:  # type: ignore[misc]
        raise CorruptContent(f"the gzip stream is corrupt ({err})") from None


def _gunzip_members(chunks: Iterator[bytes], isal_zlib: Any) -> Iterator[bytes]:
    d: Any = None  # the member being inflated; None between members
    members = 0
    for chunk in chunks:
        data: bytes | memoryview = chunk
        while data:
            if d is None:
                if members:
                    data = bytes(data).lstrip(b"\0")  # padding after a member
                    if not data:
                        break
                d = isal_zlib.decompressobj(31)
                members += 1
            out = d.decompress(data, STREAM_READ)
            if out:
                yield out
            while d.unconsumed_tail or (not d.eof and len(out) == STREAM_READ):
                out = d.decompress(d.unconsumed_tail, STREAM_READ)
                if not out:
                    break
                yield out
            if d.eof:
                data = d.unused_data
                d = None
            else:
                data = b""
    if d is not None:
        while not d.eof and (out := d.flush()):
            yield out
        if not d.eof:
            raise CorruptContent("the gzip stream ends inside a member (truncated layer)")
    if not members:
        raise CorruptContent("the gzip stream is empty")


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
    broken = err if isinstance(err, PrewarmError) else CorruptContent(f"layer {digest}: {err}")
    try:
        raw.drain()
    except DigestMismatch as mismatch:  # the registry client's own end-of-stream check
        return mismatch
    except Exception:  # noqa: BLE001 - the stream itself failed; the first error is the story
        return broken
    if raw.hash is None:  # the iterator checked the digest at its end, and found it right
        return broken
    actual = f"{raw.hash.name}:{raw.hash.hexdigest()}"
    if actual != digest:
        return DigestMismatch(f"layer {digest}: the blob ({raw.size} bytes) hashes to {actual} "
                              f"({type(err).__name__}: {err})", expected=digest, actual=actual)
    return broken


@dataclasses.dataclass
class _OpenFile:
    """The regular file whose data the stream is in: its fd, its data's stream range, its entry.

    A large file's data and its metadata go through its ``lane`` (:class:`_DataLanes`),
    which closes it; a small file's are written in the landing thread.
    """

    fd: int
    start: int
    end: int
    index: int
    meta: Meta
    lane: int | None = None
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def finish(self, done: bytearray) -> None:
        """Metadata on (owner, mode, xattrs, then the mtime, after the last write), then close."""
        try:
            apply_meta(self.fd, "reg", self.meta)
        finally:
            self.close()
        done[self.index] = 1


def _write_from(writer: DirectWriter, lanes: _DataLanes, mv: memoryview, start: int, end: int,
                current: _OpenFile | None, done: bytearray) -> _OpenFile | None:
    """Write the part of ``mv`` (stream [start, end)) that is the current file's data.

    A file whose data is all written gets its metadata on the same fd and is closed; its
    entry is marked in ``done``.
    """
    if current is None:
        return None
    lo, hi = max(start, current.start), min(end, current.end)
    last = current.end <= end
    if current.lane is not None:
        if lo < hi:
            lanes.write(current, mv[lo - start:hi - start], lo - current.start)
        if last:
            lanes.finish(current, done)
            return None
        return current
    if lo < hi:
        writer.pwrite(current.fd, mv[lo - start:hi - start], lo - current.start)
    if last:
        current.finish(done)
        return None
    return current


def _plain(meta: Meta) -> bool:
    """Metadata the C file creation takes: no xattrs, numbers in its types' ranges."""
    uid, gid, mode, mtime_ns, xattrs = meta
    return not xattrs and 0 <= uid < 1 << 32 and 0 <= gid < 1 << 32 and 0 <= mode < 1 << 32 \
        and -(1 << 63) <= mtime_ns < 1 << 63


def _create_small_file(fast: ModuleType, writer: LayerWriter, direct: DirectWriter, e: FileEntry,
                       placement: Placement, data: memoryview, meta: Meta) -> None:
    """A file whose data is all in the chunk at hand: created, written and given its metadata in one C call.

    Why: the landing thread spent most of its time in the interpreter around the eight
    system calls of each small file (a layer of 70,000 files); ``_landing.create_files``
    makes them with the GIL released, so the inflating thread runs meanwhile.

    Raises:
        UnsafeArchive: the entry would escape the layer.
        OSError: as the system calls (ENOSPC, ...).
    """
    pfd, base = writer.parent_dir(e, placement)
    uid, gid, mode, mtime_ns, _ = meta
    for attempt in (0, 1):
        _, err, direct.enabled = fast.create_files(pfd, [(os.fsencode(base), data, uid, gid, mode, mtime_ns)],
                                                   direct.enabled, direct.min_direct)
        if err != errno.EEXIST or attempt:
            break
        writer.clear(pfd, base)  # a later tar entry replaces an earlier one
    if err:
        raise OSError(err, os.strerror(err), placement.path)


class _Backlog:
    """Bytes handed to a thread and not yet written by it: the bound on what waits in a stage.

    :meth:`take` waits while more than ``limit`` bytes would be out (one item larger than the
    limit still goes, alone), unless ``failed()``: then nothing will be given back.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._out = 0
        self._room = threading.Condition()

    def take(self, size: int, failed: Callable[[], bool]) -> None:
        with self._room:
            while self._out + size > self._limit and self._out and not failed():
                self._room.wait()
            self._out += size

    def give(self, size: int) -> None:
        with self._room:
            self._out -= size
            self._room.notify_all()


class _Creator:
    """A thread that creates the layer's new small files, in tar order, while the landing thread parses on.

    Why: on a layer of many small files the landing thread spent half its time in the
    kernel creating them (py-spy, 160,000 files: ``create_file`` 54% of its samples) and
    the rest parsing tar headers and checking entries in Python; the two now overlap.
    Only files whose path nothing held before (``EntryChecker.fresh``) come here, each
    batch in one directory (a duplicate of its fd) and created in one C call with the
    GIL released; the landing thread :meth:`drain` s the queue before anything that may
    replace or link to a file still waiting.  So no two queued batches depend on each
    other, and :data:`CREATORS` threads take them: creating a file is kernel work that one
    thread did serially, the whole-layer path's floor on many-file layers (py-spy,
    40,000 files: the creating thread busy ~2 s of a ~2.8 s task, the parser waiting).
    The waiting files keep at most :data:`CREATE_BYTES` alive (the chunks their data is
    in, counted once, and their own objects; see :meth:`add`): memory stays bounded.
    """

    def __init__(self, fast: ModuleType, direct: DirectWriter) -> None:
        self._fast = fast
        self._direct, self._min_direct = direct.enabled, direct.min_direct
        self._queue: queue.Queue[tuple[int, list[tuple[bytes, memoryview, int, int, int, int]], list[str], int]
                                 | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._run, name=f"prewarm-create-{i}", daemon=True)
                         for i in range(CREATORS)]
        self._batch: list[tuple[bytes, memoryview, int, int, int, int]] = []
        self._paths: list[str] = []  # the batch's files in the layer, to name a failure
        self._batch_fd = -1
        self._batch_dir: str | None = None  # its directory in the layer (an fd number is reused)
        self._batch_bytes = 0
        self._backlog = _Backlog(CREATE_BYTES)
        self._error: BaseException | None = None

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _failed(self) -> bool:
        return self._error is not None

    def add(self, pfd: int, base: str, placement: Placement, data: memoryview, meta: Meta, held: int) -> None:
        """Queue the new file ``base`` of directory ``pfd`` (the writer's: duplicated, it may close it).

        ``held``: the bytes it keeps alive that no file queued before it does (its chunk, when it is
        the chunk's first, and :data:`CREATE_FILE_COST`).  Why not the size of its data: a 20-byte
        file keeps its whole 1 MiB chunk alive, so a bound on data bytes let a layer of tiny files
        queue all of its tar stream (250 MB for 200,000 files, issue 20).
        """
        parent = placement.created_at.rpartition("/")[0]
        if parent != self._batch_dir or len(self._batch) >= CREATE_BATCH or self._batch_bytes >= CREATE_BATCH_BYTES:
            self._flush()
            self._batch_fd, self._batch_dir = os.dup(pfd), parent
        uid, gid, mode, mtime_ns, _ = meta
        self._batch.append((os.fsencode(base), data, uid, gid, mode, mtime_ns))
        self._paths.append(placement.path)
        self._batch_bytes += held

    def _flush(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._batch:
            return
        size = self._batch_bytes
        self._backlog.take(size, self._failed)
        self._queue.put((self._batch_fd, self._batch, self._paths, size))
        self._batch, self._paths, self._batch_fd, self._batch_dir, self._batch_bytes = [], [], -1, None, 0

    def drain(self) -> None:
        """Wait until every queued file is created; raise what creating one failed with."""
        self._flush()
        self._queue.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fd, batch, paths, size = item
            try:
                if self._error is None:
                    failed, err, self._direct = self._fast.create_files(fd, batch, self._direct, self._min_direct)
                    if failed >= 0:
                        self._error = OSError(err, os.strerror(err), paths[failed])
            except BaseException as err:  # noqa: BLE001 - raised in the landing thread
                if self._error is None:
                    self._error = err
            finally:
                os.close(fd)
                self._backlog.give(size)
                self._queue.task_done()
        self._queue.task_done()

    def stop(self, check: bool = True) -> None:
        """Create what is queued (unless a failure stops it), end the thread."""
        if not any(thread.is_alive() for thread in self._threads):
            if self._batch_fd >= 0:
                os.close(self._batch_fd)
                self._batch_fd = -1
            return
        try:
            if check:
                self.drain()
        finally:
            if self._batch_fd >= 0:  # a batch never handed over (a failure before it was)
                os.close(self._batch_fd)
                self._batch, self._batch_fd = [], -1
            for _ in self._threads:
                self._queue.put(None)
            for thread in self._threads:
                thread.join()


class _DataLanes:
    """Threads that write large files' data (O_DIRECT) while the landing thread goes on.

    Why: a direct write returns when the device has the bytes, so one thread writing a
    whole layer waited for the disk once per MiB (py-spy: ``pwrite`` was a third of the
    landing thread, and the inflating thread sat waiting for it).  Each lane has its own
    :class:`DirectWriter` (its scratch buffer and the fd's O_DIRECT flag are not shared)
    and takes every piece of a file, then its metadata and close, in order.  At most
    :data:`LANE_BYTES` wait in the lanes: memory stays bounded.
    """

    def __init__(self, direct: bool, lanes: int = 3) -> None:
        self._direct = direct
        self._queues: list[queue.SimpleQueue[tuple[_OpenFile, memoryview | None, int, bytearray | None] | None]] = [
            queue.SimpleQueue() for _ in range(lanes if direct else 0)]
        self._threads = [threading.Thread(target=self._run, args=(q,), name=f"prewarm-data-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        self._next = 0
        self._backlog = _Backlog(LANE_BYTES)
        self._error: BaseException | None = None
        self._files: list[_OpenFile] = []  # given to a lane and not yet closed by it

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _failed(self) -> bool:
        return self._error is not None

    def lane_for(self, size: int) -> int | None:
        """The lane of a file this large, or None: written by the caller (small, or no O_DIRECT)."""
        if not self._queues or size < LANE_MIN_FILE:
            return None
        self._next = (self._next + 1) % len(self._queues)
        return self._next

    def write(self, f: _OpenFile, data: memoryview, offset: int) -> None:
        assert f.lane is not None
        self._backlog.take(len(data), self._failed)
        self._track(f)
        self._queues[f.lane].put((f, data, offset, None))

    def finish(self, f: _OpenFile, done: bytearray) -> None:
        assert f.lane is not None
        self._track(f)
        self._queues[f.lane].put((f, None, 0, done))

    def _track(self, f: _OpenFile) -> None:
        """Remember a file given to a lane, so that :meth:`stop` closes it if its lane could not."""
        if not self._files or self._files[-1] is not f:
            self._files.append(f)
            if len(self._files) > 4096:
                self._files = [g for g in self._files if not g.closed]

    def check(self) -> None:
        """Raise what a lane failed with (ENOSPC, EIO, ...)."""
        if self._error is not None:
            raise self._error

    def _run(self, q: queue.SimpleQueue[tuple[_OpenFile, memoryview | None, int, bytearray | None] | None]) -> None:
        writer = DirectWriter(enabled=self._direct)
        while (item := q.get()) is not None:
            f, data, offset, done = item
            try:
                if self._error is None:
                    if data is not None:
                        writer.pwrite(f.fd, data, offset)
                    elif done is not None:
                        f.finish(done)
            except BaseException as err:  # noqa: BLE001 - raised in the landing thread
                if self._error is None:
                    self._error = err
            finally:
                if data is not None:
                    self._backlog.give(len(data))

    def stop(self, check: bool = True) -> None:
        """Wait for every lane to finish its queue; close what a failure left open."""
        for q, t in zip(self._queues, self._threads):
            if t.is_alive():
                q.put(None)
        for t in self._threads:
            t.join()
        self._queues, self._threads = [], []
        for f in self._files:
            f.close()
        self._files = []
        if check:
            self.check()


class _HashingReader(io.RawIOBase):
    """A file-like view of an iterable of chunks that hashes what passes through."""

    def __init__(self, chunks: Iterable[bytes], h: hashlib._Hash | None, hasher: _Hasher) -> None:
        self._it = iter(chunks)
        self._buf = memoryview(b"")
        self.hash = h  # None: the chunks' iterator verifies them itself (``chunks_verify``)
        self._hasher = hasher
        self.size = 0
        #: What the chunk source raised, if it failed (not the decompressor or tar parser).
        self.source_error: Exception | None = None
        self._chunks: Iterator[bytes] | None = None

    def readable(self) -> bool:
        return True

    def chunks(self) -> Iterator[bytes]:
        """The chunks as they come, hashed (the gzip path reads them so, not through ``readinto``)."""
        while True:
            try:
                chunk = next(self._it, None)
            except Exception as err:
                self.source_error = err
                raise
            if chunk is None:
                return
            self._count(chunk)
            yield chunk

    def readinto(self, b: Any) -> int:
        if self._chunks is None:
            self._chunks = self.chunks()
        while not self._buf:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buf = memoryview(chunk).cast("B")
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def _count(self, chunk: bytes) -> None:
        if self.hash is not None:  # (None: the iterator checks its own digest)
            self._hasher.update(self.hash, chunk)
        self.size += len(chunk)

    def drain(self) -> None:
        """Hash whatever the decompressor did not read (trailing bytes still count)."""
        self._buf = memoryview(b"")
        for chunk in self._it:
            self._count(chunk)
