"""ContentStore under SIGKILL and concurrency: never ready when it is not; a re-run fetches only what is missing."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from prewarm.index.ztoc import parse_ztoc, serialize_ztoc
from prewarm.store.content import ContentStore
from tests.test_store import assert_every_kind_tree, every_kind_tar, sha
from tests.test_store_spans import land, make_layer

BIG = 1_500_000
REPO = Path(__file__).resolve().parent.parent

# A worker process landing spans; ``die`` makes it SIGKILL itself at a chosen point of
# span number ``die_at`` (after its data is written, or after the layer hash advanced but
# before its landed byte is set), the two windows a crash may hit.
CHILD = r"""
import os, signal, sys
from pathlib import Path
from prewarm.store.content import ContentStore
from prewarm.index.ztoc import parse_ztoc
from tests.test_store_spans import land

root, blob_path, ztoc_path, die, die_at, *order = sys.argv[1:]
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

if die == "after-data":
    store._write_pieces = killer(store._write_pieces)
elif die == "after-hash":
    store._hash_or_spool = killer(store._hash_or_spool)
for i in order:
    land(store, digest, z, blob, [int(i)])
    count += 1
    print(f"landed {i}", flush=True)
"""


def _child(root: Path, blob: Path, ztoc: Path, die: str, die_at: int, order: list[int]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(blob), str(ztoc), die, str(die_at),
                             *map(str, order)], cwd=REPO, stdout=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes, int]:
    d = tmp_path_factory.mktemp("layer")
    blob, z = make_layer(every_kind_tar(BIG), span_size=65536)
    (d / "blob").write_bytes(blob)
    (d / "ztoc").write_bytes(serialize_ztoc(z))
    return d / "blob", d / "ztoc", blob, z.num_spans


@pytest.mark.parametrize("die", ["parent-kills", "after-data", "after-hash"])
def test_sigkill_mid_landing_then_rerun_fetches_only_missing(tmp_path: Path, layer, die: str) -> None:  # type: ignore[no-untyped-def]
    blob_path, ztoc_path, blob, n = layer
    assert n >= 12
    root = tmp_path / "root"
    order = list(range(n))
    random.Random(7).shuffle(order)  # out of order: some spans are spooled, some hashed
    # Given a worker process landing spans, killed with SIGKILL part-way
    proc = _child(root, blob_path, ztoc_path, die, 6, order)
    assert proc.stdout is not None
    reported = []
    for line in proc.stdout:
        reported.append(int(line.split()[1]))
        if die == "parent-kills" and len(reported) == 6:
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait() == -signal.SIGKILL
    store = ContentStore(root)
    digest = sha(blob)
    z = parse_ztoc(ztoc_path.read_bytes())
    # Then the layer is not ready, and every reported span is known to be in
    assert not store.is_ready(digest) and store.layer_state(digest) == "partial"
    missing = store.missing_spans(digest, z)
    assert not set(reported) & set(missing)
    assert len(missing) <= n - 6
    if die != "parent-kills":
        assert order[6] in missing  # killed inside span 7's landing: it must be fetched again
    # When a re-run lands exactly the missing spans
    results = land(store, digest, z, blob, missing)
    # Then the layer is ready after the last of them and the tree is right
    assert results[-1] is True and store.is_ready(digest)
    assert_every_kind_tree(store.layout.layer_fs(digest), BIG)


def test_two_processes_land_concurrently(tmp_path: Path, layer) -> None:  # type: ignore[no-untyped-def]
    # Given two worker processes landing interleaved halves (and a shared span) at once
    blob_path, ztoc_path, blob, n = layer
    root = tmp_path / "root"
    a = _child(root, blob_path, ztoc_path, "never", -1, list(range(0, n, 2)) + [1])
    b = _child(root, blob_path, ztoc_path, "never", -1, list(reversed(range(1, n, 2))))
    assert a.wait() == 0 and b.wait() == 0
    # Then the layer is ready exactly once with the right tree
    store = ContentStore(root)
    assert store.is_ready(sha(blob))
    assert_every_kind_tree(store.layout.layer_fs(sha(blob)), BIG)


def test_partial_layer_from_an_earlier_boot_restarts(tmp_path: Path, layer) -> None:  # type: ignore[no-untyped-def]
    _, ztoc_path, blob, n = layer
    z = parse_ztoc(ztoc_path.read_bytes())
    digest = sha(blob)
    store = ContentStore(tmp_path / "root")
    land(store, digest, z, blob, [0, 1, 5])
    assert len(store.missing_spans(digest, z)) == n - 3
    # Given the partial layer's state says another boot (unsynced page cache may be lost)
    state_path = store.layout.layer_work(digest) / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "boot_id": "an-earlier-boot"}))
    # When a fresh process prepares it, Then it starts from zero
    fresh = ContentStore(tmp_path / "root")
    fresh.prepare_layer(digest, z)
    assert fresh.missing_spans(digest, z) == list(range(n))
    assert land(fresh, digest, z, blob, list(range(n)))[-1] is True


def test_a_span_landing_while_another_process_commits_the_layer(tmp_path: Path, layer) -> None:  # type: ignore[no-untyped-def]
    # Given two stores (two worker processes) on one root, both having prepared the layer
    _, ztoc_path, blob, n = layer
    z = parse_ztoc(ztoc_path.read_bytes())
    digest = sha(blob)
    first = ContentStore(tmp_path / "root")

    class Interleaved(ContentStore):
        """Lets the first process land everything and commit while this one writes its span."""

        committed = False

        def _write_pieces(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super()._write_pieces(*args, **kwargs)
            if not Interleaved.committed:
                Interleaved.committed = True
                assert land(first, digest, z, blob, list(range(n)))[-1] is True

    late = Interleaved(tmp_path / "root")
    first.prepare_layer(digest, z)
    late.prepare_layer(digest, z)
    # When the late process lands a (duplicate) span and the layer is committed meanwhile
    result = land(late, digest, z, blob, [1])[-1]
    # Then it is told the layer is ready, not that the layer vanished
    assert Interleaved.committed and result is True
    assert_every_kind_tree(first.layout.layer_fs(digest), BIG)
