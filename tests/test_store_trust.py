"""The store's trust boundary: what an image's layer may put on the node, and who may reach it.

Layers come from untrusted registries and land through the real paths (whole layers through
``ingest_stream``, spans through ``prepare_layer``/``land_span`` with a zTOC built over the
tar, with the C landing and the Python reference); what they leave is read back from disk.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from prewarm.errors import StoreError
from prewarm.store import landing
from prewarm.store.content import ContentStore
from prewarm.store.directio import DirectWriter
from prewarm.store.layerfs import OPAQUE_XATTR, LayerWriter
from prewarm.store.resumable_hash import ResumableSha256
from prewarm.store.table import LandingTable
from tests.test_landing import landing_backend
from tests.test_store import GZIP, MTIME, _add, every_kind_tar, sha
from tests.test_store_spans import land, make_layer

_C = landing.backend()
needs_c = pytest.mark.skipif(_C is None, reason="PREWARM_LANDING=python")

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def _tar(build) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        build(tf)
    return buf.getvalue()


def ingest(store: ContentStore, tar: bytes) -> Path:
    """Stream ``tar`` (gzipped) into ``store`` as a whole layer; its ``fs`` directory."""
    blob = gzip.compress(tar, mtime=0)
    store.ingest_stream(sha(blob), iter([blob]), media_type=GZIP, diff_id=sha(tar))
    return store.layout.layer_fs(sha(blob))


# === item 2: the store root is private to its owner


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is already private to root)."""
    d = Path(tempfile.mkdtemp(prefix="prewarm-trust-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to land a setuid-root file and to become nobody")
def test_an_images_setuid_binary_is_out_of_reach_of_other_users(open_dir: Path) -> None:
    # Given a store whose layer holds a setuid-root copy of cat
    cat = Path("/bin/cat").read_bytes()
    store = ContentStore(open_dir / "root")
    fs = ingest(store, _tar(lambda tf: (_add(tf, "bin/", tarfile.DIRTYPE, mode=0o755),
                                        _add(tf, "bin/cat", data=cat, mode=0o4755))))
    target = fs / "bin" / "cat"
    assert os.stat(target).st_mode & 0o7777 == 0o4755 and os.stat(target).st_uid == 0
    # When another local user tries to reach it (stat it, and run it)
    probe = ("import errno, os, sys\n"
             "try:\n    os.stat(sys.argv[1])\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n"
             "else:\n    print('reached')\n")
    reached = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", probe, str(target)], capture_output=True,
                             text=True, check=True)
    # (through a shell: setpriv itself looks its command up before it drops root)
    run = subprocess.run([*NOBODY, "/bin/sh", "-c", 'exec "$0" /dev/null', str(target)], capture_output=True,
                         text=True, check=False)
    # Then the store root stops them: EACCES, and the binary never runs
    assert reached.stdout.strip() == "EACCES"
    assert run.returncode != 0 and "Permission denied" in run.stderr
    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700


def test_an_existing_open_store_root_is_made_private_at_start_up(tmp_path: Path) -> None:
    # Given a store root that an older prewarm left 0755 (and one that does not exist yet)
    root = tmp_path / "root"
    root.mkdir()
    os.chmod(root, 0o755)
    # When the store is opened on them
    ContentStore(root)
    ContentStore(tmp_path / "new" / "root")
    # Then both are 0700
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "root").st_mode) == 0o700


# === item 10: what the store reads back from work/ is checked before C or OpenSSL trust it


def _one_file_layer(name: str = "xx/f", data: bytes = b"data" * 300) -> bytes:
    return _tar(lambda tf: (_add(tf, "xx/", tarfile.DIRTYPE, mode=0o755), _add(tf, name, data=data)))


