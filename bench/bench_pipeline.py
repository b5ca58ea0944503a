"""The pre-warm benchmark (issue 16): prewarm against fair, durable baselines, each step cold on a fresh ext4.

Run by hand, as root, from the repository root, on an otherwise idle machine::

    .venv/bin/python -m bench.bench_pipeline [--runs 2] [--cpus 1,2] [--small] [--images 3,1]
    .venv/bin/python -m bench.bench_pipeline --files 40000,160000,1000000 [--steps e,prewarm-spans]

Two images (``bench.images``, built once and cached): the AI-style image in three gzip
layers (runtime, packages, PyTorch), and its single-layer twin, the same files in one
gzip layer, the shape of most real AI images.  Each is pushed to a private registry twice:
once without a SOCI index, once with one (``prewarm index --push``, outside any timing).

Steps, each on its own scratch ext4 (``bench.scratch``: loop device with direct I/O,
no lazy init, journal kept, no ``discard``), made before and torn down after the step,
with the page cache dropped before it:

  w                 the durable-write floor: the layers, already inflated to tars and cat'ed
                    once into the page cache (after the drop, outside the timing), extracted by
                    one ``tar -x`` per layer in parallel, then ``sync``.  No download, no
                    inflate, no verification: what merely putting this tree on disk costs.
  e                 ``curl | pigz -d | tar -x`` for every layer at once (one pipeline per
                    layer, in parallel), then ``sync``: the durable shell pipeline.
  prewarm-no-index  ``prewarm schedule --wait`` (embedded: private Redis and workers) of the
                    repository without a SOCI index: the default path, whole layers.
  prewarm-spans     the same of the repository with a SOCI index: span tasks.  Followed by
                    a second schedule of the same image into the same store (not timed in the
                    table; its wall time and the layer bytes it fetched are printed).

For each step: wall seconds; machine CPU-seconds (busy time from ``/proc/stat``, all
CPUs: the registry, kernel writeback and the loop device's worker count for every step
alike); wall and CPU relative to ``e`` and ``w``; for the prewarm steps the time from
starting ``prewarm schedule`` to the first span landed (or, without spans, the first
layer ready), the span count and the workers' peak RSS.  Each step's tree, overlay-mounted
newest layer first, is compared with the reference (``umoci unpack`` of the 3-layer image,
made once, outside the timing); the single-layer twin must give the same tree.

``--files 40000,160000,1000000`` (issue 20) runs the many-file images instead of the AI ones:
per count N, one gzip layer of N small text files (``bench.manyfiles``: 200 B to 8 KiB,
2.15 KB on average, a thousand to a directory, from a seeded generator, built once per N
under ``--cache``).  Each is pushed plain and with a SOCI index (``prewarm index --push
--min-layer-size 1``: the default 4 MiB spans, and an index even for a layer under 10 MiB);
the index's wall time and peak RSS are printed though not timed.  Its reference tree is
``umoci unpack`` of its own layout.  Every step above runs on it, each on a scratch ext4
grown by 16 KiB per file (room, and one more inode per file); ``--steps`` picks fewer.
Each count gets the usual table; then, per step, the cost per extra file: the slope of
wall and CPU-seconds between the counts, in microseconds per file.

Under every table: each step's peak RSS per process kind (``bench.probes.process_kind``:
the ``prewarm schedule`` CLI, the worker, the largest of its pool processes and how many
distinct pool processes came and went (Celery recycles one at its memory ceiling),
``curl``, ``pigz``, ``tar``, ``redis-server``), sampled every 250 ms: a process living
less than that can be missed, so the counts are lower bounds.

``--cpus 1,2`` runs every step once per value with all its processes pinned to that many
cores (``taskset``: commands started under it, the running registry re-pinned), then
prints the speed-up of each step and a *projection* for 16 and 64 cores from the measured
per-span cost (a model, not a measurement).  ``--runs 2`` repeats everything and prints
every table.  Figures on a shared 2-core VM are noisy: read ratios, and repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from bench.probes import Pin, StoreWatch, TreeSampler, busy_seconds, run_measured
from bench.scratch import DEFAULT_SIZE, drop_caches, scratch_fs

if TYPE_CHECKING:
    from tests.services import Registry

STEPS = ("w", "e", "prewarm-no-index", "prewarm-spans")
PROJECTED_CORES = (16, 64)


@dataclasses.dataclass
class Figure:
    """One step's measurement."""

    wall: float
    cpu: float
    first_span: float | None = None
    first_layer: float | None = None
    spans: int = 0
    rss_mb: float = 0.0
    cores: str = ""  # the cores the step's processes were allowed on
    again_wall: float | None = None  # prewarm-spans: a second schedule of the same image, same store
    again_bytes: int | None = None  # and the layer bytes the registry served for it
    background: float = 0.0  # cores busy on average in the half second before the step: other load
    diffs: int | None = None  # None: not compared
    note: str = ""
    #: process kind (bench.probes.process_kind) -> (largest peak RSS in MB, distinct processes seen)
    rss_by_kind: dict[str, tuple[float, int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Image:
    """One benchmark image as pushed: the repository without and the one with a SOCI index."""

    name: str
    layout: Path
    plain_ref: str
    soci_ref: str
    layers: list[tuple[str, int, str]]
    blob_url: Callable[[str], str]
    tars: list[Path]  # the inflated layers, input of ``w``
    reference: Path | None  # the tree every step must give (None: not compared)
    index_wall: float  # ``prewarm index --push``, not timed in the steps: wall seconds
    index_rss_mb: float  # and its peak RSS
    files: int | None = None  # a many-file image (--files): its file count


@contextlib.contextmanager
def clock() -> Iterator[dict[str, float]]:
    """Wall seconds and machine busy CPU-seconds of the ``with`` block."""
    out: dict[str, float] = {}
    cpu0, t0 = busy_seconds(), time.monotonic()
    try:
        yield out
    finally:
        out["wall"], out["cpu"] = time.monotonic() - t0, busy_seconds() - cpu0


#: Cores busy before a step above which its table warns that something else was running.
BUSY_MACHINE = 0.15


def background_load(seconds: float = 0.5) -> float:
    """Average cores busy over ``seconds`` while the benchmark waits: the load of everything else.

    Machine CPU-seconds count every process, so a step measured beside another job is
    inflated; this figure, taken just before each step, says whether the machine was idle.
    """
    cpu0 = busy_seconds()
    time.sleep(seconds)
    return (busy_seconds() - cpu0) / seconds


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    """A step's command in its own process group, so that :func:`_wait_all` can stop a whole pipeline."""
    return subprocess.Popen(args, start_new_session=True)


def _wait_all(procs: list[subprocess.Popen[bytes]], what: str) -> None:
    try:
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    if any(codes):
        raise RuntimeError(f"{what} failed: exit codes {codes}")


def _check(args: list[str], env: dict[str, str] | None = None) -> str:
    """Run a command that must succeed; its stdout, or a RuntimeError carrying its stderr."""
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _lowerdirs(mounts: str) -> list[Path]:
    """The layer directories, newest first, from ``prewarm mounts`` (an overlay, or a bind of one layer)."""
    words = mounts.split()
    if "lowerdir=" in mounts:
        return [Path(p) for p in mounts.split("lowerdir=", 1)[1].split()[0].split(",")[0].split(":")]
    if words[:3] == ["mount", "-t", "bind"]:
        return [Path(words[3])]
    raise RuntimeError(f"cannot read the layer directories from `prewarm mounts`: {mounts.strip()!r}")


#: Scratch filesystem bytes added per file of a many-file image: room for its blocks, and
#: (ext4 makes one inode per 16 KiB) one more inode each, beyond the default's million.
FS_BYTES_PER_FILE = 16 << 10


class Bench:
    """The steps, for one registry; each image brings its reference tree."""

    def __init__(self, tmp: Path, registry: Registry) -> None:
        self.tmp, self.reg = tmp, registry
        self.host = registry.host

    # === the steps: each gets a fresh mounted filesystem, returns its Figure and the tree's lowerdirs ===

    def w(self, img: Image, mnt: Path, pin: Pin) -> tuple[Figure, list[Path]]:
        drop_caches()
        for tar in img.tars:  # into the page cache, outside the timing
            with open(tar, "rb") as src:
                while src.read(1 << 24):
                    pass
        dests = [mnt / "w" / str(i) for i in range(len(img.tars))]
        with self.step(pin) as fig:
            for d in dests:
                d.mkdir(parents=True)
            _wait_all([_start(pin.cmd(["tar", "-x", "--numeric-owner", "-f", str(tar), "-C", str(d)]))
                       for tar, d in zip(img.tars, dests)], "tar -x")
            subprocess.run(pin.cmd(["sync"]), check=True)
        return fig, dests[::-1]

    def e(self, img: Image, mnt: Path, pin: Pin) -> tuple[Figure, list[Path]]:
        dests = [mnt / "e" / str(i) for i in range(len(img.layers))]
        drop_caches()
        with self.step(pin) as fig:
            procs = []
            for (digest, _, _), d in zip(img.layers, dests):
                d.mkdir(parents=True)
                procs.append(_start(pin.cmd([
                    "bash", "-o", "pipefail", "-c",
                    f"curl -sSf {img.blob_url(digest)} | pigz -d | tar -x --numeric-owner -C {d}"])))
            _wait_all(procs, "curl | pigz -d | tar -x")
            subprocess.run(pin.cmd(["sync"]), check=True)
        return fig, dests[::-1]

    @contextlib.contextmanager
    def step(self, pin: Pin, watch: StoreWatch | None = None) -> Iterator[Figure]:
        """Time the block (wall and machine CPU) with every process pinned, sampling the process tree."""
        fig = Figure(0.0, 0.0, background=background_load())
        with pin.running([self.reg.proc.pid]):
            sampler = TreeSampler("prewarm worker")
            sampler.start()
            if watch is not None:
                watch.start()
            try:
                with clock() as c:
                    yield fig
            finally:
                if watch is not None:
                    watch.stop()
                peak, allowed = sampler.stop()
        fig.wall, fig.cpu, fig.rss_mb = c["wall"], c["cpu"], peak / 1e6
        fig.rss_by_kind = {kind: (seen.peak / 1e6, len(seen.pids)) for kind, seen in sampler.kinds.items()}
        fig.cores = ",".join(str(i) for i in sorted(allowed))
        if watch is not None:
            fig.first_span, fig.first_layer, fig.spans = watch.first_span, watch.first_layer, sum(watch.spans.values())

    def _schedule(self, ref: str, root: Path, pin: Pin) -> float:
        env = {**os.environ, "PREWARM_ROOT": str(root)}
        env.pop("PREWARM_BROKER_URL", None)
        t0 = time.monotonic()
        _check(pin.cmd([sys.executable, "-m", "prewarm", "schedule", ref, "--wait", "--quiet", "--json",
                        "--insecure-registry", self.host]), env)
        return time.monotonic() - t0

    def _prewarm(self, ref: str, img: Image, mnt: Path, pin: Pin, again: bool) -> tuple[Figure, list[Path]]:
        root = mnt / "store"
        drop_caches()
        with self.step(pin, StoreWatch(root)) as fig:
            self._schedule(ref, root, pin)
        if again:
            with pin.running([self.reg.proc.pid]):
                before = self._layer_bytes(img)
                fig.again_wall = self._schedule(ref, root, pin)
                fig.again_bytes = self._layer_bytes(img) - before
                fig.note = f"second schedule {fig.again_wall:.2f} s, {fig.again_bytes} layer bytes fetched"
        lines = _check([sys.executable, "-m", "prewarm", "mounts", ref, "/x", "--root", str(root)])
        return fig, _lowerdirs(lines)

    def _layer_bytes(self, img: Image) -> int:
        return sum(self.reg.bytes_served(f"/blobs/{d}") for d, _, _ in img.layers)

    def prewarm_no_index(self, img: Image, mnt: Path, pin: Pin) -> tuple[Figure, list[Path]]:
        return self._prewarm(img.plain_ref, img, mnt, pin, again=False)

    def prewarm_spans(self, img: Image, mnt: Path, pin: Pin) -> tuple[Figure, list[Path]]:
        return self._prewarm(img.soci_ref, img, mnt, pin, again=True)

    # === one step, on its own filesystem, compared with the reference ===

    def run(self, step: str, img: Image, pin: Pin) -> Figure:
        body = getattr(self, step.replace("-", "_"))
        with scratch_fs(step, size=DEFAULT_SIZE + (img.files or 0) * FS_BYTES_PER_FILE) as mnt:
            fig, lowers = body(img, mnt, pin)
            if img.reference is not None:
                from tests.rootfs import overlay_mount
                from tests.treecompare import compare_trees

                with overlay_mount(lowers, self.tmp / "merged") as merged:
                    diffs = compare_trees(img.reference, merged)
                fig.diffs = len(diffs)
                if diffs:
                    print(f"    {step}: tree differs from the reference in {len(diffs)} place(s): "
                          + "; ".join(diffs[:5]), flush=True)
        return fig


# === preparing the images ====================================================


#: ``prewarm index`` options for the small self-check image, whose layers are far below the
#: default 10 MiB minimum and 4 MiB span: without them it would have no spans to check.
SMALL_INDEX_OPTIONS = ("--min-layer-size", "1", "--span-size", str(256 << 10))
#: ``prewarm index`` options for the many-file images: the default span size, but an index
#: for a layer below the 10 MiB minimum too (a few thousand files make ~2 MB of gzip).
FILES_INDEX_OPTIONS = ("--min-layer-size", "1")


def prepare(layout: Path, reg: Registry, tmp: Path, index_options: tuple[str, ...] = (), *,
            reference: Path | None = None, files: int | None = None) -> Image:
    """Push the image twice (plain and with a SOCI index) and inflate its layers for ``w``.

    The index is built and pushed outside any timing; its wall time and peak RSS are
    measured all the same (issue 20: 26 s and 943 MB at a million files).
    """
    from isal import igzip

    from bench.images import push_ai_image
    from prewarm.imagebuild import blob_path

    name = layout.name
    plain_ref, layers = push_ai_image(layout, reg, f"bench/{name}-plain")
    soci_ref, _ = push_ai_image(layout, reg, f"bench/{name}")
    env = {**os.environ, "PREWARM_ROOT": str(tmp / f"index-root-{name}")}
    env.pop("PREWARM_BROKER_URL", None)
    index_wall, index_rss = run_measured([sys.executable, "-m", "prewarm", "index", soci_ref, "--push",
                                           *index_options, "--insecure-registry", reg.host], env)
    print(f"  {name}: SOCI index pushed for {soci_ref} in {index_wall:.1f} s, "
          f"peak RSS {index_rss / 1e6:.0f} MB (not timed)", flush=True)
    tars = []
    for digest, _, _ in layers:
        tar = tmp / "inflated" / f"{digest.split(':')[1]}.tar"
        tar.parent.mkdir(exist_ok=True)
        with igzip.open(blob_path(layout, digest)) as src, open(tar, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tars.append(tar)
    url = reg.url
    return Image(name, layout, plain_ref, soci_ref, layers,
                 lambda d: f"{url}/v2/bench/{name}/blobs/{d}", tars, reference, index_wall, index_rss / 1e6, files)


# === reporting ===============================================================


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:6.2f}" if b else "     -"


def print_table(img: Image, pin: Pin, run: int, figs: dict[str, Figure]) -> None:
    total = sum(s for _, s, _ in img.layers)
    files = f", {img.files} files" if img.files else ""
    print(f"\n{img.name}: {len(img.layers)} layer(s){files}, {total / 1e6:.0f} MB gzip; {pin.label}; run {run}")
    print(f"  (prewarm index --push, not timed: {img.index_wall:.1f} s, peak RSS {img.index_rss_mb:.0f} MB)")
    print(f"  {'step':<17} {'wall s':>7} {'CPU-s':>7} {'wall/e':>6} {'wall/w':>6} {'CPU/e':>6} {'CPU/w':>6}"
          f" {'1st span s':>10} {'spans':>6} {'RSS MB':>6} {'cores':>5} {'bg':>4}  tree")
    e, w = figs.get("e"), figs.get("w")
    for step, f in figs.items():
        first = f.first_span if f.first_span is not None else f.first_layer
        first_s = "-" if first is None else f"{first:.2f}" + ("" if f.first_span is not None else " (L)")
        tree = "not compared" if f.diffs is None else ("= reference" if f.diffs == 0 else f"{f.diffs} DIFFERENCES")
        print(f"  {step:<17} {f.wall:7.2f} {f.cpu:7.2f} {_ratio(f.wall, e.wall if e else None)} {_ratio(f.wall, w.wall if w else None)}"
              f" {_ratio(f.cpu, e.cpu if e else None)} {_ratio(f.cpu, w.cpu if w else None)} {first_s:>10}"
              f" {f.spans or '-':>6} {f'{f.rss_mb:.0f}' if f.rss_mb else '-':>6} {f.cores or '-':>5} {f.background:4.2f}  {tree}")
        if f.note:
            print(f"  {'':<17} ({f.note})")
    if busy := [step for step, f in figs.items() if f.background > BUSY_MACHINE]:
        print(f"  WARNING: the machine was not idle before {', '.join(busy)} (bg = cores busy just before the "
              "step); their CPU-s include other work and their wall times are suspect: run again")
    print("  (wall/e > 1: slower than e.  1st span: from `prewarm schedule` to the first span landed;"
          " '(L)': no span landed,\n   the time is to the first layer ready.  cores: those the step's processes"
          " were allowed on.\n   bg: cores busy in the half second before the step, ~0 on an idle machine)")
    print_rss_by_kind(figs)
    print_targets(figs)


#: Process kinds not worth showing: launchers and ``sync``, a few MB each, and the bench's own
#: registry, alive across all steps (its high-water mark is its lifetime's, not the step's).
_DULL_KINDS = frozenset({"taskset", "sync", "sh", "bash", "docker-registry"})


def print_rss_by_kind(figs: dict[str, Figure]) -> None:
    """Each step's peak RSS per process kind, and how many processes of the kind were seen."""
    print("  peak RSS per process kind, MB (xN: N distinct processes seen, sampled every 250 ms: a lower bound)")
    for step, f in figs.items():
        shown = sorted(((kind, mb, n) for kind, (mb, n) in f.rss_by_kind.items() if kind not in _DULL_KINDS),
                       key=lambda k: -k[1])
        text = ", ".join(f"{kind} {mb:.0f}" + (f" x{n}" if n > 1 else "") for kind, mb, n in shown)
        print(f"    {step:<17} {text or '-'}")


def print_targets(figs: dict[str, Figure]) -> None:
    """Issue 16's targets that one table can check (the scaling one needs --cpus 1,2)."""
    e, w = figs.get("e"), figs.get("w")
    spans, plain = figs.get("prewarm-spans"), figs.get("prewarm-no-index")
    checks: list[tuple[str, float | None, float, bool]] = []  # (what, measured, limit, lower is better)
    if spans and e:
        checks += [("spans: wall/e (1.5x faster than e)", spans.wall / e.wall, 1 / 1.5, True),
                   ("spans: CPU/e", spans.cpu / e.cpu, 0.8, True)]
    if spans and w:
        checks.append(("spans: wall/w", spans.wall / w.wall, 1.5, True))
    if plain and e:
        checks.append(("no index: wall/e (1.2x faster than e)", plain.wall / e.wall, 1 / 1.2, True))
    for name, f in (("spans", spans), ("no index", plain)):
        if f and f.rss_mb:
            checks.append((f"{name}: worker peak RSS MB", f.rss_mb, 300, True))
    if spans:
        checks.append(("spans: first span landed, s", spans.first_span, 1.0, True))
        if spans.again_wall is not None:
            checks += [("spans: second schedule, s", spans.again_wall, 1.0, True),
                       ("spans: second schedule, layer bytes", float(spans.again_bytes or 0), 0, True)]
    for what, value, limit, _ in checks:
        verdict = "n/a" if value is None else ("met" if value <= limit else "NOT met")
        shown = "-" if value is None else f"{value:.2f}"
        print(f"  target {what:<40} {shown:>7} <= {limit:<6.2f} {verdict}")


def print_file_costs(pin: Pin, run: int, by_count: dict[int, dict[str, Figure]]) -> None:
    """Issue 20's cost per extra file: the slope of wall and CPU-seconds between file counts.

    For each step, (figure at the larger count - figure at the smaller) / (file difference),
    in microseconds per file: smallest to largest count, then each neighbouring pair when
    there are more than two counts.
    """
    counts = sorted(by_count)
    if len(counts) < 2:
        return
    pairs = [(counts[0], counts[-1])] + (list(itertools.pairwise(counts)) if len(counts) > 2 else [])
    print(f"\ncost per extra file, microseconds (slope between file counts); {pin.label}; run {run}")
    print(f"  {'step':<17}" + "".join(f" {f'{a}->{b} wall':>22} {'CPU':>7}" for a, b in pairs))
    for step in by_count[counts[0]]:
        cells = []
        for a, b in pairs:
            fa, fb = by_count[a].get(step), by_count[b].get(step)
            if fa is None or fb is None:
                cells.append(f" {'-':>22} {'-':>7}")
                continue
            per = 1e6 / (b - a)
            cells.append(f" {(fb.wall - fa.wall) * per:22.2f} {(fb.cpu - fa.cpu) * per:7.2f}")
        print(f"  {step:<17}" + "".join(cells))
    print("  (machine CPU-seconds, as in the tables: registry and kernel writeback included)")


def print_scaling(img: Image, by_cpus: dict[int | None, dict[str, Figure]]) -> None:
    pinned = sorted(k for k in by_cpus if k)
    if len(pinned) < 2:
        return
    lo, hi = pinned[0], pinned[-1]
    print(f"\n{img.name}: scaling from {lo} to {hi} pinned core(s) (speed-up = wall at {lo} / wall at {hi})")
    for step in by_cpus[lo]:
        if step in by_cpus[hi]:
            a, b = by_cpus[lo][step].wall, by_cpus[hi][step].wall
            print(f"  {step:<17} {a:7.2f} s -> {b:7.2f} s   speed-up {a / b:5.2f}x")


def print_projection(img: Image, by_cpus: dict[int | None, dict[str, Figure]], cores: int) -> None:
    """A model, T(N) = S + max(n * c / N, c), fitted to the measured span runs."""
    spans = {k: v["prewarm-spans"] for k, v in by_cpus.items() if "prewarm-spans" in v}
    if not spans:
        return
    pinned = sorted(k for k in spans if k)
    if len(pinned) >= 2 and pinned[0] == 1:
        t1, tn, n_cores = spans[1].wall, spans[pinned[-1]].wall, pinned[-1]
        parallel = (t1 - tn) * n_cores / (n_cores - 1)  # T1 = S + P, Tn = S + P/n
        serial = max(0.0, t1 - parallel)
        n = spans[1].spans or spans[pinned[-1]].spans
        how = f"fitted to the 1- and {n_cores}-core runs: T(1) = S + P, T({n_cores}) = S + P/{n_cores}"
    else:
        k = pinned[-1] if pinned else None
        f = spans[k]
        n_cores = k or cores
        parallel = f.cpu
        serial = max(0.0, f.wall - f.cpu / n_cores)
        n = f.spans
        how = (f"from one {n_cores}-core run: P = its machine CPU-s (all of it counted as per-span work), "
               f"S = wall - P/{n_cores}")
    if not n:
        print(f"\n{img.name}: no projection (no span landed)")
        return
    if parallel <= 0:
        print(f"\n{img.name}: no projection (the pinned runs show no parallel part: more cores were not faster)")
        return
    per_span = parallel / n
    print(f"\n{img.name}: PROJECTION, not a measurement: T(N) = S + max(n*c/N, c), {how}")
    print(f"  S = {serial:.2f} s serial, P = {parallel:.2f} s parallel over n = {n} spans, "
          f"c = {per_span * 1000:.1f} ms per span")
    for big in PROJECTED_CORES:
        print(f"  projected {big:>3} cores: {serial + max(n * per_span / big, per_span):6.2f} s "
              f"(ignores the registry's and the disk's bandwidth, which w and e bound on a real node)")


# === main ====================================================================


def _cpus_list(text: str) -> list[int | None]:
    if not text:
        return [None]
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cpus {text!r}: give core counts like 1,2") from None


def _files_list(text: str) -> list[int]:
    try:
        counts = sorted({int(v) for v in text.split(",") if v})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--files {text!r}: give file counts like 40000,160000,1000000") from None
    if not counts or counts[0] <= 0:
        raise argparse.ArgumentTypeError(f"--files {text!r}: file counts must be positive")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path("/var/tmp/prewarm-bench"))
    ap.add_argument("--small", action="store_true", help="the small self-check image (seconds), not the AI one")
    ap.add_argument("--images", help="3: the 3-layer image, 1: its single-layer twin (default 3,1)")
    ap.add_argument("--files", type=_files_list, default=[],
                    help="run the many-file images (bench.manyfiles) of these file counts, e.g. "
                         "40000,160000,1000000, instead of the AI images; prints the cost per extra file")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    ap.add_argument("--cpus", type=_cpus_list, default=[None],
                    help="pin every step to this many cores with taskset; a list (1,2) runs each in turn "
                         "and prints the scaling and the projection (default: no pinning)")
    ap.add_argument("--runs", type=int, default=1, help="repeat everything; every table is printed")
    ap.add_argument("--no-compare", action="store_true", help="skip comparing each tree with the reference")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    if unknown := set(steps) - set(STEPS):
        ap.error(f"unknown step(s) {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")
    if args.files and (args.small or args.images):
        ap.error("--files runs the many-file images instead of the AI ones: leave out --small and --images")
    if os.geteuid() != 0:
        ap.error("run as root: it drops the page cache, makes loop devices and mounts filesystems")
    pins = [Pin(c) for c in args.cpus]
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    from bench.images import build_ai_image, build_single_layer, build_small_image
    from bench.manyfiles import build_many_files
    from tests.rootfs import umoci_unpack
    from tests.services import run_registry

    print(f"building (or reusing) the images in {args.cache} ...", flush=True)
    if args.files:
        wanted = [build_many_files(args.cache, n) for n in args.files]
        three = None
    else:
        three = build_small_image(args.cache) if args.small else build_ai_image(args.cache)
        layouts = {"3": three, "1": build_single_layer(three)}
        wanted = [layouts[k] for k in (args.images or "3,1").split(",") if k in layouts]
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="prewarm-bench-", dir="/var/tmp") as tmp_s, \
            run_registry(Path(tmp_s) / "registry") as reg:
        tmp = Path(tmp_s)
        images = []
        if args.files:
            for n, layout in zip(args.files, wanted):
                reference = None
                if not args.no_compare:
                    reference = umoci_unpack(layout, "latest", tmp / f"reference-{n}")
                    print(f"reference tree: umoci unpack of {layout.name} (not timed)", flush=True)
                images.append(prepare(layout, reg, tmp, FILES_INDEX_OPTIONS, reference=reference, files=n))
        else:
            assert three is not None
            reference = None
            if not args.no_compare:
                reference = umoci_unpack(three, "latest", tmp / "reference")
                print(f"reference tree: umoci unpack of {three.name} (not timed)", flush=True)
            images = [prepare(layout, reg, tmp, SMALL_INDEX_OPTIONS if args.small else (), reference=reference)
                      for layout in wanted]
        bench = Bench(tmp, reg)
        cores = len(os.sched_getaffinity(0))
        for run in range(1, args.runs + 1):
            by_count: dict[int | None, dict[int, dict[str, Figure]]] = {pin.cpus: {} for pin in pins}
            for img in images:
                by_cpus: dict[int | None, dict[str, Figure]] = {}
                for pin in pins:
                    figs: dict[str, Figure] = {}
                    for step in steps:
                        print(f"  [{img.name}, {pin.label}, run {run}] {step} ...", flush=True)
                        figs[step] = bench.run(step, img, pin)
                        results.append({"image": img.name, "files": img.files, "cpus": pin.cpus, "run": run,
                                        "step": step, **dataclasses.asdict(figs[step])})
                    by_cpus[pin.cpus] = figs
                    if img.files:
                        by_count[pin.cpus][img.files] = figs
                    print_table(img, pin, run, figs)
                print_scaling(img, by_cpus)
                print_projection(img, by_cpus, cores)
            for pin in pins:
                print_file_costs(pin, run, by_count[pin.cpus])
    print("\nfigures from a shared VM are noisy: compare ratios within one run, and repeat (--runs 2)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except RuntimeError as err:
        print(f"bench: {err}", file=sys.stderr)
        sys.exit(1)
