"""The C layer-tree check (prewarm.store._tree.check_toc) against its Python reference.

check_toc must give exactly what layerfs.check_archive computes for a zTOC's TOC, as
columns, or None where the Python checker must take the archive (every case where it
raises).  A differential hypothesis test holds the two equal on generated archives; one
case per tricky rule of EntryChecker says what the rule gives; a 200,000-entry TOC
shows the C keeps no Python object per entry.
"""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prewarm.store._tree import check_toc

from prewarm.errors import BadZtoc, CorruptContent, UnsafeArchive
from prewarm.index.ztoc import (
    FileEntry,
    LazyFiles,
    Ztoc,
    parse_ztoc,
    serialize_ztoc,
    tar_zinfo_bytes,
)
from prewarm.store.layerfs import check_archive, split_name
from prewarm.store.table import _KINDS

ROOT = Path(__file__).resolve().parent.parent
_SPAN = 1 << 22

#: (kinds, finals, fresh, paths of every entry, made_at, linked): one shape for both checkers.
Columns = tuple[bytes, bytes, bytes, list[bytes], dict[int, bytes], bytes]


def ztoc_bytes(entries: Sequence[FileEntry]) -> bytes:
    """An uncompressed layer's zTOC holding ``entries`` (their offsets as given)."""
    end = max((e.uncompressed_offset + max(e.uncompressed_size, 0) for e in entries), default=0)
    usize = end + (-end & 511) + 1024
    spans = max(1, -(-usize // _SPAN))
    z = Ztoc(version="0.9", build_tool_identifier="test", compressed_archive_size=usize,
             uncompressed_archive_size=usize, files=tuple(entries), compression="uncompressed",
             span_digests=["sha256:" + "0" * 64] * spans, checkpoints_blob=tar_zinfo_bytes(_SPAN, usize))
    return serialize_ztoc(z)


def archive(specs: Sequence[tuple[str, str, str]], size: int = 100) -> list[FileEntry]:
    """(name, type, linkname) -> entries in stream order: entry k's data at 512 * (2k + 1)."""
    return [FileEntry(name, type_, 512 * (2 * k + 1), size, linkname)
            for k, (name, type_, linkname) in enumerate(specs)]


def python_columns(buf: bytes) -> Columns | None:
    """What check_archive(parse_ztoc(buf, lazy_files=True).files, usize) says, as columns."""
    z = parse_ztoc(buf, lazy_files=True)
    try:
        checker = check_archive(z.files, z.uncompressed_archive_size)
    except (UnsafeArchive, BadZtoc, CorruptContent):
        return None
    pl = checker.placements
    targets = {"/".join(split_name(e.linkname)) for e, p in zip(z.files, pl) if p.kind == "hardlink"}
    return (bytes(_KINDS.index(p.kind) for p in pl), bytes(p.final for p in pl), bytes(checker.fresh),
            [os.fsencode(p.path) for p in pl], {i: os.fsencode(p.made_at) for i, p in enumerate(pl) if p.made_at},
            bytes(p.created_at in targets for p in pl))


def toc(buf: bytes) -> tuple[int, int, int]:
    """(start, count) of the TOC vector of the zTOC in ``buf``, and its archive size."""
    z = parse_ztoc(buf, lazy_files=True)
    assert isinstance(z.files, LazyFiles)
    return z.files._start, z.files._n, z.uncompressed_archive_size


def c_result(buf: bytes) -> tuple | None:
    return check_toc(buf, *toc(buf))


def c_columns(buf: bytes) -> Columns | None:
    out = c_result(buf)
    if out is None:
        return None
    kinds, finals, fresh, paths, path_index, made_at, linked = out
    n = len(kinds)
    assert len(finals) == len(fresh) == len(linked) == n and len(path_index) == 8 * n
    spans = [struct.unpack_from("<II", path_index, 8 * i) for i in range(n)]
    return (kinds, finals, fresh, [paths[o:o + ln] for o, ln in spans], made_at, linked)


# === the differential test

_COMMON = ["a", "b", "c", "d", "é", "\udcff"]
_ODD = [".", "", ".wh.a", ".wh.b", ".wh.d", ".wh..wh..opq", ".wh..wh.plnk", ".wh...", "x" * 255]
_HOSTILE = ["..", ".wh.", ".wh..", "y" * 256, "a\x00"]
_PREFIXES = [""] * 8 + ["./", ".//"]
_SUFFIXES = [""] * 8 + ["/", "//", "/."]


@st.composite
def _names(draw: st.DrawFn, hostile: bool) -> str:
    """A tar name of 1-3 components; a hostile archive's may escape the layer or be malformed."""
    component = st.sampled_from(_COMMON * 8 + _ODD + (_HOSTILE * 3 if hostile else []))
    parts = draw(st.lists(component, min_size=1, max_size=3))
    sep = draw(st.sampled_from(["/"] * 6 + ["//", "/./"]))
    prefix = draw(st.sampled_from(_PREFIXES + (["/"] * 2 if hostile else [])))
    return prefix + sep.join(parts) + draw(st.sampled_from(_SUFFIXES))


_TYPES = ["dir"] * 4 + ["reg"] * 3 + ["symlink", "hardlink", "hardlink", "char", "block", "fifo"]


@st.composite
def _specs(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    """An archive: names that repeat, so paths are replaced, hidden and linked to."""
    specs: list[tuple[str, str, str]] = []
    hostile = draw(st.integers(0, 3)) == 0
    for _ in range(draw(st.integers(1, 12))):
        type_ = draw(st.sampled_from(_TYPES))
        link = ""
        if type_ == "symlink":
            link = draw(st.sampled_from(["target", "/abs", "../up", "", "target"]))
        elif type_ == "hardlink":  # mostly an earlier non-directory name (since replaced or not)
            earlier = [n for n, t, _ in specs if t != "dir"]
            again = bool(earlier) and draw(st.integers(0, 3)) > 0
            link = draw(st.sampled_from(earlier) if again else _names(hostile))
        again = bool(specs) and draw(st.integers(0, 2)) == 0  # a name used before
        name = draw(st.sampled_from([n for n, _, _ in specs]) if again else _names(hostile))
        specs.append((name, type_, link))
    return specs


def test_c_check_equals_the_python_check() -> None:
    seen = {"cases": 0, "accepted": 0}

    @settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow],
              derandomize=True)  # the same 1500 cases every run: the share accepted below is not a draw
    @given(_specs(), st.sampled_from([0, 100, 512]))
    def same(specs: list[tuple[str, str, str]], size: int) -> None:
        buf = ztoc_bytes(archive(specs, size))
        want = python_columns(buf)
        got = c_columns(buf)
        seen["cases"] += 1
        # Then C agrees, and refuses nothing Python accepts (it refuses nothing exotic here)
        assert got == want, specs
        if got is not None:
            seen["accepted"] += 1

    same()
    # ... and a C that left every archive to Python would fail here
    assert seen["accepted"] >= seen["cases"] // 3, seen


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_specs(), st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4))
def test_a_mutated_ztoc_gets_the_python_answer_or_none(specs: list[tuple[str, str, str]],
                                                       flips: list[tuple[int, int]]) -> None:
    # Given a zTOC with a few bytes changed (offsets, lengths, strings, vtables)
    buf = bytearray(ztoc_bytes(archive(specs)))
    for at, value in flips:
        buf[at % len(buf)] = value
    try:
        parse_ztoc(bytes(buf), lazy_files=True)
    except BadZtoc:
        return  # the header is refused before any check
    # Then C gives what Python does, or leaves it to Python
    got = c_columns(bytes(buf))
    assert got is None or got == python_columns(bytes(buf))


