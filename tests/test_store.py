"""ContentStore: whole-layer streaming and span landing produce the same verified tree."""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import os
import random
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from prewarm.errors import (
    CorruptContent,
    DigestMismatch,
    InsufficientSpace,
    RateLimited,
    StoreError,
    UnsafeArchive,
)
from prewarm.store.content import ContentStore
from prewarm.store.layerfs import OPAQUE_XATTR

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"
MTIME = 1_700_000_000


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _add(tf: tarfile.TarFile, name: str, type_: bytes = tarfile.REGTYPE, data: bytes = b"", *,
         mode: int = 0o644, uid: int = 0, gid: int = 0, linkname: str = "", dev: tuple[int, int] = (0, 0),
         pax: dict[str, str] | None = None) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime, ti.linkname = type_, mode, uid, gid, MTIME, linkname
    ti.devmajor, ti.devminor = dev
    ti.size = len(data) if type_ == tarfile.REGTYPE else 0
    if pax:
        ti.pax_headers = pax
    tf.addfile(ti, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)


def big_data(n: int, seed: int) -> bytes:
    """Half random, half text: compresses somewhat, so spans hold many checkpoints."""
    rnd = random.Random(seed)
    return bytes(rnd.getrandbits(8) for _ in range(n // 2)) + (b"layer data %d\n" % seed) * (n // 2 // 14 + 1)


def every_kind_tar(big: int = 300_000) -> bytes:
    """A tar with every entry type the store must handle, as an image layer would have them."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "etc/", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "etc/hostname", data=b"prewarm\n")
        _add(tf, "etc/.wh.removed")
        _add(tf, "var/", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "var/.wh..wh..opq")
        _add(tf, "var/big.bin", data=big_data(big, 1), uid=1000, gid=1001, mode=0o640)
        _add(tf, "usr/bin/su", data=b"#!/bin/sh\nsu\n", mode=0o4755, uid=0, gid=0)
        _add(tf, "usr/bin/sg", data=b"sg", mode=0o2755, uid=0, gid=50)
        _add(tf, "usr/bin/su-again", tarfile.LNKTYPE, linkname="usr/bin/su", mode=0o4755)
        _add(tf, "usr/bin/sh", tarfile.SYMTYPE, linkname="bash", mode=0o777)
        _add(tf, "usr/lib/x", data=b"xattr", pax={"SCHILY.xattr.user.origin": "prewarm-test"})
        _add(tf, "usr/lib/" + "long-name-" * 20, data=b"long")
        _add(tf, "usr/lib/empty")
        _add(tf, "tmp/", tarfile.DIRTYPE, mode=0o1777)
        _add(tf, "dev/null", tarfile.CHRTYPE, dev=(1, 3), mode=0o666)
        _add(tf, "dev/sda", tarfile.BLKTYPE, dev=(8, 0), mode=0o660, gid=6)
        _add(tf, "run/fifo", tarfile.FIFOTYPE, mode=0o600)
        _add(tf, "ro/", tarfile.DIRTYPE, mode=0o555)
        _add(tf, "ro/inside", data=big_data(70_000, 2), mode=0o444)
        _add(tf, "frac", data=b"t", pax={"mtime": f"{MTIME}.25"})
        _add(tf, "replaced", data=b"first version")
        _add(tf, "replaced", data=b"second")
    return buf.getvalue()


def assert_every_kind_tree(fs: Path, big: int = 300_000) -> None:
    """What every_kind_tar must become in overlay's diff format."""
    def st(p: str) -> os.stat_result:
        return os.lstat(fs / p)

    assert (fs / "etc/hostname").read_bytes() == b"prewarm\n"
    wh = st("etc/removed")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0 and not (fs / "etc/.wh.removed").exists()
    assert os.getxattr(fs / "var", OPAQUE_XATTR) == b"y"
    assert not (fs / "var/.wh..wh..opq").exists()
    assert (fs / "var/big.bin").read_bytes() == big_data(big, 1)
    assert (st("var/big.bin").st_uid, st("var/big.bin").st_gid) == (1000, 1001)
    assert stat.S_IMODE(st("var/big.bin").st_mode) == 0o640
    assert stat.S_IMODE(st("usr/bin/su").st_mode) == 0o4755
    assert stat.S_IMODE(st("usr/bin/sg").st_mode) == 0o2755 and st("usr/bin/sg").st_gid == 50
    assert st("usr/bin/su-again").st_ino == st("usr/bin/su").st_ino
    assert os.readlink(fs / "usr/bin/sh") == "bash"
    assert os.getxattr(fs / "usr/lib/x", "user.origin") == b"prewarm-test"
    assert (fs / ("usr/lib/" + "long-name-" * 20)).read_bytes() == b"long"
    assert st("usr/lib/empty").st_size == 0
    assert stat.S_IMODE(st("tmp").st_mode) == 0o1777
    null, sda = st("dev/null"), st("dev/sda")
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_ISBLK(sda.st_mode) and (os.major(sda.st_rdev), os.minor(sda.st_rdev)) == (8, 0)
    assert sda.st_gid == 6 and stat.S_IMODE(sda.st_mode) == 0o660
    assert stat.S_ISFIFO(st("run/fifo").st_mode)
    assert stat.S_IMODE(st("ro").st_mode) == 0o555 and (fs / "ro/inside").read_bytes() == big_data(70_000, 2)
    assert (fs / "replaced").read_bytes() == b"second"
    # mtimes are set last, directories after their contents
    for p in ("etc", "ro", "usr/bin/su", "var/big.bin", "dev/null", "tmp"):
        assert st(p).st_mtime_ns == MTIME * 10**9, p
    assert st("usr/bin/sh").st_mtime_ns == MTIME * 10**9
    assert st("frac").st_mtime_ns == MTIME * 10**9 + 250_000_000


def chunked(data: bytes, size: int = 65536) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


# === the whole-layer path

@pytest.mark.parametrize("kind", ["gzip", "gzip-members", "zstd", "zstd-frames", "tar"])
def test_ingest_stream_every_compression(tmp_path: Path, kind: str) -> None:
    # Given a layer in one of the formats registries serve
    tar = every_kind_tar()
    half = len(tar) // 2
    blob, media = {
        "gzip": (gzip.compress(tar, mtime=0), GZIP),
        "gzip-members": (gzip.compress(tar[:half], mtime=0) + gzip.compress(tar[half:], mtime=0), GZIP),
        "zstd": (zstandard.ZstdCompressor().compress(tar), ZSTD),
        "zstd-frames": (zstandard.ZstdCompressor().compress(tar[:half])
                        + zstandard.ZstdCompressor().compress(tar[half:]), ZSTD),
        "tar": (tar, TAR),
    }[kind]
    store = ContentStore(tmp_path / "root")
    digest = sha(blob)
    # When it is streamed in
    store.ingest_stream(digest, chunked(blob, 7777), media_type=media, diff_id=sha(tar))
    # Then the layer is ready with the right tree and a record
    assert store.layer_state(digest) == "ready"
    assert_every_kind_tree(store.layout.layer_fs(digest))
    info = store.ready_info(digest)
    assert info["diff_id"] == sha(tar) and info["size"] == len(blob) and info["mode"] == "whole"
    assert not store.layout.layer_work(digest).exists()
    assert store.list_layers() == [digest]
    # And a second ingest of a ready layer does nothing (not even reading the stream)
    store.ingest_stream(digest, iter(()), media_type=media, diff_id=sha(tar))


def test_ingest_stream_large_files_written_beside_the_landing_keep_links_and_replacements(tmp_path: Path) -> None:
    # Given a layer whose large files go to the data lanes (written while the landing goes
    # on): one kept only by a hard link after its path is replaced, one replaced outright
    big = [big_data(1_500_000, seed) for seed in (3, 4, 5)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "a", data=big[0], mode=0o600, uid=7)
        _add(tf, "b", tarfile.LNKTYPE, linkname="a")
        _add(tf, "a", data=b"small a")
        _add(tf, "c", data=big[1], mode=0o755)
        _add(tf, "c", data=big[2], mode=0o640, uid=9)
        for i in range(50):
            _add(tf, f"many/{i}", data=big_data(300_000 if i % 7 == 0 else 100, i))
    tar = buf.getvalue()
    blob = gzip.compress(tar[:len(tar) // 3], mtime=0) + gzip.compress(tar[len(tar) // 3:], mtime=0) + bytes(9)
    store = ContentStore(tmp_path / "root")
    # When it is streamed in small chunks
    store.ingest_stream(sha(blob), chunked(blob, 4099), media_type=GZIP, diff_id=sha(tar))
    # Then each path has the data and metadata of its last entry, the link the first a's
    fs = store.layout.layer_fs(sha(blob))
    assert (fs / "b").read_bytes() == big[0] and os.lstat(fs / "b").st_uid == 7
    assert stat.S_IMODE(os.lstat(fs / "b").st_mode) == 0o600
    assert (fs / "a").read_bytes() == b"small a" and os.lstat(fs / "a").st_ino != os.lstat(fs / "b").st_ino
    assert (fs / "c").read_bytes() == big[2] and os.lstat(fs / "c").st_uid == 9
    assert stat.S_IMODE(os.lstat(fs / "c").st_mode) == 0o640
    for i in range(50):
        assert (fs / f"many/{i}").read_bytes() == big_data(300_000 if i % 7 == 0 else 100, i)
        assert os.lstat(fs / f"many/{i}").st_mtime_ns == MTIME * 10**9


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 300_000), min_size=1, max_size=4), chunk=st.integers(1, 70_000),
       padding=st.integers(0, 40))
def test_gunzip_inflates_members_in_any_chunking(sizes: list[int], chunk: int, padding: int) -> None:
    from prewarm.store.ingest import STREAM_READ, _gunzip

    parts = [big_data(n, n) for n in sizes]
    blob = b"".join(gzip.compress(p, mtime=0) for p in parts) + bytes(padding)
    pieces = list(_gunzip(chunked(blob, max(chunk, len(blob) // 200))))
    assert b"".join(pieces) == b"".join(parts)
    assert all(len(p) <= STREAM_READ for p in pieces)


@pytest.mark.parametrize("blob", [b"", bytes(10), gzip.compress(b"x" * 1000)[:-3], b"\x1f\x8bnot gzip at all"],
                         ids=["empty", "zeros", "truncated", "garbage"])
def test_gunzip_refuses_what_is_not_a_whole_gzip_stream(blob: bytes) -> None:
    from prewarm.store.ingest import _gunzip

    with pytest.raises(CorruptContent, match="gzip stream"):
        b"".join(_gunzip(iter([blob])))


@pytest.mark.parametrize("which", ["digest", "diff_id"])
def test_ingest_stream_mismatch_leaves_nothing(tmp_path: Path, which: str) -> None:
    tar = every_kind_tar(20_000)
    blob = gzip.compress(tar, mtime=0)
    store = ContentStore(tmp_path / "root")
    digest = sha(blob) if which == "diff_id" else sha(blob + b"x")
    diff_id = sha(tar + b"x") if which == "diff_id" else sha(tar)
    with pytest.raises(DigestMismatch, match=digest):
        store.ingest_stream(digest, chunked(blob), media_type=GZIP, diff_id=diff_id)
    assert store.layer_state(digest) == "absent"
    assert not store.is_ready(digest)


def test_ingest_stream_registry_failure_mid_stream_is_that_failure_not_corruption(tmp_path: Path) -> None:
    # Given a layer whose stream the registry cuts with a 429 after some chunks
    tar = every_kind_tar(200_000)
    blob = gzip.compress(tar, mtime=0)
    store = ContentStore(tmp_path / "root")
    digest = sha(blob)

    def cut() -> Iterator[bytes]:
        yield blob[:1000]
        raise RateLimited("rate limited by r.example: blob (HTTP 429)", retry_after=3.0)

    # When it is streamed in
    # Then the 429 surfaces as it is (the fleet backs off on it), not as a corrupt blob
    with pytest.raises(RateLimited) as info:
        store.ingest_stream(digest, cut(), media_type=GZIP, diff_id=sha(tar))
    assert info.value.retry_after == 3.0
    assert store.layer_state(digest) == "absent"
    # And the same layer streams in completely afterwards
    store.ingest_stream(digest, chunked(blob), media_type=GZIP, diff_id=sha(tar))
    assert store.is_ready(digest)


def _checked_at_end(blob: bytes, digest: str) -> Iterator[bytes]:
    """What the registry client's stream_blob does: the chunks, then its digest check at their end."""
    yield from chunked(blob)
    if sha(blob) != digest:
        raise DigestMismatch(f"blob {digest} in r.example/x: expected {digest}, got {sha(blob)}",
                             expected=digest, actual=sha(blob))


def test_ingest_stream_with_chunks_verify_leaves_the_digest_to_the_iterator(tmp_path: Path) -> None:
    tar = every_kind_tar(50_000)
    blob = gzip.compress(tar, mtime=0)
    store = ContentStore(tmp_path / "root")
    # Given a layer whose iterator checks the digest at its end, and finds it wrong
    wrong = sha(blob + b"x")
    # Then its DigestMismatch is the error, and nothing is kept
    with pytest.raises(DigestMismatch, match="r.example/x"):
        store.ingest_stream(wrong, _checked_at_end(blob, wrong), media_type=GZIP, diff_id=sha(tar),
                            chunks_verify=True)
    assert store.layer_state(wrong) == "absent"
    # And a tar stream broken by a blob corrupted in transit is blamed on the digest, as without chunks_verify
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    right = sha(blob)
    with pytest.raises(DigestMismatch):
        store.ingest_stream(right, _checked_at_end(bytes(bad), right), media_type=GZIP, diff_id=sha(tar),
                            chunks_verify=True)
    assert store.layer_state(right) == "absent"
    # And the blob is hashed once, by the iterator: an iterator that does not check is believed
    unchecked = sha(b"not the blob")
    store.ingest_stream(unchecked, chunked(blob), media_type=GZIP, diff_id=sha(tar), chunks_verify=True)
    assert store.is_ready(unchecked)
    # (while without chunks_verify the store hashes it itself)
    other = sha(b"not the blob either")
    with pytest.raises(DigestMismatch, match="hashes to"):
        store.ingest_stream(other, chunked(blob), media_type=GZIP, diff_id=sha(tar))


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.tuples(st.booleans(), st.integers(0, 5000)), max_size=60))
def test_the_hashing_thread_keeps_each_hash_in_order(sizes: list[tuple[bool, int]]) -> None:
    from prewarm.store.ingest import _Hasher

    rng = random.Random(len(sizes))
    hashes, given_ = (hashlib.sha256(), hashlib.sha256()), ([], [])
    hasher = _Hasher()
    hasher.start()
    for second, n in sizes:
        data = rng.randbytes(n)
        hasher.update(hashes[second], data)
        given_[second].append(data)
    hasher.close()
    assert not hasher.is_alive()
    for h, parts in zip(hashes, given_):
        assert h.hexdigest() == hashlib.sha256(b"".join(parts)).hexdigest()


def test_a_whole_layer_stream_is_read_on_its_own_thread_and_to_its_end(tmp_path: Path) -> None:
    import threading

    tar = every_kind_tar(300_000)
    blob = gzip.compress(tar, mtime=0)
    store = ContentStore(tmp_path / "root")
    readers: set[str] = set()

    def source(data: bytes) -> Iterator[bytes]:
        for chunk in chunked(data, 4096):
            readers.add(threading.current_thread().name)
            yield chunk
        readers.add(threading.current_thread().name)

    # Given a layer streamed whole
    store.ingest_stream(sha(blob), source(blob), media_type=GZIP, diff_id=sha(tar))
    # Then the stream was read by the read-ahead thread alone (not the inflating one), to its end
    assert store.is_ready(sha(blob))
    assert readers == {"prewarm-read"}
    # And with trailing bytes after the gzip member, a failure is still blamed on the digest:
    # the rest of the stream is read through the same thread
    readers.clear()
    bad = blob + b"junk after the member"
    with pytest.raises(DigestMismatch):
        store.ingest_stream(sha(blob + b"?"), source(bad), media_type=GZIP, diff_id=sha(tar))
    assert readers == {"prewarm-read"}
    assert not [t for t in threading.enumerate() if t.name.startswith(("prewarm-read", "prewarm-hash"))]


def test_the_read_ahead_hands_on_the_stream_error_and_stops_its_reader() -> None:
    from prewarm.store.ingest import _ReadAhead

    def broken() -> Iterator[bytes]:
        yield b"a"
        yield b"b"
        raise RateLimited("rate limited by r.example (HTTP 429)", retry_after=1.0)

    got: list[bytes] = []
    with _ReadAhead(broken()) as ahead, pytest.raises(RateLimited):
        got.extend(ahead)
    assert got == [b"a", b"b"]
    assert not ahead.is_alive()

    def endless() -> Iterator[bytes]:
        while True:
            yield b"x" * 100

    with _ReadAhead(endless()) as ahead:
        it = iter(ahead)
        assert next(it) == b"x" * 100
    # Then once stopped, its reader is gone and whoever still reads gets a StoreError, not a hang
    assert not ahead.is_alive()
    with pytest.raises(StoreError, match="stopped"):
        for _ in it:
            pass


def test_the_read_ahead_waits_for_a_slow_read_before_the_stream_is_closed() -> None:
    import threading
    import time

    from prewarm.store.ingest import _ReadAhead

    def slow() -> Iterator[bytes]:  # (as a registry that stalls: the client's read timeout ends it)
        yield b"a"
        time.sleep(6.0)
        yield b"b"

    # Given a stream whose reader is inside a slow read when the ingest gives up
    stream = slow()
    with _ReadAhead(stream) as ahead:
        assert next(iter(ahead)) == b"a"
        time.sleep(0.1)
    # Then the read-ahead has waited for it, and the stream can be closed (a generator still
    # running in another thread raises "generator already executing" instead)
    assert not ahead.is_alive()
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "prewarm-read"]


def test_a_landing_waiting_on_a_stopped_inflate_gets_an_error_not_a_hang() -> None:
    import threading
    import time

    from prewarm.store.ingest import _Hasher, _HashingReader, _Inflater

    release = threading.Event()

    def stalled() -> Iterator[bytes]:  # a registry that sends nothing more until released
        yield gzip.compress(b"x" * 100_000, mtime=0)[:10]  # the gzip header: nothing to inflate yet
        release.wait(10)
        yield b""

    hasher = _Hasher()
    hasher.start()
    inflater = _Inflater(_HashingReader(iter(stalled()), hashlib.sha256(), hasher), "gzip", hashlib.sha256(),
                         hasher, "sha256:" + "0" * 64, None)
    inflater.start()
    got: list[BaseException] = []

    def land() -> None:
        try:
            next(iter(inflater))
        except BaseException as err:  # noqa: BLE001 - what the landing thread would raise
            got.append(err)

    # Given a landing thread waiting for the inflate's next chunk
    landing = threading.Thread(target=land, daemon=True)
    landing.start()
    time.sleep(0.2)
    # When the inflate is stopped (the ingest gives up), Then the landing gets a StoreError at once
    inflater.stop(timeout=0)
    landing.join(3)
    release.set()
    inflater.stop()
    hasher.close()
    assert not landing.is_alive()
    assert len(got) == 1 and isinstance(got[0], StoreError), got


def test_once_closed_the_hashing_thread_hashes_inline_after_what_it_had_queued() -> None:
    from prewarm.store.ingest import _Hasher

    # Given chunks hashed through the thread, then the thread closed (a failure's drain comes next)
    h = hashlib.sha256()
    hasher = _Hasher()
    hasher.start()
    for i in range(20):
        hasher.update(h, bytes([i]) * 5000)
    hasher.close()
    # When more chunks are given, Then they are hashed in order after the queued ones, none lost
    hasher.update(h, b"the rest of the stream")
    expected = b"".join(bytes([i]) * 5000 for i in range(20)) + b"the rest of the stream"
    assert h.hexdigest() == hashlib.sha256(expected).hexdigest()


def test_a_failed_hash_is_raised_to_the_next_update_or_close() -> None:
    from prewarm.store.ingest import _Hasher

    class Broken:
        def update(self, data: bytes) -> None:
            raise MemoryError("no room to hash")

    hasher = _Hasher()
    hasher.start()
    hasher.update(Broken(), b"x" * 4096)  # type: ignore[arg-type]
    with pytest.raises(MemoryError):
        hasher.close()
    with pytest.raises(MemoryError):
        hasher.update(hashlib.sha256(), b"y")


def _hostile(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "ok", data=b"fine")
        if kind == "dotdot":
            _add(tf, "../../outside/evil", data=b"pwned")
        elif kind == "absolute":
            _add(tf, "/outside/evil", data=b"pwned")
        elif kind == "hardlink-out":
            _add(tf, "hl", tarfile.LNKTYPE, linkname="../../outside/target")
        elif kind == "hardlink-missing":
            _add(tf, "hl", tarfile.LNKTYPE, linkname="nope")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink-out", "hardlink-missing"])
def test_ingest_stream_refuses_escapes(tmp_path: Path, kind: str) -> None:
    # Given a crafted layer that tries to write outside, next to a real file outside
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_bytes(b"keep")
    tar = _symlink_escape(str(outside)) if kind == "symlink" else _hostile(kind)
    blob = gzip.compress(tar, mtime=0)
    store = ContentStore(tmp_path / "root")
    # When it is ingested, Then UnsafeArchive names the entry
    with pytest.raises(UnsafeArchive, match="tar entry"):
        store.ingest_stream(sha(blob), chunked(blob), media_type=GZIP, diff_id=sha(tar))
    # And nothing was written outside, and the layer is not there
    assert sorted(p.name for p in outside.iterdir()) == ["target"]
    assert (outside / "target").read_bytes() == b"keep" and os.lstat(outside / "target").st_nlink == 1
    assert store.layer_state(sha(blob)) == "absent"


def _symlink_escape(outside: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "link", tarfile.SYMTYPE, linkname=outside)
        _add(tf, "link/evil", data=b"pwned")
    return buf.getvalue()


def test_unknown_media_type_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a tar layer"):
        ContentStore(tmp_path).ingest_stream(sha(b""), iter(()), media_type="application/json", diff_id=None)


def test_check_space_names_root_and_bytes(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "root")
    store.check_space(1)
    with pytest.raises(InsufficientSpace, match=r"root: \d+ bytes free, 1000000000000000000 needed"):
        store.check_space(10**18)


def test_remove_layer(tmp_path: Path) -> None:
    tar = every_kind_tar(1000)
    blob = gzip.compress(tar, mtime=0)
    store = ContentStore(tmp_path / "root")
    store.ingest_stream(sha(blob), chunked(blob), media_type=GZIP, diff_id=None)
    store.remove_layer(sha(blob))
    assert store.layer_state(sha(blob)) == "absent" and store.list_layers() == []
    with pytest.raises(StoreError, match="not ready"):
        store.ready_info(sha(blob))


def _tar(*adds: tuple) -> bytes:  # type: ignore[type-arg]
    """(name, type, data-or-linkname) tuples as a tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, type_, *rest in adds:
            arg = rest[0] if rest else b""
            if type_ in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                _add(tf, name, type_, linkname=arg)
            else:
                _add(tf, name, type_, arg)
    return buf.getvalue()


def test_layers_overlay_mount_with_whiteouts_applied(tmp_path: Path) -> None:
    # Given a base layer and a layer on top that deletes a file and replaces a directory
    import subprocess

    reg, dir_, sym = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE
    base = _tar(("etc/passwd", reg, b"root:x:0:0\n"), ("etc/group", reg, b"root:x:0:\n"),
                ("var/cache/old", reg, b"stale"), ("bin/sh", reg, b"sh"))
    top = _tar(("etc/.wh.passwd", reg), ("var/", dir_), ("var/.wh..wh..opq", reg), ("var/new", reg, b"fresh"),
               ("bin/sh", sym, "busybox"))
    store = ContentStore(tmp_path / "root")
    digests = []
    for tar in (base, top):
        blob = gzip.compress(tar, mtime=0)
        store.ingest_stream(sha(blob), chunked(blob), media_type=GZIP, diff_id=sha(tar))
        digests.append(sha(blob))
    merged = tmp_path / "merged"
    merged.mkdir()
    lower = ":".join(str(store.layout.layer_fs(d)) for d in reversed(digests))  # newest first
    # When they are overlay-mounted in order, as containerd would
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}", str(merged)], check=True)
    try:
        # Then the whiteout hides the file, the opaque dir hides the old contents
        assert sorted(os.listdir(merged / "etc")) == ["group"]
        assert os.listdir(merged / "var") == ["new"]
        assert (merged / "var/new").read_bytes() == b"fresh"
        assert os.readlink(merged / "bin/sh") == "busybox"
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_symlink_without_target_is_corrupt(tmp_path: Path) -> None:
    tar = _tar(("a", tarfile.REGTYPE, b"x"), ("bin/sh", tarfile.SYMTYPE, ""))
    blob = gzip.compress(tar, mtime=0)
    store = ContentStore(tmp_path / "root")
    with pytest.raises(CorruptContent, match="'bin/sh' is a symlink with an empty target"):
        store.ingest_stream(sha(blob), chunked(blob), media_type=GZIP, diff_id=sha(tar))
    assert store.layer_state(sha(blob)) == "absent"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a node whose disk is nearly full."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_while_streaming_is_insufficient_space(small_fs: Path) -> None:
    # Given a layer bigger than the disk, When it is streamed in
    tar = every_kind_tar(3_000_000)
    blob = gzip.compress(tar, mtime=0)
    store = ContentStore(small_fs / "root")
    # Then a clear InsufficientSpace names the root, and nothing of the layer is left
    with pytest.raises(InsufficientSpace, match=f"no space left in {small_fs}/root"):
        store.ingest_stream(sha(blob), chunked(blob), media_type=GZIP, diff_id=sha(tar))
    assert store.layer_state(sha(blob)) == "absent"
    assert os.statvfs(small_fs).f_bfree * os.statvfs(small_fs).f_frsize > 1_900_000


def test_a_write_that_fails_leaves_no_file_of_the_layer_open(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from prewarm.store.directio import DirectWriter

    # Given a layer of files too small for a data lane, some of whose data cross the stream's
    # (1 MiB) chunks, and a disk that is full for the landing thread's own writes
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(12):
            _add(tf, f"f{i}", data=big_data(200 << 10, i))
    tar = buf.getvalue()
    blob = gzip.compress(tar, mtime=0)
    store = ContentStore(tmp_path / "root")
    real = DirectWriter.pwrite

    def full(self: DirectWriter, fd: int, data: memoryview, offset: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            return real(self, fd, data, offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(DirectWriter, "pwrite", full)
    # When it is streamed in, Then it fails as a full disk, and no file of the layer stays open
    # (the first write of a file failed before the file was the landing's current one: its fd leaked,
    # and the store's filesystem could not be unmounted)
    with pytest.raises(InsufficientSpace):
        store.ingest_stream(sha(blob), chunked(blob), media_type=GZIP, diff_id=sha(tar))
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert not [p for p in held if p.startswith(str(tmp_path))], held
    assert store.layer_state(sha(blob)) == "absent"


def test_a_whole_layer_of_small_files_across_directories_lands_in_tar_order(tmp_path: Path) -> None:
    # Given a tar of small files in 40 directories visited twice each, where later entries link to,
    # replace and hide files that may still be waiting to be created by the landing's creating thread
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for rnd in range(2):
            for d in range(40):
                if rnd == 0:
                    _add(tf, f"d{d}/", tarfile.DIRTYPE, mode=0o755)
                for i in range(30):
                    _add(tf, f"d{d}/f{rnd}-{i}", data=b"%d/%d/%d\n" % (rnd, d, i) * (i + 1), mode=0o600 + i)
                if rnd == 1 and d >= 20:  # a directory made elsewhere between two directories' files
                    _add(tf, f"d{d - 20}/s{d}/", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "d0/link", tarfile.LNKTYPE, linkname="d39/f1-29")
        _add(tf, "d1/f1-29", data=b"replaced\n", mode=0o640)
        _add(tf, "d2/.wh.f1-29")
        _add(tf, "d3/", tarfile.DIRTYPE, mode=0o700)
        _add(tf, "d4", data=b"a file where a directory was\n")
    tar = buf.getvalue()
    blob = gzip.compress(tar, mtime=0)
    store = ContentStore(tmp_path / "root")
    # When it is streamed in, in chunks that cut through files
    store.ingest_stream(sha(blob), chunked(blob, 3001), media_type=GZIP, diff_id=sha(tar))
    fs = store.layout.layer_fs(sha(blob))
    # Then every file is where the tar puts it, with its bytes and mode, and later entries won
    for rnd in range(2):
        for d in range(5, 40):
            for i in range(30):
                f = fs / f"d{d}" / f"f{rnd}-{i}"
                assert f.read_bytes() == b"%d/%d/%d\n" % (rnd, d, i) * (i + 1), f
                assert stat.S_IMODE(f.stat().st_mode) == 0o600 + i
    assert os.path.samefile(fs / "d0/link", fs / "d39/f1-29")
    assert (fs / "d1/f1-29").read_bytes() == b"replaced\n"
    hidden = os.lstat(fs / "d2/f1-29")  # an overlay whiteout now
    assert stat.S_ISCHR(hidden.st_mode) and hidden.st_rdev == 0 and (fs / "d2/f1-28").is_file()
    assert stat.S_IMODE((fs / "d3").stat().st_mode) == 0o700 and (fs / "d3/f1-0").is_file()
    assert (fs / "d4").read_bytes() == b"a file where a directory was\n"
    assert sorted(os.listdir(fs)) == sorted([f"d{d}" for d in range(40)])
    for d in range(5, 20):
        assert sorted(os.listdir(fs / f"d{d}")) == sorted([f"f{r}-{i}" for r in range(2) for i in range(30)]
                                                          + [f"s{d + 20}"])


def test_a_directory_removed_and_made_again_gets_the_files_after_it(tmp_path: Path) -> None:
    # Given a tar that lands files in a/b, replaces a with a file, then makes a/b again with other files
    # (the writer keeps recently used directories open: the first a/b must not be written into)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("a/", "a/b/", "c/"):
            _add(tf, name, tarfile.DIRTYPE, mode=0o755)
        _add(tf, "a/b/old", data=b"old\n")
        _add(tf, "c/x", data=b"x\n")
        _add(tf, "a", data=b"a file now\n")
        _add(tf, "c/y", data=b"y\n")
        _add(tf, "a/", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "a/b/", tarfile.DIRTYPE, mode=0o750)
        _add(tf, "a/b/new", data=b"new\n")
    tar = buf.getvalue()
    store = ContentStore(tmp_path / "root")
    # When it lands whole
    store.ingest_stream(sha(tar), chunked(tar, 4096), media_type=TAR, diff_id=sha(tar))
    # Then the second a/b holds only its own file
    fs = store.layout.layer_fs(sha(tar))
    assert os.listdir(fs / "a/b") == ["new"] and (fs / "a/b/new").read_bytes() == b"new\n"
    assert stat.S_IMODE((fs / "a/b").stat().st_mode) == 0o750
    assert sorted(os.listdir(fs / "c")) == ["x", "y"]


def test_a_stage_backlog_holds_the_landing_thread_at_its_bound_until_bytes_are_written_or_it_failed() -> None:
    import threading

    from prewarm.store.ingest import _Backlog

    backlog = _Backlog(100)
    backlog.take(150, lambda: False)  # one item past the bound still goes, alone
    failed = threading.Event()
    took = threading.Event()

    def landing() -> None:
        backlog.take(10, failed.is_set)
        took.set()

    # Given 150 bytes out, a landing thread that wants 10 more waits
    t = threading.Thread(target=landing, daemon=True)
    t.start()
    assert not took.wait(0.3)
    # When the writer gives back what it wrote, the landing thread goes on
    backlog.give(150)
    assert took.wait(10)
    t.join(10)
    # And a landing thread waiting on a writer that failed is let go (nothing comes back)
    took.clear()
    backlog.give(10)
    backlog.take(95, lambda: False)
    t = threading.Thread(target=landing, daemon=True)
    t.start()
    assert not took.wait(0.3)
    failed.set()
    backlog.give(0)  # (the failing writer's notify)
    assert took.wait(10)


def test_the_store_lists_partial_and_ready_layers_sorted_and_an_empty_store_none(tmp_path: Path) -> None:
    # Given a store with no layers folder yet, then layers of two algorithms, one partial
    store = ContentStore(tmp_path / "root")
    assert store.list_layers() == [] and next(store.layout.layer_digests(), None) is None
    for digest in ("sha256:" + "b" * 64, "sha512:" + "a" * 128, "sha256:" + "a" * 64):
        store.layout.layer_fs(digest).mkdir(parents=True)
    # Then both listings have all three, the store's in order
    assert store.list_layers() == ["sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha512:" + "a" * 128]
    assert sorted(store.layout.layer_digests()) == store.list_layers()
