"""Manifest parsing, platform choice and Go-compatible JSON (pure: no registry)."""

from __future__ import annotations

import json

import pytest

from prewarm.errors import MalformedManifest, UnsupportedManifest
from prewarm.resolve.manifest import (
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
    canonical_json,
    choose_platform,
    host_platform,
    index_json,
    manifest_json,
    media_type_of,
    parse_manifest,
    parse_platform,
    shown,
)

D1, D2, D3, D4 = ("sha256:" + c * 64 for c in "1234")


def _index(*platforms: Platform | None, media_type: str = OCI_MANIFEST) -> ImageIndex:
    return ImageIndex(OCI_INDEX, tuple(Descriptor(media_type, f"sha256:{i:064x}", 10, platform=p)
                                       for i, p in enumerate(platforms)))


def test_canonical_json_matches_go() -> None:
    # Go's encoding/json: compact, <>& escaped, non-ASCII kept as UTF-8
    assert canonical_json({"b": "<a&b>", "a": "é"}) == '{"b":"\\u003ca\\u0026b\\u003e","a":"é"}'.encode()


def test_manifest_json_field_order_and_round_trip() -> None:
    config = Descriptor("application/vnd.example.config", D1, 2)
    layer = Descriptor("application/octet-stream", D2, 5, annotations={"z": "1", "a": "2"})
    subject = Descriptor(OCI_MANIFEST, D3, 100)
    body = manifest_json(config, [layer], subject=subject, annotations={"k": "v"})
    assert list(json.loads(body)) == ["schemaVersion", "mediaType", "config", "layers", "subject", "annotations"]
    assert b'"annotations":{"a":"2","z":"1"}' in body  # map keys sorted, as Go does
    parsed = parse_manifest(body, media_type_of(body, None))
    assert isinstance(parsed, ImageManifest)
    assert parsed.layers == (layer,) and parsed.subject == subject and parsed.annotations == {"k": "v"}
    # an empty layer list is [] (Go writes "layers":[] for an empty slice)
    assert b'"layers":[]' in manifest_json(config, [])


def test_index_json_round_trip() -> None:
    entries = [Descriptor(OCI_MANIFEST, D1, 1, platform=Platform("linux", "arm64", "v8")),
               Descriptor(OCI_MANIFEST, D2, 2, artifact_type="application/vnd.x", annotations={"a": "b"})]
    body = index_json(entries)
    parsed = parse_manifest(body, media_type_of(body, "application/json"))
    assert isinstance(parsed, ImageIndex) and parsed.manifests == tuple(entries)


@pytest.mark.parametrize("body,ctype,why", [
    (b'{"schemaVersion":1,"name":"a","fsLayers":[]}', "application/json", "schema 1"),
    (b"{}", "application/vnd.docker.distribution.manifest.v1+prettyjws", "schema 1"),
    (b"not json", OCI_MANIFEST, "not valid JSON"),
    (b"[1]", OCI_MANIFEST, "not a JSON object"),
    (b'{"schemaVersion":2}', "text/plain", "unknown manifest type"),
])
def test_media_type_refusals(body: bytes, ctype: str, why: str) -> None:
    with pytest.raises(UnsupportedManifest, match=why):
        media_type_of(body, ctype, "img")


@pytest.mark.parametrize("raw,why", [
    ({"schemaVersion": 3, "config": {}, "layers": []}, "schemaVersion 3"),
    ({"schemaVersion": 2, "layers": []}, "no config"),
    ({"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:12", "size": 1}}, "not sha256"),
    ({"schemaVersion": 2, "config": {"mediaType": "x", "digest": D1, "size": -1}}, "non-negative"),
    ({"schemaVersion": 2, "config": {"digest": D1, "size": 1}}, "no mediaType"),
    ({"schemaVersion": 2, "config": {"mediaType": "x", "digest": D1, "size": 1}, "layers": {}}, "must be a list"),
    ({"schemaVersion": 2, "config": {"mediaType": "x", "digest": D1, "size": 1, "annotations": {"a": 1}}},
     "strings to strings"),
])
def test_malformed_manifests(raw: dict, why: str) -> None:
    with pytest.raises(UnsupportedManifest, match=why):
        parse_manifest(json.dumps(raw).encode(), OCI_MANIFEST, "img")