@needs_c
@pytest.mark.parametrize("lie", ["negative data start", "header after the data", "size past 64 bits"])
def test_a_corrupt_landing_table_is_refused_by_name(tmp_path: Path, lie: str) -> None:
    # Given the C records of a layer, one of them corrupted as a damaged work/plan would be
    tar = _one_file_layer()
    _, z = make_layer(tar, span_size=1 << 20)
    table = LandingTable.derive(z)
    k = next(i for i, p in enumerate(table.placements) if p.kind == "reg")
    rec = bytearray(table.records)
    at = landing.RECORD.size * k
    data_start = struct.unpack_from("<q", rec, at)[0]
    if lie == "negative data start":
        struct.pack_into("<q", rec, at, -1)
        struct.pack_into("<q", rec, at + 8, -513)
    elif lie == "header after the data":
        struct.pack_into("<q", rec, at + 8, data_start - 100)
    else:
        struct.pack_into("<q", rec, at + 16, (1 << 63) - 1)
    out = memoryview(tar[:z.uncompressed_archive_size])
    fs = tmp_path / "fs"
    (fs / "xx").mkdir(parents=True)
    # When C is asked to check the span's headers or write its files with them
    # Then it refuses the table (naming it corrupt) instead of reading or writing by its numbers
    with pytest.raises(StoreError, match="landing table .* is corrupt"):
        landing.check_headers(_C, bytes(rec), table.heap, out, 0)
    with LayerWriter(fs) as writer, pytest.raises(StoreError, match="landing table .* is corrupt"):
        landing.write_pieces(_C, bytes(rec), table.heap, writer.root_fd, out, 0, DirectWriter(),
                             table.placements, lambda *piece: None)
    assert os.listdir(fs / "xx") == []


def test_a_corrupt_saved_hash_state_is_refused_not_resumed() -> None:
    # Given a saved sha256 state, and copies with the block count or digest length damaged
    h = ResumableSha256()
    h.update(b"abc" * 30)
    good = h.state()
    num_at = len(good) - 8
    for num, md_len in ((64, 32), (0xFFFFFFFF, 32), (91 % 64 + 1, 32), (90 % 64, 0)):
        bad = bytearray(good)
        struct.pack_into("=II", bad, num_at, num, md_len)
        # Then only the intact one resumes; the others are refused before OpenSSL copies into them
        with pytest.raises(StoreError, match="saved sha256 state is corrupt"):
            ResumableSha256.from_state(bytes(bad))
    assert ResumableSha256.from_state(good).hexdigest() == hashlib.sha256(b"abc" * 30).hexdigest()


def test_a_corrupt_hash_file_stops_the_layer_with_a_store_error(tmp_path: Path) -> None:
    # Given a layer of several spans whose first span landed (work/hash holds the running sha256)
    tar = every_kind_tar(60_000)
    blob, z = make_layer(tar, span_size=8192)
    assert z.num_spans > 2
    store = ContentStore(tmp_path / "root")
    digest = sha(blob)
    land(store, digest, z, blob, [0])
    # When work/hash is damaged (its block count past the 64-byte buffer) and the next span lands
    hash_file = store.layout.layer_work(digest) / "hash"
    raw = bytearray(hash_file.read_bytes())
    struct.pack_into("=I", raw, len(raw) - 8, 64)
    hash_file.write_bytes(bytes(raw))
    # Then landing stops with the store's error, not a wrong digest or a crash
    with pytest.raises(StoreError, match="saved sha256 state is corrupt"):
        land(store, digest, z, blob, [1])


#: Run in a child: make openat2 fail with ENOSYS (as an old kernel or a seccomp profile
#: does), so both landing paths resolve paths by their component-by-component walk.
_NO_OPENAT2 = r"""
import ctypes, errno, sys
libc = ctypes.CDLL(None, use_errno=True)
class Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
code = (Filter * 4)(Filter(0x20, 0, 0, 0),                       # load the syscall number
                    Filter(0x15, 0, 1, 437),                     # openat2?
                    Filter(0x06, 0, 0, 0x00050000 | errno.ENOSYS),  # then ENOSYS
                    Filter(0x06, 0, 0, 0x7FFF0000))              # else allow
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(Prog(4, code)), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
"""

_ESCAPES = _NO_OPENAT2 + r"""
import gzip, os, pathlib
from prewarm.errors import UnsafeArchive
from prewarm.store import landing
from prewarm.store.directio import DirectWriter
from prewarm.store.layerfs import OPAQUE_XATTR, LayerWriter
from prewarm.store.table import LandingTable
from prewarm.index.ztoc_build import build_ztoc
base = pathlib.Path(sys.argv[1])
fs = base / "fs"
(fs / "xx").mkdir(parents=True)
(base / "victim").write_bytes(b"outside")
# the Python walk, asked for a path through '..'
with LayerWriter(fs) as w:
    try:
        os.close(w.open_data("../victim"))
        print("python: escaped")
    except UnsafeArchive as err:
        print("python: refused", err)
# the C walk, given a record whose path climbs out of the layer
tar = pathlib.Path(sys.argv[2]).read_bytes()
blob = gzip.compress(tar, mtime=0)
z = build_ztoc([blob], span_size=1 << 20, build_tool_identifier="prewarm-test")
t = LandingTable.derive(z)
heap = bytes(t.heap).replace(b"xx/f", b"../f")
assert heap != bytes(t.heap)
with LayerWriter(fs) as w:
    try:
        landing.write_pieces(landing.backend(), t.records, heap, w.root_fd, memoryview(tar[:z.uncompressed_archive_size]),
                             0, DirectWriter(), t.placements, lambda *piece: None)
        print("c: escaped" if (base / "f").exists() else "c: nothing")
    except UnsafeArchive as err:
        print("c: refused", err)
"""


