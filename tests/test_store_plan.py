"""Prepare once per layer: a lazy TOC, and the plan saved by the first process, loaded by the others.

Every "process" here is its own ContentStore + ZtocCache over the same PREWARM_ROOT, as the
worker processes of a node are; the zTOCs come through the node cache by digest.
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from prewarm.errors import BadZtoc
from prewarm.index.ztoc import LazyFiles, Ztoc, parse_ztoc, serialize_ztoc
from prewarm.store.content import ContentStore
from prewarm.store.layout import Layout
from prewarm.store.spanmap import SpanMap
from prewarm.store.table import LandingTable
from prewarm.store.ztoc_cache import ZtocCache
from tests.test_store import assert_every_kind_tree, every_kind_tar, sha
from tests.test_store_spans import _with_files, header_dense_tar, land, make_layer
from tests.test_ztoc_parse import golden, tampered


def _process(root: Path, zdigest: str) -> tuple[ContentStore, Ztoc]:
    """What one worker process holds: its own store object and its own parsed zTOC."""
    return ContentStore(root), ZtocCache(Layout(root)).get(zdigest)


def _cached(root: Path, z: Ztoc) -> str:
    return ZtocCache(Layout(root)).put(serialize_ztoc(z))


def _derived(monkeypatch: pytest.MonkeyPatch) -> list[Ztoc]:
    """The zTOCs whose landing table is derived (validated) from now on, in this process."""
    calls: list[Ztoc] = []
    derive = LandingTable.derive.__func__  # type: ignore[attr-defined]

    def spy(cls: type[LandingTable], ztoc: Ztoc, spill: Path | None = None) -> LandingTable:
        calls.append(ztoc)
        return derive(cls, ztoc, spill)  # type: ignore[no-any-return]

    monkeypatch.setattr(LandingTable, "derive", classmethod(spy))
    return calls


def _decoded(z: Ztoc) -> int:
    files = z.files
    assert isinstance(files, LazyFiles)
    return files.decoded


@pytest.mark.parametrize("name", ["meta", "multi-basic", "many-l6-s4096", "empty"])
def test_lazy_files_are_the_eager_ones(shared_dir: Path, name: str) -> None:
    raw = golden(shared_dir, name)
    eager, lazy = parse_ztoc(raw), parse_ztoc(raw, lazy_files=True)
    assert isinstance(lazy.files, LazyFiles)
    assert len(lazy.files) == len(eager.files)
    if len(eager.files):
        assert lazy.files[-1] == eager.files[-1] and lazy.files[0] == eager.files[0]
        assert lazy.files._all is None  # indexing decoded two entries only
    assert lazy.files == eager.files and tuple(lazy.files) == eager.files
    assert lazy.files[1:] == eager.files[1:]
    with pytest.raises(IndexError):
        lazy.files[len(eager.files)]


@pytest.mark.parametrize(("change", "message"), [
    (lambda z: {"files": (dataclasses.replace(z.files[1], uncompressed_size=10**9),) + z.files[2:]}, "outside"),
    (lambda z: {"files": (z.files[1], dataclasses.replace(z.files[2], uncompressed_offset=1100))}, "overlaps"),
    (lambda z: {"files": (dataclasses.replace(z.files[1], name="../../etc/passwd"),)}, "'..'"),
    (lambda z: {"files": (dataclasses.replace(z.files[1], type="socket"),)}, "unknown type"),
])
def test_lazy_files_check_what_an_eager_parse_checks(shared_dir: Path, change, message) -> None:  # type: ignore[no-untyped-def]
    # Given a zTOC with a bad TOC, parsed lazily (the header and spans are fine)
    z = parse_ztoc(golden(shared_dir, "meta"))
    lazy = parse_ztoc(tampered(z, **change(z)), lazy_files=True)
    # Then walking its files raises the same BadZtoc an eager parse raises
    with pytest.raises(BadZtoc, match=message):
        list(lazy.files)


def test_other_processes_load_the_plan_and_decode_only_their_entries(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a layer of 600 small files in many spans, whose zTOC is in the node cache
    tar = header_dense_tar()
    blob, built = make_layer(tar, span_size=16384)
    digest, root = sha(blob), tmp_path / "root"
    zdigest = _cached(root, built)
    first, z1 = _process(root, zdigest)
    derived = _derived(monkeypatch)
    # When the first process prepares the layer (validating the whole TOC)...
    first.prepare_layer(digest, z1)
    assert (first.layout.layer_work(digest) / "plan").is_file()
    assert derived == [z1] and len(z1.files) == 600
    # ...and another process lands one span
    second, z2 = _process(root, zdigest)
    span = z2.num_spans // 2
    assert land(second, digest, z2, blob, [span]) == [False]
    # Then the second process loaded the plan: it checked the span's real headers against the
    # plan's entry keys without decoding a single TOC entry
    assert _decoded(z2) == 0 and derived == [z1]
    loaded, made = second._tables[digest].placements, first._tables[digest].placements
    assert list(loaded) == list(made) and len(loaded) == len(made)
    assert [loaded[i] for i in (0, 299, -1)] == [made[i] for i in (0, 299, -1)]
    assert loaded[10:20] == made[10:20]
    assert second._tables[digest].spanmap.arrays() == first._tables[digest].spanmap.arrays()
    # And the layer completes across processes with every file's bytes and xattrs
    third, z3 = _process(root, zdigest)
    rest = [i for i in range(z3.num_spans) if i != span]
    assert land(third, digest, z3, blob, rest)[-1] is True
    fs = third.layout.layer_fs(digest)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
        assert len(members) == 600
        for m in members[::37]:
            f = tf.extractfile(m)
            assert f is not None and (fs / m.name).read_bytes() == f.read()
            assert os.getxattr(fs / m.name, "user.a").decode() == m.pax_headers["SCHILY.xattr.user.a"]


@pytest.mark.parametrize("damage", [b"", b"garbage", "other-counts"])
def test_an_unusable_plan_is_derived_again(tmp_path: Path, damage: object, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a prepared layer whose saved plan is damaged (or belongs to other counts)
    blob, built = make_layer(every_kind_tar(), span_size=16384)
    digest, root = sha(blob), tmp_path / "root"
    zdigest = _cached(root, built)
    first, z1 = _process(root, zdigest)
    first.prepare_layer(digest, z1)
    plan_path = first.layout.layer_work(digest) / "plan"
    if damage == "other-counts":
        other, _ = make_layer(every_kind_tar(50_000), span_size=16384)
        scratch = tmp_path / "scratch"
        oz = _cached(scratch, make_layer(every_kind_tar(50_000), span_size=16384)[1])
        s, z = _process(scratch, oz)
        s.prepare_layer(sha(other), z)
        plan_path.write_bytes((s.layout.layer_work(sha(other)) / "plan").read_bytes())
    else:
        assert isinstance(damage, bytes)
        plan_path.write_bytes(damage)
    # When another process prepares it, Then it validates the TOC itself and saves a good plan
    second, z2 = _process(root, zdigest)
    derived = _derived(monkeypatch)
    second.prepare_layer(digest, z2)
    assert derived == [z2]
    third, z3 = _process(root, zdigest)
    assert land(third, digest, z3, blob, list(range(z3.num_spans)))[-1] is True
    assert _decoded(z3) == 0  # the plan carries every entry's metadata: even the last span decodes none
    assert_every_kind_tree(third.layout.layer_fs(digest))


def test_a_lying_toc_is_caught_in_processes_that_loaded_the_plan(tmp_path: Path) -> None:
    # Given a cached zTOC whose TOC lies about one file's mode, and a layer prepared from it
    blob, built = make_layer(every_kind_tar(), span_size=65536)
    files = list(built.files)
    k = next(i for i, f in enumerate(files) if f.name == "usr/bin/sg")
    files[k] = dataclasses.replace(files[k], mode=0o755)
    digest, root = sha(blob), tmp_path / "root"
    zdigest = _cached(root, _with_files(built, files))
    first, z1 = _process(root, zdigest)
    first.prepare_layer(digest, z1)
    # When other processes land every span with the saved plan
    errors = []
    for i in range(z1.num_spans):
        store, z = _process(root, zdigest)
        try:
            land(store, digest, z, blob, [i])
        except BadZtoc as err:
            errors.append(str(err))
    # Then the real tar header still exposes the lie, and the layer is never ready
    assert any("mode" in e and "usr/bin/sg" in e for e in errors)
    assert not first.is_ready(digest)


def test_another_ztoc_does_not_use_the_saved_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a layer prepared and partly landed from a lying zTOC in the cache
    blob, honest = make_layer(every_kind_tar(), span_size=65536)
    files = list(honest.files)
    k = next(i for i, f in enumerate(files) if f.name == "usr/bin/sg")
    files[k] = dataclasses.replace(files[k], mode=0o777)
    digest, root = sha(blob), tmp_path / "root"
    liar_store, liar = _process(root, _cached(root, _with_files(honest, files)))
    land(liar_store, digest, liar, blob, [honest.num_spans - 1])
    # When a process prepares it with the honest zTOC (another digest)
    store, z = _process(root, _cached(root, honest))
    derived = _derived(monkeypatch)
    store.prepare_layer(digest, z)
    # Then the layer starts over, validated from that zTOC, and completes
    assert store.missing_spans(digest, z) == list(range(z.num_spans))
    assert derived == [z]
    assert land(store, digest, z, blob, list(range(z.num_spans)))[-1] is True
    assert_every_kind_tree(store.layout.layer_fs(digest))


def test_spanmap_arrays_round_trip_and_are_checked() -> None:
    smap = SpanMap([(512, 10), (1024, 0), (1536, 700)])
    again = SpanMap.from_arrays(*smap.arrays())
    assert again.pieces(0, 3000) == smap.pieces(0, 3000) and len(again.pieces(0, 3000)) == 2
    with pytest.raises(BadZtoc, match="after one ending"):
        SpanMap.from_arrays([512, 515], [600, 700], [0, 1])
    with pytest.raises(BadZtoc, match="different lengths"):
        SpanMap.from_arrays([512], [600, 700], [0])


_PREPARE_CHILD = """
import sys
from pathlib import Path
from prewarm.store.layout import Layout
from prewarm.store.content import ContentStore
from prewarm.store.ztoc_cache import ZtocCache
root, digest, zdigest = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
z = ZtocCache(Layout(root)).get(zdigest)
sys.stdin.readline()  # start together
ContentStore(root).prepare_layer(digest, z)
files = z.files
print(files.decoded, flush=True)
"""


def test_processes_preparing_at_once_validate_the_toc_once(tmp_path: Path) -> None:
    # Given three worker processes that get a span of the same cold layer at the same moment
    blob, built = make_layer(header_dense_tar(), span_size=16384)
    digest, root = sha(blob), tmp_path / "root"
    zdigest = _cached(root, built)
    repo = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE_CHILD, str(root), digest, zdigest], cwd=repo,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.close()
    outs = [p.stdout.read() if p.stdout is not None else "" for p in procs]
    for p in procs:
        p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0]
    # Then exactly one of them decoded and checked the whole TOC; the others loaded its plan
    assert sorted(int(o) for o in outs) == [0, 0, 600]


def test_preparing_ahead_never_waits_for_the_lock(tmp_path: Path) -> None:
    # Given a cold layer whose lock another process holds
    import fcntl

    blob, built = make_layer(every_kind_tar(), span_size=65536)
    digest, root = sha(blob), tmp_path / "root"
    store, z = _process(root, _cached(root, built))
    lock = store.layout.layer_lock(digest)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        # When a process prepares it ahead, Then it gives up at once and creates nothing
        assert store.prepare_layer(digest, z, wait=False) is False
        assert store.layer_state(digest) == "absent"
    finally:
        os.close(fd)
    # And once the lock is free it prepares the layer, which then completes
    assert store.prepare_layer(digest, z, wait=False) is True
    assert store.layer_state(digest) == "partial"
    assert land(store, digest, z, blob, list(range(z.num_spans)))[-1] is True
    assert_every_kind_tree(store.layout.layer_fs(digest))


def test_a_table_derived_in_a_spill_folder_is_mapped_from_a_file_and_leaves_nothing_there(tmp_path: Path) -> None:
    from prewarm.store.table import LandingTable

    # Given a layer's zTOC
    _, z = make_layer(header_dense_tar(), span_size=16384)
    spill = tmp_path / "tmp"
    spill.mkdir()
    # When its table is derived in a spill folder, and once in memory
    spilled, in_memory = LandingTable.derive(z, spill), LandingTable.derive(z)
    # Then the two are the same table, the spilled one a mapped file, and the folder is empty
    assert bytes(spilled.records) == bytes(in_memory.records) and bytes(spilled.heap) == bytes(in_memory.heap)
    assert list(spilled.placements) == list(in_memory.placements)
    spilled.save(tmp_path / "a")
    in_memory.save(tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert os.listdir(spill) == []


def test_a_process_drops_the_table_of_a_layer_another_process_finished(tmp_path: Path) -> None:
    # Given two layers in the node cache, and a process that landed one span of the first
    tar = header_dense_tar()
    root = tmp_path / "root"
    (blob1, built1), (blob2, built2) = make_layer(tar, span_size=16384), make_layer(tar + bytes(1024), span_size=16384)
    z1digest, z2digest = _cached(root, built1), _cached(root, built2)
    first, z1 = _process(root, z1digest)
    assert land(first, sha(blob1), z1, blob1, [0]) == [False]
    assert sha(blob1) in first._tables
    # When another process lands the rest and commits the layer (its work/ and table file go)
    other, z1b = _process(root, z1digest)
    assert land(other, sha(blob1), z1b, blob1, list(range(1, z1b.num_spans)))[-1] is True
    # And the first process moves on to the second layer
    z2 = ZtocCache(Layout(root)).get(z2digest)
    first.prepare_layer(sha(blob2), z2)
    # Then it no longer holds the finished layer's table (nor its deleted file mapped)
    assert sha(blob1) not in first._tables and sha(blob2) in first._tables
