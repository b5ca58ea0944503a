"""The node's peer cache: compressed bytes of spans (and whole small layers) it fetched and verified.

Why a separate cache: the store keeps layers unpacked, while other nodes need the
compressed bytes the zTOC's span digests vouch for.  Keeping them costs disk, so the
cache is bounded (``PREWARM_PEER_CACHE``; default 10% of the store's filesystem, at most
20 GiB), drops the least recently served or stored item first, and gives space back
before the store runs short (:meth:`PeerCache.give_back`, called before landing).

Layout: ``$PREWARM_ROOT/peers/<layer hex>/<span index>`` (``blob`` for a whole layer).
An item is written to a temporary name and renamed into place only after its bytes were
verified, so the peer server (which serves only those exact names) can never hand out
bytes the node has not verified.  The file's mtime is its last use (LRU).  Several
worker processes share the folder; every operation tolerates the others' renames and
unlinks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from prewarm.config import DEFAULT_PEER_CACHE_CAP

#: Free space the cache always leaves on the store's filesystem: 2% of it, at most 2 GiB.
RESERVE_SHARE, RESERVE_CAP = 0.02, 2 << 30
#: Share of the store's filesystem the cache takes when no size is set.
DEFAULT_SHARE = 0.10

_HEX = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^(?:0|[1-9][0-9]{0,8}|blob)$")
BLOB = "blob"


#: File in the cache folder holding the bytes held, as 8 bytes (big endian), under flock.
COUNTER = ".size"


class _Counter:
    """The shared size counter, valid while its file is locked."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        raw = os.pread(fd, 8, 0)
        self.total = max(0, int.from_bytes(raw, "big", signed=True)) if len(raw) == 8 else 0

    def add(self, n: int) -> None:
        self.set(self.total + n)

    def set(self, total: int) -> None:
        self.total = max(0, total)
        os.pwrite(self.fd, self.total.to_bytes(8, "big", signed=True), 0)


@dataclasses.dataclass(frozen=True)
class Item:
    """One cached item: layer digest, span index (None: the whole layer), size, last use."""

    layer: str
    span: int | None
    size: int
    used: float
    path: Path


def default_limit(root: Path) -> int:
    """10% of the filesystem holding ``root``, at most 20 GiB."""
    return min(DEFAULT_PEER_CACHE_CAP, int(shutil.disk_usage(root).total * DEFAULT_SHARE))


