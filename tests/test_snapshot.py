"""The overlay snapshotter as a library: metadata, mounts, usage, cleanup, the handshake.

containerd's conformance suite (test_snapshotter_conformance.py) covers the common
contract through gRPC; these cover what it does not: restarts, namespaces, usage,
cleanup of orphans, the pre-warmed layers and the chain records.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prewarm.errors import (
    FailedPrecondition,
    InvalidSnapshotRequest,
    SnapshotExists,
    SnapshotNotFound,
    StoreError,
)
from prewarm.runtime.snapshot.filters import matches_any, parse_filter, parse_filters
from prewarm.runtime.snapshot.overlay import OverlaySnapshotter
from prewarm.runtime.snapshot.prewarmed import lookup_chain, register_chains
from prewarm.runtime.snapshot.snapshotter import (
    LABEL_PREWARMED_LAYER,
    LABEL_SNAPSHOT_REF,
    Info,
    Kind,
    Mount,
)
from prewarm.store.layout import Layout
from tests.containerd import WHITEOUT, install_prewarmed, make_layer

NS = "default"


@pytest.fixture()
def sn(tmp_path: Path) -> OverlaySnapshotter:
    snapshotter = OverlaySnapshotter(tmp_path)
    yield snapshotter
    snapshotter.close()


def committed(sn: OverlaySnapshotter, name: str, parent: str = "", files: dict[str, bytes] | None = None) -> None:
    """Prepare, write ``files`` into the upper dir, commit as ``name``."""
    mounts = sn.prepare(NS, name + "-active", parent)
    upper = _upper(mounts)
    for path, data in (files or {}).items():
        (upper / path).write_bytes(data)
    sn.commit(NS, name, name + "-active")


def _upper(mounts: list[Mount]) -> Path:
    m = mounts[0]
    if m.type == "bind":
        return Path(m.source)
    return Path(next(o for o in m.options if o.startswith("upperdir="))[len("upperdir="):])


# === filters


@pytest.mark.parametrize("text, expected", [
    ("kind==active", [(("kind",), "==", "active")]),
    ('labels."containerd.io/gc.root"==x', [(("labels", "containerd.io/gc.root"), "==", "x")]),
    ("labels.l", [(("labels", "l"), "", "")]),
    ('parent!="",name==a', [(("parent",), "!=", ""), (("name",), "==", "a")]),
    ("name~=/^a-.*$/", [(("name",), "~=", "^a-.*$")]),
    ('labels."containerd.io/snapshot.ref"==sha256:ab,parent=="x/1/y"',
     [(("labels", "containerd.io/snapshot.ref"), "==", "sha256:ab"), (("parent",), "==", "x/1/y")]),
])
def test_filters_parse_containerd_syntax(text: str, expected: list[tuple[tuple[str, ...], str, str]]) -> None:
    # Given a filter as containerd sends it / When parsed / Then each selector is as written
    assert [(s.fieldpath, s.operator, s.value) for s in parse_filter(text)] == expected


@pytest.mark.parametrize("text", ["kind==", "==x", 'labels."unterminated', "kind==a b", "name~=/(/"])
def test_bad_filters_are_invalid_requests(text: str) -> None:
    with pytest.raises(InvalidSnapshotRequest, match="snapshot filter"):
        parse_filter(text)


def test_filter_semantics_any_filter_all_selectors() -> None:
    # Given a committed base and an active child with a label
    base = Info(name="base", kind=Kind.COMMITTED)
    child = Info(name="child", kind=Kind.ACTIVE, parent="base", labels={"l": "2"})

    def names(*filters: str) -> list[str]:
        parsed = parse_filters(list(filters))
        return [i.name for i in (base, child) if matches_any(parsed, i)]

    # Then: no filter = all; "," = AND; several filters = OR; != holds for absent labels;
    # parent=="" finds the base (parent is always present, as in containerd)
    assert names() == ["base", "child"]
    assert names("kind==active,labels.l==2") == ["child"]
    assert names("kind==committed", "labels.l") == ["base", "child"]
    assert names("labels.l!=2") == ["base"]
    assert names('parent==""') == ["base"]
    assert names("labels.l==3") == []


# === lifecycle errors and mounts


def test_lifecycle_errors_name_the_snapshot(sn: OverlaySnapshotter) -> None:
    # Given a committed base with an active child and a view
    committed(sn, "base")
    sn.prepare(NS, "child", "base")
    sn.view(NS, "v", "base")

    # Then each misuse raises the error containerd expects, naming the snapshot
    with pytest.raises(SnapshotExists, match="'child'"):
        sn.prepare(NS, "child", "base")
    with pytest.raises(SnapshotExists, match="'base'"):
        sn.view(NS, "base")
    with pytest.raises(SnapshotNotFound, match="'nope'"):
        sn.prepare(NS, "x", "nope")
    with pytest.raises(InvalidSnapshotRequest, match="'child' is a active"):
        sn.prepare(NS, "x", "child")
    with pytest.raises(FailedPrecondition, match="'v' is view"):
        sn.commit(NS, "c", "v")
    with pytest.raises(FailedPrecondition, match="parent of"):
        sn.remove(NS, "base")
    with pytest.raises(FailedPrecondition, match="committed and has no mounts"):
        sn.mounts(NS, "base")
    with pytest.raises(SnapshotNotFound):
        sn.remove(NS, "nope")
    with pytest.raises(InvalidSnapshotRequest, match="'parent'"):
        sn.update(NS, sn.stat(NS, "child"), ["parent"])
    with pytest.raises(InvalidSnapshotRequest, match="longer than 4096"):
        sn.prepare(NS, "big", "", {"k": "v" * 5000})
    # And nothing half-made stays on disk after the failures
    assert not [p for p in sn.dirs.iterdir() if not p.name.isdigit()]


def test_mounts_follow_containerds_overlay_snapshotter(sn: OverlaySnapshotter) -> None:
    # Given two committed layers
    committed(sn, "l1")
    committed(sn, "l2", "l1")

    def fs(key: str) -> str:
        with sn.meta.transaction() as txn:
            return sn._fs(txn.get(NS, key).id)

    l1, l2 = fs("l1"), fs("l2")

    # Then: parentless active = rw bind; view of one parent = ro bind of that parent;
    # active on two = overlay with upper/work and lowers nearest first; view on two = lowers only
    assert sn.prepare(NS, "a0") == [Mount("bind", fs("a0"), ("rw", "rbind"))]
    assert sn.view(NS, "v1", "l1") == [Mount("bind", l1, ("ro", "rbind"))]
    active = sn.prepare(NS, "a2", "l2")[0]
    assert active.type == "overlay" and active.options[-1] == f"lowerdir={l2}:{l1}"
    assert f"upperdir={fs('a2')}" in active.options
    assert any(o.startswith("workdir=") for o in active.options)
    view = sn.view(NS, "v2", "l2")[0]
    assert view.type == "overlay" and view.options == ("index=off", f"lowerdir={l2}:{l1}")
    # And Mounts answers the same as Prepare did
    assert sn.mounts(NS, "a2") == [active]


def test_update_labels_and_timestamps(sn: OverlaySnapshotter) -> None:
    # Given an active snapshot with labels and a clock we control
    ticks = iter(range(1_000, 10_000, 1_000))
    sn._clock = lambda: next(ticks)
    sn.prepare(NS, "a", "", {"keep": "1", "drop": "2"})
    before = sn.stat(NS, "a")
    assert before.created_ns == before.updated_ns == 1_000

    # When one label is set and one removed through field paths
    after = sn.update(NS, Info(name="a", kind=Kind.VIEW, parent="ignored", labels={"new": "n"}),
                      ["labels.new", "labels.drop"])

    # Then only labels changed, and updated moved while created did not
    assert after.labels == {"keep": "1", "new": "n"}
    assert (after.kind, after.parent, after.created_ns, after.updated_ns) == (Kind.ACTIVE, "", 1_000, 2_000)


# === durability, namespaces, usage, cleanup


def test_state_survives_reopening_and_namespaces_are_apart(tmp_path: Path) -> None:
    # Given snapshots with the same key in two namespaces
    sn = OverlaySnapshotter(tmp_path)
    sn.prepare("default", "same", "", {"ns": "default"})
    committed(sn, "base")
    sn.prepare("k8s.io", "same", "", {"ns": "k8s"})
    sn.close()

    # When the snapshotter is opened again (a shim restart)
    again = OverlaySnapshotter(tmp_path)

    # Then everything is still there, each namespace seeing only its own
    assert again.stat("default", "same").labels == {"ns": "default"}
    assert again.stat("k8s.io", "same").labels == {"ns": "k8s"}
    assert again.stat("default", "base").kind == Kind.COMMITTED
    with pytest.raises(SnapshotNotFound):
        again.stat("k8s.io", "base")
    assert [i.name for i in again.walk("k8s.io")] == ["same"]
    again.close()


def test_usage_live_for_active_frozen_at_commit(sn: OverlaySnapshotter) -> None:
    # Given an active snapshot with a 64 KiB file in its upper dir
    upper = _upper(sn.prepare(NS, "a"))
    (upper / "data").write_bytes(b"x" * 65536)

    # Then its usage counts the file now (bytes in blocks, and two inodes: dir and file)
    live = sn.usage(NS, "a")
    assert live.size >= 65536 and live.inodes == 2

    # When it is committed and its directory changes behind our back
    sn.commit(NS, "c", "a")
    (upper / "more").write_bytes(b"y" * 65536)

    # Then the committed usage is the one measured at commit
    assert sn.usage(NS, "c") == live


def test_cleanup_removes_only_what_no_snapshot_owns(sn: OverlaySnapshotter) -> None:
    # Given a snapshot and leftovers of a crash: a half-made dir, a half-removed one, a stray id
    sn.prepare(NS, "a")
    owned = {p.name for p in sn.dirs.iterdir()}
    for leftover in ("new-abc123", "rm-7", "999"):
        (sn.dirs / leftover / "fs").mkdir(parents=True)
    (sn.dirs / "stray-file").write_text("x")

    # When cleanup runs
    sn.cleanup()

    # Then only the owned directory remains
    assert {p.name for p in sn.dirs.iterdir()} == owned


# === pre-warmed layers


def test_prepare_with_ref_of_prewarmed_layer_commits_the_store_layer(sn: OverlaySnapshotter) -> None:
    # Given two layers pre-warmed in the store (the second whiting out a file of the first)
    base = make_layer({"etc/a": b"a\n", "etc/gone": b"g\n"})
    top = make_layer({"etc/gone": WHITEOUT, "etc/b": b"b\n"})
    c0, c1 = install_prewarmed(sn.layout.root, [base, top])

    # When containerd prepares each with its chain ID in containerd.io/snapshot.ref
    with pytest.raises(SnapshotExists, match="pre-warmed"):
        sn.prepare(NS, "extract-1 " + c0, "", {LABEL_SNAPSHOT_REF: c0, "containerd.io/gc.root": "x"})
    with pytest.raises(SnapshotExists):
        sn.prepare(NS, "extract-2 " + c1, c0, {LABEL_SNAPSHOT_REF: c1})

    # Then committed snapshots named by chain ID exist, labels kept, pointing into the store
    info = sn.stat(NS, c1)
    assert (info.kind, info.parent) == (Kind.COMMITTED, c0)
    assert info.labels[LABEL_SNAPSHOT_REF] == c1 and info.labels[LABEL_PREWARMED_LAYER] == top.digest
    assert sn.stat(NS, c0).labels["containerd.io/gc.root"] == "x"
    with pytest.raises(SnapshotNotFound):
        sn.stat(NS, "extract-1 " + c0)
    view = sn.view(NS, "v", c1)[0]
    lowers = view.options[-1][len("lowerdir="):].split(":")
    assert [os.path.realpath(p) for p in lowers] == [str(sn.layout.layer_fs(top.digest)),
                                                     str(sn.layout.layer_fs(base.digest))]
    # And usage is measured on demand from the store's files (etc/, etc/a, etc/gone and the root)
    # and remembered
    first = sn.usage(NS, c0)
    assert first.inodes == 4 and first.size > 0
    (sn.layout.layer_fs(base.digest) / "etc/later").write_bytes(b"l")
    assert sn.usage(NS, c0) == first

    # And removing them never touches the store's layers
    sn.remove(NS, "v")
    sn.remove(NS, c1)
    sn.remove(NS, c0)
    assert (sn.layout.layer_fs(base.digest) / "etc/a").read_bytes() == b"a\n"


def test_prepare_falls_back_when_layer_not_ready_or_parent_differs(sn: OverlaySnapshotter) -> None:
    # Given a pre-warmed chain whose layer then loses its ready file, and another layer
    base = make_layer({"etc/a": b"a\n"})
    other = make_layer({"etc/o": b"o\n"})
    (c0,) = install_prewarmed(sn.layout.root, [base])
    (o0,) = install_prewarmed(sn.layout.root, [other])
    committed(sn, "unrelated")
    sn.layout.layer_ready(base.digest).unlink()

    # When containerd prepares them: not ready, and under a parent the chain does not have
    m1 = sn.prepare(NS, "extract-1", "", {LABEL_SNAPSHOT_REF: c0})
    m2 = sn.prepare(NS, "extract-2", "unrelated", {LABEL_SNAPSHOT_REF: o0})

    # Then both are ordinary active snapshots for containerd to apply into
    assert m1[0].type == "bind" and m2[0].type == "overlay"
    assert sn.stat(NS, "extract-1").kind == Kind.ACTIVE
    assert sn.stat(NS, "extract-2").kind == Kind.ACTIVE
    with pytest.raises(SnapshotNotFound):
        sn.stat(NS, o0)


def test_parent_unpacked_by_containerd_is_recognised_by_its_ref_label(sn: OverlaySnapshotter) -> None:
    # Given a base layer containerd unpacked itself (named after its own key, ref label set)
    base = make_layer({"etc/a": b"a\n"})
    top = make_layer({"etc/b": b"b\n"})
    c0, c1 = install_prewarmed(sn.layout.root, [base, top])
    sn.layout.layer_ready(base.digest).unlink()
    sn.prepare(NS, "default/1/extract", "", {LABEL_SNAPSHOT_REF: c0})
    sn.commit(NS, "default/2/" + c0, "default/1/extract", {LABEL_SNAPSHOT_REF: c0})

    # When the second layer, pre-warmed, is prepared on it
    with pytest.raises(SnapshotExists):
        sn.prepare(NS, "default/3/extract", "default/2/" + c0, {LABEL_SNAPSHOT_REF: c1})

    # Then it is committed under containerd's parent name
    assert sn.stat(NS, c1).parent == "default/2/" + c0


def test_chain_records_round_trip_and_refuse_bad_input(tmp_path: Path) -> None:
    # Given layers in the store with ready files
    layout = Layout(tmp_path)
    base, top = make_layer({"a": b"1"}), make_layer({"b": b"2"})
    c0, c1 = install_prewarmed(tmp_path, [base, top])

    # Then each chain ID reads back with its parent, layer and fs
    layer = lookup_chain(layout, c1)
    assert layer is not None
    assert (layer.parent, layer.diff_id, layer.layer_digest, layer.fs) == (
        c0, top.diff_id, top.digest, layout.layer_fs(top.digest))
    assert lookup_chain(layout, c0).parent is None  # type: ignore[union-attr]
    assert not list(layout.chains_dir().rglob(".tmp-*"))
    # And unknown, malformed or unready chains are simply absent
    assert lookup_chain(layout, "sha256:" + "0" * 64) is None
    assert lookup_chain(layout, "not-a-digest") is None
    layout.chain(c0).write_text("{broken")
    assert lookup_chain(layout, c0) is None
    # And the writer refuses mismatched or malformed input, saying what to pass
    with pytest.raises(StoreError, match="one diff_id per layer"):
        register_chains(layout, [base.digest], [])
    with pytest.raises(StoreError, match="not a digest"):
        register_chains(layout, ["latest"], [base.diff_id])
