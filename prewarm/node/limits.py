"""The container's CPU and memory limits, and the worker pool that fits inside them.

Why: ``os.cpu_count()`` is the node's core count, not the container's share.  A worker in a
DaemonSet limited to 2 CPUs and 2 GiB on a 64-core node would otherwise start 66 pool
processes, each allowed Celery's per-child memory ceiling, and the kernel's OOM killer would
end the pod long before any of them reached it.  The limits are read from cgroup v2
(``cpu.max``, ``memory.max``) of this process's own cgroup and of every parent up to the
mount point, the smallest one winning (a pod's limit sits on the pod's cgroup, a container's
on its own).  Without cgroup v2 (a laptop, cgroup v1) nothing is limited and the old default
holds.

Sizing: one process per CPU plus two (processes waiting on the network or the disk leave
every core inflating, see :func:`prewarm.node.embedded.default_concurrency`), but no more
processes than the memory left after :data:`PARENT_RESERVE` gives each at least
:data:`MIN_CHILD_MEMORY`; Celery's ``worker_max_memory_per_child`` is then the memory share
of one process, capped at :data:`MAX_CHILD_MEMORY`, so that all of them at their ceiling
still fit under the limit.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

#: Where cgroup v2 is mounted.
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Names this process's cgroup (the ``0::/path`` line of cgroup v2).
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
#: Bytes kept for the worker's main process (Celery's consumer, the heartbeat, the peer
#: server, the metrics endpoint) before the pool's share is counted.
PARENT_RESERVE = 256 << 20
#: Bytes a pool process needs to do one span task without being recycled after every task
#: (measured resident size of an idle pool process: ~70 MiB; a span in flight adds its span).
MIN_CHILD_MEMORY = 192 << 20
#: The lowest per-child ceiling ever set.
FLOOR_CHILD_MEMORY = 64 << 20
#: Celery's per-child ceiling when memory is not the constraint: a leak still cannot grow
#: a pool process without bound (the value the worker used before limits were read).
MAX_CHILD_MEMORY = 400_000 << 10
#: Extra processes beyond one per CPU: the ones waiting on a download or a disk write.
EXTRA_PROCESSES = 2


@dataclasses.dataclass(frozen=True)
class Limits:
    """What this container may use: ``cpus`` may be fractional; None means unlimited."""

    cpus: float | None
    memory: int | None


@dataclasses.dataclass(frozen=True)
class PoolSize:
    """The worker pool that fits the limits."""

    concurrency: int
    #: Celery's ``worker_max_memory_per_child``, in KiB (Celery's unit).
    max_memory_per_child_kib: int


def _own_cgroup(proc_self_cgroup: Path) -> str:
    """``/kubepods/.../cri-containerd-...`` from ``0::/path``, or ``/`` (a cgroup namespace)."""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return "/"
    for line in lines:
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return "/"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_max(text: str | None) -> float | None:
    """``"200000 100000"`` -> 2.0; ``"max 100000"`` or unreadable -> None."""
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _memory_max(text: str | None) -> int | None:
    """``"2147483648"`` -> that; ``"max"`` or unreadable -> None."""
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value > 0 else None


def _smaller(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def read_limits(cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> Limits:
    """The smallest ``cpu.max`` and ``memory.max`` from this process's cgroup up to the root.

    Unreadable or absent files (cgroup v1, no permission) count as unlimited: a wrong guess
    here would only size the pool, never stop the worker.
    """
    own = _own_cgroup(proc_self_cgroup).strip("/")
    parts = [p for p in own.split("/") if p and p != ".."]
    cpus: float | None = None
    memory: float | None = None
    # from the leaf up; a cgroup namespace shows the container's cgroup as the root itself
    for depth in range(len(parts), -1, -1):
        folder = cgroup_root.joinpath(*parts[:depth])
        cpus = _smaller(cpus, _cpu_max(_read(folder / "cpu.max")))
        memory = _smaller(memory, _memory_max(_read(folder / "memory.max")))
    return Limits(cpus=cpus, memory=int(memory) if memory is not None else None)


def pool_size(limits: Limits, cpu_count: int | None = None, concurrency: int | None = None) -> PoolSize:
    """The default concurrency and per-child memory ceiling for these limits.

    ``cpu_count`` is the node's core count (``os.cpu_count()`` when None); a CPU limit only
    ever lowers it.  A ``concurrency`` the operator chose (``--concurrency``) is kept, and
    the memory is shared among that many processes.
    """
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    cpus = cores if limits.cpus is None else max(1, min(cores, math.ceil(limits.cpus)))
    chosen = concurrency
    concurrency = chosen or cpus + EXTRA_PROCESSES
    if limits.memory is None:
        return PoolSize(concurrency, MAX_CHILD_MEMORY >> 10)
    pool_memory = max(0, limits.memory - PARENT_RESERVE)
    if not chosen:
        concurrency = max(1, min(concurrency, pool_memory // MIN_CHILD_MEMORY))
    # a limit below PARENT_RESERVE + MIN_CHILD_MEMORY is too small to run well; the floor keeps
    # Celery's check on (0 would turn it off) and recycles the one process after each task
    share = max(FLOOR_CHILD_MEMORY, min(MAX_CHILD_MEMORY, pool_memory // concurrency))
    return PoolSize(concurrency, share >> 10)
