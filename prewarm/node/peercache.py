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

import dataclasses
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from prewarm.config import DEFAULT_PEER_CACHE_CAP

#: Free space the cache always leaves on the store's filesystem: 2% of it, at most 2 GiB.
RESERVE_SHARE, RESERVE_CAP = 0.02, 2 << 30
#: Share of the store's filesystem the cache takes when no size is set.
DEFAULT_SHARE = 0.10

_HEX = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^(?:0|[1-9][0-9]{0,8}|blob)$")
BLOB = "blob"


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
        cache is an extra, never a reason to fail a task.
        """
        final = self.path(layer, span)
        if len(data) > self.limit:
            return False, []
        evicted = self.make_room(len(data))
        if shutil.disk_usage(self.root).free - len(data) < self.reserve:
            return False, evicted
        final.parent.mkdir(exist_ok=True)
        tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
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
        evicted = self.make_room(size, staged=size)
        os.replace(staged, self.path(layer, None))
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
        return sum(item.size for item in self.items())

    def make_room(self, nbytes: int, *, staged: int = 0) -> list[Item]:
        """Evict least recently used items until ``nbytes`` more fit under the limit and the reserve.

        ``staged``: bytes of the incoming item already on disk (not counted against free space).
        """
        items = sorted(self.items(), key=lambda i: i.used)
        state = {"total": sum(i.size for i in items), "free": shutil.disk_usage(self.root).free + staged}

        def short() -> bool:
            return state["total"] + nbytes > self.limit or state["free"] - nbytes < self.reserve

        def gone(item: Item) -> None:
            state["total"] -= item.size
            state["free"] += item.size

        return self._evict(items, short, gone)

    def give_back(self, nbytes: int) -> list[Item]:
        """Evict until the store can take ``nbytes`` and still leave the reserve free.

        Called before landing: the store's own data comes first, the peer cache only uses
        space the store does not need.
        """
        free = shutil.disk_usage(self.root).free
        if free - nbytes >= self.reserve:
            return []
        state = {"free": free}
        items = sorted(self.items(), key=lambda i: i.used)

        def short() -> bool:
            return state["free"] - nbytes < self.reserve

        def gone(item: Item) -> None:
            state["free"] += item.size

        return self._evict(items, short, gone)

    def remove_layer(self, layer: str) -> list[Item]:
        """Drop every item of ``layer`` (e.g. it failed to verify as a whole)."""
        return self._evict([i for i in self.items() if i.layer == layer], lambda: True, lambda item: None)

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

