"""The C landing path (prewarm.store._landing): never vouches for a header the TOC misdescribes,
does the common case itself, and lands the same tree as the Python reference."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prewarm.errors import BadZtoc, ConfigError
from prewarm.store import landing
from prewarm.store.content import ContentStore
from prewarm.store.directio import ALIGN, DirectWriter
from prewarm.store.layerfs import entry_meta
from prewarm.store.table import LandingTable
from tests.test_store import assert_every_kind_tree, every_kind_tar, sha
from tests.test_store_spans import land, make_layer
from tests.treecompare import compare_trees

_C = landing.backend()

_NAME = st.text("abcdefgh", min_size=1, max_size=8)


@st.composite
def tars(draw: st.DrawFn, fmt: int) -> bytes:
    """A tar in one format: files, directories, symlinks, fifos, long names, odd numbers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i in range(draw(st.integers(1, 12))):
            depth = draw(st.integers(0, 3))
            long = draw(st.booleans())
            # a long name: more than ustar's 100 bytes (a prefix field, a GNU L header or a PAX path)
            name = "/".join(["d" + "x" * 80] * long + [draw(_NAME) for _ in range(depth)] + [f"{draw(_NAME)}{i}"])
            info = tarfile.TarInfo(name)
            info.type = draw(st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                                              tarfile.FIFOTYPE]))
            info.mode = draw(st.integers(0, 0o7777))
            big = fmt != tarfile.USTAR_FORMAT  # GNU writes base-256, PAX a record; ustar cannot
            info.uid = draw(st.one_of(st.integers(0, 70000), st.integers(0, (1 << 32) - 1 if big else 70000)))
            info.gid = draw(st.integers(0, 70000))
            info.mtime = draw(st.one_of(st.integers(0, 8**11 - 1), st.integers(1, 1 << 31).map(lambda s: s + 0.25)))
            data = b""
            if info.type == tarfile.SYMTYPE:
                info.linkname = draw(_NAME)
            elif info.type == tarfile.REGTYPE:
                data = random.Random(i).randbytes(draw(st.integers(0, 3000)))
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _table_checks(tmp_path: Path, tar: bytes, mutate: tuple[int, str] | None = None) -> tuple[list[int], list]:
    """C's unverified entries over the whole stream, with entry ``mutate[0]``'s field changed in the TOC."""
    _, z = make_layer(tar, span_size=1 << 20)
    prep = LandingTable.derive(z)
    files = list(z.files)
    if mutate is not None:
        k, field = mutate
        e = files[k]
        value = getattr(e, field)
        if field == "mod_time":
            changed = "2001-02-03T04:05:06Z" if value != "2001-02-03T04:05:06Z" else "2001-02-03T04:05:07Z"
        elif field == "type":
            changed = "reg" if value != "reg" else "fifo"
        elif isinstance(value, str) and value:  # the same length: only a comparison of the bytes can tell
            changed = value[:-1] + ("y" if value[-1] != "y" else "z")
        else:
            changed = value + ("z" if isinstance(value, str) else 1)
        files[k] = dataclasses.replace(e, **{field: changed})
        if field == "name" and e.xattrs == (("path", e.name),):  # a TOC that lies consistently
            files[k] = dataclasses.replace(files[k], xattrs=(("path", changed),))
    table, heap = landing.build_table(files, prep.placements, bytes(prep.born), list(map(entry_meta, files)),
                                      list(prep.header_starts))
    out = memoryview(tar[:z.uncompressed_archive_size])
    return landing.check_headers(_C, table, heap, out, 0), files


needs_c = pytest.mark.skipif(_C is None, reason="PREWARM_LANDING=python")


@needs_c
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tar=st.one_of(tars(tarfile.GNU_FORMAT), tars(tarfile.USTAR_FORMAT), tars(tarfile.PAX_FORMAT)))
def test_c_verifies_exactly_the_one_block_headers_that_match(tmp_path: Path, tar: bytes) -> None:
    # Given a tar in any format and its TOC as soci records it
    todo, files = _table_checks(tmp_path, tar)
    for k, e in enumerate(files):
        h = 0 if k == 0 else _end(files[k - 1])
        one_block = e.uncompressed_offset - 512 == h
        pax_path = e.xattrs == (("path", e.name),) and tar[h + 156] == ord("x")
        # Then C verifies exactly the one-block headers (alone or behind a PAX path record)
        # and leaves to Python the rest: other PAX records, GNU long names, base-256
        # numbers, sub-second times
        plain = ((one_block and not e.xattrs) or pax_path) and e.uid < 1 << 21 and not _fraction(e.mod_time)
        assert (k in todo) == (not plain), (k, e)
    if any(e.xattrs == (("path", e.name),) for e in files):
        assert set(todo) != set(range(len(files)))


