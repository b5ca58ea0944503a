"""Writing file data around the page cache (O_DIRECT) where that is cheaper.

Why: on the machines we measured (Linux 6.x guests on virtio disks), a buffered write
costs ~4 s of kernel CPU per GB (page-cache allocation and copying), more than
inflating the data does; the same bytes written with ``O_DIRECT`` cost ~0.2 s per GB
and reach the disk at its speed.  For a 20 GB image that is most of a pre-warm's CPU.
A pre-warmed layer is read later by containers, not now, so keeping it out of the
page cache also leaves the node's working set alone.

``O_DIRECT`` needs aligned file offsets, lengths and memory.  Only the page-aligned
middle of a large piece goes direct (copied into a page-aligned scratch buffer, one
memcpy); its unaligned head and tail are written buffered.  Whole pages are never
shared between the two paths, so a direct write never races a buffered write to the
same page (the known way of mixing them corrupts data).  A filesystem that refuses
``O_DIRECT`` (tmpfs on older kernels, some FUSE) makes the writer fall back to
buffered writes for good.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

#: File offsets, lengths and buffer addresses of direct writes are multiples of this
#: (the page size: covers 512- and 4096-byte logical blocks, and keeps pages unshared).
ALIGN = mmap.PAGESIZE

#: Below this many aligned bytes a piece is written buffered: two extra fcntl calls and a
#: copy are not worth it for small files.
MIN_DIRECT = 64 * 1024


class DirectWriter:
    """pwrite with the aligned middle of large writes done O_DIRECT (one per process)."""

    def __init__(self, *, enabled: bool = True, min_direct: int = MIN_DIRECT) -> None:
        self.enabled = enabled and hasattr(os, "O_DIRECT")
        self.min_direct = max(min_direct, ALIGN)
        self._scratch: mmap.mmap | None = None
        self.direct_bytes = 0

    def _buffer(self, n: int) -> memoryview:
        if self._scratch is None or len(self._scratch) < n:
            if self._scratch is not None:
                self._scratch.close()
            self._scratch = mmap.mmap(-1, max(n, 4 << 20))  # anonymous mmap: page-aligned
        return memoryview(self._scratch)[:n]

    def pwrite(self, fd: int, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset`` of ``fd`` (opened without O_DIRECT).

        Raises:
            OSError: as pwrite(2) would (ENOSPC, EIO, ...).
        """
        end = offset + len(data)
        lo = -(-offset // ALIGN) * ALIGN
        hi = end // ALIGN * ALIGN
        if not self.enabled or hi - lo < self.min_direct:
            _pwrite_all(fd, data, offset)
            return
        if not self._direct(fd, data[lo - offset:hi - offset], lo):
            _pwrite_all(fd, data[lo - offset:hi - offset], lo)
        if lo > offset:
            _pwrite_all(fd, data[:lo - offset], offset)
        if end > hi:
            _pwrite_all(fd, data[hi - offset:], hi)

    def _direct(self, fd: int, middle: memoryview, offset: int) -> bool:
        """Write an aligned range with O_DIRECT; False (and disabled) if the fs refuses it."""
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            self.enabled = False
            return False
        try:
            buf = self._buffer(len(middle))
            buf[:] = middle
            try:
                _pwrite_all(fd, buf, offset)
            except OSError as err:
                if err.errno != errno.EINVAL:  # alignment the device does not take: stop trying
                    raise
                self.enabled = False
                return False
            self.direct_bytes += len(middle)
            return True
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    written = os.pwrite(fd, data, offset)
    while written < len(data):  # short writes are legal; finish them
        written += os.pwrite(fd, data[written:], offset + written)
