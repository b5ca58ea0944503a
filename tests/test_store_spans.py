"""ContentStore span path: out-of-order landing, header checks, in-order hash, lying zTOCs."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import random
import threading
import time
from pathlib import Path

import pytest

from prewarm.errors import (
    BadSpan,
    BadZtoc,
    DigestMismatch,
    InsufficientSpace,
    PrewarmError,
    StoreError,
    UnsafeArchive,
)
from prewarm.index.inflate import inflate_span
from prewarm.index.ztoc import CHECKPOINT_RECORD_SIZE, ZINFO_HEADER_SIZE, Ztoc, parse_ztoc
from prewarm.index.ztoc_build import build_ztoc
from prewarm.store import ingest, writeback
from prewarm.store.content import ContentStore, fetch_range
from tests.test_store import _add, assert_every_kind_tree, every_kind_tar, sha

GOLDEN = ["basic-l0", "basic-l9", "empty", "hdr-name", "incompressible-l0-s16384", "many-l6-s4096", "meta",
          "multi-basic", "single", "text-l6-s4096"]


def make_layer(tar: bytes, *, span_size: int = 16384, members: int = 1, level: int = 6) -> tuple[bytes, Ztoc]:
    """A gzip layer (optionally pigz-style members) and its zTOC from our builder."""
    cut = [len(tar) * k // members for k in range(members + 1)]
    blob = b"".join(gzip.compress(tar[a:b], compresslevel=level, mtime=0) for a, b in itertools.pairwise(cut))
    z = build_ztoc([blob[i:i + 65536] for i in range(0, len(blob), 65536)], span_size=span_size,
                   build_tool_identifier="prewarm-test")
    return blob, z


def fetch_and_inflate(z: Ztoc, blob: bytes, i: int, *, keep_padding: bool = True) -> tuple[bytes, bytes]:
    """What a worker does before landing: fetch the span's range, inflate it with the window checks.

    The last span keeps the zero padding after the archive end (the diff_id covers it),
    as prewarm.node.warm does, unless ``keep_padding`` is False.
    """
    s = z.span(i)
    lo, hi = fetch_range(s)
    data = blob[lo:hi]
    body = data[len(data) - (s.compressed_end - s.compressed_start):]
    assert sha(body) == s.digest
    nxt = z.checkpoint(i + 1).window if i + 1 < z.num_spans and s.checkpoint else None
    last = i == z.num_spans - 1
    return data, inflate_span(s, body, next_window=nxt, is_last=last, keep_padding=keep_padding and last)


def land(store: ContentStore, digest: str, z: Ztoc, blob: bytes, order: list[int], *, diff_id: str | None = None,
         keep_padding: bool = True) -> list[bool]:
    results = []
    for i in order:
        store.prepare_layer(digest, z, diff_id=diff_id)
        data, out = fetch_and_inflate(z, blob, i, keep_padding=keep_padding)
        results.append(bool(store.land_span(digest, z, i, data, out)))
    return results


@pytest.mark.parametrize("members", [1, 3])
def test_spans_out_of_order_make_the_verified_tree(tmp_path: Path, members: int) -> None:
    # Given a layer of every entry kind split into many spans (some checkpoints with bits != 0)
    tar = every_kind_tar()
    blob, z = make_layer(tar, members=members)
    assert z.num_spans >= 5
    assert any(bits for _, _, bits in z.checkpoint_offsets()), "no checkpoint with bits != 0 to test"
    digest = sha(blob)
    store = ContentStore(tmp_path / "root")
    order = list(range(z.num_spans))
    random.Random(members).shuffle(order)
    # When the spans land in random order
    ready = land(store, digest, z, blob, order)
    # Then the layer becomes ready with the last span only, and the tree is right
    assert ready == [False] * (len(order) - 1) + [True]
    assert_every_kind_tree(store.layout.layer_fs(digest))
    info = store.ready_info(digest)
    assert info["size"] == len(blob) and info["spans"] == z.num_spans and info["mode"] == "spans"
    assert not store.layout.layer_work(digest).exists()


def test_duplicate_landing_changes_nothing(tmp_path: Path) -> None:
    tar = every_kind_tar(100_000)
    blob, z = make_layer(tar)
    digest = sha(blob)
    store = ContentStore(tmp_path / "root")
    store.prepare_layer(digest, z)
    store.prepare_layer(digest, z)  # idempotent
    land(store, digest, z, blob, [2, 0, 2, 0])
    assert store.missing_spans(digest, z) == [i for i in range(z.num_spans) if i not in (0, 2)]
    assert store.span_landed(digest, 2) and not store.span_landed(digest, 1)
    data, out = fetch_and_inflate(z, blob, 2)
    assert store.land_span(digest, z, 2, data, out).landed_now is False
    assert land(store, digest, z, blob, store.missing_spans(digest, z))[-1] is True
    assert store.land_span(digest, z, 1, *fetch_and_inflate(z, blob, 1)).ready
    assert_every_kind_tree(store.layout.layer_fs(digest), 100_000)


def test_span_zero_must_bring_the_gzip_header(tmp_path: Path) -> None:
    blob, z = make_layer(every_kind_tar(10_000))
    store = ContentStore(tmp_path / "root")
    store.prepare_layer(sha(blob), z)
    data, out = fetch_and_inflate(z, blob, 0)
    with pytest.raises(BadSpan, match="gzip header"):
        store.land_span(sha(blob), z, 0, data[z.span(0).compressed_start:], out)


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_soci_ztocs_land(tmp_path: Path, shared_dir: Path, name: str) -> None:
    # Given soci's own zTOC for a layer (its TOC is what our header check compares with)
    fixtures = shared_dir / "fixtures/soci-ztoc"
    entry = next(e for e in json.loads((fixtures / "manifest.json").read_text()) if e["name"] == name)
    blob = (fixtures / entry["input"]).read_bytes()
    z = parse_ztoc((fixtures / f"{name}.ztoc").read_bytes())
    store = ContentStore(tmp_path / "root")
    # When every span lands, last first
    land(store, sha(blob), z, blob, list(reversed(range(z.num_spans))))
    # Then the layer is ready and holds each regular file's bytes from the tar
    assert store.is_ready(sha(blob))
    tar = gzip.decompress(blob)
    fs = store.layout.layer_fs(sha(blob))
    for f in z.files:
        if f.type == "reg" and not f.name.rsplit("/", 1)[-1].startswith(".wh."):
            path = fs / f.name.lstrip("./")
            want = tar[f.uncompressed_offset:f.uncompressed_offset + f.uncompressed_size]
            assert path.read_bytes() == want, f.name


def _patched_window(z: Ztoc, i: int) -> Ztoc:
    blob = bytearray(z.checkpoints_blob)
    at = ZINFO_HEADER_SIZE + i * CHECKPOINT_RECORD_SIZE + 17 + 32000
    blob[at:at + 16] = bytes(b ^ 0x5A for b in blob[at:at + 16])
    return Ztoc(version=z.version, build_tool_identifier=z.build_tool_identifier,
                compressed_archive_size=z.compressed_archive_size,
                uncompressed_archive_size=z.uncompressed_archive_size, files=z.files,
                compression=z.compression, span_digests=z.span_digests, checkpoints_blob=bytes(blob))


def _with_files(z: Ztoc, files: list) -> Ztoc:  # type: ignore[type-arg]
    return Ztoc(version=z.version, build_tool_identifier=z.build_tool_identifier,
                compressed_archive_size=z.compressed_archive_size,
                uncompressed_archive_size=z.uncompressed_archive_size, files=files,
                compression=z.compression, span_digests=z.span_digests, checkpoints_blob=z.checkpoints_blob)


def test_lying_window_ends_in_error_not_a_tree(tmp_path: Path) -> None:
    # Given a zTOC whose checkpoint 3 window is wrong (its span digests still match)
    blob, good = make_layer(every_kind_tar())
    z = _patched_window(good, 3)
    digest = sha(blob)
    store = ContentStore(tmp_path / "root")
    # When span 3 (inflated with the bad window) lands first, it is accepted or refused...
    try:
        land(store, digest, z, blob, [3])
    except (BadZtoc, BadSpan):
        pass
    # ...but span 2's window check catches the lie, and the layer never becomes ready
    with pytest.raises(BadSpan, match="window"):
        land(store, digest, z, blob, [2])
    rest = [i for i in range(z.num_spans) if i not in (2, 3)]
    for i in rest:
        try:
            land(store, digest, z, blob, [i])
        except (BadZtoc, BadSpan):
            pass
    assert not store.is_ready(digest)


@pytest.mark.parametrize("lie", ["offset", "size", "name", "mode", "dropped-last", "dropped-middle", "uid"])
def test_lying_toc_ends_in_error(tmp_path: Path, lie: str) -> None:
    # Given a zTOC whose TOC disagrees with the tar headers in one way
    blob, z = make_layer(every_kind_tar(), span_size=65536)
    files = list(z.files)
    k = next(i for i, f in enumerate(files) if f.name == "usr/bin/sg")
    f = files[k]
    if lie == "offset":
        files[k] = dataclasses.replace(f, uncompressed_offset=f.uncompressed_offset + 512)
    elif lie == "size":
        files[k] = dataclasses.replace(f, uncompressed_size=f.uncompressed_size + 1)
    elif lie == "name":
        files[k] = dataclasses.replace(f, name="usr/bin/sgx")
    elif lie == "mode":
        files[k] = dataclasses.replace(f, mode=0o755)
    elif lie == "uid":
        files[k] = dataclasses.replace(f, uid=1234)
    elif lie == "dropped-last":
        files.pop()
    else:
        files.pop(k)
    liar = _with_files(z, files)
    store = ContentStore(tmp_path / "root")
    digest = sha(blob)
    # When every span is landed, Then a BadZtoc names the problem and the layer is not ready
    errors = []
    for i in range(z.num_spans):
        try:
            land(store, digest, liar, blob, [i])
        except BadZtoc as err:
            errors.append(str(err))
    assert errors and all(digest in e for e in errors)
    assert not store.is_ready(digest)


def test_wrong_layer_digest_is_never_ready(tmp_path: Path) -> None:
    # Given spans that are fine but a layer digest they do not hash to
    blob, z = make_layer(every_kind_tar(50_000))
    wrong = sha(blob + b"\0")
    store = ContentStore(tmp_path / "root")
    # When the last span lands, Then DigestMismatch names the layer, and the layer is discarded
    with pytest.raises(DigestMismatch, match=wrong):
        land(store, wrong, z, blob, list(range(z.num_spans)))
    assert store.layer_state(wrong) == "absent"


def test_hostile_toc_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    # A TOC claiming a 1 PB file, and a layer writing through its own symlink to outside
    blob, z = make_layer(every_kind_tar(10_000))
    files = list(z.files)
    files[1] = dataclasses.replace(files[1], uncompressed_size=1 << 50)
    store = ContentStore(tmp_path / "root")
    with pytest.raises(BadZtoc, match="outside the"):
        store.prepare_layer(sha(blob), _with_files(z, files))
    assert not store.layout.layer_fs(sha(blob)).exists()

    outside = tmp_path / "outside"
    outside.mkdir()
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "a", data=b"ok")
        _add(tf, "link", tarfile.SYMTYPE, linkname=str(outside))
        _add(tf, "link/evil", data=b"pwned")
    blob2, z2 = make_layer(buf.getvalue())
    with pytest.raises(UnsafeArchive, match="link/evil"):
        store.prepare_layer(sha(blob2), z2)
    assert list(outside.iterdir()) == [] and not store.layout.layer_fs(sha(blob2)).exists()


def test_layer_larger_than_the_disk_is_refused_before_creating_it(tmp_path: Path) -> None:
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        blob, z = make_layer(every_kind_tar(2_000_000))
        store = ContentStore(mnt / "root")
        with pytest.raises(InsufficientSpace, match="bytes free"):
            store.prepare_layer(sha(blob), z)
        assert store.layer_state(sha(blob)) == "absent"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def pax_heavy_tar() -> bytes:
    """Entries whose header chains are 3+ blocks (PAX path + xattr), so many cross span boundaries."""
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(40):
            _add(tf, f"dir-{i:02d}/" + "n" * (120 + i), data=bytes([i]) * (700 + 37 * i),
                 pax={"SCHILY.xattr.user.k": "v" * (300 + 20 * i)})
    return buf.getvalue()


@pytest.mark.parametrize("seed", [1, 2])
def test_uncompressed_layer_checks_chains_across_span_boundaries(tmp_path: Path, seed: int) -> None:
    # Given an uncompressed layer (no windows) whose PAX header chains straddle span boundaries
    from prewarm.index.ztoc_build import build_tar_ztoc
    tar = pax_heavy_tar()
    z = build_tar_ztoc([tar], span_size=3000, build_tool_identifier="prewarm-test")
    straddling = [k for k in range(z.num_spans - 1)
                  if any(_chain_crosses(z, f_prev, f, z.span(k).uncompressed_end)
                         for f_prev, f in zip(z.files, z.files[1:]))]
    assert straddling, "no header chain crosses a span boundary"
    store = ContentStore(tmp_path / "root")
    order = list(range(z.num_spans))
    random.Random(seed).shuffle(order)
    # When the spans land in any order, Then the layer is ready with the right files
    assert land(store, sha(tar), z, tar, order)[-1] is True
    fs = store.layout.layer_fs(sha(tar))
    for i in range(40):
        assert (fs / (f"dir-{i:02d}/" + "n" * (120 + i))).read_bytes() == bytes([i]) * (700 + 37 * i)


def _chain_crosses(z: Ztoc, prev, f, boundary: int) -> bool:  # type: ignore[no-untyped-def]
    start = prev.uncompressed_offset + -(-prev.uncompressed_size // 512) * 512
    return start < boundary < f.uncompressed_offset


@pytest.mark.parametrize("first", ["tail", "head"])
def test_lie_in_a_straddling_chain_is_caught_whichever_span_lands_first(tmp_path: Path, first: str) -> None:
    from prewarm.index.ztoc_build import build_tar_ztoc
    tar = pax_heavy_tar()
    z = build_tar_ztoc([tar], span_size=3000, build_tool_identifier="prewarm-test")
    files = list(z.files)
    # Given a lie about an entry whose chain crosses the boundary after span b
    b, k = next((b, k) for b in range(z.num_spans - 1) for k in range(1, len(files))
                if _chain_crosses(z, files[k - 1], files[k], z.span(b).uncompressed_end))
    files[k] = dataclasses.replace(files[k], uid=4242)
    liar = _with_files(z, files)
    store = ContentStore(tmp_path / "root")
    order = [b, b + 1] if first == "tail" else [b + 1, b]
    land(store, sha(tar), liar, tar, [order[0]])
    # When the second of the two spans lands, Then the lie is found and the span is not landed
    with pytest.raises(BadZtoc, match="uid=4242"):
        land(store, sha(tar), liar, tar, [order[1]])
    assert order[1] in store.missing_spans(sha(tar), liar)


def header_dense_tar(n: int = 600) -> bytes:
    """Many small entries with random names and PAX xattrs: deflate blocks end inside header chains."""
    import io
    import tarfile
    rnd = random.Random(3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(n):
            _add(tf, f"d{i % 7}/" + rnd.randbytes(60).hex(), data=rnd.randbytes(rnd.randrange(0, 300)),
                 pax={"SCHILY.xattr.user.a": rnd.randbytes(100).hex()})
    return buf.getvalue()


def test_gzip_chains_across_boundaries_are_checked_from_the_window(tmp_path: Path) -> None:
    # Given a gzip layer where header chains straddle span boundaries (within the 32 KiB window)
    tar = header_dense_tar()
    blob, z = make_layer(tar, span_size=16384)
    crossing = [(b, k) for b in range(z.num_spans - 1) for k in range(1, len(z.files))
                if _chain_crosses(z, z.files[k - 1], z.files[k], z.span(b).uncompressed_end)]
    assert len(crossing) >= 3
    store = ContentStore(tmp_path / "root")
    order = list(range(z.num_spans))
    random.Random(5).shuffle(order)
    # When all spans land, Then the layer is ready
    assert land(store, sha(blob), z, blob, order)[-1] is True
    # And a lie about a straddling entry is caught by the span its chain ends in
    b, k = crossing[1]
    files = list(z.files)
    files[k] = dataclasses.replace(files[k], name=files[k].name[:-1] + "X")
    liar = _with_files(z, files)
    other = ContentStore(tmp_path / "other")
    land(other, sha(blob), liar, blob, [b])
    with pytest.raises(BadZtoc, match="name="):
        land(other, sha(blob), liar, blob, [b + 1])


def test_a_different_toc_restarts_the_partial_layer(tmp_path: Path) -> None:
    # Given a layer partly landed under a lying TOC (one mode changed)
    blob, z = make_layer(every_kind_tar(), span_size=65536)
    files = list(z.files)
    k = next(i for i, f in enumerate(files) if f.name == "usr/bin/sg")
    files[k] = dataclasses.replace(files[k], mode=0o777)
    liar = _with_files(z, files)
    store = ContentStore(tmp_path / "root")
    land(store, sha(blob), liar, blob, [z.num_spans - 1])
    assert len(store.missing_spans(sha(blob), liar)) == z.num_spans - 1
    # When the honest zTOC arrives (another process), Then the layer starts over with it and completes
    honest = ContentStore(tmp_path / "root")
    honest.prepare_layer(sha(blob), z)
    assert honest.missing_spans(sha(blob), z) == list(range(z.num_spans))
    assert land(honest, sha(blob), z, blob, list(range(z.num_spans)))[-1] is True
    assert_every_kind_tree(honest.layout.layer_fs(sha(blob)))


@pytest.mark.parametrize("ring", [4, 0])
def test_spans_ahead_of_the_hashed_front_are_parked_inflated_not_inflated_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ring: int) -> None:
    # Given a layer of many spans, and spans landing in reverse order: every span but the
    # first is ahead of the hashed front when it lands
    from prewarm.store import inorder

    tar = every_kind_tar(400_000)
    blob, z = make_layer(tar, span_size=16384)
    assert z.num_spans > 6
    digest = sha(blob)
    store = ContentStore(tmp_path / "root")
    monkeypatch.setattr(inorder, "RING_SLOTS", ring)
    again: list[int] = []
    real = inorder.inflate_span
    monkeypatch.setattr(inorder, "inflate_span", lambda s, *a, **k: again.append(s.index) or real(s, *a, **k))
    # When they land
    ready = land(store, digest, z, blob, list(range(z.num_spans))[::-1], diff_id=sha(tar))
    # Then the layer is verified against its diff_id and its tree is right
    assert ready[-1] and store.ready_info(digest)["diff_id"] == sha(tar)
    assert_every_kind_tree(store.layout.layer_fs(digest), 400_000)
    # And only spans that were more than the ring's slots ahead were inflated a second time
    assert sorted(again) == [i for i in range(1, z.num_spans) if i >= ring]


def _failing_syncfs(fd: int) -> None:
    raise StoreError("syncfs failed: Input/output error; the layer was not committed")


def test_a_failed_early_writeback_keeps_the_layer_from_being_committed(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a layer landing span by span, whose spans start the write-back of what landed,
    # and one of those write-backs fails (the kernel reports a write-back error once, to
    # that syncfs alone, not to the commit's)
    tar = every_kind_tar()
    blob, z = make_layer(tar)
    digest = sha(blob)
    store = ContentStore(tmp_path / "root")
    monkeypatch.setattr(writeback, "syncfs", _failing_syncfs)
    assert not any(land(store, digest, z, blob, list(range(z.num_spans - 1))))
    store._writeback.join()  # the write-back the spans so far started
    monkeypatch.undo()
    work = store.layout.layer_work(digest)
    assert (work / writeback.WRITEBACK_LOCK).is_file()
    assert "Input/output error" in (work / writeback.WRITEBACK_FAILED).read_text()
    # When the last span lands (its own early write-back and the commit's syncfs succeed)
    # Then the layer is not committed: it is discarded, to be fetched again
    with pytest.raises(StoreError, match="writing it back to disk failed while it landed .*Input/output error"):
        land(store, digest, z, blob, [z.num_spans - 1])
    assert store.layer_state(digest) == "absent"
    # And landed again from the start, it is committed
    assert land(store, digest, z, blob, list(range(z.num_spans)))[-1]
    assert_every_kind_tree(store.layout.layer_fs(digest))


def test_a_failed_early_writeback_of_a_whole_layer_fails_its_ingest(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a whole layer streamed in, whose early write-backs fail
    tar = every_kind_tar()
    blob = gzip.compress(tar, mtime=0)
    monkeypatch.setattr(ingest, "WRITEBACK_EVERY", 4096)
    monkeypatch.setattr(writeback, "syncfs", _failing_syncfs)
    store = ContentStore(tmp_path / "root")
    # When it is ingested (the commit's own syncfs succeeds)
    # Then it is not committed
    with pytest.raises(StoreError, match="writing it back to disk failed while it landed .*Input/output error"):
        store.ingest_stream(sha(blob), [blob], media_type="application/vnd.oci.image.layer.v1.tar+gzip",
                            diff_id=sha(tar))
    assert store.layer_state(sha(blob)) != "ready"


def test_a_failed_ingest_leaves_no_early_writeback_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a whole layer whose stream breaks off after its first early write-back started,
    # and a write-back that takes its time (a slow disk)
    tar = every_kind_tar()
    blob = gzip.compress(tar, mtime=0)
    monkeypatch.setattr(ingest, "WRITEBACK_EVERY", 4096)
    running = threading.Event()

    def slow_syncfs(fd: int) -> None:
        running.set()
        time.sleep(0.5)

    monkeypatch.setattr(writeback, "syncfs", slow_syncfs)
    store = ContentStore(tmp_path / "root")
    # When the ingest fails (the blob's last bytes are cut off)
    with pytest.raises(PrewarmError):
        store.ingest_stream(sha(blob), [blob[:-9]], media_type="application/vnd.oci.image.layer.v1.tar+gzip",
                            diff_id=sha(tar))
    # Then the write-back had started, and had ended before the failure was raised: nothing
    # holds the removed layer's folder open
    assert running.is_set()
    assert not [t for t in threading.enumerate() if t.name == "prewarm-writeback"]
