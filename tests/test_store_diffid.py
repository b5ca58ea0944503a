"""The span path commits a layer only under the diff_id its decompressed stream hashes to.

The attack this guards against: an image whose config copies a popular base image's
diff_ids, with its own layers (and a SOCI index for them).  Chain IDs, which name the
snapshots containerd reuses, are built from diff_ids, so a layer committed under a
diff_id that is not its own would put the attacker's tree under the base image's chain.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from prewarm.errors import BadSpan, DiffIdMismatch, DigestMismatch, StoreError
from prewarm.index.ztoc import Ztoc, parse_ztoc, serialize_ztoc
from prewarm.index.ztoc_build import build_tar_ztoc
from prewarm.store.content import ContentStore
from tests.test_store import assert_every_kind_tree, every_kind_tar, sha
from tests.test_store_spans import fetch_and_inflate, land, make_layer, pax_heavy_tar

REPO = Path(__file__).resolve().parent.parent
BIG = 200_000
#: The diff_id of some other layer: what a config copying a popular base image would list.
POPULAR = sha(b"a popular base image's layer tar")
CRASH_BIG = 1_500_000


def _order(how: str, n: int) -> list[int]:
    order = list(range(n))
    if how == "reversed":
        order.reverse()
    elif how == "shuffled":
        random.Random(n).shuffle(order)
    return order


def _layer(members: int, padding: int, span_size: int = 16384, big: int = BIG) -> tuple[bytes, Ztoc, str]:
    """A gzip layer of every entry kind with ``padding`` zeros after the tar's own record padding."""
    tar = every_kind_tar(big) + bytes(padding)
    blob, z = make_layer(tar, members=members, span_size=span_size)
    assert gzip.decompress(blob) == tar
    assert z.uncompressed_archive_size < len(tar), "no bytes after the archive end to test"
    return blob, z, sha(tar)


CASES = [("in-order", 1, 0), ("shuffled", 1, 0), ("reversed", 1, 40_000), ("shuffled", 3, 0),
         ("shuffled", 3, 40_000), ("in-order", 3, 40_000)]


@pytest.mark.parametrize("how,members,padding", CASES)
def test_a_wrong_diff_id_is_refused_at_commit(tmp_path: Path, how: str, members: int, padding: int) -> None:
    # Given a layer whose spans are fine but an image config that lists another layer's diff_id
    blob, z, _ = _layer(members, padding)
    digest = sha(blob)
    store = ContentStore(tmp_path / "root")
    order = _order(how, z.num_spans)
    # When every span lands, Then the last one is refused naming the layer and both diff_ids
    land(store, digest, z, blob, order[:-1], diff_id=POPULAR)
    with pytest.raises(DigestMismatch, match="diff_id") as caught:
        land(store, digest, z, blob, order[-1:], diff_id=POPULAR)
    assert digest in str(caught.value) and POPULAR in str(caught.value)
    assert caught.value.expected == POPULAR and caught.value.actual == sha(gzip.decompress(blob))
    # And nothing of the layer is left to be trusted
    assert not store.is_ready(digest) and store.layer_state(digest) == "absent"


@pytest.mark.parametrize("how,members,padding", CASES)
def test_the_right_diff_id_commits_and_is_recorded(tmp_path: Path, how: str, members: int, padding: int) -> None:
    blob, z, diff_id = _layer(members, padding)
    digest = sha(blob)
    store = ContentStore(tmp_path / "root")
    assert land(store, digest, z, blob, _order(how, z.num_spans), diff_id=diff_id)[-1] is True
    assert store.ready_info(digest)["diff_id"] == diff_id
    assert_every_kind_tree(store.layout.layer_fs(digest), BIG)


@pytest.mark.parametrize("how", ["in-order", "shuffled"])
def test_a_last_span_landed_without_its_padding_is_inflated_again(tmp_path: Path, how: str) -> None:
    # Given a worker that drops the zero padding after the archive end (inflate_span's default)
    blob, z, diff_id = _layer(1, 40_000)
    digest = sha(blob)
    store = ContentStore(tmp_path / "root")
    # When it lands every span, Then the store still hashes the whole stream
    assert land(store, digest, z, blob, _order(how, z.num_spans), diff_id=diff_id, keep_padding=False)[-1]
    assert store.ready_info(digest)["diff_id"] == diff_id


def test_without_a_diff_id_the_computed_one_is_recorded(tmp_path: Path) -> None:
    blob, z, diff_id = _layer(3, 40_000)
    store = ContentStore(tmp_path / "root")
    land(store, sha(blob), z, blob, _order("shuffled", z.num_spans))
    assert store.ready_info(sha(blob))["diff_id"] == diff_id


