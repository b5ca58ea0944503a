"""RegistryClient against the real docker-registry: manifests, blobs, ranges, uploads, referrers."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import pytest

from prewarm.errors import (
    BlobNotFound,
    CorruptContent,
    DigestMismatch,
    ManifestNotFound,
    RangeNotHonored,
    RegistryError,
    UnsupportedManifest,
)
from prewarm.resolve.digest import sha256_digest
from prewarm.resolve.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor, Platform, host_platform
from prewarm.resolve.reference import parse_reference
from prewarm.resolve.registry.client import RegistryClient, referrers_tag
from prewarm.resolve.registry.retry import RetryPolicy
from tests.faultproxy import Fault, FaultProxy
from tests.registry_images import push_image, push_index
from tests.services import Registry

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


@pytest.fixture()
def client(registry: Registry, tmp_path: Path) -> RegistryClient:
    c = RegistryClient(insecure_registries=frozenset({registry.host}), docker_config=tmp_path, retry=FAST_RETRY)
    yield c
    c.close()


def test_blob_push_monolithic_and_get(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    # Given some bytes
    data = os.urandom(300_000)
    # When pushed monolithically and read back
    digest = client.push_blob(registry.host, repo_name, data)
    # Then the digest is the content's and the blob comes back verified
    assert digest == sha256_digest(data)
    assert client.get_blob(registry.host, repo_name, digest) == data
    assert client.blob_exists(registry.host, repo_name, digest) == len(data)


def test_blob_push_chunked_from_file_and_skip_existing(client: RegistryClient, registry: Registry,
                                                       repo_name: str, tmp_path: Path) -> None:
    # Given a file of 2.5 chunks
    data = os.urandom(2 * 65536 + 1000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    # When pushed with PATCH chunks
    digest = client.push_blob(registry.host, repo_name, path, chunk_size=65536)
    # Then the registry has exactly that blob, and its log shows three PATCH requests
    assert client.get_blob(registry.host, repo_name, digest) == data
    assert len(registry.requests_logged("PATCH", repo_name)) == 3
    # And pushing it again only asks HEAD (no new upload)
    before = len(registry.requests_logged("POST", repo_name))
    assert client.push_blob(registry.host, repo_name, data, digest=digest) == digest
    assert len(registry.requests_logged("POST", repo_name)) == before


def test_push_blob_refuses_wrong_digest(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    with pytest.raises(DigestMismatch):
        client.push_blob(registry.host, repo_name, b"abc", digest=sha256_digest(b"abd"))


def test_get_blob_not_found_and_size_limit(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    digest = client.push_blob(registry.host, repo_name, b"x" * 5000)
    with pytest.raises(BlobNotFound, match="not found"):
        client.get_blob(registry.host, repo_name, sha256_digest(b"nothing"))
    with pytest.raises(CorruptContent, match="more than the 100"):
        client.get_blob(registry.host, repo_name, digest, max_size=100)


def test_ranges_206_open_ended_and_416(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    # Given a blob of 1 MiB
    data = os.urandom(1 << 20)
    digest = client.push_blob(registry.host, repo_name, data)
    # When ranges are fetched, Then exactly those bytes come back
    assert client.fetch_range(registry.host, repo_name, digest, 0, 1) == data[:1]
    assert client.fetch_range(registry.host, repo_name, digest, 12345, 700001) == data[12345:700001]
    assert client.fetch_range(registry.host, repo_name, digest, (1 << 20) - 10) == data[-10:]
    assert client.fetch_range(registry.host, repo_name, digest, 1000, 1 << 20) == data[1000:]
    # And a range past the end is a clear RangeNotHonored
    with pytest.raises(RangeNotHonored, match="range not satisfiable"):
        client.fetch_range(registry.host, repo_name, digest, 2 << 20, 3 << 20)
    # And a range that runs over the end names the blob's size
    with pytest.raises(RangeNotHonored, match=f"blob is {1 << 20} bytes"):
        client.fetch_range(registry.host, repo_name, digest, 100, (1 << 20) + 50)
    # And the client is still usable afterwards (no stuck connection)
    assert client.fetch_range(registry.host, repo_name, digest, 5, 10) == data[5:10]


def test_stream_blob_verifies_digest(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    data = os.urandom(3 << 20)
    digest = client.push_blob(registry.host, repo_name, data)
    h = hashlib.sha256()
    with client.stream_blob(registry.host, repo_name, digest, chunk_size=1 << 18) as chunks:
        sizes = []
        for chunk in chunks:
            h.update(chunk)
            sizes.append(len(chunk))
    assert "sha256:" + h.hexdigest() == digest
    assert max(sizes) <= 1 << 18


def test_manifest_push_get_head_and_resolve(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    # Given an OCI image of two layers pushed under a tag
    img = push_image(client, registry.host, repo_name, "v1", [{"a.txt": b"hello"}, {"b.bin": os.urandom(1000)}])
    # When the manifest is read by tag and by digest
    body, media_type, digest = client.get_manifest(registry.host, repo_name, "v1")
    assert (body, media_type, digest) == (img.manifest, OCI_MANIFEST, img.manifest_digest)
    assert client.get_manifest(registry.host, repo_name, digest)[0] == img.manifest
    head = client.head_manifest(registry.host, repo_name, "v1")
    assert head is not None and head.digest == digest and head.size == len(body)
    assert client.head_manifest(registry.host, repo_name, "nope") is None
    # And resolved
    resolved = client.resolve(parse_reference(f"{registry.host}/{repo_name}:v1"))
    # Then layers, config and diff_ids are those pushed
    assert resolved.manifest_digest == img.manifest_digest
    assert [d.digest for d in resolved.layers] == img.layer_digests
    assert resolved.config_bytes == img.config
    assert resolved.diff_ids == tuple(json.loads(img.config)["rootfs"]["diff_ids"])
    assert resolved.platform == "linux/amd64"
    assert resolved.pinned.digest == img.manifest_digest


def test_docker_schema2_manifest_resolves(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    img = push_image(client, registry.host, repo_name, "d", [{"x": b"1"}], docker=True)
    resolved = client.resolve(parse_reference(f"{registry.host}/{repo_name}:d"))
    assert resolved.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert resolved.manifest_digest == img.manifest_digest
    assert resolved.layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"


def test_unknown_image_is_not_found(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    with pytest.raises(ManifestNotFound, match=f"not found: missing in {registry.host}/{repo_name}"):
        client.resolve(parse_reference(f"{registry.host}/{repo_name}:missing"))


def test_platform_selection_from_index(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    # Given an index over amd64, arm64/v8 and arm/v7 images
    amd = push_image(client, registry.host, repo_name, None, [{"amd": b"1"}])
    arm64 = push_image(client, registry.host, repo_name, None, [{"arm64": b"2"}], arch="arm64", variant="v8")
    arm7 = push_image(client, registry.host, repo_name, None, [{"arm7": b"3"}], arch="arm", variant="v7")
    index_digest = push_index(client, registry.host, repo_name, "multi", [
        (amd, Platform("linux", "amd64")), (arm64, Platform("linux", "arm64", "v8")),
        (arm7, Platform("linux", "arm", "v7"))])
    ref = parse_reference(f"{registry.host}/{repo_name}:multi")
    # When resolved for each platform, Then the matching manifest is chosen
    assert client.resolve(ref, "linux/amd64").manifest_digest == amd.manifest_digest
    assert client.resolve(ref, "linux/arm64").manifest_digest == arm64.manifest_digest
    assert client.resolve(ref, "linux/arm64/v8").manifest_digest == arm64.manifest_digest
    got = client.resolve(ref, "linux/arm/v7")
    assert got.manifest_digest == arm7.manifest_digest and got.platform == "linux/arm/v7"
    assert got.index_digest == index_digest
    # And the host platform is the default (this machine is one of amd64/arm64)
    assert client.resolve(ref).platform in ("linux/amd64", "linux/arm64/v8")
    # And a platform the index lacks is a clear error listing what there is
    with pytest.raises(UnsupportedManifest, match="no manifest for platform linux/s390x.*linux/amd64"):
        client.resolve(ref, "linux/s390x")
    with pytest.raises(UnsupportedManifest, match="os/arch"):
        client.resolve(ref, "amd64")


def test_single_platform_image_refuses_other_platform(client: RegistryClient, registry: Registry,
                                                      repo_name: str) -> None:
    push_image(client, registry.host, repo_name, "one", [{"a": b"1"}])
    with pytest.raises(UnsupportedManifest, match="linux/amd64 only, not linux/arm64"):
        client.resolve(parse_reference(f"{registry.host}/{repo_name}:one"), "linux/arm64")


def test_push_manifest_by_digest_checks_it(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    img = push_image(client, registry.host, repo_name, "t", [{"a": b"1"}])
    with pytest.raises(DigestMismatch):
        client.push_manifest(registry.host, repo_name, sha256_digest(b"other"), img.manifest, OCI_MANIFEST)


def test_referrers_fallback_tag(client: RegistryClient, registry: Registry, repo_name: str) -> None:
    # Given an image and two artifacts whose subject is it
    img = push_image(client, registry.host, repo_name, "r", [{"a": b"1"}])
    subject = Descriptor(OCI_MANIFEST, img.manifest_digest, len(img.manifest))
    assert client.referrers(registry.host, repo_name, img.manifest_digest) == []
    config = client.push_blob(registry.host, repo_name, b"{}")
    pushed = []
    for kind in ("application/vnd.example.a", "application/vnd.example.b"):
        from prewarm.resolve.manifest import manifest_json
        body = manifest_json(Descriptor(kind, config, 2), [], subject=subject, annotations={"k": kind})
        desc = Descriptor(OCI_MANIFEST, sha256_digest(body), len(body), annotations={"k": kind},
                          artifact_type=kind)
        pushed.append(client.push_referrer(registry.host, repo_name, body, OCI_MANIFEST,
                                           subject_digest=img.manifest_digest, descriptor=desc))
    # When the referrers are listed (distribution 2.8 has no referrers API: the fallback tag)
    found = client.referrers(registry.host, repo_name, img.manifest_digest)
    only_b = client.referrers(registry.host, repo_name, img.manifest_digest, artifact_type="application/vnd.example.b")
    # Then both are there, filterable by artifact type, via the sha256-<hex> tag
    assert [d.digest for d in found] == pushed
    assert [d.digest for d in only_b] == pushed[1:]
    body, media_type, _ = client.get_manifest(registry.host, repo_name, referrers_tag(img.manifest_digest))
    assert media_type == OCI_INDEX and json.loads(body)["manifests"][0]["artifactType"] == "application/vnd.example.a"
    # And adding the same referrer again does not duplicate it
    client.add_referrer_to_fallback_tag(registry.host, repo_name, img.manifest_digest, found[0])
    assert len(client.referrers(registry.host, repo_name, img.manifest_digest)) == 2


def test_schema1_refused_clearly(registry: Registry, repo_name: str, tmp_path: Path) -> None:
    # Given a server that answers a manifest request with a signed schema-1 manifest
    schema1 = json.dumps({"schemaVersion": 1, "name": repo_name, "tag": "old", "fsLayers": [],
                          "signatures": []}).encode()
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("respond", path="/manifests/", status=200, body=schema1,
                        headers={"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"}))
        c = RegistryClient(insecure_registries=frozenset({proxy.host}), docker_config=tmp_path, retry=FAST_RETRY)
        # When it is resolved, Then the error says schema 1 and what to do
        with pytest.raises(UnsupportedManifest, match="schema 1 .*push the image again"):
            c.resolve(parse_reference(f"{proxy.host}/{repo_name}:old"))


def test_corrupt_manifest_and_blob_detected(client: RegistryClient, registry: Registry, repo_name: str,
                                            tmp_path: Path) -> None:
    # Given an image, and a proxy that flips one byte of every body
    img = push_image(client, registry.host, repo_name, "c", [{"a": os.urandom(5000)}])
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("corrupt", path="/(manifests|blobs)/", method="GET"))
        c = RegistryClient(insecure_registries=frozenset({proxy.host}), docker_config=tmp_path, retry=FAST_RETRY)
        # Then manifests by digest and by tag, small blobs and streamed blobs fail their digest check
        with pytest.raises(DigestMismatch):
            c.get_manifest(proxy.host, repo_name, img.manifest_digest)
        with pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
            c.get_manifest(proxy.host, repo_name, "c")
        with pytest.raises(DigestMismatch):
            c.get_blob(proxy.host, repo_name, img.layer_digests[0])
        with pytest.raises(DigestMismatch), c.stream_blob(proxy.host, repo_name, img.layer_digests[0]) as chunks:
            for _ in chunks:
                pass


def test_tls_registry_with_ca_bundle(tmp_path: Path, repo_name: str) -> None:
    from tests.services import run_registry
    from tests.tokenserver import make_cert

    cert, key = make_cert(tmp_path / "tls", "127.0.0.1")
    with run_registry(tmp_path / "reg", tls=(cert, key)) as reg:
        # Given an HTTPS registry with a private CA, When we trust the CA, Then push and pull work
        good = RegistryClient(ca_bundle=str(cert), docker_config=tmp_path, retry=FAST_RETRY)
        digest = good.push_blob(reg.host, repo_name, b"over tls")
        assert good.get_blob(reg.host, repo_name, digest) == b"over tls"
        assert good.base_url(reg.host).startswith("https://")
        # And without the CA the error says what to do, without retrying
        bad = RegistryClient(docker_config=tmp_path, retry=FAST_RETRY)
        with pytest.raises(RegistryError, match="--ca-bundle"):
            bad.get_blob(reg.host, repo_name, digest)


def test_single_platform_image_of_another_platform_needs_platform(client: RegistryClient, registry: Registry,
                                                                  repo_name: str) -> None:
    host = host_platform()
    other = "s390x" if host.architecture != "s390x" else "amd64"
    # Given an image (no index) built for another architecture than this host's
    push_image(client, registry.host, repo_name, "foreign", [{"a": b"1"}], arch=other)
    ref = parse_reference(f"{registry.host}/{repo_name}:foreign")
    # When it is resolved without --platform, Then it is refused, saying how to ask for it
    with pytest.raises(UnsupportedManifest, match=f"linux/{other} only and this host is {host}; "
                                                  f"pass --platform linux/{other}"):
        client.resolve(ref)
    # And with --platform naming it, it resolves
    assert client.resolve(ref, f"linux/{other}").platform == f"linux/{other}"


def test_a_large_small_blob_is_held_once_while_read(client: RegistryClient, registry: Registry, repo_name: str,
                                                    tmp_path: Path) -> None:
    # Given a 48 MiB blob (a zTOC of a layer of a few hundred thousand files is that size)
    path = tmp_path / "big"
    path.write_bytes(os.urandom(1 << 20) * 48)
    digest = client.push_blob(registry.host, repo_name, path)
    # When it is read whole
    tracemalloc.start()
    try:
        data = client.get_blob(registry.host, repo_name, digest, max_size=64 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Then it came verified, as bytes, and was never held twice (a bytearray and a bytes copy of it)
    assert type(data) is bytes and len(data) == 48 << 20
    assert peak < 1.4 * len(data), peak
