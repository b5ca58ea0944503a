"""An image whose config copies another image's diff_ids is refused end to end (issue 13 item 1).

Chain IDs, which name the snapshots containerd reuses, are built from diff_ids.  An
image listing a popular base image's diff_ids over its own layers (with a zTOC, so they
land by spans) must fail the layer, and leave neither a chain record that would point
the base image's chain at its tree nor an image record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prewarm.imagebuild import BuiltImage, Layer, TarEntry, blob_path, build_image
from tests.images import mixed_bytes, simple_image
from tests.pipeline_helpers import clean_env, prewarm, push
from tests.services import Registry

SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20)}


def _write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path(layout, digest).write_bytes(data)
    return digest, len(data)


def with_diff_ids(image: BuiltImage, diff_ids: list[str]) -> None:
    """Rewrite the image's config (and so its manifest and tag) to list ``diff_ids``."""
    index_path = image.layout / "index.json"
    index = json.loads(index_path.read_text())
    desc = next(m for m in index["manifests"] if m["digest"] == image.manifest_digest)
    manifest = json.loads(blob_path(image.layout, image.manifest_digest).read_bytes())
    config = json.loads(blob_path(image.layout, manifest["config"]["digest"]).read_bytes())
    config["rootfs"]["diff_ids"] = diff_ids
    manifest["config"]["digest"], manifest["config"]["size"] = _write_blob(image.layout, json.dumps(config).encode())
    desc["digest"], desc["size"] = _write_blob(image.layout, json.dumps(manifest).encode())
    index_path.write_text(json.dumps(index))


def evil_image(layout: Path, tag: str) -> BuiltImage:
    """One layer of its own: pigz members, big enough to land by spans."""
    return build_image(layout, [Layer([TarEntry("etc", "dir", mode=0o755), TarEntry("etc/hostname", data=b"evil\n"),
                                       TarEntry("bin/payload", data=mixed_bytes(3 << 20, seed=13))],
                                      "pigz", member_size=1 << 20)], tag=tag)


def test_an_image_copying_a_base_images_diff_ids_is_refused(tmp_path: Path, registry: Registry) -> None:
    # Given a popular base image, and an image whose one layer is its own but whose config lists
    # the base image's bottom diff_id
    popular = simple_image(tmp_path / "popular")
    popular_ref = push(popular, registry, "diffid/popular")
    base_diff_id = popular.layers[0].diff_id
    evil = evil_image(tmp_path / "evil", "evil")
    with_diff_ids(evil, [base_diff_id])
    evil_ref = push(evil, registry, "diffid/evil")
    layer = evil.layers[0].digest
    env = clean_env(tmp_path / "store", **SPANS)
    store = tmp_path / "store"
    # When it is pre-warmed by spans (zTOC built)
    proc = prewarm("schedule", evil_ref, "--wait", "--json", "--index", "build", "--insecure-registry",
                   registry.host, env=env)
    # Then the job fails that layer with an error naming the diff_id, without a traceback
    assert proc.returncode == 8, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["state"] == "failed"
    errors = summary["nodes"][next(iter(summary["nodes"]))]["errors"]
    assert list(errors) == [layer]
    assert "diff_id" in errors[layer] and base_diff_id in errors[layer], errors[layer]
    # And the layer is not ready, no chain record names the base image's chain, no image record exists
    assert not (store / "layers" / "sha256" / layer.split(":")[1] / "ready").exists()
    chain = store / "chains" / "sha256" / f"{base_diff_id.split(':')[1]}.json"
    assert not chain.exists()
    assert not list((store / "images").glob("*.json")) if (store / "images").exists() else True
    assert json.loads(prewarm("images", "--json", env=env, check=True).stdout) == []
    # And the base image itself still pre-warms, its chain pointing at its own layer
    prewarm("schedule", popular_ref, "--wait", "--insecure-registry", registry.host, env=env, check=True)
    assert json.loads(chain.read_text())["layer_digest"] == popular.layers[0].digest


def test_a_ready_layer_reused_under_another_diff_id_writes_no_chain(tmp_path: Path, registry: Registry) -> None:
    # Given a layer made ready honestly (its own image, its own diff_id)
    popular = simple_image(tmp_path / "popular")
    base_diff_id = popular.layers[0].diff_id
    honest = evil_image(tmp_path / "honest", "honest")
    env = clean_env(tmp_path / "store", **SPANS)
    prewarm("schedule", push(honest, registry, "diffid/honest"), "--wait", "--index", "build",
            "--insecure-registry", registry.host, env=env, check=True)
    # When an image lists that very layer under the popular base image's diff_id
    liar = evil_image(tmp_path / "liar", "liar")
    with_diff_ids(liar, [base_diff_id])
    proc = prewarm("schedule", push(liar, registry, "diffid/liar"), "--wait", "--index", "build",
                   "--insecure-registry", registry.host, env=env)
    # Then it is refused naming both diff_ids, and the base image's chain is not recorded
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert base_diff_id in proc.stderr and honest.layers[0].diff_id in proc.stderr, proc.stderr
    assert not (tmp_path / "store" / "chains" / "sha256" / f"{base_diff_id.split(':')[1]}.json").exists()
    listed = json.loads(prewarm("images", "--json", env=env, check=True).stdout)
    assert [i["name"] for i in listed] == [f"{registry.host}/diffid/honest:honest"]
