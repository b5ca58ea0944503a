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
import tempfile
from pathlib import Path

from prewarm.errors import InsufficientSpace, StoreError


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (temp file + rename); fsync with ``durable``.

    Raises:
        OSError: the write failed (its ``filename`` is ``path``); ``path`` is as it was
            and no temporary file is left.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
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
