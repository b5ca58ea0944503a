"""The node's zTOC cache: zTOCs by digest, fetched once from the registry, read via mmap.

A worker needs the zTOC of a layer for every span it handles; parsing it once per
process and keeping the checkpoint windows in the page cache (mmap) keeps that cheap
and keeps worker memory independent of layer size.  Files are written atomically after
their digest was verified, so a file in the cache is trusted as it is.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import mmap
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from prewarm.errors import BadZtoc, DigestMismatch
from prewarm.index.ztoc import LazyFiles, Ztoc, parse_ztoc
from prewarm.resolve.digest import new_hasher, verify
from prewarm.store.layout import Layout

#: A zTOC larger than this is refused before it is fetched (about 4,000 GB of layer).
MAX_ZTOC_BYTES = 1 << 30
#: Bytes per read when a zTOC file is copied in (:meth:`ZtocCache.put_file`).
_COPY_CHUNK = 1 << 20
_ANY_SHA256 = "sha256:" + "0" * 64


class BlobSource(Protocol):
    def get_blob(self, registry: str, repository: str, digest: str, *, max_size: int = ...) -> bytes: ...


@runtime_checkable
class StreamingBlobSource(BlobSource, Protocol):
    """A source that can also stream a blob (the registry client): a zTOC then goes to disk as it comes.

    Its chunks check ``digest`` themselves: the iteration raises DigestMismatch at the end
    of a blob that is not ``digest``, so the cache does not hash the bytes a second time.
    """

    def stream_blob(self, registry: str, repository: str, digest: str, *,
                    chunk_size: int = ...) -> contextlib.AbstractContextManager[Iterator[bytes]]: ...


class ZtocCache:
    """zTOCs by digest under ``PREWARM_ROOT/ztoc``, with a small per-process LRU of parsed ones."""

    def __init__(self, layout: Layout, capacity: int = 16) -> None:
        self.layout = layout
        self._parsed: collections.OrderedDict[str, Ztoc] = collections.OrderedDict()
        self._capacity = capacity

    def path(self, digest: str) -> Path:
        return self.layout.ztoc(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    @contextlib.contextmanager
    def fetching(self, digest: str) -> Iterator[None]:
        """Held by the one process of the node that fetches ``digest``; the node's other
        processes wait here and then find it cached (check :meth:`has` inside).

        Why: every process of a node needs the layer's zTOC for its first span at the same
        moment; each fetching it was one copy per process from the registry, and under a
        fleet budget each booked its bytes, so the copies not made still used the budget.
        """
        path = self.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store zTOC bytes (verified against ``digest`` when given); returns the digest.

        Raises:
            DigestMismatch: ``data`` is not ``digest`` (nothing is stored).
        """
        if digest is not None and self.has(digest):
            verify(data, digest, what=f"zTOC {digest}")  # refused as ever, but no copy written to drop
            return digest
        return self._store((data,), digest, f"zTOC {digest or ''}".strip(), limit=None)

    def put_file(self, source: Path, digest: str | None = None) -> str:
        """Store a zTOC file (one built on disk: ``build_ztoc_file``) by copying it in; returns its digest.

        Why a copy: it is hashed as it is written, so what lands in the cache is exactly
        what was verified (against ``digest`` when given), whatever happens to ``source``
        meanwhile; and memory stays at one chunk for a zTOC of hundreds of MB.  The copy
        is written under a temporary name in the cache folder, flushed, and renamed.

        Raises:
            DigestMismatch: the file is not ``digest`` (nothing is stored).
            OSError: reading ``source`` or writing the cache failed (no temporary file is left).
        """
        if digest is not None and self.has(digest):
            return digest  # nothing of source is stored, so nothing of it needs trusting
        with open(source, "rb") as src:
            return self._store(iter(functools.partial(src.read, _COPY_CHUNK), b""), digest, f"zTOC file {source}",
                               limit=None)

    def _store(self, chunks: Iterable[bytes], digest: str | None, what: str, limit: int | None, *,
               chunks_verify: bool = False) -> str:
        """Write ``chunks`` under a temporary name in the cache, hashing them; fsync, check, rename.

        With ``chunks_verify`` the chunks check ``digest`` themselves (a
        :class:`StreamingBlobSource`'s): they are not hashed again here.

        The rename is not followed by an fsync of the folder: a zTOC lost to a crash is
        fetched again, and a file that is there was whole and verified before its rename.

        Raises:
            DigestMismatch: the bytes are not ``digest`` (nothing is stored).
            BadZtoc: more than ``limit`` bytes (nothing is stored).
        """
        if chunks_verify and digest is None:
            raise ValueError("chunks that verify themselves need the digest they verify")
        folder = self.path(digest or _ANY_SHA256).parent  # put names zTOCs by their sha256
        folder.mkdir(parents=True, exist_ok=True)
        # the writer's PID in the name, as atomic_write: remove_orphaned_temps knows a killed writer's file
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".put.{os.getpid()}-")
        tmp = Path(tmp_name)
        try:
            hasher = None if chunks_verify else new_hasher(digest or _ANY_SHA256)
            size = 0
            with os.fdopen(fd, "wb") as dst:
                for block in chunks:
                    size += len(block)
                    if limit is not None and size > limit:
                        raise BadZtoc(f"{what} is more than the {limit} bytes a zTOC may be")
                    if hasher is not None:
                        hasher.update(block)
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
            if hasher is None:
                assert digest is not None
                actual = digest  # the chunks raised DigestMismatch at their end if it were not
            else:
                actual = f"{hasher.name}:{hasher.hexdigest()}"
                if digest is not None and actual != digest:
                    raise DigestMismatch(f"{what}: expected {digest}, got {actual}", expected=digest, actual=actual)
            if not self.path(actual).is_file():
                os.replace(tmp, self.path(actual))
        finally:
            tmp.unlink(missing_ok=True)
        return actual

    def get(self, digest: str, source: BlobSource | None = None, registry: str = "",
            repository: str = "") -> Ztoc:
        """The parsed zTOC; fetched from ``registry/repository`` through ``source`` if not cached.

        Raises:
            BadZtoc: the zTOC is not in the cache and no source was given, or it is malformed.
            RegistryError: fetching it failed.
        """
        z = self._parsed.get(digest)
        if z is not None:
            self._parsed.move_to_end(digest)
            return z
        path = self.path(digest)
        if not path.is_file():
            if source is None:
                raise BadZtoc(f"zTOC {digest} is not in the node cache {path.parent} and no registry was given")
            self._fetch(source, registry, repository, digest)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise BadZtoc(f"zTOC {digest} in {path} is empty; delete it and retry")
            buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        # Lazy TOC: a process landing a few spans decodes only the entries in them; the
        # digest (verified when the file was cached) names this TOC for the landing table.
        z = parse_ztoc(memoryview(buf), lazy_files=True)
        z.digest = digest
        if isinstance(z.files, LazyFiles):
            z.files.file_backed = True
        self._parsed[digest] = z
        while len(self._parsed) > self._capacity:
            self._parsed.popitem(last=False)
        return z

    def _fetch(self, source: BlobSource, registry: str, repository: str, digest: str) -> None:
        """Fetch zTOC ``digest`` into the cache, streamed to disk where ``source`` can stream.

        Why: a layer of a million files has a zTOC of ~220 MB; read whole, it was that much
        more peak memory in the process that fetched it (the ``schedule`` CLI).
        """
        what = f"zTOC {digest} from {registry}/{repository}"
        if isinstance(source, StreamingBlobSource):
            with source.stream_blob(registry, repository, digest) as chunks:
                self._store(chunks, digest, what, limit=MAX_ZTOC_BYTES, chunks_verify=True)
        else:
            self.put(source.get_blob(registry, repository, digest, max_size=MAX_ZTOC_BYTES), digest)
