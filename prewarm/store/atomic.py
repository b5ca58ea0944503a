"""Writing a small file so that readers see the old content or the new, never a part of it.

Records (images, chains, cached zTOCs, job summaries) and the store's layer state are
written to a temporary file in the same folder and renamed over the target: a crash at any
moment leaves either file whole.  ``durable`` also flushes file and folder to disk, for
what must survive a power loss (a layer's ``ready``); state the store re-derives after a
reboot skips the fsyncs on its hot path.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from prewarm.errors import InsufficientSpace, StoreError


def atomic_write(path: Path, data: bytes | bytearray | memoryview, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (temp file + rename); fsync with ``durable``.

    Raises:
        OSError: the write failed (its ``filename`` is ``path``); ``path`` is as it was
            and no temporary file is left.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the writer's PID in the name: remove_orphaned_temps knows a killed writer's file
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-")
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_failed(path: Path, err: OSError, root: Path) -> StoreError:
    """A failed record write as the StoreError the CLI reports (exit 7), naming the file.

    ENOSPC and EDQUOT become :class:`InsufficientSpace`; EROFS, EACCES and the rest say
    what the operating system said.  The caller has already put the store back as it was.
    """
    what = err.strerror or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpace(f"no space left in {root} writing {path} ({what}); nothing of this job was "
                                 "kept: free space in the store and schedule the image again")
    return StoreError(f"cannot write {path} ({what}); nothing of this job was kept: check that {root} is "
                      "writable and schedule the image again")


_TEMP = re.compile(r"\..+\.(\d+)-[A-Za-z0-9_]{8}")


def remove_orphaned_temps(folders: Iterable[Path], *, wait: float = 0.0) -> list[Path]:
    """Remove atomic_write's temp files whose writer is gone; the files removed.

    Why: a writer killed between its write and its rename (a worker stopped outright when
    an embedded run is interrupted, the OOM killer) leaves ``.name.PID-xxxxxxxx`` beside the
    record.  The record itself is whole, old or new; the temp file is only litter, and its
    PID says whether anyone may still rename it.  ``wait``: seconds to give writers that
    were just killed to be gone (a live writer's file is left alone after that).
    """
    candidates = []
    for folder in folders:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        candidates += [(e, int(m.group(1))) for e in entries if (m := _TEMP.fullmatch(e.name))]
    deadline = time.monotonic() + wait
    while any(_alive(pid) for _, pid in candidates) and time.monotonic() < deadline:
        time.sleep(0.05)
    removed = []
    for entry, pid in candidates:
        if _alive(pid):
            continue
        try:
            entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a killed writer awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")