@needs_c
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tar=st.one_of(tars(tarfile.GNU_FORMAT), tars(tarfile.USTAR_FORMAT), tars(tarfile.PAX_FORMAT)),
       data=st.data())
def test_c_never_vouches_for_a_changed_field(tmp_path: Path, tar: bytes, data: st.DataObject) -> None:
    # Given a TOC entry with one field the tar header does not say
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        n = len(tf.getmembers())
    k = data.draw(st.integers(0, n - 1))
    field = data.draw(st.sampled_from(["name", "linkname", "mode", "uid", "gid", "uncompressed_size", "mod_time",
                                       "devmajor", "devminor", "type"]))
    todo, _ = _table_checks(tmp_path, tar, (k, field))
    # Then C does not verify it: the Python checker gets it (and names the field)
    assert k in todo


@needs_c
def test_c_never_vouches_for_a_long_name_the_toc_changes_to_another_of_its_length(tmp_path: Path) -> None:
    # Given a file with a long name, as Go writes it (an x header with one path record), and a
    # TOC that names it another path of the same length, in its name and its path record alike
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("d" + "x" * 120 + "/file")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    todo, files = _table_checks(tmp_path, buf.getvalue(), (0, "name"))
    # Then C leaves it to the Python checker
    assert files[0].name == "d" + "x" * 120 + "/fily" and files[0].xattrs == (("path", files[0].name),)
    assert todo == [0]
    # And without the change C verifies it
    assert _table_checks(tmp_path, buf.getvalue())[0] == []


_ODD_INT = st.one_of(st.integers(-3, 70000), st.sampled_from([(1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63,
                                                               -(1 << 63), -(1 << 63) - 1, 1 << 70]))


@needs_c
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tar=st.one_of(tars(tarfile.GNU_FORMAT), tars(tarfile.USTAR_FORMAT), tars(tarfile.PAX_FORMAT)),
       data=st.data())
def test_the_c_table_builder_matches_the_python_one_or_hands_it_over(tmp_path: Path, tar: bytes,
                                                                        data: st.DataObject) -> None:
    # Given a layer's TOC as soci records it...
    _, z = make_layer(tar, span_size=1 << 20)
    prep = LandingTable.derive(z)
    files = list(z.files)

    def table(entries: list) -> tuple[bytes, bytes] | None:  # type: ignore[type-arg]
        return _C.build_table(entries, prep.placements, bytes(prep.born), list(map(entry_meta, entries)),
                              list(prep.header_starts))

    def reference(entries: list) -> tuple[bytes, bytes]:  # type: ignore[type-arg]
        return landing.build_table_python(entries, prep.placements, bytes(prep.born), list(map(entry_meta, entries)),
                                          list(prep.header_starts))

    # Then C builds exactly the Python builder's records and heap
    assert table(files) == reference(files)
    # ...and with any fields changed (numbers beyond 32 or 64 bits, names that do not encode,
    # other PAX records), C builds the same table or hands the layer to Python
    for _ in range(data.draw(st.integers(1, 4))):
        k = data.draw(st.integers(0, len(files) - 1))
        field = data.draw(st.sampled_from(["uid", "gid", "mode", "uncompressed_size", "devmajor", "devminor",
                                           "name", "linkname", "xattrs"]))
        if field in ("name", "linkname"):
            value = data.draw(st.sampled_from(["", "a/b", "\udcff-escaped", "\ud800-lone", "é"]))
        elif field == "xattrs":
            value = data.draw(st.sampled_from([(), (("path", files[k].name),), (("path", "other"),),
                                               (("SCHILY.xattr.user.a", "1"),),
                                               (("path", files[k].name), ("uid", "1"))]))
        else:
            value = data.draw(_ODD_INT)
        files[k] = dataclasses.replace(files[k], **{field: value})
    try:
        expected = reference(files)
    except BadZtoc:
        assert table(files) is None
    else:
        assert table(files) == expected


def _end(e) -> int:  # type: ignore[no-untyped-def]
    size = e.uncompressed_size if e.type == "reg" else 0
    return e.uncompressed_offset + size + (-size % 512)


def _fraction(mod_time: str) -> bool:
    return "." in mod_time


@contextlib.contextmanager
def landing_backend(monkeypatch: pytest.MonkeyPatch, value: str) -> Iterator[None]:
    """``PREWARM_LANDING=value`` for the block (the backend is chosen once, so forget it around it)."""
    monkeypatch.setenv("PREWARM_LANDING", value)
    landing.backend.cache_clear()
    try:
        yield
    finally:
        monkeypatch.delenv("PREWARM_LANDING")
        landing.backend.cache_clear()


@pytest.fixture
def reference_landing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with landing_backend(monkeypatch, "python"):
        yield


