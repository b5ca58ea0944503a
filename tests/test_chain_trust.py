"""Chain records serve only what the store verified (issue 13 item 1, issue 21 item 2).

The attack: an image whose config copies a popular base image's diff_ids, with its own
layers.  Registering its chains would point the popular chain at the attacker's tree, and
the shim would serve that tree to every later pull of the real base image.  Here the
store holds both layers as the pipeline leaves them (``ready`` written at commit, naming
the diff_id the layer's stream really hashed to); the checks are on what the chain
records and the shim then do.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from prewarm.errors import SnapshotExists, StoreError
from prewarm.runtime.snapshot.overlay import OverlaySnapshotter
from prewarm.runtime.snapshot.prewarmed import lookup_chain, register_chains
from prewarm.runtime.snapshot.snapshotter import (
    LABEL_CRI_LAYER_DIGEST,
    LABEL_PREWARMED_LAYER,
    LABEL_SNAPSHOT_REF,
)
from prewarm.store.layout import Layout, chain_ids
from tests.containerd import HandmadeLayer, install_prewarmed, make_layer, write_layer_fs

NS = "default"


def _put(layout: Layout, layer: HandmadeLayer, proven_diff_id: str | None) -> None:
    """A layer committed in the store; its ready record proves ``proven_diff_id``."""
    write_layer_fs(layout.layer_fs(layer.digest), layer.files)
    layout.layer_ready(layer.digest).write_text(json.dumps({"digest": layer.digest, "diff_id": proven_diff_id}))


def _recompressed(layer: HandmadeLayer) -> HandmadeLayer:
    """The same tar in another gzip blob: another layer digest, the same diff_id."""
    blob = gzip.compress(gzip.decompress(layer.blob), compresslevel=1, mtime=1)
    return HandmadeLayer(files=layer.files, blob=blob, digest="sha256:" + hashlib.sha256(blob).hexdigest(),
                         diff_id=layer.diff_id)


def test_a_claimed_diff_id_that_the_layer_does_not_prove_is_refused(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    # Given the real base image pre-warmed, and the attacker's layer committed with its own diff_id
    popular = make_layer({"etc/os-release": b"ubuntu\n"})
    (chain,) = install_prewarmed(tmp_path, [popular])
    evil = make_layer({"etc/os-release": b"evil\n"})
    _put(layout, evil, evil.diff_id)
    # When the attacker's image registers its layer under the popular diff_id
    with pytest.raises(StoreError, match="proves"):
        register_chains(layout, [evil.digest], [popular.diff_id])
    # Then the popular chain still serves the popular tree
    served = lookup_chain(layout, chain)
    assert served is not None and served.layer_digest == popular.digest


def test_a_chain_record_is_never_overwritten_by_another_layer(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    # Given a chain served from a verified layer, and the same tree in another blob, also verified
    base = make_layer({"etc/a": b"a\n"})
    (chain,) = install_prewarmed(tmp_path, [base])
    again = _recompressed(base)
    _put(layout, again, again.diff_id)
    # When the second blob registers the same chain
    assert register_chains(layout, [again.digest], [again.diff_id]) == [chain]
    # Then the record still names the first layer
    assert json.loads(layout.chain(chain).read_text())["layer_digest"] == base.digest
    # And once the first layer is gone, the second may take the chain over
    layout.layer_ready(base.digest).unlink()
    register_chains(layout, [again.digest], [again.diff_id])
    assert lookup_chain(layout, chain).layer_digest == again.digest  # type: ignore[union-attr]


def test_a_record_that_its_layer_does_not_prove_is_never_served(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    # Given a chain record written behind the store's back (or by an older prewarm that did not
    # check): the popular chain pointing at a layer whose commit proves another diff_id
    popular = make_layer({"etc/os-release": b"ubuntu\n"})
    evil = make_layer({"etc/os-release": b"evil\n"})
    _put(layout, evil, evil.diff_id)
    (chain,) = chain_ids([popular.diff_id])
    layout.chain(chain).parent.mkdir(parents=True, exist_ok=True)
    layout.chain(chain).write_text(json.dumps({"chain_id": chain, "parent": None, "diff_id": popular.diff_id,
                                               "layer_digest": evil.digest}))
    # Then lookup_chain does not serve it, and neither does the shim
    assert lookup_chain(layout, chain) is None
    sn = OverlaySnapshotter(tmp_path)
    try:
        mounts = sn.prepare(NS, "extract", "", {LABEL_SNAPSHOT_REF: chain})
        assert mounts and sn.stat(NS, "extract").labels.get(LABEL_PREWARMED_LAYER) is None
    finally:
        sn.close()


def test_the_shim_serves_the_blob_containerd_names_or_nothing(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    base = make_layer({"etc/a": b"a\n"})
    (chain,) = install_prewarmed(tmp_path, [base])
    again = _recompressed(base)
    sn = OverlaySnapshotter(tmp_path)
    try:
        # When containerd asks for the chain naming a blob the store does not hold
        m = sn.prepare(NS, "x1", "", {LABEL_SNAPSHOT_REF: chain, LABEL_CRI_LAYER_DIGEST: again.digest})
        # Then it prepares normally (containerd fetches and applies that blob itself)
        assert m and sn.stat(NS, "x1").kind.name == "ACTIVE"
        sn.remove(NS, "x1")
        # When that blob is pre-warmed too, and proves the chain's diff_id
        _put(layout, again, again.diff_id)
        with pytest.raises(SnapshotExists):
            sn.prepare(NS, "x2", "", {LABEL_SNAPSHOT_REF: chain, LABEL_CRI_LAYER_DIGEST: again.digest})
        # Then the chain is served from that very blob
        assert sn.stat(NS, chain).labels[LABEL_PREWARMED_LAYER] == again.digest
        sn.remove(NS, chain)
        # And the label naming the record's own blob serves it as before
        with pytest.raises(SnapshotExists):
            sn.prepare(NS, "x3", "", {LABEL_SNAPSHOT_REF: chain, LABEL_CRI_LAYER_DIGEST: base.digest})
        assert sn.stat(NS, chain).labels[LABEL_PREWARMED_LAYER] == base.digest
    finally:
        sn.close()
