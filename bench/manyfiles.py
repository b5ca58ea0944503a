"""The many-file benchmark image (issue 20): one gzip layer of N small text files.

Issue 20's workload is the shape of a Python environment or a ``node_modules`` tree: many
small source files and nothing else, so that the per-file cost of a pre-warm (a create,
its metadata, a small write) dominates instead of the inflate.  Each file is text (lines
of made-up Python: names, calls, comments), so gzip finds the ratio it finds in real
source; its size is drawn log-uniformly from 200 B to 8 KiB, mean ``(8192 - 200) /
ln(8192 / 200)`` = 2.15 KB, issue 20's "about 2.2 KB".

Deterministic: a seeded ``random.Random`` (Mersenne Twister; ``random()`` gives the same
numbers on every CPython) draws the sizes, names and contents, and ``prewarm.imagebuild``
writes fixed mtimes and zero gzip timestamps, so one (N, seed) gives one layer digest.
The layer is written streaming: the entries come from a generator, one file's bytes at a
time, out of one shared 1 MiB text corpus (each file is its own header line, then a
window of the corpus at a random offset), so a million files never sit in memory.
(``prewarm.imagebuild``'s ``tarfile`` does keep each member's header until the layer is
written, ~0.7 KB a file measured at 5,000: ~0.7 GB at a million files, once per build.)

The tree: ``opt/venv/lib/python3/site-packages/pkgNNNN/modM/``, :data:`FILES_PER_DIR`
files per ``modM`` directory and :data:`DIRS_PER_PACKAGE` of those per package: five
levels down, a thousand files a directory.  Files are ``0644``, directories ``0755``,
owned by root.

Built once per (N, seed) under the benchmark's cache (``manyfiles-v1-N``) by
:func:`bench.images.build_cached`, which writes a ``complete`` marker last.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path

from bench.images import build_cached
from prewarm.imagebuild import Layer, TarEntry

#: The default seed (the issue's number).
SEED = 20
#: File sizes, bytes: drawn log-uniformly in [MIN_SIZE, MAX_SIZE).
MIN_SIZE, MAX_SIZE = 200, 8192
#: Files per leaf directory (the last one holds the remainder).
FILES_PER_DIR = 1000
#: Leaf directories (``modM``) per package directory.
DIRS_PER_PACKAGE = 4
#: Where the packages live in the image.
ROOT = "opt/venv/lib/python3/site-packages"
#: Bytes of the shared text every file takes its window from.
CORPUS_SIZE = 1 << 20
#: Goes into the cached layout's name: bump it when the generator's output changes.
VERSION = 1
LAYOUT_PREFIX = f"manyfiles-v{VERSION}-"

_KEYWORDS = ("def", "return", "if", "else:", "for", "in", "import", "from", "class", "self", "None",
             "True", "False", "not", "and", "or", "is", "with", "as", "try:", "except", "raise", "yield")
_SYLLABLES = ("ba", "co", "de", "fi", "ga", "he", "in", "jo", "ka", "lu", "me", "no", "pa", "qu",
              "ra", "si", "te", "un", "va", "we", "xo", "ya", "ze", "st", "tr", "ch", "ph", "nd")


def mean_size() -> float:
    """The expected file size of the log-uniform draw, bytes."""
    return (MAX_SIZE - MIN_SIZE) / math.log(MAX_SIZE / MIN_SIZE)


def _words(rng: random.Random, n: int) -> list[str]:
    """``n`` made-up identifiers of two to four syllables (a module's vocabulary)."""
    return ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(n)]


def corpus(rng: random.Random, size: int = CORPUS_SIZE) -> bytes:
    """``size`` bytes of Python-like lines: defs, calls, assignments, comments, docstrings."""
    names = _words(rng, 600)
    lines: list[str] = []
    length = 0
    while length < size:
        indent = "    " * rng.randint(0, 3)
        a, b, c = rng.choice(names), rng.choice(names), rng.choice(names)
        kind = rng.random()
        if kind < 0.12:
            line = f"def {a}({b}, {c}=None):"
        elif kind < 0.30:
            line = f"{indent}return {a}.{b}({c}, {rng.randint(0, 999)})"
        elif kind < 0.50:
            line = f"{indent}{a} = {b}[{c}] + {rng.randint(0, 99)}"
        elif kind < 0.62:
            line = f"{indent}if {a} is not None and {b} {rng.choice(_KEYWORDS)} {c}:"
        elif kind < 0.74:
            line = f"{indent}# " + " ".join(rng.choice(names) for _ in range(rng.randint(3, 10)))
        elif kind < 0.82:
            line = f"from {a}.{b} import {c}"
        elif kind < 0.90:
            line = f'{indent}"""' + " ".join(rng.choice(names) for _ in range(rng.randint(4, 12))) + '."""'
        else:
            line = f"{indent}self.{a} = {b}({c!r}) if {rng.choice(names)} else {rng.randint(0, 9)}"
        lines.append(line)
        length += len(line) + 1
    return ("\n".join(lines) + "\n").encode()[:size]


def file_size(rng: random.Random) -> int:
    """One file's size: log-uniform in [MIN_SIZE, MAX_SIZE)."""
    return min(MAX_SIZE - 1, int(MIN_SIZE * (MAX_SIZE / MIN_SIZE) ** rng.random()))


def entries(n: int, seed: int = SEED) -> Iterator[TarEntry]:
    """The layer's tar entries, directories before their files, generated one at a time.

    Raises:
        ValueError: ``n`` is not positive.
    """
    if n <= 0:
        raise ValueError(f"a many-file image needs at least one file, not {n}")
    rng = random.Random(seed)
    text = corpus(rng)
    names = _words(rng, 400)
    parts = ROOT.split("/")
    for i in range(1, len(parts) + 1):
        yield TarEntry("/".join(parts[:i]), "dir", mode=0o755)
    for first in range(0, n, FILES_PER_DIR):
        leaf = first // FILES_PER_DIR
        package = f"{ROOT}/pkg{leaf // DIRS_PER_PACKAGE:04d}"
        if leaf % DIRS_PER_PACKAGE == 0:
            yield TarEntry(package, "dir", mode=0o755)
        folder = f"{package}/mod{leaf % DIRS_PER_PACKAGE}"
        yield TarEntry(folder, "dir", mode=0o755)
        for i in range(min(FILES_PER_DIR, n - first)):
            path = f"{folder}/{rng.choice(names)}_{i:03d}.py"
            header = f"# {path}\n".encode()
            size = file_size(rng)
            body = size - len(header)
            start = rng.randrange(0, len(text) - body)
            yield TarEntry(path, "file", header + text[start:start + body], mode=0o644)


def layer(n: int, seed: int = SEED) -> Layer:
    """The one gzip level-6 layer (what ``docker build`` writes) of ``n`` files."""
    return Layer(entries(n, seed), "gzip", level=6,  # type: ignore[arg-type]  # a generator: streamed
                 created_by=f"COPY {n} small text files (bench.manyfiles, seed {seed})")


def build_many_files(cache: Path, n: int, seed: int = SEED) -> Path:
    """Build (or reuse) the ``n``-file image under ``cache``; returns its OCI layout (tag ``latest``).

    Raises:
        ValueError: ``n`` is not positive.
    """
    if n <= 0:
        raise ValueError(f"a many-file image needs at least one file, not {n}")
    cache.mkdir(parents=True, exist_ok=True)
    name = f"{LAYOUT_PREFIX}{n}" + ("" if seed == SEED else f"-seed{seed}")
    return build_cached(cache / name, [layer(n, seed)])