@needs_c
@pytest.mark.parametrize("members", [1, 3])
def test_c_and_python_landing_make_the_same_tree(tmp_path: Path, members: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a layer of every entry kind (xattrs, hard links, whiteouts, big and empty files)
    tar = every_kind_tar()
    blob, z = make_layer(tar, members=members)
    digest = sha(blob)
    order = list(range(z.num_spans))
    random.Random(members).shuffle(order)
    # When it lands once through C and once through the Python reference
    c_store = ContentStore(tmp_path / "c")
    land(c_store, digest, z, blob, order)
    with landing_backend(monkeypatch, "python"):
        py_store = ContentStore(tmp_path / "py")
        land(py_store, digest, z, blob, order)
    # Then both trees are right and equal, and every path the tar names has the same mtime
    # (directories created implicitly, such as usr/, get the time they were made)
    c_fs, py_fs = c_store.layout.layer_fs(digest), py_store.layout.layer_fs(digest)
    assert_every_kind_tree(c_fs)
    assert compare_trees(c_fs, py_fs) == []
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        named = {m.name.rstrip("/") for m in tf.getmembers() if ".wh." not in m.name}
    assert named and all(os.lstat(c_fs / p).st_mtime_ns == os.lstat(py_fs / p).st_mtime_ns for p in named)


def test_the_python_reference_lands_alone(tmp_path: Path, reference_landing: None) -> None:
    tar = every_kind_tar(50_000)
    blob, z = make_layer(tar)
    store = ContentStore(tmp_path / "root")
    assert land(store, sha(blob), z, blob, list(range(z.num_spans)))[-1]
    assert landing.backend() is None
    assert_every_kind_tree(store.layout.layer_fs(sha(blob)), 50_000)


def test_an_unknown_landing_backend_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    with landing_backend(monkeypatch, "fortran"), \
            pytest.raises(ConfigError, match="PREWARM_LANDING='fortran' is not one of c, python"):
        landing.backend()


@needs_c
@pytest.mark.parametrize("min_direct", [ALIGN, 1 << 30])
def test_c_writes_take_the_stores_direct_io_threshold(tmp_path: Path, min_direct: int) -> None:
    # Given a store whose direct writer sends every aligned page direct, or none
    tar = every_kind_tar()
    blob, z = make_layer(tar)
    store = ContentStore(tmp_path / "root")
    store._writer = DirectWriter(min_direct=min_direct)
    # When the layer lands through C
    assert land(store, sha(blob), z, blob, list(range(z.num_spans)))[-1]
    # Then the big file's aligned middles went direct only under the low threshold, and the tree is right
    assert_every_kind_tree(store.layout.layer_fs(sha(blob)))
    if min_direct == ALIGN and store._writer.enabled:
        assert store._writer.direct_bytes > 0
    else:
        assert store._writer.direct_bytes == 0


def _owner_and_mode_tar() -> tuple[bytes, dict[str, tuple[int, int, int]]]:
    """Files of every kind of permission (set-id, sticky, bits a umask cuts, none), owned by
    root or not, some in a set-gid directory; with each path's expected (uid, gid, mode)."""
    want: dict[str, tuple[int, int, int]] = {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        folder = tarfile.TarInfo("sgid")
        folder.type, folder.mode, folder.uid, folder.gid = tarfile.DIRTYPE, 0o2775, 0, 4321
        tf.addfile(folder)
        for parent in ("", "sgid/"):
            for mode in (0o644, 0o666, 0o777, 0o600, 0o000, 0o4755, 0o2755, 0o6711, 0o1777):
                for uid, gid in ((0, 0), (1000, 1000), (0, 50)):
                    info = tarfile.TarInfo(f"{parent}f{mode:o}-{uid}-{gid}")
                    info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, 1_700_000_000
                    data = random.Random(info.name).randbytes(mode % 3000)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                    want[info.name] = (uid, gid, mode)
    return buf.getvalue(), want


@needs_c
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o000])
def test_c_landing_gives_each_file_its_owner_and_mode_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    # Given files of every permission and set-id combination, of root's and others', some in
    # a set-gid directory (whose files are born with its group, not the creator's)
    tar, want = _owner_and_mode_tar()
    blob, z = make_layer(tar, span_size=4096)
    old = os.umask(mask)
    try:
        # When the layer lands through C, span by span and as one whole stream
        spans = ContentStore(tmp_path / "spans")
        assert land(spans, sha(blob), z, blob, list(range(z.num_spans)))[-1]
        whole = ContentStore(tmp_path / "whole")
        whole.ingest_stream(sha(blob), [blob], media_type="application/vnd.oci.image.layer.v1.tar+gzip",
                            diff_id=sha(tar))
    finally:
        os.umask(old)
    # Then every file has exactly the tar's owner and mode, under any umask
    for store in (spans, whole):
        fs = store.layout.layer_fs(sha(blob))
        got = {name: (st.st_uid, st.st_gid, st.st_mode & 0o7777)
               for name in want for st in [os.lstat(fs / name)]}
        assert got == want
