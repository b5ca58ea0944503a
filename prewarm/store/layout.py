"""Where things live under ``PREWARM_ROOT``: every path template in one place.

::

    <root>/
      layers/sha256/<hex>/fs/         the layer in overlay's diff format (an overlay lowerdir)
      layers/sha256/<hex>/ready       JSON written last (atomically): the layer is complete and verified
      layers/sha256/<hex>/work/       in-progress state: landed-span bitmap, hash state, spool
      layers/sha256/<hex>/lock        flock(2) target serialising writers of one layer
      ztoc/sha256/<hex>               zTOCs cached by their own digest
      chains/sha256/<hex>.json        OCI chain ID -> {chain_id, parent, diff_id, layer_digest}
      images/<hex of name>.json       pre-warmed image records
      snapshots/                      the snapshotter shim's metadata and active snapshots
      tmp/                            scratch on the same filesystem, for atomic renames

Layers are keyed by their compressed (manifest) digest, so a layer shared by two images
is fetched once.  A path here is only a name: creating and locking is the store's job,
except for the root itself (:func:`secure_root`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prewarm.errors import StoreError
from prewarm.resolve.digest import parse_digest

#: The root's mode: the owner (root) alone may traverse it.
ROOT_MODE = 0o700


class Layout:
    """Path templates under one root."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _by_digest(self, area: str, digest: str) -> Path:
        algo, hexd = parse_digest(digest)
        return self.root / area / algo / hexd

    def layer(self, digest: str) -> Path:
        return self._by_digest("layers", digest)

    def layer_fs(self, digest: str) -> Path:
        return self.layer(digest) / "fs"

    def layer_ready(self, digest: str) -> Path:
        return self.layer(digest) / "ready"

    def layer_work(self, digest: str) -> Path:
        return self.layer(digest) / "work"

    def layer_lock(self, digest: str) -> Path:
        return self.layer(digest) / "lock"

    def layers_dir(self) -> Path:
        return self.root / "layers"

    def layer_digests(self) -> Iterator[str]:
        """Digests of every layer with anything in the store (ready or partial), in no order."""
        base = self.layers_dir()
        if base.is_dir():
            for algo in base.iterdir():
                for d in algo.iterdir():
                    yield f"{algo.name}:{d.name}"

    def ztoc(self, digest: str) -> Path:
        return self._by_digest("ztoc", digest)

    def chain(self, chain_id: str) -> Path:
        algo, hexd = parse_digest(chain_id)
        return self.root / "chains" / algo / f"{hexd}.json"

    def chains_dir(self) -> Path:
        return self.root / "chains"

    def image(self, name: str) -> Path:
        return self.root / "images" / f"{hashlib.sha256(name.encode()).hexdigest()}.json"

    def images_dir(self) -> Path:
        return self.root / "images"

    def pins_dir(self) -> Path:
        """``pins/<job>.json``: layers a running job needs, which gc keeps (prewarm.runtime.gc)."""
        return self.root / "pins"

    def snapshots(self) -> Path:
        return self.root / "snapshots"

    def record_folders(self) -> list[Path]:
        """The folders records are written into with atomic_write (images, pins, job summaries,
        chains, layers' ready markers and zTOC cache), for :func:`prewarm.store.atomic.remove_orphaned_temps`."""
        folders = [self.images_dir(), self.pins_dir(), self.root / "jobs"]
        for area in ("chains", "layers", "ztoc"):
            folders += [p for p in (self.root / area).glob("*") if p.is_dir()]
        folders += [p for p in self.layers_dir().glob("*/*") if p.is_dir()]
        return folders

    def tmp(self) -> Path:
        return self.root / "tmp"


def secure_root(root: Path) -> None:
    """Create the store root 0700, or take group and other access away from an existing one.

    Why: ``layers/*/fs`` keep images' setuid binaries, ``security.capability`` xattrs and
    device nodes as they are, so a root any local user may traverse lets them run an
    image's setuid shell or open its block devices.  containerd keeps its snapshot root
    0700 for the same reason; a root created by an older prewarm (0755) is corrected here,
    whenever the store is opened.

    Raises:
        StoreError: the root cannot be created or its mode changed (naming it).
    """
    try:
        root.mkdir(parents=True, exist_ok=True, mode=ROOT_MODE)
        mode = stat.S_IMODE(os.stat(root).st_mode)
        if mode & ~ROOT_MODE:
            os.chmod(root, mode & ROOT_MODE)
    except OSError as err:
        if err.errno == errno.EROFS and root.is_dir():
            return  # a read-only mount: nothing can be written there, and commands that write refuse it (check_root)
        raise StoreError(f"cannot make the store root {root} private (mode {ROOT_MODE:o}): {err.strerror}; "
                         "check PREWARM_ROOT and that prewarm runs as the root's owner") from None


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


def check_root(root: Path, *, writable: bool) -> None:
    """The store root is usable, checked once when a command starts, the same for --root and PREWARM_ROOT.

    It is a directory, or does not exist yet (an empty store: made, private, by a command
    that writes); a command that writes must be able to create a file in it (a read-only
    mount or missing permission shows here, not as a traceback from the first write).

    Raises:
        StoreError: naming the path and what to do (exit 7).
    """
    if root.exists() and not root.is_dir():
        raise StoreError(f"the store root {root} is not a directory; point PREWARM_ROOT (or --root) at a folder")
    if not writable:
        return
    try:
        root.mkdir(parents=True, exist_ok=True, mode=ROOT_MODE)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise StoreError(f"the store root {root} is not writable ({err.strerror}); this command writes to it: "
                         "mount it read-write, fix its permissions, or point PREWARM_ROOT elsewhere") from None
    secure_root(root)
