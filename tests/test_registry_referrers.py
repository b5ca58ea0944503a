"""Referrers: the OCI referrers API (served by the fault proxy), OCI-Subject, the fallback tag under concurrency."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from prewarm.resolve.digest import sha256_digest
from prewarm.resolve.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor, index_json, manifest_json
from prewarm.resolve.registry.client import RegistryClient, referrers_tag
from prewarm.resolve.registry.retry import RetryPolicy
from tests.faultproxy import Fault, FaultProxy
from tests.registry_images import push_image
from tests.services import Registry

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


def _client(host: str, tmp_path: Path) -> RegistryClient:
    return RegistryClient(insecure_registries=frozenset({host}), docker_config=tmp_path, retry=FAST_RETRY)


def _artifact(client: RegistryClient, host: str, repo: str, subject: Descriptor,
              kind: str, n: int) -> tuple[bytes, Descriptor]:
    config = client.push_blob(host, repo, b"{}")
    body = manifest_json(Descriptor(kind, config, 2), [], subject=subject, annotations={"n": str(n)})
    return body, Descriptor(OCI_MANIFEST, sha256_digest(body), len(body), annotations={"n": str(n)},
                            artifact_type=kind)


def test_oci_subject_means_no_fallback_tag(registry: Registry, repo_name: str, tmp_path: Path) -> None:
    client = _client(registry.host, tmp_path)
    img = push_image(client, registry.host, repo_name, "s", [{"a": b"1"}])
    subject = Descriptor(OCI_MANIFEST, img.manifest_digest, len(img.manifest))
    body, desc = _artifact(client, registry.host, repo_name, subject, "application/vnd.example.a", 1)
    # Given a registry that acknowledges the subject of a pushed manifest (it indexes referrers itself)
    with FaultProxy(registry.host) as proxy:
        fault = proxy.add(Fault("add_headers", path="/manifests/sha256:", method="PUT",
                                headers={"OCI-Subject": img.manifest_digest}))
        via = _client(proxy.host, tmp_path)
        # When a referrer is pushed
        assert via.push_referrer(proxy.host, repo_name, body, OCI_MANIFEST, subject_digest=img.manifest_digest,
                                 descriptor=desc) == desc.digest
        # Then the fallback tag was neither read nor written
        assert fault.applied == 1
        assert not [r for r in proxy.requests if referrers_tag(img.manifest_digest) in r.path]
    assert client.head_manifest(registry.host, repo_name, referrers_tag(img.manifest_digest)) is None
    # And without the header (distribution 2.8 itself) the fallback tag is written
    client.push_referrer(registry.host, repo_name, body, OCI_MANIFEST, subject_digest=img.manifest_digest,
                         descriptor=desc)
    assert client.head_manifest(registry.host, repo_name, referrers_tag(img.manifest_digest)) is not None


def test_referrers_api_pages_are_followed(registry: Registry, repo_name: str, tmp_path: Path) -> None:
    subject = "sha256:" + "ab" * 32
    a = [Descriptor(OCI_MANIFEST, sha256_digest(b"a%d" % i), 10, artifact_type="application/vnd.example.a")
         for i in range(2)]
    b = [Descriptor(OCI_MANIFEST, sha256_digest(b"b%d" % i), 10, artifact_type="application/vnd.example.b")
         for i in range(2)]
    # Given a registry with the referrers API that answers in two pages, linked by rel="next"
    with FaultProxy(registry.host) as proxy:
        page2 = proxy.add(Fault("respond", path=r"/referrers/.*last=p1", method="GET", status=200,
                                headers={"Content-Type": OCI_INDEX}, body=index_json([a[1], b[1]])))
        page1 = proxy.add(Fault("respond", path="/referrers/", method="GET", status=200, headers={
            "Content-Type": OCI_INDEX,
            "Link": f'</v2/{repo_name}/referrers/{subject}?n=2&last=p1>; rel="next"'},
            body=index_json([a[0], b[0]])))
        client = _client(proxy.host, tmp_path)
        # When the referrers are listed, all and by artifact type
        found = client.referrers(proxy.host, repo_name, subject)
        only_b = client.referrers(proxy.host, repo_name, subject, artifact_type="application/vnd.example.b")
        # Then both pages count, in order, and the fallback tag was never consulted
        assert [d.digest for d in found] == [a[0].digest, b[0].digest, a[1].digest, b[1].digest]
        assert [d.digest for d in only_b] == [b[0].digest, b[1].digest]
        assert page1.applied == 2 and page2.applied == 2
        assert not [r for r in proxy.requests if "/manifests/" in r.path]


def test_referrers_next_page_on_another_host_is_refused(registry: Registry, repo_name: str,
                                                        tmp_path: Path) -> None:
    subject = "sha256:" + "cd" * 32
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("respond", path="/referrers/", method="GET", status=200, headers={
            "Content-Type": OCI_INDEX, "Link": f'<http://{proxy.cdn_host}/v2/x/referrers/{subject}>; rel="next"'},
            body=index_json([])))
        with pytest.raises(Exception, match="another host"):
            _client(proxy.host, tmp_path).referrers(proxy.host, repo_name, subject)
        assert not proxy.cdn_requests


def test_concurrent_fallback_tag_pushes_keep_every_entry(registry: Registry, repo_name: str,
                                                         tmp_path: Path) -> None:
    client = _client(registry.host, tmp_path)
    img = push_image(client, registry.host, repo_name, "c", [{"a": b"1"}])
    subject = Descriptor(OCI_MANIFEST, img.manifest_digest, len(img.manifest))
    n = 6
    artifacts = [_artifact(client, registry.host, repo_name, subject, "application/vnd.example.z", i)
                 for i in range(n)]
    # When six pushers add referrers of the same image at once (a registry without the referrers API)
    barrier = threading.Barrier(n)
    errors: list[Exception] = []

    def push(i: int) -> None:
        body, desc = artifacts[i]
        own = _client(registry.host, tmp_path)
        barrier.wait()
        try:
            own.push_referrer(registry.host, repo_name, body, OCI_MANIFEST, subject_digest=img.manifest_digest,
                              descriptor=desc)
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then the fallback tag lists every one of them
    assert not errors
    found = client.referrers(registry.host, repo_name, img.manifest_digest)
    assert sorted(d.digest for d in found) == sorted(desc.digest for _, desc in artifacts)
