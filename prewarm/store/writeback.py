"""Write-back started while a layer still lands, so that its commit's ``syncfs`` finds little left.

Why: a layer is durable only after ``syncfs``, and the kernel writes nothing back before
it (the dirty thresholds are gigabytes on a node): the whole layer's write-back (ext4's
block allocation, the journal, the device) was left to the end, one flushing thread
while the cores idled.  Started early, the same work overlaps the landing.  Measured on
the 160,000-file layer of ``bench.bench_pipeline``, span path, two pairs: 6.96 and
7.00 s against 7.40 and 7.41 s.

The kernel reports a write-back error to each open file once: an error an early
``syncfs`` saw may never reach the commit's.  So it is kept: by the object, for a layer
landed by one process (the whole-layer path joins it before committing), and in the
layer's work folder (:data:`WRITEBACK_FAILED`) for span layers, which several processes
land; written there under a shared lock (:data:`WRITEBACK_LOCK`) that the commit takes
exclusively before it looks (:meth:`EarlyWriteback.failure`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

from prewarm.errors import StoreError
from prewarm.store.syscalls import syncfs

#: In a span layer's work folder: an early write-back failed (its text says how).  The layer
#: is then never committed: it is discarded, to be fetched again.
WRITEBACK_FAILED = "writeback-failed"
#: In a span layer's work folder: held shared by each early write-back while it runs, taken
#: exclusively by the commit before it reads :data:`WRITEBACK_FAILED`.
WRITEBACK_LOCK = "writeback.lock"


class EarlyWriteback:
    """A thread of this process that runs ``syncfs`` on a layer's filesystem, one at a time.

    :meth:`start` after each span (or each stretch of a whole layer's stream): it does
    nothing while the last one still runs.  With a ``work`` folder (span layers) a failure
    is kept there for whichever process commits; without one it is kept here, for
    :meth:`join`.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._failed: str | None = None

    def start(self, fs: Path, work: Path | None = None) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._run, args=(fs, work), name="prewarm-writeback", daemon=True)
        self._thread.start()

    def join(self) -> str | None:
        """Wait for the write-back under way; what one of this object's failed with (no ``work`` folder)."""
        if self._thread is not None:
            self._thread.join()
        return self._failed

    def _run(self, fs: Path, work: Path | None) -> None:
        lock = -1
        try:
            if work is not None:
                lock = os.open(work / WRITEBACK_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(lock, fcntl.LOCK_SH)
            fd = os.open(fs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            if lock >= 0:
                os.close(lock)
            return  # the layer was committed or removed meanwhile: nothing of it to write back
        try:
            syncfs(fd)
        except StoreError as err:
            if work is None:
                self._failed = str(err)
            else:
                with contextlib.suppress(OSError):
                    (work / WRITEBACK_FAILED).write_text(str(err))
        finally:
            os.close(fd)
            if lock >= 0:
                os.close(lock)

    @staticmethod
    def failure(work: Path) -> str | None:
        """What an early write-back of the layer in ``work`` failed with, once none of them still runs."""
        try:
            lock = os.open(work / WRITEBACK_LOCK, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # none ever started
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return (work / WRITEBACK_FAILED).read_text(errors="replace")
        except FileNotFoundError:
            return None
        finally:
            os.close(lock)
