"""The two Linux calls the store needs that Python's ``os`` module does not offer.

Why a module of their own: both go through ctypes to libc, and neither belongs to the
code that calls it.  ``syncfs`` makes a committed layer durable (``os.syncfs`` needs
Python 3.12); punching a hole gives back the part of a span spool that was already
hashed, so a layer spooled out of order never holds its compressed size twice.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from prewarm.errors import StoreError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """syncfs(2) on the filesystem of ``fd`` (os.syncfs needs Python 3.12).

    Raises:
        StoreError: the filesystem reported a write-back error (the layer is not committed).
    """
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise StoreError(f"syncfs failed: {os.strerror(err)}; the layer was not committed")


def punch_hole(path: Path, upto: int) -> None:
    """Free the first ``upto`` bytes of ``path``, keeping its size.

    Best effort: a filesystem that cannot punch holes keeps the bytes (the caller removes
    the file in the end anyway).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, ctypes.c_int64(0), ctypes.c_int64(upto))
    finally:
        os.close(fd)
