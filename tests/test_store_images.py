"""The store against the test image catalogue: odd layers match umoci's rootfs; hostile layers stay contained."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from prewarm.errors import UnsafeArchive
from prewarm.imagebuild import BuiltLayer, build_layer, init_layout
from prewarm.index.ztoc_build import build_tar_ztoc, build_ztoc
from prewarm.store.content import ContentStore
from tests.images import HOSTILE_ATTACKS, hostile_layers, odd_image
from tests.rootfs import overlay_mount, umoci_unpack
from tests.test_store_spans import land
from tests.treecompare import compare_trees

SPAN = 1 << 20


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def _chunks(data: bytes) -> list[bytes]:
    return [data[i:i + SPAN] for i in range(0, len(data), SPAN)]


def _land_by_spans(store: ContentStore, layer: BuiltLayer, blob: bytes, seed: int) -> None:
    """The span path: zTOC built from the blob, spans landed in random order."""
    if layer.compression == "uncompressed":
        z = build_tar_ztoc(_chunks(blob), span_size=SPAN, build_tool_identifier="prewarm-test")
    else:
        z = build_ztoc(_chunks(blob), span_size=SPAN, build_tool_identifier="prewarm-test")
    order = list(range(z.num_spans))
    random.Random(seed).shuffle(order)
    store.prepare_layer(layer.digest, z, diff_id=layer.diff_id)
    assert land(store, layer.digest, z, blob, order)[-1] is True


def test_odd_image_through_both_paths_equals_umoci_unpack(tmp_path: Path) -> None:
    # Given the odd image (every compression and entry kind, whiteouts over lower layers)
    built = odd_image(tmp_path / "layout")
    spans_store, whole_store = ContentStore(tmp_path / "spans"), ContentStore(tmp_path / "whole")
    # When each layer goes through the span path (zstd: streamed) and, separately, the whole path
    for i, layer in enumerate(built.layers):
        blob = _blob(built.layout, layer.digest)
        if layer.compression == "zstd":
            spans_store.ingest_stream(layer.digest, _chunks(blob), media_type=layer.media_type,
                                      diff_id=layer.diff_id)
        else:
            _land_by_spans(spans_store, layer, blob, seed=i)
        whole_store.ingest_stream(layer.digest, _chunks(blob), media_type=layer.media_type, diff_id=layer.diff_id)
    # Then both stores' layers, overlay-mounted newest first, equal umoci's unpacked rootfs
    rootfs = umoci_unpack(built.layout, built.tag, tmp_path / "umoci")
    for name, store in (("spans", spans_store), ("whole", whole_store)):
        lowers = [store.layout.layer_fs(layer.digest) for layer in reversed(built.layers)]
        with overlay_mount(lowers, tmp_path / f"merged-{name}") as merged:
            assert compare_trees(merged, rootfs) == [], name


OUTSIDE_CANDIDATES = ("x", "outside", "outside-file", "hl", "file")


def _outside_files(tmp_path: Path, root: Path) -> set[Path]:
    """Every file under tmp_path that is not inside a layer's fs/ (or the source layout)."""
    out = set()
    for dirpath, _, files in os.walk(tmp_path):
        d = Path(dirpath)
        if "fs" in d.relative_to(tmp_path).parts or "layout" in d.relative_to(tmp_path).parts:
            continue
        out |= {d / f for f in files if f in OUTSIDE_CANDIDATES}
    return out


@pytest.mark.parametrize("path", ["whole", "spans"])
@pytest.mark.parametrize("attack", HOSTILE_ATTACKS)
def test_hostile_layers_never_write_outside(tmp_path: Path, attack: str, path: str) -> None:
    # Given a crafted layer from the catalogue and the places it aims at
    layout = tmp_path / "layout"
    init_layout(layout)
    layer = build_layer(layout, hostile_layers()[attack])
    blob = _blob(layout, layer.digest)
    store = ContentStore(tmp_path / "root")
    watched = [Path("/tmp/outside"), Path("/tmp/outside-victim"), Path("/etc/x"), Path("/x")]
    before = {p: p.exists() for p in watched}
    passwd_links = os.stat("/etc/passwd").st_nlink
    # When it is stored
    try:
        if path == "whole":
            store.ingest_stream(layer.digest, _chunks(blob), media_type=layer.media_type, diff_id=layer.diff_id)
        else:
            _land_by_spans(store, layer, blob, seed=1)
        refused = False
    except UnsafeArchive as err:
        refused = True
        assert "tar entry" in str(err)
    # Then it was refused (or, for a file replacing a symlink, contained) and nothing outside changed
    if attack == "symlink-overwrite":
        victim = store.layout.layer_fs(layer.digest) / "victim"
        assert not refused and victim.is_file() and not victim.is_symlink()
    else:
        assert refused and not store.is_ready(layer.digest)
    assert {p: p.exists() for p in watched} == before
    assert os.stat("/etc/passwd").st_nlink == passwd_links
    assert _outside_files(tmp_path, store.root) == set()