@pytest.mark.parametrize("right", [True, False])
def test_an_uncompressed_layer_has_its_digest_as_diff_id(tmp_path: Path, right: bool) -> None:
    tar = pax_heavy_tar() + bytes(20_000)
    z = build_tar_ztoc([tar], span_size=3000, build_tool_identifier="prewarm-test")
    store = ContentStore(tmp_path / "root")
    order = _order("shuffled", z.num_spans)
    if right:
        assert land(store, sha(tar), z, tar, order, diff_id=sha(tar))[-1] is True
        assert store.ready_info(sha(tar))["diff_id"] == sha(tar)
        return
    land(store, sha(tar), z, tar, order[:-1], diff_id=POPULAR)
    with pytest.raises(DigestMismatch, match=POPULAR):
        land(store, sha(tar), z, tar, order[-1:], diff_id=POPULAR)
    assert store.layer_state(sha(tar)) == "absent"


def test_a_second_config_naming_another_diff_id_is_refused(tmp_path: Path) -> None:
    # Given a layer being landed for its own diff_id
    blob, z, diff_id = _layer(1, 0)
    digest = sha(blob)
    land(ContentStore(tmp_path / "root"), digest, z, blob, [0], diff_id=diff_id)
    # When another process prepares it for another image whose config names another diff_id
    other = ContentStore(tmp_path / "root")
    with pytest.raises(DigestMismatch, match=POPULAR):
        other.prepare_layer(digest, z, diff_id=POPULAR)
    # Then the layer still commits under its own
    assert land(other, digest, z, blob, list(range(1, z.num_spans)), diff_id=diff_id)[-1] is True
    assert other.ready_info(digest)["diff_id"] == diff_id


def test_a_layer_prepared_without_diff_id_takes_the_first_one_claimed(tmp_path: Path) -> None:
    # Given a layer prepared (and partly landed) with no diff_id, then claimed for a wrong one
    blob, z, _ = _layer(1, 0)
    digest = sha(blob)
    land(ContentStore(tmp_path / "root"), digest, z, blob, [0, 2])
    store = ContentStore(tmp_path / "root")
    store.prepare_layer(digest, z, diff_id=POPULAR)
    # When the rest lands, Then the claim is checked, not ignored
    with pytest.raises(DigestMismatch, match=POPULAR):
        land(store, digest, z, blob, [i for i in range(z.num_spans) if i not in (0, 2)])
    assert store.layer_state(digest) == "absent"


def test_padding_that_is_not_zeros_or_not_last_is_refused(tmp_path: Path) -> None:
    blob, z, _ = _layer(1, 0)
    store = ContentStore(tmp_path / "root")
    store.prepare_layer(sha(blob), z)
    data, out = fetch_and_inflate(z, blob, z.num_spans - 1)
    with pytest.raises(BadSpan, match="not zero padding"):
        store.land_span(sha(blob), z, z.num_spans - 1, data, out + b"\x01")
    data, out = fetch_and_inflate(z, blob, 1)
    with pytest.raises(BadSpan, match="expected"):
        store.land_span(sha(blob), z, 1, data, out + bytes(1))


def test_a_partial_layer_from_an_older_hash_record_restarts(tmp_path: Path) -> None:
    # Given a partial layer whose state predates the diff_id hash (no "inorder" format)
    blob, z, diff_id = _layer(1, 0)
    digest = sha(blob)
    store = ContentStore(tmp_path / "root")
    land(store, digest, z, blob, [0, 1], diff_id=diff_id)
    state_path = store.layout.layer_work(digest) / "state.json"
    state = json.loads(state_path.read_text())
    del state["inorder"]
    state_path.write_text(json.dumps(state))
    # When a fresh process prepares it, Then it starts from zero and still commits
    fresh = ContentStore(tmp_path / "root")
    fresh.prepare_layer(digest, z, diff_id=diff_id)
    assert fresh.missing_spans(digest, z) == list(range(z.num_spans))
    assert land(fresh, digest, z, blob, list(range(z.num_spans)), diff_id=diff_id)[-1] is True


# A worker process landing spans for a diff_id; SIGKILLs itself inside span number
# ``die_at`` (after its data is written, or after both hashes advanced but before its
# landed byte is set).
CHILD = r"""
import os, signal, sys
from pathlib import Path
from prewarm.store.content import ContentStore
from prewarm.index.ztoc import parse_ztoc
from tests.test_store_spans import land

root, blob_path, ztoc_path, diff_id, die, die_at, *order = sys.argv[1:]
blob, z = Path(blob_path).read_bytes(), parse_ztoc(Path(ztoc_path).read_bytes())
digest = "sha256:" + __import__("hashlib").sha256(blob).hexdigest()
store = ContentStore(root)
count = 0

def killer(method):
    def wrapped(*a, **kw):
        result = method(*a, **kw)
        if count == int(die_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped

setattr(store, die, killer(getattr(store, die)))
for i in order:
    land(store, digest, z, blob, [int(i)], diff_id=diff_id)
    count += 1
"""


