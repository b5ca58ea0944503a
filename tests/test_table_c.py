"""The landing table built in C from the zTOC buffer is the one the Python derive builds.

``LandingTable.derive`` takes a TOC through C (``_landing.toc_records``, the tree check
``_tree.check_toc``, ``_landing.place_records``) when C is sure of every entry, and
through the Python reference otherwise.  Generated archives (odd names, whiteouts, hard
links, replaced paths, PAX records, times in every spelling) go both ways here: the
tables are equal field by field, or both ways refuse the archive with the same error.
"""

from __future__ import annotations

import io
import os
import tarfile
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prewarm.errors import BadZtoc, PrewarmError
from prewarm.index.ztoc import FileEntry, Ztoc, decode_budget, parse_ztoc, serialize_ztoc
from prewarm.store import landing, table
from prewarm.store.table import LandingTable
from tests.test_store_spans import _with_files, make_layer
from tests.test_ztoc_hostile import many_entries_one_name, many_xattrs_one_value


def _template() -> Ztoc:
    """A layer of 4 MiB of one file in 16 KiB spans: room and span boundaries for generated TOCs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("big")
        info.size = 4 << 20
        tf.addfile(info, io.BytesIO(os.urandom(64) * (info.size // 64)))
    return make_layer(buf.getvalue(), span_size=16384)[1]


TEMPLATE = _template()
_COMPONENTS = ["a", "b", "c", ".", "..", "", ".wh.a", ".wh.b", ".wh..wh..opq", ".wh..wh.plnk", ".wh.", "é", "x" * 256]
_TIMES = ["", "2024-01-02T03:04:05Z", "2024-01-02T03:04:05.5z", "2024-01-02T03:04:05.123456789Z",
          "2024-02-29T23:59:59Z", "2023-02-29T00:00:00Z", "2024-01-02T03:04:05+01:00", "9999-12-31T23:59:59Z",
          "1970-01-01T00:00:00Z", "2024-01-02 03:04:05Z", "0000-01-01T00:00:00Z", "2024-13-01T00:00:00Z"]


@st.composite
def _names(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.sampled_from(_COMPONENTS), min_size=1, max_size=4))
    name = "/".join(parts)
    prefix = draw(st.sampled_from(["", "", "./", "/"]))
    suffix = draw(st.sampled_from(["", "", "/"]))
    return (prefix + name + suffix) or "a"


@st.composite
def _archives(draw: st.DrawFn) -> list[FileEntry]:
    n = draw(st.integers(min_value=1, max_value=40))
    names = [draw(_names()) for _ in range(n)]
    out = []
    for k, name in enumerate(names):
        type_ = draw(st.sampled_from(["reg", "reg", "reg", "dir", "dir", "symlink", "hardlink", "char", "fifo"]))
        link = ""
        if type_ == "symlink":
            link = draw(st.sampled_from(["", "a", "../../etc", "/etc/passwd"]))
        elif type_ == "hardlink":
            link = draw(st.sampled_from([*names, "missing", "a"]))
        size = draw(st.sampled_from([0, 1, 511, 512, 3000, 40000])) if type_ == "reg" else 0
        xattrs = draw(st.sampled_from([(), (), (("path", name),), (("SCHILY.xattr.user.a", "v"),),
                                       (("SCHILY.xattr.trusted.overlay.opaque", "y"),), (("mtime", "1.5"),),
                                       (("path", name), ("SCHILY.xattr.user.b", "w"))]))
        out.append(FileEntry(
            name=name, type=type_, uncompressed_offset=0, uncompressed_size=size, linkname=link,
            mode=draw(st.sampled_from([0o644, 0o755, 0o4755, 0])), uid=draw(st.sampled_from([0, 1000, 2**32 - 1])),
            gid=draw(st.sampled_from([0, 50])), mod_time=draw(st.sampled_from(_TIMES)),
            devmajor=1 if type_ == "char" else 0, xattrs=xattrs))
    # in stream order: each entry's data after the previous one's, a header (or two) before it
    at, placed = 0, []
    for e in out:
        at += 512 * draw(st.integers(min_value=1, max_value=3))
        placed.append(_replace(e, at))
        data = e.uncompressed_size if e.type == "reg" else 0
        at += data + (-data & 511)
    return placed


def _replace(e: FileEntry, offset: int) -> FileEntry:
    import dataclasses
    return dataclasses.replace(e, uncompressed_offset=offset)


def _parsed(files: list[FileEntry]) -> Ztoc:
    z = parse_ztoc(serialize_ztoc(_with_files(TEMPLATE, files)), lazy_files=True)
    z.digest = "sha256:" + "ab" * 32  # as the node cache names a verified zTOC
    return z


def _derive(files: list[FileEntry], *, c: bool, monkeypatch: pytest.MonkeyPatch) -> LandingTable | str:
    with monkeypatch.context() as m:
        if not c:
            m.setattr(table, "_tree", lambda: None)
        try:
            return LandingTable.derive(_parsed(files))
        except PrewarmError as err:
            return f"{type(err).__name__}: {err}"


def _fields(t: LandingTable) -> Iterator[tuple[object, ...]]:
    """Every record's fields, its heap offsets resolved to the bytes they point at."""
    heap = bytes(t.heap)
    for i in range(len(t.born)):
        r = landing.RECORD.unpack_from(t.records, landing.RECORD.size * i)
        yield (*r[:9], heap[r[9]:r[9] + r[10]], heap[r[11]:r[11] + r[12]], heap[r[13]:r[13] + r[14]], *r[15:])