@needs_c
def test_the_fallback_path_walks_refuse_dot_dot(tmp_path: Path) -> None:
    # Given a node whose kernel (or seccomp profile) has no openat2, so both landing paths walk
    tar = _one_file_layer()
    (tmp_path / "layer.tar").write_bytes(tar)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("PREWARM_LANDING", None)
    # When the Python writer and the C records are given a path through '..'
    run = subprocess.run([sys.executable, "-c", _ESCAPES, str(tmp_path / "base"), str(tmp_path / "layer.tar")],
                         capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 0, run.stderr
    # Then both refuse it as an unsafe archive, and nothing is written outside the layer
    lines = run.stdout.splitlines()
    assert lines[0].startswith("python: refused") and lines[1].startswith("c: refused"), run.stdout
    assert not (tmp_path / "base" / "f").exists()
    assert (tmp_path / "base" / "victim").read_bytes() == b"outside"


# === item 3: overlay's own xattrs never come from a layer's tar

#: What a hostile layer writes into its PAX records: overlay's state, and one xattr of the image's own.
_OVERLAY_XATTRS = {
    "trusted.overlay.redirect": "/etc", "trusted.overlay.metacopy": "", "trusted.overlay.origin": "\x00\xfb",
    "trusted.overlay.opaque": "y", "trusted.overlay.upper": "x", "trusted.other": "1",
    "user.overlay.redirect": "/etc", "user.overlay.opaque": "y",
}
_DROPPED = sorted(_OVERLAY_XATTRS)


def _pax(xattrs: dict[str, str]) -> dict[str, str]:
    return {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}


def overlay_xattr_tar() -> bytes:
    def build(tf: tarfile.TarFile) -> None:
        _add(tf, "plain/", tarfile.DIRTYPE, mode=0o755, pax=_pax({**_OVERLAY_XATTRS, "user.keep": "dir"}))
        _add(tf, "plain/f", data=b"file" * 100, pax=_pax({**_OVERLAY_XATTRS, "user.keep": "file"}))
        _add(tf, "plain/only", data=b"only overlay xattrs", pax=_pax(_OVERLAY_XATTRS))
        _add(tf, "opq/", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "opq/.wh..wh..opq")
        _add(tf, "opq/kept", data=b"kept")
        _add(tf, "pad", data=os.urandom(40_000))  # several spans
    return _tar(build)


LANDINGS = ["whole", "spans-c", "spans-python"]


def land_layer(tmp_path: Path, tar: bytes, how: str, monkeypatch: pytest.MonkeyPatch, span_size: int = 4096) -> Path:
    """Land ``tar`` through one of the store's real paths; the layer's fs directory."""
    store = ContentStore(tmp_path / how)
    if how == "whole":
        return ingest(store, tar)
    if how == "spans-c" and _C is None:
        pytest.skip("PREWARM_LANDING=python")
    with landing_backend(monkeypatch, how.removeprefix("spans-")):
        blob, z = make_layer(tar, span_size=span_size)
        order = list(range(z.num_spans))[::-1]
        assert land(store, sha(blob), z, blob, order)[-1]
    return store.layout.layer_fs(sha(blob))


@pytest.mark.parametrize("how", LANDINGS)
def test_overlay_xattrs_from_the_tar_never_reach_the_layer(tmp_path: Path, how: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a layer whose tar sets overlay's redirect, metacopy, origin and opaque (trusted.* and
    # user.overlay.*) on a plain directory and files, next to a real opaque whiteout
    # When it lands
    fs = land_layer(tmp_path, overlay_xattr_tar(), how, monkeypatch)
    # Then no overlay xattr is on disk, the image's own xattrs are, and the real opaque marker is
    for path in ("plain", "plain/f", "plain/only"):
        names = set(os.listxattr(fs / path, follow_symlinks=False))
        assert not names & set(_DROPPED), (path, names)
    assert os.getxattr(fs / "plain", "user.keep") == b"dir"
    assert os.getxattr(fs / "plain/f", "user.keep") == b"file"
    assert (fs / "plain/only").read_bytes() == b"only overlay xattrs"
    assert os.getxattr(fs / "opq", OPAQUE_XATTR) == b"y"
    assert (fs / "opq/kept").read_bytes() == b"kept"


# === item 4: a hard link keeps the node it was made to, whatever replaces the path later


def _padding(tf: tarfile.TarFile, name: str) -> None:
    _add(tf, name, data=os.urandom(9000))  # more than a span: the entries around it land apart


def relinked_tar(case: str) -> bytes:
    def build(tf: tarfile.TarFile) -> None:
        if case == "replaced":  # a, b -> a, a new a
            _add(tf, "a", data=b"one", mode=0o644)
            _padding(tf, "pad1")
            _add(tf, "b", tarfile.LNKTYPE, linkname="a", mode=0o644)
            _padding(tf, "pad2")
            _add(tf, "a", data=b"two", mode=0o600)
        elif case == "chain":  # a, b -> a, c -> b, a new a, then b replaced too: c keeps the first a
            _add(tf, "a", data=b"one", mode=0o644)
            _add(tf, "b", tarfile.LNKTYPE, linkname="a", mode=0o644)
            _padding(tf, "pad1")
            _add(tf, "c", tarfile.LNKTYPE, linkname="b", mode=0o644)
            _add(tf, "a", data=b"two", mode=0o600)
            _padding(tf, "pad2")
            _add(tf, "b", data=b"three", mode=0o640)
        else:  # "dir gone": d/a, b -> d/a, then d replaced by a file
            _add(tf, "d/", tarfile.DIRTYPE, mode=0o755)
            _add(tf, "d/a", data=b"one", mode=0o644)
            _padding(tf, "pad1")
            _add(tf, "b", tarfile.LNKTYPE, linkname="d/a", mode=0o644)
            _add(tf, "d", data=b"two", mode=0o600)
    return _tar(build)


#: path -> (content, mode) as containerd's unpack leaves them.
RELINKED = {
    "replaced": {"a": (b"two", 0o600), "b": (b"one", 0o644)},
    "chain": {"a": (b"two", 0o600), "b": (b"three", 0o640), "c": (b"one", 0o644)},
    "dir gone": {"d": (b"two", 0o600), "b": (b"one", 0o644)},
}


@pytest.mark.parametrize("how", LANDINGS)
@pytest.mark.parametrize("case", sorted(RELINKED))
def test_a_hard_link_keeps_the_file_it_was_made_to_after_the_path_is_replaced(
        tmp_path: Path, how: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a tar that links b to a, then replaces a (or the directory holding it)
    # When it lands whole, or in spans of 4 KiB (the entries in different spans)
    fs = land_layer(tmp_path, relinked_tar(case), how, monkeypatch, span_size=4096)
    # Then each path has what containerd's unpack gives it: the link the first a's content and mode
    for path, (content, mode) in RELINKED[case].items():
        assert (fs / path).read_bytes() == content, path
        assert stat.S_IMODE(os.lstat(fs / path).st_mode) == mode, path
        assert os.lstat(fs / path).st_mtime_ns == MTIME * 10**9, path
    inodes = {os.lstat(fs / p).st_ino for p in RELINKED[case]}
    assert len(inodes) == len(RELINKED[case])


def test_a_saved_landing_table_keeps_where_a_kept_node_is_created(tmp_path: Path) -> None:
    # Given the landing table of a layer whose first a only a hard link keeps
    _, z = make_layer(relinked_tar("chain"), span_size=4096)
    table = LandingTable.derive(z)
    kept = [p for p in table.placements if p.made_at]
    assert [(p.kind, p.made_at, p.path, p.final) for p in kept] == [("reg", "a", "c", True)]
    # When another process loads it
    table.save(tmp_path / "plan")
    loaded = LandingTable.load(tmp_path / "plan", z, table.fingerprint)
    # Then it creates that node where the tar did and writes it where the link keeps it
    assert loaded is not None
    assert list(loaded.placements) == list(table.placements)
    assert loaded.placements[0] == table.placements[0] and loaded.placements[-1] == table.placements[-1]


def test_the_shim_opening_a_store_first_makes_its_root_private(tmp_path: Path) -> None:
    from prewarm.runtime.snapshot.overlay import OverlaySnapshotter

    root = tmp_path / "fresh"
    sn = OverlaySnapshotter(root)
    try:
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    finally:
        sn.close()
