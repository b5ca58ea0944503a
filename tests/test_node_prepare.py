"""Preparing span layers ahead (node.prepare), and waiting for a Redis to answer (fleet.broker).

Both are shared by the embedded run and the workers; the stores and the redis-server here
are real.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

import pytest
import redis

from prewarm.errors import BadZtoc, PrewarmError
from prewarm.fleet.broker import wait_until_answers
from prewarm.fleet.plan import LayerPlan
from prewarm.index.ztoc import Ztoc
from prewarm.node.prepare import prepare_layers_ahead
from prewarm.store.content import ContentStore
from tests.services import _require
from tests.test_store import every_kind_tar, sha
from tests.test_store_spans import header_dense_tar, make_layer


class _Recording(ContentStore):
    """A real store that remembers in which order layers were prepared."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.order: list[str] = []

    def prepare_layer(self, digest: str, ztoc, **kw) -> bool:  # type: ignore[no-untyped-def,override]
        self.order.append(digest)
        return super().prepare_layer(digest, ztoc, **kw)


def _span_layer(blob: bytes, z: Ztoc, name: str) -> LayerPlan:
    return LayerPlan(sha(blob), len(blob), "application/vnd.oci.image.layer.v1.tar+gzip", sha(name.encode()),
                     "spans", z.num_spans, ztoc_digest=sha(b"ztoc-" + name.encode()), num_files=len(z.files))


def test_span_layers_are_prepared_largest_toc_first_and_failures_are_left_to_their_tasks(
        tmp_path: Path) -> None:
    # Given a plan with a small-TOC layer, a large-TOC layer, a whole layer, a layer whose zTOC
    # cannot be loaded, and a layer another process is preparing (its lock is held)
    small_blob, small = make_layer(every_kind_tar(big=1000), span_size=65536)
    large_blob, large = make_layer(header_dense_tar(300), span_size=65536)
    held_blob, held = make_layer(header_dense_tar(50), span_size=65536)
    layers = [_span_layer(small_blob, small, "small"), _span_layer(large_blob, large, "large"),
              LayerPlan(sha(b"whole"), 5, "application/vnd.oci.image.layer.v1.tar", sha(b"w"), "whole", 1),
              _span_layer(b"no-ztoc", small, "broken"), _span_layer(held_blob, held, "held")]
    ztocs = {layers[0].ztoc_digest: small, layers[1].ztoc_digest: large, layers[4].ztoc_digest: held}

    def load(digest: str) -> Ztoc:
        if digest not in ztocs:
            raise BadZtoc(f"zTOC {digest} does not parse")
        return ztocs[digest]

    store = _Recording(tmp_path / "root")
    lock = store.layout.layer_lock(layers[4].digest)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        # When they are prepared ahead
        prepared = prepare_layers_ahead(store, layers, load)
    finally:
        os.close(fd)
    # Then the largest TOC went first, the held layer was tried without waiting, and
    # nothing was raised for the zTOC that failed
    assert len(large.files) > len(held.files) > 0 and len(large.files) > len(small.files)
    assert store.order[0] == layers[1].digest and set(store.order) == {layers[i].digest for i in (0, 1, 4)}
    assert prepared == [d for d in store.order if d != layers[4].digest]
    assert store.layer_state(layers[0].digest) == store.layer_state(layers[1].digest) == "partial"
    assert store.layer_state(layers[4].digest) == store.layer_state(layers[3].digest) == "absent"
    # And a layer that is no longer absent is not prepared again
    store.order.clear()
    assert prepare_layers_ahead(store, layers[:2], load) == [] and store.order == []


def test_waiting_for_redis_returns_once_a_starting_server_answers(tmp_path: Path) -> None:
    # Given a redis-server started just now on a unix socket (not there yet)
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen([_require("redis-server"), "--port", "0", "--unixsocket", str(sock),
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(unix_socket_path=str(sock))
        # When we wait for it, Then it answers afterwards
        wait_until_answers(client, what="test redis", timeout=20)
        assert client.ping()
        # And an ``alive`` check that fails is raised at once, before any ping
        with pytest.raises(PrewarmError, match="gone"):
            wait_until_answers(client, what="test redis", timeout=20,
                               alive=lambda: (_ for _ in ()).throw(PrewarmError("gone")))
    finally:
        proc.kill()
        proc.wait()


def test_waiting_for_a_redis_that_never_answers_names_it(tmp_path: Path) -> None:
    # Given a socket where no Redis will ever listen
    client = redis.Redis(unix_socket_path=str(tmp_path / "nobody.sock"))
    # When we wait for it, Then it fails after the timeout, naming what it waited for (the
    # ping that is under way then finishes first: redis-py retries a refused connection
    # for ~3 s on its own)
    start = time.monotonic()
    with pytest.raises(PrewarmError, match=r"nobody's redis did not answer within 0.3s"):
        wait_until_answers(client, what="nobody's redis", timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 30