def assert_same_table(c: LandingTable, py: LandingTable) -> None:
    assert c.fingerprint == py.fingerprint
    assert list(_fields(c)) == list(_fields(py))
    for column in ("born", "kinds", "finals", "keys"):
        assert bytes(getattr(c, column)) == bytes(getattr(py, column)), column
    assert (c.archive_data_end, c.spans, c.windowed) == (py.archive_data_end, py.spans, py.windowed)
    assert [list(a) for a in c.spanmap.arrays()] == [list(a) for a in py.spanmap.arrays()]
    assert list(c.placements) == list(py.placements)
    assert list(c.meta) == list(py.meta)
    assert c.data_size == py.data_size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=_archives())
def test_c_and_python_derive_the_same_table_or_the_same_error(files: list[FileEntry],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    py = _derive(files, c=False, monkeypatch=monkeypatch)
    c = _derive(files, c=True, monkeypatch=monkeypatch)
    if isinstance(py, str):
        assert c == py
    else:
        assert isinstance(c, LandingTable), c
        assert_same_table(c, py)


def _plain_layer() -> list[FileEntry]:
    """What a real layer holds: directories, files of every size, links, a long PAX name, xattrs."""
    long = "d/" + "n" * 120
    spec = [("d", "dir", 0, "", ()), ("d/a", "reg", 100, "", ()), ("d/b", "reg", 40000, "", ()),
            ("d/e", "reg", 0, "", ()), ("d/s", "symlink", 0, "a", ()), ("d/h", "hardlink", 0, "d/a", ()),
            (long, "reg", 10, "", (("path", long),)),
            ("d/x", "reg", 5, "", (("SCHILY.xattr.user.k", "v"), ("SCHILY.xattr.trusted.t", "y"))),
            ("./d/.wh.gone", "reg", 0, "", ()), ("d/f", "fifo", 0, "", ())]
    out, at = [], 512
    for name, type_, size, link, xattrs in spec:
        out.append(FileEntry(name=name, type=type_, uncompressed_offset=at, uncompressed_size=size, linkname=link,
                             mode=0o644, uid=1, gid=2, mod_time="2024-05-06T07:08:09.25Z", xattrs=xattrs))
        at += size + (-size & 511) + 1024
    return out


def test_a_plain_layer_goes_through_c(monkeypatch: pytest.MonkeyPatch) -> None:
    assert landing.backend() is not None and table._tree() is not None, "the C extensions are not built"
    # Given a layer of every common kind of entry, and its zTOC as the node cache holds it
    files = _plain_layer()
    z = _parsed(files)
    py = _derive(files, c=False, monkeypatch=monkeypatch)
    assert isinstance(py, LandingTable)
    # When C derives its table
    built = table._derive_in_c(z, py.fingerprint, list(py.spans), py.windowed, None)
    # Then C took it (no fallback), decoded only the entries it needed Python for, and built Python's table
    assert built is not None
    assert z.files.decoded <= 3  # type: ignore[attr-defined]  (the xattr entry; the keys it cannot check)
    assert_same_table(LandingTable(z, built), py)
    c = LandingTable.derive(_parsed(files))
    assert_same_table(c, py)
    assert c.placements[7].path == "d/x" and c.meta[7][4] == (("user.k", "v"),)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(field + ":"))


@pytest.mark.parametrize("make", [lambda: many_entries_one_name(2000), lambda: many_xattrs_one_value(200, 10)],
                         ids=["entries-share-a-name", "entries-share-xattrs"])
def test_shared_strings_cannot_multiply_what_c_builds(make: Callable[[], bytes]) -> None:
    # Given a zTOC of under 160 KB whose references repeat one 64 KiB string 2,000 times
    raw = make()
    z = parse_ztoc(raw, lazy_files=True)
    z.digest = "sha256:" + "cd" * 32
    budget = decode_budget(len(raw))
    # When its landing table is derived, Then the derive refuses it, naming the budget...
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS from here
    before = _rss("VmRSS")
    tracemalloc.start()
    try:
        with pytest.raises(BadZtoc, match=f"past {budget} bytes"):
            LandingTable.derive(z)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # ... before more than the budget was allocated (the 131 MB the references make), in
    # Python objects or in what C allocates itself
    assert peak < budget + 2 * len(raw), (peak, budget)
    assert _rss("VmHWM") - before < budget + 2 * len(raw) + (8 << 20)
