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
- :class:`RssSampler` samples the peak RSS of processes matching a command line.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
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
        """Re-pin already running processes (all their threads) for the duration of the step."""
        if not self.cpus:
            yield
            return
        everything = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        for pid in pids:
            subprocess.run(["taskset", "-a", "-p", "-c", self.cpu_list, str(pid)], check=True, capture_output=True)
        try:
            yield
        finally:
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
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


class RssSampler(threading.Thread):
    """Peak RSS of processes whose command line contains ``needle`` (sampled every 50 ms)."""

    def __init__(self, needle: str) -> None:
        super().__init__(daemon=True)
        self.needle, self.peak, self._halt = needle, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if self.needle not in cmd:
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
                except OSError:
                    continue
            self._halt.wait(0.05)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak
