"""Fleet security (issue 6 item 6) with real Redis, registry and worker processes.

* No credential reaches Redis: after a job against an htpasswd registry (credentials from a
  DOCKER_CONFIG config.json), every key and every value of every type is scanned.
* Redis with a password, an ACL user and TLS (``rediss://``) works from PREWARM_BROKER_URL
  for the worker and the scheduler.
* A layer that tries to escape through the whole pipeline fails with a clear reason and
  writes nothing outside PREWARM_ROOT.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from prewarm.fleet.nodes import heartbeat
from prewarm.imagebuild import BuiltImage, push_layout
from prewarm.resolve.registry.client import RegistryClient
from tests.images import hostile_image, simple_image
from tests.pipeline_helpers import (
    assert_matches_umoci,
    clean_env,
    prewarm,
    push,
    start_worker,
    wait_job,
)
from tests.services import Registry, free_port, stop_pid, wait_until

SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20)}
PASSWORD = "s3cret-pw"


def every_key_and_value(r: redis.Redis) -> Iterator[bytes]:
    """Every key, and every member, field and value of every type, as bytes."""
    for key in r.scan_iter(count=500):
        yield key
        kind = r.type(key).decode()
        if kind == "string":
            yield r.get(key) or b""
        elif kind == "list":
            yield from r.lrange(key, 0, -1)
        elif kind == "hash":
            for field, value in r.hgetall(key).items():
                yield field
                yield value
        elif kind == "set":
            yield from r.smembers(key)
        elif kind == "zset":
            yield from (m for m, _ in r.zrange(key, 0, -1, withscores=True))
        elif kind == "stream":
            for _, fields in r.xrange(key):
                for field, value in fields.items():
                    yield field
                    yield value
        else:
            raise AssertionError(f"unexpected Redis type {kind} for {key!r}")


def test_no_credential_reaches_redis(tmp_path: Path, auth_registry: Registry, redis_url: str) -> None:
    # Given credentials for the registry in a docker config.json
    auth = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    config = tmp_path / "docker"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": auth}}}))
    image = simple_image(tmp_path / "oci")
    client = RegistryClient(insecure_registries=frozenset({auth_registry.host}), docker_config=config)
    assert image.tag
    push_layout(client, image.layout, auth_registry.host, "fleet/secret", image.tag)
    ref = f"{auth_registry.host}/fleet/secret:{image.tag}"
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_VISIBILITY_TIMEOUT="4",
                    PREWARM_INSECURE_REGISTRIES=auth_registry.host, PREWARM_NODE_NAME="s1",
                    DOCKER_CONFIG=str(config), **SPANS)
    prewarm("budget", auth_registry.host, "--rate", "50MB", env=env, check=True)
    # When a job runs, with a second job left queued for a node whose worker never started
    # (its messages stay in Celery's queue), and a task left unacked by a killed worker
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@s1")
    try:
        job = prewarm("schedule", ref, "--node", "s1", env=env, check=True).stdout.strip()
        final = wait_job(job, env)
        heartbeat(redis.Redis.from_url(redis_url), "ghost", labels={}, root=tmp_path / "ghost",
                  layers=frozenset())  # a node that registered once and whose worker is gone
        prewarm("schedule", ref, "--node", "ghost", env=env, check=True)
    finally:
        worker.stop()
    assert final["state"] == "succeeded", (final, worker.log.read_text()[-3000:])
    # Then no key or value anywhere in Redis holds the password, the basic auth string or a token
    r = redis.Redis.from_url(redis_url)
    values = list(every_key_and_value(r))
    assert any(b"prewarm.node.ghost" in v for v in values), "Celery's queue was scanned too"
    forbidden = [PASSWORD.encode(), auth.encode(), b"Authorization", b"Basic ", b"Bearer "]
    leaks = [(f, v[:120]) for v in values for f in forbidden if f in v]
    # Celery base64-encodes message bodies: decode them and look inside too
    for v in values:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            envelope = json.loads(v)
            if isinstance(envelope, dict) and envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(envelope["body"])
                leaks += [(f, body[:120]) for f in forbidden if f in body]
    assert leaks == []


# === Redis with a password, an ACL user, and TLS
def _make_ca_and_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway test CA and a server certificate for 127.0.0.1, made with openssl."""
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=prewarm test CA",
        "-keyout", str(ca_key), "-out", str(ca))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
        "-extfile", str(ext), "-out", str(cert))
    return ca, cert, key


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One redis-server with requirepass, an ACL user and a TLS port; URLs by kind."""
    data = tmp_path_factory.mktemp("locked-redis")
    ca, cert, key = _make_ca_and_cert(data)
    port, tls_port = free_port(), free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                             "--requirepass", "adm1n-pw", "--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                             "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
                             "--save", "", "--logfile", str(data / "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = redis.Redis(port=port, password="adm1n-pw")

    def up() -> bool:
        try:
            return bool(admin.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(up, what="redis-server with TLS")
        admin.execute_command("ACL", "SETUSER", "prewarm", "on", ">acl-pw", "~*", "&*", "+@all")
        admin.execute_command("ACL", "SETUSER", "default", "on", ">adm1n-pw", "~*", "&*", "+@all")
        yield {
            "password": f"redis://:adm1n-pw@127.0.0.1:{port}/0",
            "acl": f"redis://prewarm:acl-pw@127.0.0.1:{port}/0",
            "tls": f"rediss://prewarm:acl-pw@127.0.0.1:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}",
        }
    finally:
        stop_pid(proc)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> tuple[BuiltImage, str]:
    image = simple_image(tmp_path_factory.mktemp("simple-sec-oci"))
    return image, push(image, registry, "fleet/secure-broker")


@pytest.mark.parametrize("kind", ["password", "acl", "tls"])
def test_locked_down_redis_works_for_worker_and_scheduler(kind: str, tmp_path: Path, registry: Registry,
                                                          locked_redis: dict[str, str],
                                                          small: tuple[BuiltImage, str]) -> None:
    image, ref = small
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=locked_redis[kind], PREWARM_VISIBILITY_TIMEOUT="4",
                    PREWARM_INSECURE_REGISTRIES=registry.host, PREWARM_NODE_NAME=f"sec-{kind}", **SPANS)
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", f"w@sec-{kind}")
    try:
        out = prewarm("schedule", ref, "--node", f"sec-{kind}", "--wait", "--json", "--quiet", env=env, timeout=120)
    finally:
        worker.stop()
    assert out.returncode == 0, (out.stdout, out.stderr, worker.log.read_text()[-3000:])
    assert json.loads(out.stdout)["state"] == "succeeded"
    assert_matches_umoci(image, ref, env, tmp_path)


def test_a_wrong_redis_password_is_a_clear_error(tmp_path: Path, registry: Registry,
                                                 locked_redis: dict[str, str], small: tuple[BuiltImage, str]) -> None:
    _, ref = small
    bad = locked_redis["acl"].replace("acl-pw", "wrong-pw")
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=bad, PREWARM_INSECURE_REGISTRIES=registry.host)
    out = prewarm("schedule", ref, "--node", "x", env=env, timeout=60)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert "refused the credentials" in out.stderr and "PREWARM_BROKER_URL" in out.stderr, out.stderr
    assert "wrong-pw" not in out.stderr + out.stdout, "the password must not be echoed"


# === tar escape attempts through the whole pipeline
@pytest.mark.parametrize("attack", ["dotdot", "symlink-escape", "hardlink-absolute"])
def test_an_escaping_layer_fails_with_a_reason_and_writes_nothing_outside(
        attack: str, tmp_path: Path, registry: Registry, redis_url: str) -> None:
    outside = Path("/tmp/outside")
    assert not (outside / "file").exists()
    image = hostile_image(tmp_path / "oci", attack)
    ref = push(image, registry, f"fleet/hostile-{attack}")
    root = tmp_path / "jail" / "store"
    env = clean_env(root, PREWARM_BROKER_URL=redis_url, PREWARM_VISIBILITY_TIMEOUT="4",
                    PREWARM_INSECURE_REGISTRIES=registry.host, PREWARM_NODE_NAME="h1", **SPANS)
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@h1")
    try:
        job = prewarm("schedule", ref, "--node", "h1", env=env, check=True).stdout.strip()
        final = wait_job(job, env)
    finally:
        worker.stop()
    # Then the job fails (never success), naming the hostile layer and why
    assert final["state"] == "failed", final
    text = prewarm("status", job, env=env, check=True).stdout
    assert "failed:" in text and ("unsafe" in text.lower() or "escape" in text.lower() or "outside" in text.lower()), text
    # And nothing was written outside PREWARM_ROOT: its parent holds only the store, /tmp/outside nothing new
    assert sorted(p.name for p in (tmp_path / "jail").iterdir()) == ["store"]
    assert not (outside / "file").exists()
    assert not (tmp_path / "jail" / "x").exists() and not (tmp_path / "x").exists()
