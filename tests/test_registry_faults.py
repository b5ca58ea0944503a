"""Retries, ranges and redirects through the fault-injecting proxy in front of the real registry."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
import requests

from prewarm.errors import (
    AuthenticationFailed,
    BlobNotFound,
    RangeNotHonored,
    RateLimited,
    RegistryError,
    RegistryUnavailable,
    Transient,
)
from prewarm.resolve.reference import parse_reference
from prewarm.resolve.registry.client import RegistryClient
from prewarm.resolve.registry.retry import RetryPolicy
from prewarm.resolve.registry.status import error_for_exception, parse_retry_after
from tests.faultproxy import Fault, FaultProxy
from tests.registry_images import push_image
from tests.services import Registry, free_port
from tests.tokenserver import make_cert

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, max_retry_after=0.3)


@pytest.fixture()
def blob(registry: Registry, repo_name: str, tmp_path: Path) -> tuple[str, str, bytes]:
    data = os.urandom(2 << 20)
    c = RegistryClient(insecure_registries=frozenset({registry.host}), docker_config=tmp_path)
    return repo_name, c.push_blob(registry.host, repo_name, data), data


def proxy_client(proxy: FaultProxy, tmp_path: Path, retry: RetryPolicy = FAST_RETRY) -> RegistryClient:
    return RegistryClient(insecure_registries=frozenset({proxy.host}), docker_config=tmp_path, retry=retry)


def test_retry_policy_backoff_bounds() -> None:
    policy = RetryPolicy(attempts=5, base_delay=1.0, max_delay=4.0, max_retry_after=10.0)
    assert [policy.delay(n, rng=lambda: 1.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.delay(3, rng=lambda: 0.25) == 1.0
    assert policy.delay(1, retry_after=7.0, rng=lambda: 0.5) == 7.0
    assert policy.delay(1, retry_after=99.0, rng=lambda: 0.5) == 10.0
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412475.0) == 5.0
    assert parse_retry_after("soon") is None


def test_5xx_then_success(registry: Registry, blob: tuple[str, str, bytes], tmp_path: Path) -> None:
    repo, digest, data = blob
    with FaultProxy(registry.host) as proxy:
        # Given a registry that answers 503 to the first two blob requests
        fault = proxy.add(Fault("status", path="/blobs/sha256", status=503, first=2))
        # When a range is fetched, Then the retries get it
        assert proxy_client(proxy, tmp_path).fetch_range(proxy.host, repo, digest, 10, 20) == data[10:20]
        assert fault.applied == 2


def test_persistent_5xx_gives_up_naming_everything(registry: Registry, blob: tuple[str, str, bytes],
                                                    tmp_path: Path) -> None:
    repo, digest, _ = blob
    with FaultProxy(registry.host) as proxy:
        fault = proxy.add(Fault("status", path="/blobs/", status=502))
        with pytest.raises(RegistryUnavailable) as err:
            proxy_client(proxy, tmp_path).fetch_range(proxy.host, repo, digest, 0, 10)
        # Then the attempts are bounded and the error names registry, repository, digest and status
        assert fault.applied == FAST_RETRY.attempts
        assert proxy.host in str(err.value) and repo in str(err.value) and digest in str(err.value)
        assert "HTTP 502" in str(err.value)
        assert (err.value.registry, err.value.repository, err.value.digest, err.value.status) == \
            (proxy.host, repo, digest, 502)


def test_429_honours_retry_after(registry: Registry, blob: tuple[str, str, bytes], tmp_path: Path) -> None:
    repo, digest, data = blob
    waits: list[float] = []
    policy = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.001, max_retry_after=5)
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("status", path="/blobs/", status=429, retry_after="2", first=1))
        client = proxy_client(proxy, tmp_path, RetryPolicy(attempts=1))
        # When rate limited once with Retry-After: 2, Then the wait before the retry is those 2 s
        got = policy.run(lambda: client.fetch_range(proxy.host, repo, digest, 0, 100), sleep=waits.append)
        assert got == data[:100]
        assert waits and waits[0] == 2.0
        # And a registry that keeps rate limiting ends in RateLimited carrying retry_after
        proxy.add(Fault("status", path="/blobs/", status=429, retry_after="1"))
        with pytest.raises(RateLimited) as err:
            RetryPolicy(attempts=2, max_retry_after=0.01).run(
                lambda: client.fetch_range(proxy.host, repo, digest, 0, 100))
        assert err.value.retry_after == 1.0 and err.value.status == 429


def test_connection_reset_retried(registry: Registry, blob: tuple[str, str, bytes], tmp_path: Path) -> None:
    repo, digest, data = blob
    with FaultProxy(registry.host) as proxy:
        fault = proxy.add(Fault("reset", path="/blobs/", first=2))
        assert proxy_client(proxy, tmp_path).get_blob(proxy.host, repo, digest) == data
        assert fault.applied == 2


def test_unreachable_registry_is_clear(tmp_path: Path) -> None:
    host = f"127.0.0.1:{free_port()}"
    client = RegistryClient(insecure_registries=frozenset({host}), docker_config=tmp_path, retry=FAST_RETRY)
    with pytest.raises(RegistryUnavailable, match=f"registry {host} unreachable"):
        client.resolve(parse_reference(f"{host}/some/image:1"))


def test_ignored_range_still_works(registry: Registry, blob: tuple[str, str, bytes], tmp_path: Path) -> None:
    repo, digest, data = blob
    with FaultProxy(registry.host) as proxy:
        # Given a server that ignores Range and answers 200 with the whole blob
        proxy.add(Fault("ignore_range", path="/blobs/"))
        client = proxy_client(proxy, tmp_path)
        # When ranges are fetched, Then the right bytes come back
        assert client.fetch_range(proxy.host, repo, digest, 1000, 1100) == data[1000:1100]
        assert client.fetch_range(proxy.host, repo, digest, len(data) - 5) == data[-5:]
        # And an early range of a big blob does not pull it all through (the connection is dropped
        # once the range is read; what is relayed is bounded by socket buffers, not the blob)
        big = os.urandom(32 << 20)
        big_digest = RegistryClient(insecure_registries=frozenset({registry.host}),
                                    docker_config=tmp_path).push_blob(registry.host, repo, big)
        before = proxy.bytes_relayed
        assert client.fetch_range(proxy.host, repo, big_digest, 0, 10) == big[:10]
        assert proxy.bytes_relayed - before < len(big) // 2


def test_stream_resumes_after_cut(registry: Registry, blob: tuple[str, str, bytes], tmp_path: Path) -> None:
    repo, digest, data = blob
    with FaultProxy(registry.host) as proxy:
        # Given a connection cut in the middle of the first blob response
        fault = proxy.add(Fault("truncate", path="/blobs/", first=1))
        h = hashlib.sha256()
        with proxy_client(proxy, tmp_path).stream_blob(proxy.host, repo, digest, chunk_size=65536) as chunks:
            for chunk in chunks:
                h.update(chunk)
        # Then the stream resumed with a Range request and the digest verified
        assert "sha256:" + h.hexdigest() == digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert fault.applied == 1
        resumed = [r for r in proxy.requests if "/blobs/" in r.path and "Range" in r.headers]
        assert resumed and resumed[0].headers["Range"].startswith("bytes=") and resumed[0].status == 206


def test_stream_resume_when_range_ignored(registry: Registry, blob: tuple[str, str, bytes], tmp_path: Path) -> None:
    repo, digest, data = blob
    assert len(data) == 2 << 20
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("truncate", path="/blobs/", first=1))
        proxy.add(Fault("ignore_range", path="/blobs/"))
        out = bytearray()
        with proxy_client(proxy, tmp_path).stream_blob(proxy.host, repo, digest) as chunks:
            for chunk in chunks:
                out += chunk
        assert bytes(out) == data


def test_redirect_to_other_host_drops_authorization(auth_registry: Registry, repo_name: str,
                                                    tmp_path: Path) -> None:
    # Given alice's credentials and an image on the htpasswd registry
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    basic = base64.b64encode(b"alice:s3cret-pw").decode()
    direct = RegistryClient(insecure_registries=frozenset({auth_registry.host}), docker_config=cfg)
    (cfg / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": basic}}}))
    img = push_image(direct, auth_registry.host, repo_name, "v1", [{"big": os.urandom(200_000)}])
    # And a proxy (whose name the config also knows) that sends blob GETs to a "CDN" on another port;
    # the CDN reaches the registry with its own credentials, as a pre-signed URL would
    with FaultProxy(auth_registry.host, cdn_upstream_headers={"Authorization": f"Basic {basic}"}) as proxy:
        (cfg / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": basic},
                                                               proxy.host: {"auth": basic}}}))
        proxy.add(Fault("redirect", path="/blobs/sha256", method="GET"))
        client = proxy_client(proxy, cfg)
        # When the image is resolved and a layer range and stream are read
        resolved = client.resolve(parse_reference(f"{proxy.host}/{repo_name}:v1"))
        layer = img.layers[0]
        assert client.fetch_range(proxy.host, repo_name, img.layer_digests[0], 5, 500) == layer[5:500]
        with client.stream_blob(proxy.host, repo_name, img.layer_digests[0]) as chunks:
            assert b"".join(chunks) == layer
        # Then the registry saw our credentials but the CDN never did
        assert resolved.manifest_digest == img.manifest_digest
        assert any("Authorization" in r.headers for r in proxy.requests)
        assert len(proxy.cdn_requests) >= 3
        assert all("Authorization" not in r.headers for r in proxy.cdn_requests)
        assert all("sig=" in r.path for r in proxy.cdn_requests)


def test_not_found_is_not_retried(registry: Registry, repo_name: str, tmp_path: Path) -> None:
    with FaultProxy(registry.host) as proxy:
        client = proxy_client(proxy, tmp_path)
        with pytest.raises(BlobNotFound):
            client.get_blob(proxy.host, repo_name, "sha256:" + "0" * 64)
        assert len([r for r in proxy.requests if "/blobs/" in r.path]) == 1


def test_auth_failure_is_not_retried(auth_registry: Registry, repo_name: str, tmp_path: Path) -> None:
    with FaultProxy(auth_registry.host) as proxy:
        client = proxy_client(proxy, tmp_path)
        with pytest.raises(AuthenticationFailed):
            client.get_blob(proxy.host, repo_name, "sha256:" + "0" * 64)
        assert len(proxy.requests) == 1


def test_range_cut_short_is_retried(registry: Registry, blob: tuple[str, str, bytes], tmp_path: Path) -> None:
    repo, digest, data = blob
    with FaultProxy(registry.host) as proxy:
        # Given a 206 whose body is cut in the middle, once
        fault = proxy.add(Fault("truncate", path="/blobs/", first=1))
        # Then the short read is transient: the retry gets the whole range
        assert proxy_client(proxy, tmp_path).fetch_range(proxy.host, repo, digest, 100, 900_100) == data[100:900_100]
        assert fault.applied == 1


def test_fault_fraction_schedule_and_byte_count(registry: Registry, blob: tuple[str, str, bytes],
                                                tmp_path: Path) -> None:
    repo, digest, data = blob
    with FaultProxy(registry.host, seed=3) as proxy:
        # Given 5xx on a seeded 30% of range requests
        fault = proxy.add(Fault("status", path="/blobs/", method="GET", status=500, fraction=0.3))
        client = proxy_client(proxy, tmp_path, RetryPolicy(attempts=8, base_delay=0.001, max_delay=0.002))
        # When 20 ranges are fetched, Then all arrive; some requests failed and were retried
        for i in range(20):
            assert client.fetch_range(proxy.host, repo, digest, i * 1000, i * 1000 + 500) == data[i * 1000:i * 1000 + 500]
        assert 0 < fault.applied < fault.matched and fault.matched == 20 + fault.applied
        # And the proxy counted exactly the range bytes it relayed
        assert proxy.bytes_relayed == 20 * 500


def test_manifests_survive_a_compressing_proxy(registry: Registry, repo_name: str, tmp_path: Path) -> None:
    direct = RegistryClient(insecure_registries=frozenset({registry.host}), docker_config=tmp_path)
    img = push_image(direct, registry.host, repo_name, "v1", [{"f": b"data" * 1000}])
    # Given a proxy that gzips every manifest answer whose request allows it
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("gzip", path="/manifests/"))
        client = proxy_client(proxy, tmp_path)
        # When the image is resolved and its manifest looked up by HEAD
        resolved = client.resolve(parse_reference(f"{proxy.host}/{repo_name}:v1"))
        head = client.head_manifest(proxy.host, repo_name, "v1")
        # Then the digests check out, because manifests are asked for uncompressed
        assert resolved.manifest_digest == img.manifest_digest
        assert head is not None and head.digest == img.manifest_digest
        assert head.size == len(resolved.manifest_bytes)
        manifest_requests = [r for r in proxy.requests if "/manifests/" in r.path]
        assert {r.method for r in manifest_requests} == {"GET", "HEAD"}
        assert all(r.headers.get("Accept-Encoding") == "identity" for r in manifest_requests)


def test_request_that_cannot_succeed_is_not_retried(registry: Registry, repo_name: str, tmp_path: Path) -> None:
    # Given a registry that redirects blob reads to a URL no client can parse
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("respond", path="/blobs/", status=307, headers={"Location": "http://exa mple/blob"}))
        client = proxy_client(proxy, tmp_path)
        # Then the error is final, after one attempt
        with pytest.raises(RegistryError, match="InvalidURL") as err:
            client.get_blob(proxy.host, repo_name, "sha256:" + "0" * 64)
        assert not isinstance(err.value, Transient)
        assert len([r for r in proxy.requests if "/blobs/" in r.path]) == 1
    # And the same holds for the other requests-level errors no retry cures
    for final in (requests.exceptions.InvalidURL("x"), requests.TooManyRedirects("x"),
                  requests.exceptions.InvalidHeader("x")):
        mapped = error_for_exception(final, kind="blob", registry="r", repository="p")
        assert not isinstance(mapped, Transient), final
    for transient in (requests.ConnectionError("x"), requests.exceptions.ReadTimeout("x"),
                      requests.exceptions.ChunkedEncodingError("x")):
        assert isinstance(error_for_exception(transient, kind="blob", registry="r", repository="p"), Transient)


@pytest.mark.parametrize("status", [307, 308])
@pytest.mark.parametrize("tls", [False, True])
def test_reissued_put_sends_its_file_body_again(registry: Registry, repo_name: str, tmp_path: Path,
                                                status: int, tls: bool) -> None:
    data = os.urandom(300_000)
    source = tmp_path / "layer.bin"
    source.write_bytes(data)
    cert, key = make_cert(tmp_path / "tls")
    # Given a registry that answers the closing PUT of an upload with "send it again there"
    with FaultProxy(registry.host, tls=(cert, key) if tls else None) as proxy:
        fault = proxy.add(Fault("reissue", path="/blobs/uploads/", method="PUT", status=status, first=1))
        client = RegistryClient(insecure_registries=frozenset() if tls else frozenset({proxy.host}),
                                ca_bundle=str(cert), docker_config=tmp_path, retry=RetryPolicy(attempts=1),
                                timeout=5.0)
        # When a blob is pushed from a file, in one attempt
        digest = client.push_blob(proxy.host, repo_name, source)
        # Then the second PUT carried the whole file, and the registry has it
        assert fault.applied == 1
        puts = [r for r in proxy.requests if r.method == "PUT"]
        assert len(puts) == 2 and puts[0].path == puts[1].path
        assert client.get_blob(proxy.host, repo_name, digest) == data


@pytest.mark.parametrize("code", ["EVIL\nforged: log line", "<b>EVIL</b>", "EVIL_CODE\n", "E" * 65, "evil_code", ""])
def test_registry_error_codes_are_not_reflected(registry: Registry, repo_name: str, tmp_path: Path,
                                                code: str) -> None:
    # Given a registry whose error body carries a code that is not of the spec's form
    body = json.dumps({"errors": [{"code": code, "message": "m"}]}).encode()
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("status", path="/blobs/", status=500, body=body))
        proxy.add(Fault("status", path="/manifests/", status=404, body=body))
        client = proxy_client(proxy, tmp_path, RetryPolicy(attempts=1))
        # When requests fail, Then the messages name the HTTP status and nothing of the code
        with pytest.raises(RegistryUnavailable) as unavailable:
            client.get_blob(proxy.host, repo_name, "sha256:" + "0" * 64)
        with pytest.raises(RegistryError) as missing:
            client.get_manifest(proxy.host, repo_name, "v1")
    for err, status in ((unavailable.value, 500), (missing.value, 404)):
        message = str(err)
        assert f"HTTP {status})" in message or f"HTTP {status};" in message or message.endswith(f"HTTP {status}")
        assert "\n" not in message and "<" not in message and "forged" not in message
        assert "()" not in message and "EVIL" not in message.upper()


def test_registry_error_code_of_spec_form_is_kept(registry: Registry, repo_name: str, tmp_path: Path) -> None:
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("status", path="/blobs/", status=500))
        with pytest.raises(RegistryUnavailable, match=r"HTTP 500 \(UNAVAILABLE\)"):
            proxy_client(proxy, tmp_path, RetryPolicy(attempts=1)).get_blob(proxy.host, repo_name, "sha256:" + "0" * 64)


def test_range_past_the_end_of_a_whole_blob_answer(registry: Registry, blob: tuple[str, str, bytes],
                                                   tmp_path: Path) -> None:
    repo, digest, data = blob
    # Given a server that ignores Range and sends the whole blob
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("ignore_range", path="/blobs/"))
        client = proxy_client(proxy, tmp_path)
        # When a range starts past the end, or runs over it, Then the error says where the blob ends
        for start, end in ((len(data) + 10, len(data) + 20), (len(data) - 10, len(data) + 10)):
            with pytest.raises(RangeNotHonored, match=f"the blob ends at byte {len(data)}$"):
                client.fetch_range(proxy.host, repo, digest, start, end)
        # And a range that fits is cut out of the stream exactly
        assert client.fetch_range(proxy.host, repo, digest, len(data) - 10, len(data)) == data[-10:]
