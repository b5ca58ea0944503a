"""A pre-warm goes where the node's containerd pulls from: two real registries, one the mirror of the other."""

from __future__ import annotations

import contextlib
import hashlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from prewarm.errors import BlobNotFound
from prewarm.resolve.registry.client import RegistryClient
from prewarm.resolve.registry.retry import RetryPolicy
from tests.images import simple_image
from tests.pipeline_helpers import assert_matches_umoci, clean_env, prewarm, push
from tests.services import Registry, _require, free_port, run_registry, stop_pid, wait_until
from tests.tokenserver import make_cert

FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05)
#: Small spans, so that the top layer is fetched by Range requests from its zTOC.
SPANS = {"PREWARM_SPAN_SIZE": str(64 * 1024), "PREWARM_MIN_LAYER_SIZE": str(64 * 1024)}


def blob_gets(reg: Registry, digest: str) -> list[str]:
    """The registry's log lines of GETs of blob ``digest``."""
    return reg.requests_logged("GET", f"/blobs/{digest}")


def hosts_folder(root: Path, registry: Registry) -> Path:
    folder = root / f"127.0.0.1_{registry.port}_"  # containerd's name for 127.0.0.1:PORT
    folder.mkdir(parents=True)
    return folder


def test_a_prewarm_reads_from_the_mirror_and_falls_back_to_the_registry(tmp_path: Path) -> None:
    image = simple_image(tmp_path / "oci")
    with run_registry(tmp_path / "upstream") as upstream:
        with run_registry(tmp_path / "mirror") as mirror:
            # Given the image in a registry and in its mirror (a pull-through cache that has it)
            ref = push(image, upstream, "mirrored/simple")
            push(image, mirror, "mirrored/simple")
            # And containerd's hosts.toml for the registry naming the mirror first
            hosts = tmp_path / "certs.d"
            (hosts_folder(hosts, upstream) / "hosts.toml").write_text(
                f'server = "http://{upstream.host}"\n\n'
                f'[host."http://{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n')
            env = clean_env(tmp_path / "store", PREWARM_CONTAINERD_HOSTS_DIR=str(hosts), **SPANS)
            before = len(upstream.requests_logged())
            # When the image is pre-warmed (spans from its zTOCs, built here)
            prewarm("schedule", ref, "--wait", "--index", "build", "--insecure-registry", upstream.host,
                    env=env, check=True)
            # Then every layer byte came from the mirror, asked with ?ns=<registry> as containerd does
            for layer in image.layers:
                assert blob_gets(upstream, layer.digest) == [], layer
                gets = blob_gets(mirror, layer.digest)
                assert gets and all(f"ns={upstream.host.replace(':', '%3A')}" in g for g in gets), gets
            assert mirror.bytes_served("/blobs/") >= sum(layer.size for layer in image.layers)
            # And the manifest was resolved on the mirror too; the registry saw only what the mirror
            # lacks: the SOCI index pushed and read back (the zTOCs and their referrers)
            assert mirror.requests_logged("GET", "/manifests/")
            upstream_now = upstream.requests_logged()[before:]
            assert not any("/blobs/" + layer.digest in line for line in upstream_now for layer in image.layers)
            (tmp_path / "first").mkdir()
            assert_matches_umoci(image, ref, env, tmp_path / "first")
        # When the mirror is down and another node (a fresh store) pre-warms the image
        env2 = clean_env(tmp_path / "store2", PREWARM_CONTAINERD_HOSTS_DIR=str(hosts), **SPANS)
        proc = prewarm("schedule", ref, "--wait", "--insecure-registry", upstream.host, env=env2, check=True)
        # Then it falls back to the registry and succeeds, the layers now served by the registry
        assert "Traceback" not in proc.stderr
        for layer in image.layers:
            assert blob_gets(upstream, layer.digest), layer
        (tmp_path / "second").mkdir()
        assert_matches_umoci(image, ref, env2, tmp_path / "second")


# === TLS from hosts.toml: a mirror with its own CA that requires a client certificate


@contextlib.contextmanager
def run_mtls_registry(data: Path, cert: Path, key: Path, client_ca: Path) -> Iterator[Registry]:
    """docker-registry over HTTPS that refuses clients without a certificate signed by ``client_ca``."""
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = data / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {data / 'store'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        f"  tls:\n    certificate: {cert}\n    key: {key}\n    clientcas:\n      - {client_ca}\n")
    log_path = data / "registry.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([_require("docker-registry"), "serve", str(config)], stdout=log,
                                stderr=subprocess.STDOUT)
    reg = Registry(proc, port, data, log_path, None, "https")

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {reg.log()[-2000:]}")
        try:
            requests.get(f"{reg.url}/v2/", timeout=1, verify=False)
        except requests.exceptions.SSLError:
            return True  # answering TLS (and refusing us: no client certificate)
        except requests.ConnectionError:
            return False
        return True

    try:
        wait_until(up, what="docker-registry with client certificates")
        yield reg
    finally:
        stop_pid(proc)


