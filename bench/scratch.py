"""A fresh scratch ext4 per benchmark step: a loop device with direct I/O over a file in /var/tmp.

Why each step gets its own filesystem (issue 16): ext4 with ``discard`` creates files
slowly for minutes after a mass deletion (``recently_deleted`` / ``find_inode_bit`` in
every create), and that taxed whichever step came next.  A new filesystem per step also
means no step inherits another's free-space fragmentation or journal state.

The filesystem is made as a node would have it, minus the costs that belong to no step:

- the backing file is sparse, in ``/var/tmp`` (a real disk, not tmpfs);
- ``losetup --direct-io=on``: the loop device's writes bypass the host page cache, so
  ``sync`` inside the step really waits for the disk, and the data is not cached twice;
- ``mkfs.ext4 -E lazy_itable_init=0,lazy_journal_init=0``: the inode tables and the
  journal are written at mkfs time, so no ``ext4lazyinit`` thread writes in the
  background of the step; the journal is kept (``has_journal``), as on any real node;
- mounted without ``discard`` (ext4's default; we pass ``nodiscard`` to be explicit).

Everything is torn down (``umount``, ``losetup -d``, the file removed) when the ``with``
block ends, on error and on Ctrl-C too.  Needs root.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

#: Apparent size of the backing file; sparse, so only what a step writes uses disk.
DEFAULT_SIZE = 16 << 30
#: Where the backing files live: a disk-backed directory.
DEFAULT_PARENT = Path("/var/tmp")


def _run(args: list[str]) -> str:
    proc = subprocess.run(args, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


def _quietly(args: list[str]) -> None:
    proc = subprocess.run(args, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  (teardown: {' '.join(args)}: {proc.stderr.strip()})", file=sys.stderr)


def _umount(mnt: Path) -> None:
    for _ in range(20):  # a process of the step may still be exiting
        if subprocess.run(["umount", str(mnt)], check=False, capture_output=True).returncode == 0:
            return
        time.sleep(0.25)
    _quietly(["umount", "--lazy", str(mnt)])


@contextlib.contextmanager
def scratch_fs(label: str, *, size: int = DEFAULT_SIZE, parent: Path = DEFAULT_PARENT) -> Iterator[Path]:
    """Make, mount and yield a fresh ext4 for one step; tear it all down afterwards.

    Args:
        label: goes into the directory name, to tell leftovers apart.
        size: apparent size of the sparse backing file.
        parent: directory on a real disk for the backing file and the mount point.

    Raises:
        RuntimeError: losetup, mkfs or mount failed (their stderr is in the message).
    """
    top = Path(tempfile.mkdtemp(prefix=f"prewarm-scratch-{label}-", dir=parent))
    image, mnt = top / "fs.img", top / "mnt"
    dev = None
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        dev = _run(["losetup", "--find", "--show", "--direct-io=on", str(image)])
        _run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", dev])
        mnt.mkdir()
        _run(["mount", "-t", "ext4", "-o", "nodiscard", dev, str(mnt)])
        mounted = True
        yield mnt
    finally:
        if mounted:
            _umount(mnt)
        if dev:
            _quietly(["losetup", "-d", dev])
        with contextlib.suppress(OSError):
            image.unlink()
        with contextlib.suppress(OSError):
            mnt.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def drop_caches() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``: the next step starts with a cold page cache.

    Raises:
        RuntimeError: not root (a warm-cache figure must not pass for a cold one).
    """
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        raise RuntimeError(f"cannot drop the page cache ({err.strerror}); run the benchmark as root") from None
