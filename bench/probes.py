"""What the pipeline benchmark measures besides wall time: machine CPU, pinning, first span, RSS.

- :func:`busy_seconds` reads the machine's busy time from ``/proc/stat`` (user + nice +
  system + irq + softirq + steal, all CPUs).  It counts the registry, kernel writeback,
  the loop device's worker and everyone else alike, which is why the issue asks for it
  instead of a process tree's rusage: a tool that moves work into the kernel or another
  process cannot hide it.  The machine should be otherwise idle.
- :class:`Pin` runs a step's processes on the first N cores with ``taskset``: new
  commands are started under ``taskset -c``; already running ones (the registry) are
  re-pinned with ``taskset -a -p`` for the step and set back afterwards.  Kernel threads
  (writeback, jbd2, loop workers) are not pinned: no user-space tool can pin them.
- :class:`StoreWatch` polls a prewarm store for the first landed span (``work/landed``
  has one byte per span, non-zero once landed) or the first finished layer (``ready``),
  and keeps the largest span count seen per layer, for the per-span projection.
- :class:`TreeSampler` samples the processes the benchmark started: the peak RSS of each
  kind of process (the ``prewarm schedule`` CLI, the worker, its pool processes and how many
  of them came and went, ``curl``, ``pigz``, ``tar``), and the cores they were allowed on
  (the evidence that a pinned step stayed pinned).
- :func:`run_measured` runs one command to its end: wall time and the command's own peak
  RSS, started from a small go-between so that the benchmark's own peak is not counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system [idle iowait] irq softirq steal


def busy_seconds() -> float:
    """Busy CPU-seconds of the whole machine since boot (all CPUs), from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    if fields[0] != "cpu":
        raise RuntimeError(f"/proc/stat starts with {fields[0]!r}, not the 'cpu' total line")
    ticks = [int(v) for v in fields[1:]]
    return sum(ticks[i] for i in _BUSY_FIELDS) / os.sysconf("SC_CLK_TCK")


#: The go-between of :func:`run_measured`, run as ``python -I -S`` (its own peak ~9 MB): it
#: spawns the command (stdout to /dev/null), waits for it and prints its wait status and
#: ``ru_maxrss`` in KiB.
_MEASURER = """
import os, sys
args = sys.argv[1:]
pid = os.posix_spawnp(args[0], args, os.environ,
                      file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
_, status, usage = os.wait4(pid, 0)
print(status, usage.ru_maxrss)
"""


def run_measured(args: Sequence[str], env: dict[str, str]) -> tuple[float, int]:
    """Run a command that must succeed; its wall seconds and its own peak RSS in bytes.

    The peak is ``wait4``'s ``ru_maxrss`` of the command, which Linux seeds at ``exec`` with
    the high-water mark of the address space being replaced.  Python's subprocess starts a
    command by ``vfork``, so that address space is the caller's, and a command started
    straight from the benchmark was charged the benchmark's own peak: ``prewarm index
    --push`` at 1M files "peaked at 476 MB" in the run that had just built the 1M-file image
    in-process.  Its own peak is 44 MB; building that image takes a process to 443 MB, and
    a bare ``python -c pass`` started from it then measured 443 MB.  So the command is
    started by a small go-between (:data:`_MEASURER`) and what it reports is the
    command's own (that ``python -c pass``: 10 MB), never below the go-between's ~9 MB.

    Raises:
        RuntimeError: the command failed (its exit code and the end of its stderr), or
            could not be started.
    """
    with tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        # its own session: an interrupted benchmark kills the go-between and the command together
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _MEASURER, *args], env=env,
                                stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        try:
            out, _ = proc.communicate()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        wall = time.monotonic() - t0
        err.seek(0)
        stderr = err.read().decode(errors="replace").strip()[-2000:]
    report = out.split()
    if proc.returncode != 0 or len(report) != 2:
        why = stderr.splitlines()[-1] if stderr else f"exit {proc.returncode}"  # the go-between's exception
        raise RuntimeError(f"{' '.join(args)} could not be started: {why}")
    code = os.waitstatus_to_exitcode(int(report[0]))
    if code != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {code}): {stderr}")
    return wall, int(report[1]) * 1024


class Pin:
    """Run a step's processes on cores ``0..cpus-1`` (``cpus`` None: no pinning)."""

    def __init__(self, cpus: int | None) -> None:
        available = sorted(os.sched_getaffinity(0))
        if cpus is not None and not 1 <= cpus <= len(available):
            raise ValueError(f"--cpus {cpus}: this machine lets us use {len(available)} core(s)")
        self.cpus = cpus
        self.cores = available[:cpus] if cpus else available
        self.cpu_list = ",".join(str(c) for c in self.cores)

    @property
    def label(self) -> str:
        return f"pinned to {self.cpus} core(s)" if self.cpus else f"all {len(self.cores)} cores"

    def cmd(self, args: Sequence[str]) -> list[str]:
        """``args`` prefixed with ``taskset -c`` when pinning."""
        return ["taskset", "-c", self.cpu_list, *args] if self.cpus else list(args)

    def shell(self, script: str) -> list[str]:
        """A shell pipeline whose every process inherits the pinning (taskset on the shell)."""
        return self.cmd(["sh", "-c", script])

    @contextlib.contextmanager
    def running(self, pids: Sequence[int]) -> Iterator[None]:
        """Re-pin already running processes (all their threads), and this thread, for the step.

        The benchmark's own probe threads (started inside the block) inherit the pin, so
        their small polling cost lands on the pinned cores too.
        """
        if not self.cpus:
            yield
            return
        mine = os.sched_getaffinity(0)
        everything = ",".join(str(c) for c in sorted(mine))
        for pid in pids:
            subprocess.run(["taskset", "-a", "-p", "-c", self.cpu_list, str(pid)], check=True, capture_output=True)
        os.sched_setaffinity(0, self.cores)  # this thread, and the probe threads it starts during the step
        try:
            yield
        finally:
            os.sched_setaffinity(0, mine)
            for pid in pids:
                subprocess.run(["taskset", "-a", "-p", "-c", everything, str(pid)], check=False, capture_output=True)