def test_unknown_media_type_refused() -> None:
    with pytest.raises(UnsupportedManifest, match="unsupported manifest media type"):
        parse_manifest(b'{"schemaVersion":2}', "application/vnd.example+json", "img")


def test_platform_parsing_and_host() -> None:
    assert parse_platform("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert str(parse_platform("Linux/AMD64")) == "linux/amd64"
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(UnsupportedManifest, match="os/arch"):
            parse_platform(bad)
    host = host_platform()
    assert host.os == "linux" and host.architecture in ("amd64", "arm64", "arm", "386", "ppc64le", "s390x",
                                                        "riscv64")


def test_choose_platform_rules() -> None:
    amd = Platform("linux", "amd64")
    arm64 = Platform("linux", "arm64", "v8")
    arm64_plain = Platform("linux", "arm64")
    arm6, arm7 = Platform("linux", "arm", "v6"), Platform("linux", "arm", "v7")
    attestation = Platform("unknown", "unknown")
    index = _index(attestation, amd, arm64_plain, arm6, arm7)
    assert choose_platform(index, Platform("linux", "amd64")).platform == amd
    # arm64 and arm64/v8 are the same platform
    assert choose_platform(index, arm64).platform == arm64_plain
    # exact variant wins; no variant asked takes the first of the architecture
    assert choose_platform(index, arm7).platform == arm7
    assert choose_platform(index, Platform("linux", "arm")).platform == arm6
    with pytest.raises(UnsupportedManifest) as err:
        choose_platform(index, Platform("windows", "amd64"), "img:1")
    assert "img:1: no manifest for platform windows/amd64" in str(err.value)
    assert "unknown" not in str(err.value)
    # entries that are not image manifests (nested indexes, artifacts) are never chosen
    with pytest.raises(UnsupportedManifest):
        choose_platform(_index(amd, media_type=DOCKER_MANIFEST_LIST), amd)


@pytest.mark.parametrize("evil", ["<b>x</b>", "a\nforged: log line", "x" * 10_000])
def test_registry_words_are_not_reflected(evil: str) -> None:
    digest = "sha256:" + "a" * 64
    # Given manifests whose media type, descriptor digest or platform is not a plain token
    bad_type = json.dumps({"schemaVersion": 2, "mediaType": evil, "layers": []}).encode()
    bad_digest = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": evil, "size": 1}]}).encode()
    odd_platform = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": 1,
         "platform": {"os": "linux", "architecture": evil}}]}).encode()
    messages = []
    with pytest.raises(UnsupportedManifest) as err:
        parse_manifest(bad_type, evil)
    messages.append(str(err.value))
    with pytest.raises(UnsupportedManifest) as err:
        media_type_of(json.dumps({"schemaVersion": 2}).encode(), evil)
    messages.append(str(err.value))
    with pytest.raises(UnsupportedManifest) as err:
        parse_manifest(bad_digest, OCI_INDEX)
    messages.append(str(err.value))
    index = parse_manifest(odd_platform, OCI_INDEX)
    assert isinstance(index, ImageIndex)
    with pytest.raises(UnsupportedManifest) as err:
        choose_platform(index, Platform("linux", "amd64"))
    messages.append(str(err.value))
    # Then no message repeats them, and each says something was left out
    for message in messages:
        assert evil[:20] not in message and "\n" not in message and len(message) < 400
        assert "not shown" in message
    assert shown("application/vnd.oci.image.manifest.v1+json") == "application/vnd.oci.image.manifest.v1+json"


@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe", b"[1]", b'"a string"'])
def test_a_manifest_that_is_not_a_json_object_is_the_registrys_fault_not_bad_input(body: bytes) -> None:
    # Given a registry answering a manifest request with bytes that are not a JSON object
    # When they are read
    with pytest.raises(MalformedManifest) as err:
        media_type_of(body, OCI_MANIFEST, "img")
    # Then it is a registry error (exit 3), not the user's bad input (2)
    assert err.value.exit_code == 3
