"""Writing a small file so that readers see the old content or the new, never a part of it.

Records (images, chains, cached zTOCs, job summaries) and the store's layer state are
written to a temporary file in the same folder and renamed over the target: a crash at any
moment leaves either file whole.  ``durable`` also flushes file and folder to disk, for
what must survive a power loss (a layer's ``ready``); state the store re-derives after a
reboot skips the fsyncs on its hot path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (temp file + rename); fsync with ``durable``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