def _push_blob(reg: Registry, repository: str, data: bytes, verify: str, cert: tuple[str, str]) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with requests.Session() as s:  # verify per request: $REQUESTS_CA_BUNDLE would win over the session's
        resp = s.post(f"{reg.url}/v2/{repository}/blobs/uploads/", timeout=10, verify=verify, cert=cert)
        assert resp.status_code == 202, resp.text
        location = requests.compat.urljoin(resp.url, resp.headers["Location"])
        resp = s.put(location, params={"digest": digest}, data=data, timeout=10, verify=verify, cert=cert,
                     headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code == 201, resp.text
    return digest


@pytest.mark.parametrize("trust", ["ca", "skip_verify"])
def test_a_mirrors_ca_client_certificate_and_skip_verify_come_from_hosts_toml(tmp_path: Path, registry: Registry,
                                                                              trust: str) -> None:
    server_cert, server_key = make_cert(tmp_path / "server")
    client_cert, client_key = make_cert(tmp_path / "client", "prewarm-node")
    with run_mtls_registry(tmp_path / "mirror", server_cert, server_key, client_cert) as mirror:
        # Given a blob only the mirror has (so only the mirror can answer for it)
        data = b"only the mirror has this " + trust.encode()
        digest = _push_blob(mirror, "tls/only", data, str(server_cert), (str(client_cert), str(client_key)))
        # And a hosts.toml for the registry naming the mirror with its CA (or skip_verify) and our
        # client certificate, as files relative to the folder
        hosts = tmp_path / "certs.d"
        folder = hosts_folder(hosts, registry)
        (folder / "mirror-ca.pem").write_bytes(server_cert.read_bytes())
        (folder / "node.pem").write_bytes(client_cert.read_bytes())
        (folder / "node.key").write_bytes(client_key.read_bytes())
        trust_line = 'ca = "mirror-ca.pem"' if trust == "ca" else "skip_verify = true"
        toml = (f'server = "http://{registry.host}"\n[host."https://{mirror.host}"]\n'
                f'  capabilities = ["pull"]\n  {trust_line}\n  client = [["node.pem", "node.key"]]\n')
        (folder / "hosts.toml").write_text(toml)
        client = RegistryClient(insecure_registries=frozenset({registry.host}), docker_config=tmp_path,
                                retry=FAST_RETRY, hosts_dir=hosts)
        try:
            # When the blob is read as the registry's
            # Then it comes from the mirror, over TLS with our client certificate
            assert client.get_blob(registry.host, "tls/only", digest) == data
            with client.stream_blob(registry.host, "tls/only", digest) as chunks:
                assert b"".join(chunks) == data
            assert client.fetch_range(registry.host, "tls/only", digest, 5, 12) == data[5:12]
        finally:
            client.close()
        assert re.search(rf"GET.*/v2/tls/only/blobs/{digest}", mirror.log()) or \
            mirror.requests_logged("GET", f"/blobs/{digest}")
        # When the hosts.toml gives no client certificate
        (folder / "hosts.toml").write_text(toml.replace('  client = [["node.pem", "node.key"]]\n', ""))
        client = RegistryClient(insecure_registries=frozenset({registry.host}), docker_config=tmp_path,
                                retry=FAST_RETRY, hosts_dir=hosts)
        try:
            # Then the mirror refuses the handshake, the registry is asked instead, and it has no such blob
            with pytest.raises(BlobNotFound):
                client.get_blob(registry.host, "tls/only", digest)
            assert blob_gets(registry, digest), "the registry was asked after the mirror failed"
        finally:
            client.close()


def test_a_dead_mirror_is_skipped_for_a_while_not_asked_per_request(tmp_path: Path, registry: Registry,
                                                                     repo_name: str) -> None:
    # Given a hosts.toml naming a mirror nothing listens on
    dead = free_port()
    hosts = tmp_path / "certs.d"
    (hosts_folder(hosts, registry) / "hosts.toml").write_text(
        f'server = "http://{registry.host}"\n[host."http://127.0.0.1:{dead}"]\n')
    client = RegistryClient(insecure_registries=frozenset({registry.host}), docker_config=tmp_path,
                            retry=FAST_RETRY, hosts_dir=hosts)
    plain = RegistryClient(insecure_registries=frozenset({registry.host}), docker_config=tmp_path)
    digest = plain.push_blob(registry.host, repo_name, b"from the registry")
    tried: list[str] = []
    real_send = client._send

    def counting_send(method, url, ctx, **kw):  # type: ignore[no-untyped-def]
        tried.append(url)
        return real_send(method, url, ctx, **kw)

    client._send = counting_send  # type: ignore[method-assign]
    try:
        # When several blobs are read
        for _ in range(5):
            assert client.get_blob(registry.host, repo_name, digest) == b"from the registry"
    finally:
        client.close()
        plain.close()
    # Then the dead mirror was tried once, and every read was answered by the registry
    assert sum(f"127.0.0.1:{dead}" in u for u in tried) == 1, tried
    assert sum(registry.host in u for u in tried) == 5
