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
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from prewarm.errors import BadZtoc
from prewarm.index.ztoc import Ztoc, parse_ztoc
from prewarm.resolve.digest import sha256_digest, verify
from prewarm.store.atomic import atomic_write
from prewarm.store.layout import Layout

#: A zTOC larger than this is refused before it is fetched (about 4,000 GB of layer).
MAX_ZTOC_BYTES = 1 << 30


class BlobSource(Protocol):
    def get_blob(self, registry: str, repository: str, digest: str, *, max_size: int = ...) -> bytes: ...


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
        """Store zTOC bytes (verified against ``digest`` when given); returns the digest."""
        if digest is None:
            digest = sha256_digest(data)
        else:
            verify(data, digest, what=f"zTOC {digest}")
        path = self.path(digest)
        if path.is_file():
            return digest
        atomic_write(path, data)
        return digest

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
            self.put(source.get_blob(registry, repository, digest, max_size=MAX_ZTOC_BYTES), digest)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise BadZtoc(f"zTOC {digest} in {path} is empty; delete it and retry")
            buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        # Lazy TOC: a process landing a few spans decodes only the entries in them; the
        # digest (verified when the file was cached) names this TOC for the landing table.
        z = parse_ztoc(memoryview(buf), lazy_files=True)
        z.digest = digest
        self._parsed[digest] = z
        while len(self._parsed) > self._capacity:
            self._parsed.popitem(last=False)
        return z