@pytest.fixture(scope="module")
def pigz_layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes, str]:
    d = tmp_path_factory.mktemp("layer")
    blob, z, diff_id = _layer(3, 40_000, span_size=65536, big=CRASH_BIG)
    (d / "blob").write_bytes(blob)
    (d / "ztoc").write_bytes(serialize_ztoc(z))
    return d / "blob", d / "ztoc", blob, diff_id


@pytest.mark.parametrize("die,die_at,wrong", [("_hash_or_spool", 5, False), ("_write_pieces", 7, False),
                                              ("_hash_or_spool", 9, True)])
def test_a_crash_mid_layer_then_resume_still_checks_the_diff_id(tmp_path: Path, pigz_layer, die: str,  # type: ignore[no-untyped-def]
                                                                die_at: int, wrong: bool) -> None:
    blob_path, ztoc_path, blob, right = pigz_layer
    diff_id = POPULAR if wrong else right
    z = parse_ztoc(ztoc_path.read_bytes())
    digest = sha(blob)
    order = _order("shuffled", z.num_spans)
    # Given a worker killed part-way through an out-of-order layer (some spans spooled, some hashed)
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(blob_path), str(ztoc_path), diff_id, die,
                           str(die_at), *map(str, order)], cwd=REPO, timeout=120, check=False)
    assert proc.returncode == -9
    store = ContentStore(root)
    assert store.layer_state(digest) == "partial"
    missing = store.missing_spans(digest, z)
    assert z.num_spans >= 12 and order[die_at] in missing and len(missing) == z.num_spans - die_at
    # When another process lands what is missing
    if wrong:
        with pytest.raises(DigestMismatch, match=POPULAR):
            land(store, digest, z, blob, missing, diff_id=diff_id)
        assert store.layer_state(digest) == "absent"
        return
    # Then the layer commits under its real diff_id, with the right tree
    assert land(store, digest, z, blob, missing, diff_id=diff_id)[-1] is True
    assert store.ready_info(digest)["diff_id"] == right
    assert_every_kind_tree(store.layout.layer_fs(digest), CRASH_BIG)


def test_a_spooled_span_that_no_longer_inflates_is_a_clear_error(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Given span 2 spooled (it came early, with no ring slot for its inflated output), then
    # its spooled bytes overwritten
    from prewarm.store import inorder

    monkeypatch.setattr(inorder, "RING_SLOTS", 0)
    blob, z, diff_id = _layer(1, 0)
    digest = sha(blob)
    store = ContentStore(tmp_path / "root")
    land(store, digest, z, blob, [2], diff_id=diff_id)
    s = z.span(2)
    with open(store.layout.layer_work(digest) / "spool", "r+b") as f:
        f.seek(s.compressed_start)
        f.write(b"\xff" * (s.compressed_end - s.compressed_start))
    # When the spans before it land and the in-order hash reaches it, Then the store says so
    land(store, digest, z, blob, [0])
    with pytest.raises(StoreError, match="no longer inflates"):
        land(store, digest, z, blob, [1])
    assert not store.is_ready(digest)


@pytest.mark.parametrize("what", ["ring", "spool"])
def test_a_parked_span_whose_bytes_changed_fails_the_layer_at_commit(tmp_path: Path, what: str) -> None:
    # Given span 2 parked (it came early: compressed in the spool, inflated in the ring),
    # then the one or the other overwritten
    blob, z, diff_id = _layer(1, 0)
    digest = sha(blob)
    store = ContentStore(tmp_path / "root")
    land(store, digest, z, blob, [2], diff_id=diff_id)
    work = store.layout.layer_work(digest)
    assert (work / "ring").exists()
    s = z.span(2)
    if what == "ring":  # span 2's slot: the ring ends with it (slots 0 and 1 are unwritten)
        at = (work / "ring").stat().st_size - len(fetch_and_inflate(z, blob, 2)[1]) + 100
    else:
        at = s.compressed_start + 10
    with open(work / what, "r+b") as f:
        f.seek(at)
        f.write(b"\xff" * 64)
    # When every span is in, Then the layer is refused and wiped: the diff_id (ring) or the
    # layer digest (spool) does not match
    with pytest.raises(DigestMismatch) as info:
        land(store, digest, z, blob, [i for i in range(z.num_spans) if i != 2])
    assert type(info.value) is (DiffIdMismatch if what == "ring" else DigestMismatch)
    assert store.layer_state(digest) == "absent"
