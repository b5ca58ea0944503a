"""Start a crashed Celery worker again in place, and give up on a crash loop.

A node's worker must outlive what goes wrong under it.  Celery stops its worker for good
on an "Unrecoverable error", and some of those come from the broker client itself: kombu
5.7 was seen to die of an ``AttributeError`` while closing the connection that a Redis
restart broke.  A Kubernetes DaemonSet would restart the container, but a worker run by
hand or by systemd without ``Restart=`` would not, and the jobs of its node would stall.

So ``prewarm worker`` replaces itself (``execv``: same PID, same arguments and
environment) when Celery returns a failure without having been asked to stop, and at
once when Celery logs its "Unrecoverable error": its own shutdown after such an error was
seen to hang for minutes ("Error on stopping Hub"), so nothing is waited for.  The pool
processes are SIGKILLed first (their unacknowledged tasks are redelivered, as after any
``kill -9``), so no orphan outlives the process image that knew it.  Crashes
are counted in the environment the new image inherits; :data:`MAX_CRASHES` within
:data:`CRASH_WINDOW` seconds is a crash loop (a bad option, an unreadable file), which ends
the process with an error instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time


def set_death_signal(sig: int) -> None:
    """Have the kernel send this process ``sig`` when its parent dies (prctl PR_SET_PDEATHSIG).

    Raises:
        OSError: the kernel refused it.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


_PR_SET_PDEATHSIG = 1

#: Environment variable carrying the times of recent crashes into the replacement process.
CRASHES_ENV = "PREWARM_WORKER_CRASHES"
MAX_CRASHES = 5
CRASH_WINDOW = 300.0


@dataclasses.dataclass(frozen=True)
class Verdict:
    restart: bool
    delay: float            # seconds to wait before starting again
    history: str            # the new value of CRASHES_ENV
    crashes: int            # crashes within the window, this one included


def judge_crash(history: str, now: float) -> Verdict:
    """Record a crash at ``now`` in ``history`` (CRASHES_ENV's value); restart or give up?"""
    times = []
    for part in history.split(","):
        try:
            t = float(part)
        except ValueError:
            continue  # a value we did not write: ignore it rather than refuse to restart
        if now - CRASH_WINDOW < t <= now:
            times.append(t)
    times.append(now)
    history = ",".join(f"{t:.3f}" for t in times)
    return Verdict(restart=len(times) < MAX_CRASHES, delay=float(min(len(times), 5)), history=history,
                   crashes=len(times))


def is_unrecoverable(record: logging.LogRecord) -> bool:
    """Is this Celery's log line of a worker that is about to stop for good?"""
    return record.levelno >= logging.CRITICAL and record.getMessage().startswith("Unrecoverable error")


def reason(exc: BaseException | None, fallback: str) -> str:
    """One line saying what ended Celery: the exception's type and the first line of its
    message (``ConnectionError: Error 111 connecting to ...``), else ``fallback``.

    Logged with each restart and repeated in the crash-loop error, so the operator reads
    the cause where the verdict is, not only in a traceback further up.
    """
    if exc is None:
        return fallback
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (zombies included), from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return out


def kill_children() -> int:
    """SIGKILL and reap this process's children (the Celery pool) until none is left;
    how many there were.

    Repeated because Celery's pool supervisor (a thread) replaces killed pool processes,
    and reaped because the next image would not know to: they would stay zombies.
    """
    killed = 0
    for _ in range(10):
        pids = children_of(os.getpid())
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):  # reaped by Celery's pool meanwhile
                os.waitpid(pid, 0)
        killed += len(pids)
    return killed


def restart_in_place(verdict: Verdict) -> None:
    """Replace this process with a fresh ``python -m prewarm`` with the same arguments."""
    os.environ[CRASHES_ENV] = verdict.history
    time.sleep(verdict.delay)
    sys.stdout.flush()
    sys.stderr.flush()
    # Last, right before exec: a pool process forked after the kill would outlive the
    # image that knew it.
    kill_children()
    # ``-m prewarm``, not sys.argv[0]: run as a file, prewarm/__main__.py would put the
    # package folder first on sys.path, where prewarm/runtime/gc.py hides the standard gc module.
    os.execv(sys.executable, [sys.executable, "-m", "prewarm", *sys.argv[1:]])