class StoreWatch(threading.Thread):
    """Poll a prewarm store root: when did the first span (or whole layer) land, and how many spans."""

    def __init__(self, root: Path, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.t0 = time.monotonic()
        self.first_span: float | None = None
        self.first_layer: float | None = None
        self.spans: dict[str, int] = {}
        self._halt = threading.Event()

    def start(self) -> None:
        self.t0 = time.monotonic()
        super().start()

    def run(self) -> None:
        layers = self.root / "layers" / "sha256"
        while not self._halt.is_set():
            now = time.monotonic() - self.t0
            with contextlib.suppress(OSError):
                for d in os.listdir(layers):
                    with contextlib.suppress(OSError):
                        landed = (layers / d / "work" / "landed").read_bytes()
                        self.spans[d] = max(self.spans.get(d, 0), len(landed))
                        if self.first_span is None and any(landed):
                            self.first_span = now
                    if self.first_layer is None and (layers / d / "ready").exists():
                        self.first_layer = now
            self._halt.wait(self.interval if self.first_span is None and self.first_layer is None else 0.1)

    def stop(self) -> None:
        self._halt.set()
        self.join()


#: The kind of a pool process: a ``prewarm worker`` forked by another one (Celery's prefork
#: pool forks without exec, so a pool process has its parent's command line).
POOL_KIND = "prewarm worker pool"


def process_kind(args: Sequence[str], parent_kind: str | None) -> str:
    """What a process is, from its command line: ``prewarm <command>``, a worker's pool, or its program.

    ``python -m prewarm schedule ...`` is ``prewarm schedule``; a ``prewarm worker`` whose
    parent is one too is :data:`POOL_KIND`; anything else is its program's name (``curl``,
    ``pigz``, ``tar``, ``redis-server``).
    """
    for i, arg in enumerate(args[:-2]):
        if arg == "-m" and args[i + 1] == "prewarm":
            kind = f"prewarm {args[i + 2]}"
            return POOL_KIND if kind == "prewarm worker" and parent_kind in (kind, POOL_KIND) else kind
    # a program that rewrote its title (redis-server) has spaces in its first word
    program = args[0].split(" ", 1)[0] if args else ""
    return os.path.basename(program) or "?"


@dataclasses.dataclass
class KindPeak:
    """The processes of one kind seen during a step: the largest peak RSS, and how many there were."""

    peak: int = 0  # bytes, the largest VmHWM of any of them
    pids: set[int] = dataclasses.field(default_factory=set)


class TreeSampler(threading.Thread):
    """Every 250 ms, the processes descended from this one: peak RSS per process kind, and the cores allowed.

    The peak is each process's own high-water mark (``VmHWM``), so a coarse interval loses
    no peak of a process alive at a sample; the interval was 50 ms, and the scans of
    ``/proc`` cost a visible share of the machine CPU-seconds that every step is charged
    (py-spy: more samples than the prewarm CLI itself during a spans step).  What a process
    grows in its last 250 ms, and a process that lives less than that, can be missed: the
    count of distinct processes per kind is a lower bound (issue 20 saw ~90 pool processes
    come and go at 1M files, recycled at Celery's per-child memory ceiling).

    ``needle`` picks the processes whose RSS makes :attr:`peak` (``prewarm worker``: the
    worker and its pool); :attr:`kinds` has every descendant's by :func:`process_kind`
    (the ``prewarm schedule`` CLI, the pool processes, ``curl``, ``tar`` ...).  The allowed
    cores (``Cpus_allowed_list``) are collected from every descendant, so a pinned step
    shows that nothing it started ran outside the pin.
    """

    def __init__(self, needle: str) -> None:
        super().__init__(daemon=True)
        self.needle, self.peak, self.allowed = needle, 0, set[int]()
        self.kinds: dict[str, KindPeak] = {}
        self._me = os.getpid()
        self._halt = threading.Event()

    def _descendants(self) -> list[tuple[str, str]]:
        """(pid, parent pid) of every descendant, each after its parent."""
        parent: dict[str, str] = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    parent[pid] = stat.rsplit(")", 1)[1].split()[1]
        inside, out = {str(self._me)}, []
        changed = True
        while changed:
            changed = False
            for pid, ppid in parent.items():
                if ppid in inside and pid not in inside:
                    inside.add(pid)
                    out.append((pid, ppid))
                    changed = True
        return out

    def sample(self) -> None:
        """One look at the process tree."""
        kinds: dict[str, str] = {}
        for pid, ppid in self._descendants():
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                args = raw.decode(errors="replace").split("\0")[:-1]
                kind = kinds[pid] = process_kind(args, kinds.get(ppid))
                hwm = 0
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm = int(line.split()[1]) * 1024
                    elif line.startswith("Cpus_allowed_list:"):
                        self.allowed |= _cpu_set(line.split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if not raw:  # a kernel thread, or a process between fork and exec's end
                continue
            seen = self.kinds.setdefault(kind, KindPeak())
            seen.pids.add(int(pid))
            seen.peak = max(seen.peak, hwm)
            if self.needle in " ".join(args):
                self.peak = max(self.peak, hwm)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(0.25)

    def stop(self) -> tuple[int, set[int]]:
        """(peak RSS in bytes of the ``needle`` processes, cores any descendant was allowed on)."""
        self._halt.set()
        self.join()
        return self.peak, self.allowed


def _cpu_set(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out