def test_paths_are_shared_and_compact() -> None:
    # Given an archive that names the same paths many times
    specs = [("d", "dir", ""), ("d/f", "reg", "")] * 50 + [("d/g", "hardlink", "d/f")] * 50
    out = c_result(ztoc_bytes(archive(specs)))
    assert out is not None
    paths, path_index = out[3], out[4]
    # Then each path's bytes are stored once (d, d/f, d/g and the root)
    assert len(paths) == len("d") + len("d/f") + len("d/g")
    assert {struct.unpack_from("<II", path_index, 8 * i) for i in range(len(specs))} == {(0, 1), (1, 3), (4, 3)}


def test_an_mmap_of_a_cached_ztoc_is_read_in_place(tmp_path: Path) -> None:
    buf = ztoc_bytes(archive([("d", "dir", ""), ("d/f", "reg", ""), ("d/h", "hardlink", "d/f")]))
    (tmp_path / "z").write_bytes(buf)
    with open(tmp_path / "z", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            assert check_toc(view, *toc(buf)) == c_result(buf) is not None
        finally:
            view.release()


# === one case per tricky rule


def both(specs: Sequence[tuple[str, str, str]]) -> Columns:
    buf = ztoc_bytes(archive(specs))
    got = c_columns(buf)
    assert got is not None and got == python_columns(buf)
    return got


R, D, S, H, W, O, K = (_KINDS.index(k) for k in ("reg", "dir", "symlink", "hardlink", "whiteout", "opaque", "skip"))


def test_a_hard_link_keeps_a_replaced_node_where_it_was_made() -> None:
    # Given a, then b linked to a, then a new a
    _, finals, fresh, paths, made_at, linked = both([("a", "reg", ""), ("b", "hardlink", "a"), ("a", "reg", "")])
    # Then the first a's node is final at b, made at a; a is a link target
    assert paths == [b"b", b"b", b"a"] and made_at == {0: b"a"}
    assert finals == b"\x01\x01\x01" and fresh == b"\x01\x01\x00" and linked == b"\x01\x00\x01"


def test_a_node_losing_every_link_in_one_subtree_follows_the_order_paths_came_back() -> None:
    # Given x/b gone (x replaced) and back after x/a, both links of x/a's node, then x replaced
    specs = [("x", "dir", ""), ("x/b", "reg", ""), ("x", "reg", ""), ("x", "dir", ""), ("x/a", "reg", ""),
             ("x/b", "hardlink", "x/a"), ("x", "reg", "")]
    _, finals, _, paths, made_at, _ = both(specs)
    # Then x/a is dropped first (it came back first): the node moved to x/b, then lost it
    assert paths[4] == b"x/b" and made_at == {4: b"x/a"} and finals[4] == 0
    assert finals == b"\x00\x00\x00\x00\x00\x00\x01"


def test_a_whiteout_of_a_directory_takes_its_children() -> None:
    kinds, finals, fresh, paths, _, _ = both(
        [("d", "dir", ""), ("d/e", "dir", ""), ("d/e/f", "reg", ""), ("./.wh.d", "reg", ""), ("d", "dir", ""),
         ("d/e", "fifo", "")])
    assert kinds == bytes([D, D, R, W, D, _KINDS.index("fifo")]) and paths[3] == b"d"
    assert finals == b"\x00\x00\x00\x00\x01\x01" and fresh == b"\x01\x01\x01\x00\x00\x01"
    # A whiteout is no directory: nothing can be put under it
    buf = ztoc_bytes(archive([("d", "dir", ""), (".wh.d", "reg", ""), ("d/g", "reg", "")]))
    assert python_columns(buf) is None and c_result(buf) is None


def test_an_opaque_marker_names_its_directory() -> None:
    kinds, finals, fresh, paths, _, _ = both(
        [("d", "dir", ""), ("d/f", "reg", ""), ("d/.wh..wh..opq", "reg", ""), ("e/.wh..wh..opq", "reg", ""),
         (".wh..wh.plnk/x", "reg", ""), ("./", "dir", "")])
    assert kinds == bytes([D, R, O, O, R, K]) and paths[2:] == [b"d", b"e", b".wh..wh.plnk/x", b""]
    assert fresh == b"\x01\x01\x00\x01\x01\x00" and finals == b"\x01" * 6
    kinds, *_ = both([(".wh..wh.plnk", "reg", ""), ("a/.wh..wh.aufs", "dir", "")])
    assert kinds == bytes([K, K])


def test_a_directory_replaced_by_a_file_then_recreated() -> None:
    _, finals, fresh, _, _, _ = both(
        [("d", "dir", ""), ("d/f", "reg", ""), ("d", "reg", ""), ("d/", "dir", ""), ("d/f", "reg", ""),
         ("d", "dir", ""), ("d/g", "symlink", "f")])
    assert fresh == b"\x01\x01\x00\x00\x01\x00\x01"
    assert finals == b"\x00\x00\x00\x00\x01\x01\x01"  # a dir replacing a dir keeps d/f


@pytest.mark.parametrize("specs", [
    [("a", "reg", ""), ("a/b", "reg", "")],             # a file as a parent
    [("l", "symlink", "/etc"), ("l/x", "reg", "")],     # through a symlink
    [("l", "symlink", "")],                             # a symlink with no target
    [("d", "dir", ""), ("h", "hardlink", "d")],         # a hard link to a directory
    [("h", "hardlink", "nowhere")],                     # ... to a missing path
    [("h", "hardlink", "./")],                          # ... to the root
    [("a", "reg", ""), ("h", "hardlink", "/a")],        # ... absolute
    [("/a", "reg", "")],
    [("a/../b", "reg", "")],
    [(".wh..", "reg", "")],
    [("a/" + "z" * 256, "reg", "")],
])
def test_what_python_refuses_c_leaves_to_it(specs: list[tuple[str, str, str]]) -> None:
    buf = ztoc_bytes(archive(specs))
    assert python_columns(buf) is None and c_result(buf) is None


def test_entries_outside_the_archive_or_out_of_order_are_left_to_python() -> None:
    # Given a regular file whose data runs past the archive the caller names
    entries = archive([("a", "reg", "")], size=100)
    buf = ztoc_bytes(entries)
    start = toc(buf)[0]
    assert c_result(buf) is not None
    assert check_toc(buf, start, 1, 600) is None  # 512 + 100 > 600
    assert check_toc(buf, start, 1, 511) is None  # 1 entry needs 512 bytes
    # ... and an entry whose header would overlap the data before it (LazyFiles refuses it)
    buf = ztoc_bytes([FileEntry("a", "reg", 512, 1000), FileEntry("b", "reg", 1536, 10)])
    with pytest.raises(BadZtoc):
        list(parse_ztoc(buf, lazy_files=True).files)
    assert python_columns(buf) is None and c_result(buf) is None
    # ... and, refused though Python takes it, a TOC not in stream order (soci sorts it)
    buf = ztoc_bytes([FileEntry("a", "reg", 1536, 10), FileEntry("b", "reg", 512, 10)])
    assert python_columns(buf) is not None and c_result(buf) is None
    # ... and a TOC vector outside the buffer is the caller's error
    with pytest.raises(ValueError):
        check_toc(buf, len(buf) - 4, 2, 1 << 20)


def test_a_broken_entry_table_is_left_to_python() -> None:
    # Given a zTOC whose second entry's name string points past the buffer
    buf = bytearray(ztoc_bytes(archive([("a", "reg", ""), ("bbbbbbbb", "reg", "")])))
    at = buf.index(b"bbbbbbbb") - 4
    struct.pack_into("<I", buf, at, 1 << 30)
    with pytest.raises(BadZtoc):
        list(parse_ztoc(bytes(buf), lazy_files=True).files)
    assert c_result(bytes(buf)) is None


# === memory and time on 200,000 entries

_N = 200_000


def _big_ztoc() -> bytes:
    specs = []
    for k in range(_N):
        if k % 100 == 0:
            specs.append((f"usr/share/d{k // 100}", "dir", ""))
        elif k % 50 == 1 and k > 50:
            specs.append((f"usr/share/d{k // 100}/link{k}", "hardlink", f"usr/share/d{(k - 2) // 100}/file{k - 2}"))
        else:
            specs.append((f"usr/share/d{k // 100}/file{k}", "reg", ""))
    return ztoc_bytes(archive(specs))


def test_no_python_object_per_entry(tmp_path: Path) -> None:
    buf = _big_ztoc()
    start, n, usize = toc(buf)
    # Python allocations while checking: the returned columns, nothing per entry
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = check_toc(buf, start, n, usize)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert out is not None and len(out[0]) == n
    returned = sum(len(c) for c in out if isinstance(c, bytes))
    assert peak - returned < _N * 20, (peak, returned)
    # The process's resident memory (a fresh process: the peak is this call's)
    path = tmp_path / "big.ztoc"
    path.write_bytes(buf)
    probe = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from prewarm.store._tree import check_toc

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

        buf = Path({str(path)!r}).read_bytes()
        open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
        before = status("VmRSS")
        t = time.perf_counter()
        out = check_toc(buf, {start}, {n}, {usize})
        took = time.perf_counter() - t
        print(status("VmHWM") - before, sum(len(c) for c in out if isinstance(c, bytes)), took)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out_text = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True,
                              text=True).stdout.split()
    grown, returned, took = int(out_text[0]), int(out_text[1]), float(out_text[2])
    assert grown < _N * 150 + returned, (grown, returned)
    assert grown - returned < _N * 60, (grown, returned)  # the path table: ~40 B per entry
    assert took < 2.0  # O(1) per entry: about 0.6 us each here
