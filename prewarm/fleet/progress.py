"""The live progress display of ``prewarm schedule --wait``.

Per image and per node: bytes done/total, throughput and ETA.  On a terminal the block
is redrawn in place; otherwise (logs, CI) one line per node is printed every few
seconds, so a pipe never fills with carriage returns.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from typing import TextIO

from prewarm.fleet.jobs import JobStatus

BAR_WIDTH = 28


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "--"
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    fraction = min(1.0, max(0.0, fraction))
    full = int(fraction * width)
    return "█" * full + ("▌" if fraction * width - full >= 0.5 else "") + " " * (width - full - (1 if fraction * width - full >= 0.5 else 0))


#: After this many seconds without a byte, a progress line says so instead of an ETA.
STALL_NOTICE = 15.0


@dataclasses.dataclass
class _Rate:
    """Throughput over a sliding window of samples (bytes, time)."""

    samples: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    window: float = 3.0
    #: when ``done`` last moved (or the first sample)
    moved: float | None = None
    last: int = -1

    def add(self, t: float, done: int) -> float:
        if done != self.last or self.moved is None:
            self.moved, self.last = t, done
        self.samples.append((t, done))
        while len(self.samples) > 2 and t - self.samples[0][0] > self.window:
            self.samples.pop(0)
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0


class ProgressView:
    """Renders successive :class:`JobStatus` snapshots."""

    def __init__(self, stream: TextIO | None = None, interval_plain: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._rates: dict[str, _Rate] = {}
        self._lines_drawn = 0
        self._last_plain = 0.0
        self._interval_plain = interval_plain
        self._start = time.monotonic()

    def _line(self, label: str, done: int, total: int, key: str, now: float, state: str) -> str:
        tracker = self._rates.setdefault(key, _Rate())
        rate = tracker.add(now, done)
        frac = done / total if total else 1.0
        eta = (total - done) / rate if rate > 0 and done < total else (0.0 if done >= total else None)
        tail = state if state in ("succeeded", "failed", "cancelled") else f"ETA {human_seconds(eta)}"
        stalled = now - (tracker.moved or now)
        if state not in ("succeeded", "failed", "cancelled") and stalled >= STALL_NOTICE:
            # never a silent 0%: say how long nothing moved, and what that may mean
            tail = f"no progress for {human_seconds(stalled)} ({state}; is its worker up? prewarm nodes)"
        return (f"{label:<24.24} [{bar(frac)}] {human_bytes(done):>9}/{human_bytes(total):<9} "
                f"{human_bytes(rate) + '/s':>10}  {tail}")

    def render(self, status: JobStatus, final: bool = False) -> None:
        now = time.monotonic()
        lines = [self._line(status.image, status.bytes_done, status.bytes_total, "*", now, status.state)]
        if len(status.nodes) > 1 or not self.tty:
            for name, node in sorted(status.nodes.items()):
                lines.append(self._line("  " + name, node.bytes_done, node.bytes_total, name, now, node.state))
        if self.tty:
            cols = shutil.get_terminal_size((100, 20)).columns
            out = ""
            if self._lines_drawn:
                out += f"\x1b[{self._lines_drawn}F"
            out += "".join(f"\x1b[2K{line[:cols - 1]}\n" for line in lines)
            self.stream.write(out)
            self._lines_drawn = len(lines)
        elif final or now - self._last_plain >= self._interval_plain:
            self._last_plain = now
            for line in lines:
                self.stream.write(line + "\n")
        self.stream.flush()