class PeerCache:
    """Bounded LRU store of verified compressed bytes, one file per (layer, span)."""

    def __init__(self, root: Path, limit: int | None = None) -> None:
        self.root = root
        self.dir = root / "peers"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.limit = default_limit(root) if limit is None else limit
        total = shutil.disk_usage(root).total
        self.reserve = min(RESERVE_CAP, int(total * RESERVE_SHARE))

    def path(self, layer: str, span: int | None) -> Path:
        """Where ``span`` of ``layer`` lives (whether or not it is there).

        Raises:
            ValueError: ``layer`` is not ``sha256:<64 hex>`` or ``span`` is negative.
        """
        algo, _, hexpart = layer.partition(":")
        if algo != "sha256" or not _HEX.match(hexpart):
            raise ValueError(f"{layer!r} is not a sha256 layer digest")
        if span is not None and not 0 <= span < 1_000_000_000:
            raise ValueError(f"span index {span} is out of range")
        return self.dir / hexpart / (BLOB if span is None else str(span))

    def lookup(self, layer: str, span: int | None) -> tuple[Path, int] | None:
        """The item's file and size if held, marked as just used; None if not held."""
        path = self.path(layer, span)
        try:
            size = path.stat().st_size
            os.utime(path)
        except FileNotFoundError:
            return None
        return path, size

    def put(self, layer: str, span: int | None, data: bytes | memoryview) -> tuple[bool, list[Item]]:
        """Keep verified ``data`` as ``span`` of ``layer``; returns (kept, items evicted to make room).

        Not kept (False) when it is larger than the cache or the disk is too full: the
        cache is an extra, never a reason to fail a task.  Room is booked in the size
        counter before the bytes are written, so processes writing at once never overshoot.
        """
        final = self.path(layer, span)
        n = len(data)
        if n > self.limit:
            return False, []
        if final.exists():  # a redelivered span: already held
            return True, []
        with self._counter() as counter:
            evicted = self._fit(counter, n)
            if shutil.disk_usage(self.root).free - n < self.reserve:
                return False, evicted
            counter.add(n)
        final.parent.mkdir(exist_ok=True)
        tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            with self._counter() as counter:
                counter.add(-n)
            return False, evicted
        return True, evicted

    def staging(self, layer: str) -> Path:
        """A temporary file name beside ``layer``'s items (for a whole layer being verified while it streams)."""
        final = self.path(layer, None)
        final.parent.mkdir(exist_ok=True)
        return final.parent / f".tmp-{uuid.uuid4().hex}"

    def adopt(self, layer: str, staged: Path) -> tuple[bool, list[Item]]:
        """Move a staged whole layer, now verified, into the cache (or drop it if there is no room)."""
        size = staged.stat().st_size
        if size > self.limit:
            staged.unlink(missing_ok=True)
            return False, []
        final = self.path(layer, None)
        with self._counter() as counter:
            evicted = self._fit(counter, size, staged=size)
            if final.exists():
                staged.unlink(missing_ok=True)
                return True, evicted
            os.replace(staged, final)
            counter.add(size)
        return True, evicted

    def items(self) -> list[Item]:
        out = []
        try:
            layers = list(os.scandir(self.dir))
        except FileNotFoundError:
            return out
        for d in layers:
            if not _HEX.match(d.name):
                continue
            try:
                entries = list(os.scandir(d.path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for e in entries:
                if not _NAME.match(e.name):
                    continue
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                out.append(Item(f"sha256:{d.name}", None if e.name == BLOB else int(e.name), st.st_size,
                                st.st_mtime, Path(e.path)))
        return out

    def size(self) -> int:
        """Bytes held (the shared counter: no scan of the folder)."""
        with self._counter() as counter:
            return counter.total

    def recount(self) -> int:
        """Set the counter from a scan of the folder (a worker starting: it may have died
        between a write and its booking); returns the bytes held."""
        with self._counter() as counter:
            counter.set(sum(i.size for i in self.items()))
            return counter.total

    def give_back(self, nbytes: int) -> list[Item]:
        """Evict until the store can take ``nbytes`` and still leave the reserve free.

        Called before landing: the store's own data comes first, the peer cache only uses
        space the store does not need.
        """
        if shutil.disk_usage(self.root).free - nbytes >= self.reserve:
            return []
        with self._counter() as counter:
            state = {"free": shutil.disk_usage(self.root).free}
            items = sorted(self.items(), key=lambda i: i.used)
            counter.set(sum(i.size for i in items))

            def short() -> bool:
                return state["free"] - nbytes < self.reserve

            def gone(item: Item) -> None:
                state["free"] += item.size
                counter.add(-item.size)

            return self._evict(items, short, gone)

    def remove_layer(self, layer: str) -> list[Item]:
        """Drop every item of ``layer`` (e.g. it failed to verify as a whole)."""
        with self._counter() as counter:
            evicted = self._evict([i for i in self.items() if i.layer == layer], lambda: True,
                                  lambda item: counter.add(-item.size))
            return evicted

    def _fit(self, counter: _Counter, nbytes: int, *, staged: int = 0) -> list[Item]:
        """Under the counter's lock: evict until ``nbytes`` more fit.  The folder is scanned
        only when the counter says the limit would be passed or the disk is short, so a put
        costs a few system calls, not a stat of every item (thousands for a 20 GB image)."""
        free = shutil.disk_usage(self.root).free + staged
        if counter.total + nbytes <= self.limit and free - nbytes >= self.reserve:
            return []
        items = sorted(self.items(), key=lambda i: i.used)
        counter.set(sum(i.size for i in items))
        state = {"free": free}

        def short() -> bool:
            return counter.total + nbytes > self.limit or state["free"] - nbytes < self.reserve

        def gone(item: Item) -> None:
            counter.add(-item.size)
            state["free"] += item.size

        return self._evict(items, short, gone)

    @contextlib.contextmanager
    def _counter(self) -> Iterator[_Counter]:
        """The bytes-held counter shared by the node's worker processes, locked for the block."""
        fd = os.open(self.dir / COUNTER, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield _Counter(fd)
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _evict(items: list[Item], more: Callable[[], bool], gone: Callable[[Item], None]) -> list[Item]:
        evicted = []
        for item in items:
            if not more():
                break
            try:
                item.path.unlink()
            except FileNotFoundError:
                continue
            gone(item)
            evicted.append(item)
        return evicted

