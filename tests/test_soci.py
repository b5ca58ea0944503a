"""SOCI index manifests: soci's JSON shape, push + discovery (v1 fallback tag, v2), and `prewarm index`."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from prewarm.cli import main
from prewarm.errors import BadZtoc
from prewarm.index.soci import (
    ANN_IMAGE_MANIFEST_DIGEST,
    ANN_INDEX_DIGEST,
    EMPTY_CONFIG,
    EMPTY_CONFIG_DIGEST,
    SOCI_INDEX_V1,
    SOCI_INDEX_V2,
    find_soci_index,
    parse_soci_index,
    push_soci_index,
    soci_index_manifest,
)
from prewarm.index.tarindex import TarIndexer
from prewarm.index.ztoc import parse_ztoc, serialize_ztoc
from prewarm.index.ztoc_build import build_ztoc
from prewarm.resolve.digest import sha256_digest, verify
from prewarm.resolve.manifest import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    index_json,
    manifest_json,
)
from prewarm.resolve.reference import parse_reference
from prewarm.resolve.registry.client import RegistryClient, referrers_tag
from tests.registry_images import push_image
from tests.services import Registry

L1, L2, Z1 = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "a" * 64


@pytest.fixture()
def client(registry: Registry, tmp_path: Path) -> RegistryClient:
    return RegistryClient(insecure_registries=frozenset({registry.host}), docker_config=tmp_path)


def test_empty_config_digest() -> None:
    assert sha256_digest(EMPTY_CONFIG) == EMPTY_CONFIG_DIGEST


def test_index_json_is_what_soci_writes() -> None:
    # Given one indexed layer and the image manifest as subject
    layer = Descriptor(OCI_LAYER_GZIP, L1, 12345)
    subject = Descriptor(OCI_MANIFEST, L2, 999)
    body = soci_index_manifest([(layer, Z1, 777)], 4194304, "AWS SOCI CLI v0.2", subject)
    # Then the bytes are soci's: compact, Go field order, annotations sorted, config {} of type v1
    assert body == (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        '"config":{"mediaType":"application/vnd.amazon.soci.index.v1+json",'
        '"digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},'
        f'"layers":[{{"mediaType":"application/octet-stream","digest":"{Z1}","size":777,'
        f'"annotations":{{"com.amazon.soci.image-layer-digest":"{L1}",'
        '"com.amazon.soci.image-layer-mediaType":"application/vnd.oci.image.layer.v1.tar+gzip",'
        '"com.amazon.soci.span-size":"4194304"}}],'
        f'"subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{L2}","size":999}},'
        '"annotations":{"com.amazon.soci.build-tool-identifier":"AWS SOCI CLI v0.2"}}'
    ).encode()
    parsed = parse_soci_index(body, sha256_digest(body))
    assert parsed.version == "v1" and parsed.subject == subject
    assert parsed.ztoc_for_layer(L1) is not None and parsed.ztoc_for_layer(L1).digest == Z1  # type: ignore[union-attr]
    assert parsed.ztoc_for_layer(L2) is None


def test_push_and_discover_v1(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    # Given an image of three layers and zTOC bytes for two of them
    img = push_image(client, registry.host, repo_name, "v1", [{"a": b"1"}, {"b": b"2"}, {"c": b"3"}])
    resolved = client.resolve(parse_reference(f"{registry.host}/{repo_name}:v1"))
    assert find_soci_index(client, resolved) is None
    ztocs = {img.layer_digests[2]: b"ztoc-of-c", img.layer_digests[0]: b"ztoc-of-a"}
    # When a SOCI index is pushed
    digest = push_soci_index(client, resolved, ztocs, 65536, "prewarm-test")
    # Then discovery (through the sha256-<hex> fallback tag) finds it, zTOCs in layer order
    found = find_soci_index(client, resolved)
    assert found is not None and found.digest == digest and found.version == "v1"
    assert [d.annotations["com.amazon.soci.image-layer-digest"] for d in found.ztocs] == \
        [img.layer_digests[0], img.layer_digests[2]]
    assert found.ztoc_for_layer(img.layer_digests[1]) is None
    for layer, data in ztocs.items():
        desc = found.ztoc_for_layer(layer)
        assert desc is not None and client.get_blob(registry.host, repo_name, desc.digest) == data
    assert found.build_tool_identifier == "prewarm-test" and found.subject == resolved.manifest_descriptor
    # And the fallback tag entry carries the artifact type, the image is unchanged
    tag_index = json.loads(client.get_manifest(registry.host, repo_name, referrers_tag(img.manifest_digest))[0])
    assert tag_index["manifests"][0]["artifactType"] == SOCI_INDEX_V1
    assert client.get_manifest(registry.host, repo_name, "v1")[2] == img.manifest_digest
    # And zTOCs for layers the image does not have are refused
    with pytest.raises(BadZtoc, match="not layers of"):
        push_soci_index(client, resolved, {"sha256:" + "9" * 64: b"x"}, 65536, "t")


def _push_v2_index(client: RegistryClient, registry: Registry, repo: str, layer: Descriptor) -> str:
    client.push_blob(registry.host, repo, EMPTY_CONFIG)
    ztoc = client.push_blob(registry.host, repo, b"v2-ztoc")
    body = soci_index_manifest([(layer, ztoc, 7)], 4194304, "soci", None, version="v2")
    return client.push_manifest(registry.host, repo, sha256_digest(body), body, OCI_MANIFEST)


def test_discover_v2_by_manifest_annotation(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    # Given a v2 SOCI index and an image manifest annotated with its digest (as soci convert writes)
    base = push_image(client, registry.host, repo_name, None, [{"a": b"1"}])
    layer = Descriptor(OCI_LAYER_GZIP, base.layer_digests[0], len(base.layers[0]))
    index_digest = _push_v2_index(client, registry, repo_name, layer)
    config = Descriptor(OCI_CONFIG, sha256_digest(base.config), len(base.config))
    body = manifest_json(config, [layer], annotations={ANN_INDEX_DIGEST: index_digest})
    client.push_manifest(registry.host, repo_name, "converted", body, OCI_MANIFEST)
    # When resolved and searched, Then the v2 index is found through the annotation
    resolved = client.resolve(parse_reference(f"{registry.host}/{repo_name}:converted"))
    found = find_soci_index(client, resolved)
    assert found is not None and found.digest == index_digest and found.version == "v2"
    assert found.ztoc_for_layer(layer.digest) is not None


def test_discover_v2_by_image_index_entry(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    # Given an image index holding the amd64 image and, beside it, its v2 SOCI index entry
    img = push_image(client, registry.host, repo_name, None, [{"a": b"1"}])
    layer = Descriptor(OCI_LAYER_GZIP, img.layer_digests[0], len(img.layers[0]))
    index_digest = _push_v2_index(client, registry, repo_name, layer)
    soci_size = len(client.get_manifest(registry.host, repo_name, index_digest)[0])
    # (the SOCI entry first: it must never be taken for the image)
    entries = [Descriptor(OCI_MANIFEST, index_digest, soci_size, platform=Platform("linux", "amd64"),
                          artifact_type=SOCI_INDEX_V2,
                          annotations={ANN_IMAGE_MANIFEST_DIGEST: img.manifest_digest}),
               Descriptor(OCI_MANIFEST, img.manifest_digest, len(img.manifest), platform=Platform("linux", "amd64"))]
    client.push_manifest(registry.host, repo_name, "multi", index_json(entries), OCI_INDEX)
    # When resolved for amd64, Then the manifest (not the SOCI index) is chosen, and the v2 index found
    resolved = client.resolve(parse_reference(f"{registry.host}/{repo_name}:multi"), "linux/amd64")
    assert resolved.manifest_digest == img.manifest_digest
    found = find_soci_index(client, resolved)
    assert found is not None and found.digest == index_digest and found.version == "v2"


# === prewarm index, end to end with real zTOCs
def _tar_gz(files: dict[str, bytes]) -> tuple[bytes, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue(), sha256_digest(raw.getvalue())


def test_index_cli_builds_pushes_and_verifies(client: RegistryClient, registry: Registry, repo_name: str,
                                              tmp_path: Path) -> None:
    import zstandard

    # Given an image with a 1.5 MB gzip layer, a tiny gzip layer, an uncompressed tar layer and a zstd layer
    rng = random.Random(7)
    text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", str(rng.random())]) for _ in range(300_000))
    big_tar, big_id = _tar_gz({"big.txt": text.encode(), "rand.bin": os.urandom(200_000)})
    small_tar, small_id = _tar_gz({"s": b"small"})
    plain_tar, plain_id = _tar_gz({"plain.bin": os.urandom(150_000)})
    zstd_tar, zstd_id = _tar_gz({"z.bin": os.urandom(150_000)})
    blobs = [(gzip.compress(big_tar, 6), OCI_LAYER_GZIP), (gzip.compress(small_tar), OCI_LAYER_GZIP),
             (plain_tar, OCI_LAYER_TAR), (zstandard.ZstdCompressor().compress(zstd_tar), OCI_LAYER_ZSTD)]
    layers = [Descriptor(mt, client.push_blob(registry.host, repo_name, b), len(b)) for b, mt in blobs]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [big_id, small_id, plain_id, zstd_id]}}).encode()
    config_desc = Descriptor(OCI_CONFIG, client.push_blob(registry.host, repo_name, config), len(config))
    client.push_manifest(registry.host, repo_name, "big", manifest_json(config_desc, layers), OCI_MANIFEST)
    image = f"{registry.host}/{repo_name}:big"

    # When `prewarm index --push` runs with a small span size and minimum layer size
    env = {"PREWARM_INSECURE_REGISTRIES": registry.host, "DOCKER_CONFIG": str(tmp_path)}
    result = CliRunner().invoke(main, ["index", image, "--span-size", "65536", "--min-layer-size", "100000",
                                       "--push", "--json", "-o", str(tmp_path / "out")], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)

    # Then the gzip and tar layers were indexed, the small and zstd ones skipped with reasons
    assert set(report["ztocs"]) == {layers[0].digest, layers[2].digest}
    assert "under the minimum layer size" in report["skipped"][layers[1].digest]
    assert "zstd" in report["skipped"][layers[3].digest]
    # And discovery finds the pushed index, whose zTOCs equal a local build from the layer bytes
    resolved = client.resolve(parse_reference(image))
    found = find_soci_index(client, resolved)
    assert found is not None and found.digest == report["soci_index"]
    gz_desc = found.ztoc_for_layer(layers[0].digest)
    assert gz_desc is not None and gz_desc.annotations["com.amazon.soci.span-size"] == "65536"
    pushed = client.get_blob(registry.host, repo_name, gz_desc.digest)
    local = serialize_ztoc(build_ztoc([blobs[0][0]], span_size=65536, build_tool_identifier="prewarm"))
    assert pushed == local == (tmp_path / "out" / f"{layers[0].digest[7:]}.ztoc").read_bytes()
    # And every span's compressed bytes, fetched by range from the registry, match the span digests
    ztoc = parse_ztoc(pushed)
    assert ztoc.num_spans > 10
    for span in ztoc.spans():
        data = client.fetch_range(registry.host, repo_name, layers[0].digest, span.compressed_start,
                                  span.compressed_end)
        verify(data, span.digest, what=f"span {span.index}")
    tar_ztoc = parse_ztoc(client.get_blob(registry.host, repo_name, found.ztoc_for_layer(layers[2].digest).digest))
    # soci's size of an uncompressed layer ends at the tar's end marker, before the record padding
    indexer = TarIndexer()
    indexer.feed(plain_tar)
    indexer.finish()
    assert tar_ztoc.compression == "uncompressed"
    assert tar_ztoc.uncompressed_archive_size == indexer.ended_at <= len(plain_tar)
    assert {f.name for f in ztoc.files} == {"big.txt", "rand.bin"}


def test_index_cli_without_push_and_bad_span(registry: Registry, repo_name: str, client: RegistryClient,
                                             tmp_path: Path) -> None:
    push_image(client, registry.host, repo_name, "t", [{"a": b"1"}])
    env = {"PREWARM_INSECURE_REGISTRIES": registry.host, "DOCKER_CONFIG": str(tmp_path)}
    result = CliRunner().invoke(main, ["index", f"{registry.host}/{repo_name}:t"], env=env)
    assert result.exit_code == 0 and "no zTOC: " in result.output and "not pushed" in result.output
    result = CliRunner().invoke(main, ["index", f"{registry.host}/{repo_name}:t", "--span-size", "0"], env=env)
    assert result.exit_code == 2 and "--span-size='0' is out of range" in result.output
