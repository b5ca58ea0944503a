"""A worker's memory does not grow with the number of files in a layer (issue 20).

The layer here has 200,000 entries.  One process prepares it (checks the TOC, saves the
landing table); a second, as a worker process would, opens the node's cached zTOC and
the saved table and lands one span from the middle.  The second process's anonymous
memory is measured (``/proc/self/status``), not timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prewarm.imagebuild import TarEntry, write_layer_tar
from prewarm.index.ztoc import serialize_ztoc
from prewarm.index.ztoc_build import build_ztoc_from_file
from prewarm.resolve.digest import sha256_digest
from prewarm.store.layout import Layout
from prewarm.store.ztoc_cache import ZtocCache

ENTRIES = 200_000
FILES_PER_DIR = 1000
#: Bytes of anonymous memory a worker may add per entry of the layer it lands a span of.
PER_ENTRY = 150
#: What landing one span costs whatever the layer (the span, its inflated bytes, the interpreter's caches).
FIXED = 24 << 20
#: Peak bytes (resident: anonymous and the zTOC's and table's file pages) per entry while a layer is
#: prepared: 400 MB for a million entries.
PREPARE_PEAK_PER_ENTRY = 400 - 24

_WORKER = r"""
import json, sys
from pathlib import Path

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) << 10

def anon():
    return status("RssAnon")

from prewarm.index.inflate import inflate_span
from prewarm.store.content import ContentStore
from prewarm.store.layout import Layout
from prewarm.store.table import LandingTable
from prewarm.store.ztoc_cache import ZtocCache

root, zdigest, layer, digest, role = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5]
store = ContentStore(root)
derived = []
_derive = LandingTable.derive.__func__
LandingTable.derive = classmethod(lambda cls, z, spill=None: derived.append(1) or _derive(cls, z, spill))
z = ZtocCache(Layout(root)).get(zdigest)
open("/proc/self/clear_refs", "w").write("5")  # VmHWM: the peak from here
before, rss = anon(), status("VmRSS")
if role == "prepare":
    store.prepare_layer(digest, z)
else:
    k = z.num_spans // 2
    span = z.span(k)
    with open(layer, "rb") as f:
        f.seek(span.compressed_start)
        compressed = f.read(span.compressed_end - span.compressed_start)
    store.land_span(digest, z, k, compressed, inflate_span(span, compressed))
    assert store.span_landed(digest, k)
decoded = z.files.decoded
print(json.dumps({"grew": anon() - before, "peak": status("VmHWM") - rss, "decoded": decoded,
                  "derived": len(derived)}))
"""


def _tar_entries() -> list[TarEntry]:
    out = [TarEntry("data", "dir", mode=0o755)]
    for d in range(ENTRIES // FILES_PER_DIR):
        out.append(TarEntry(f"data/d{d:03d}", "dir", mode=0o755))
        out.extend(TarEntry(f"data/d{d:03d}/f{i:04d}.txt", data=b"%d %d\n" % (d, i) * (i % 7))
                   for i in range(FILES_PER_DIR))
    return out


def write_many_file_layer(base: Path) -> Path:
    """``base``/layer.tar.gz: the ~200,000 small files of :func:`_tar_entries`, gzip (isal, level 1)."""
    from isal import igzip

    tar = base / "layer.tar"
    with open(tar, "wb") as out:
        write_layer_tar(_tar_entries(), out)
    layer = base / "layer.tar.gz"
    with open(tar, "rb") as src, igzip.open(layer, "wb", compresslevel=1) as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    tar.unlink()
    return layer


@pytest.fixture(scope="module")
def big_layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, Path, int]:
    """A gzip layer of ~200,000 small files, its zTOC in a fresh node's cache."""
    base = tmp_path_factory.mktemp("manyentries")
    layer = write_many_file_layer(base)
    z = build_ztoc_from_file(layer, span_size=4 << 20, build_tool_identifier="prewarm-test")
    assert len(z.files) >= ENTRIES
    root = base / "root"
    zdigest = ZtocCache(Layout(root)).put(serialize_ztoc(z))
    with open(layer, "rb") as f:
        digest = sha256_digest(f.read())
    return root, zdigest, digest, layer, len(z.files)


def _run(role: str, root: Path, zdigest: str, layer: Path, digest: str) -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", _WORKER, str(root), zdigest, str(layer), digest, role],
                         capture_output=True, text=True, env=env, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def test_a_worker_landing_a_span_of_a_layer_of_200k_entries_holds_its_memory_bound(
        big_layer: tuple[Path, str, str, Path, int]) -> None:
    root, zdigest, digest, layer, n = big_layer
    # Given the layer prepared by one process (it checked every entry and saved the table)
    prepared = _run("prepare", root, zdigest, layer, digest)
    assert prepared["derived"] == 1
    # When another process lands a span from the middle of the layer
    worker = _run("land", root, zdigest, layer, digest)
    # Then it decoded none of the TOC's entries (the saved table answered) and its anonymous
    # memory grew by at most 150 bytes per entry of the layer, plus what one span costs
    assert worker["decoded"] == 0
    assert worker["grew"] <= PER_ENTRY * n + FIXED, (worker["grew"], n)


def test_preparing_a_layer_of_200k_entries_holds_its_memory_bound(
        big_layer: tuple[Path, str, str, Path, int], tmp_path: Path) -> None:
    root, zdigest, digest, layer, n = big_layer
    # Given a node whose cache holds the layer's zTOC, nothing prepared
    fresh = tmp_path / "root"
    ZtocCache(Layout(fresh)).put_file(ZtocCache(Layout(root)).path(zdigest), zdigest)
    # When a process prepares it (checks the TOC in C, writes the table, creates the tree)
    prepared = _run("prepare", fresh, zdigest, layer, digest)
    # Then its peak resident memory grew by under ~400 bytes per entry (400 MB for a million
    # files), its anonymous memory by at most 150 bytes per entry once done
    assert prepared["derived"] == 1
    assert prepared["peak"] <= PREPARE_PEAK_PER_ENTRY * n + FIXED, (prepared["peak"], n)
    assert prepared["grew"] <= PER_ENTRY * n + FIXED, (prepared["grew"], n)


_PASSES = r"""
import json, sys
from pathlib import Path

from prewarm.store import _landing, _tree
from prewarm.store.layout import Layout
from prewarm.store.table import parse_mod_time
from prewarm.store.ztoc_cache import ZtocCache

def mapped_rss(path):
    # the resident kB of the mapping of ``path`` (smaps: its header line, then its fields)
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        if line.endswith(path):
            return next(int(l.split()[1]) << 10 for l in lines[i + 1:] if l.startswith("Rss:"))
    raise AssertionError(f"{path} is not mapped")

root, zdigest, file_backed = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
cache = ZtocCache(Layout(root))
buf, start, n, allowance = cache.get(zdigest).files.vector()
usize = cache.get(zdigest).uncompressed_archive_size
path = str(cache.path(zdigest))
out = {"size": cache.path(zdigest).stat().st_size}
assert _tree.check_toc(buf, start, n, usize, file_backed) is not None
out["after_check"] = mapped_rss(path)
assert _landing.toc_records(buf, start, n, usize, allowance, parse_mod_time, file_backed) is not None
out["after_records"] = mapped_rss(path)
print(json.dumps(out))
"""


@pytest.mark.parametrize("file_backed", [True, False])
def test_each_pass_over_a_mapped_ztoc_gives_its_pages_back_as_it_goes(
        big_layer: tuple[Path, str, str, Path, int], file_backed: bool) -> None:
    root, zdigest, _, _, n = big_layer
    # Given the cached zTOC of a layer of 200k entries, mapped from the node's cache
    # When the tree check and the records each read every entry of it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", _PASSES, str(root), zdigest, "1" if file_backed else "0"],
                         capture_output=True, text=True, env=env, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    # Then, told the buffer maps a file, each pass ends holding at most the entries it read since
    # its last give-back (65,536 of the 200k, about a third), not the whole zTOC; told nothing, it
    # holds what it read
    assert n > 3 * 65536
    for after in ("after_check", "after_records"):
        if file_backed:
            assert got[after] <= got["size"] // 3, (after, got)
        else:
            assert got[after] >= got["size"] * 9 // 10, (after, got)
