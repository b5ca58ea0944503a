"""Auth against real registries: htpasswd basic auth, and bearer tokens from our token server."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from prewarm.config import Settings
from prewarm.errors import AuthenticationFailed, ConfigError, RegistryError, Transient
from prewarm.resolve.reference import parse_reference
from prewarm.resolve.registry.auth import parse_challenge, scope_for
from prewarm.resolve.registry.client import RegistryClient
from prewarm.resolve.registry.dockerconfig import Credential, DockerConfig
from prewarm.resolve.registry.retry import RetryPolicy
from tests.faultproxy import Fault, FaultProxy
from tests.registry_images import push_image
from tests.services import Registry
from tests.tokenserver import TokenRegistry, make_cert

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)
PASSWORD = "s3cret-pw"


def write_config(folder: Path, registry: str, **entry: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"auths": {registry: entry}}))
    return folder


def basic_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def client_for(reg: Registry, config_dir: Path) -> RegistryClient:
    return RegistryClient(insecure_registries=frozenset({reg.host}), docker_config=config_dir, retry=FAST_RETRY)


# === pure parts
def test_parse_challenge_and_scope() -> None:
    c = parse_challenge('Bearer realm="https://auth.example/token",service="reg.example",'
                        'scope="repository:a/b:pull,push"')
    assert c is not None and c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "reg.example",
                        "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x"').scheme == "basic"  # type: ignore[union-attr]
    assert parse_challenge("") is None
    assert scope_for("GET", "a/b") == "repository:a/b:pull"
    assert scope_for("PATCH", "team/blobs/app") == "repository:team/blobs/app:pull,push"
    assert scope_for("GET", None) is None


def test_docker_config_forms(tmp_path: Path) -> None:
    # Given auths keyed in Docker's different styles
    (tmp_path / "config.json").write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": basic_entry("hubuser", "hubpw"),
        "https://reg.example:5000": {"username": "u", "password": "p"},
        "tok.example": {"auth": base64.b64encode(b"<token>:").decode(), "identitytoken": "idt"},
    }}))
    cfg = DockerConfig.load(tmp_path)
    # Then each registry finds its own, Docker Hub under all its names
    assert cfg.credential_for("docker.io") == Credential("hubuser", "hubpw")
    assert cfg.credential_for("reg.example:5000") == Credential("u", "p")
    assert cfg.credential_for("tok.example") == Credential("<token>", identity_token="idt")
    assert cfg.credential_for("other.example") is None
    # And secrets never show in repr or str
    assert "hubpw" not in repr(cfg.credential_for("docker.io")) and "hubpw" not in str(cfg.credential_for("docker.io"))
    assert "idt" not in repr(cfg.credential_for("tok.example"))
    # And a missing file means no credentials, a broken one a clear error
    assert DockerConfig.load(tmp_path / "none").credential_for("docker.io") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"auths": {"x": {"auth": "hubpw-not-json')
    with pytest.raises(ConfigError, match="not valid JSON") as err:
        DockerConfig.load(tmp_path / "bad")
    assert "hubpw" not in str(err.value)


def test_credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a credential helper program on PATH, named by credHelpers
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-prewarmtest"
    helper.write_text('#!/bin/sh\nread host\nif [ "$host" = "reg.example" ]; then\n'
                      '  echo \'{"ServerURL":"reg.example","Username":"helperuser","Secret":"helperpw"}\'\n'
                      'else echo "credentials not found in native keychain"; exit 1; fi\n')
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    (tmp_path / "config.json").write_text(json.dumps({"credHelpers": {"reg.example": "prewarmtest"},
                                                      "credsStore": "prewarmtest"}))
    cfg = DockerConfig.load(tmp_path)
    # Then the helper's answer is the credential; "not found" means none
    assert cfg.credential_for("reg.example") == Credential("helperuser", "helperpw")
    assert cfg.credential_for("elsewhere.example") is None
    # And a helper that is not installed is a clear error
    (tmp_path / "config.json").write_text(json.dumps({"credsStore": "absent-helper"}))
    with pytest.raises(ConfigError, match="docker-credential-absent-helper.*not on PATH"):
        DockerConfig.load(tmp_path).credential_for("reg.example")


# === htpasswd basic auth
def test_basic_auth_with_docker_config(auth_registry: Registry, repo_name: str, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # Given alice's credentials in config.json
    client = client_for(auth_registry, write_config(tmp_path / "ok", auth_registry.host,
                                                    **basic_entry("alice", PASSWORD)))
    # When an image is pushed and resolved
    img = push_image(client, auth_registry.host, repo_name, "v1", [{"f": b"data"}])
    resolved = client.resolve(parse_reference(f"{auth_registry.host}/{repo_name}:v1"))
    # Then it works, and the password was never logged
    assert resolved.manifest_digest == img.manifest_digest
    assert PASSWORD not in caplog.text


def test_basic_auth_wrong_or_missing_password(auth_registry: Registry, repo_name: str, tmp_path: Path) -> None:
    ref = parse_reference(f"{auth_registry.host}/{repo_name}:v1")
    wrong = client_for(auth_registry, write_config(tmp_path / "w", auth_registry.host,
                                                   **basic_entry("alice", "not-the-password")))
    with pytest.raises(AuthenticationFailed, match=f"authentication failed for registry {auth_registry.host}") as e:
        wrong.resolve(ref)
    assert "not-the-password" not in str(e.value)
    anonymous = client_for(auth_registry, tmp_path / "empty")
    with pytest.raises(AuthenticationFailed, match=auth_registry.host):
        anonymous.resolve(ref)


def test_docker_config_from_settings(auth_registry: Registry, repo_name: str, tmp_path: Path) -> None:
    # Given DOCKER_CONFIG pointing at a config with alice's credentials (as a worker's environment would)
    folder = write_config(tmp_path / "dc", auth_registry.host, username="alice", password=PASSWORD)
    settings = Settings.from_env({"DOCKER_CONFIG": str(folder),
                                  "PREWARM_INSECURE_REGISTRIES": auth_registry.host})
    client = RegistryClient.from_settings(settings, retry=FAST_RETRY)
    # Then the client authenticates with them
    digest = client.push_blob(auth_registry.host, repo_name, b"via settings")
    assert client.get_blob(auth_registry.host, repo_name, digest) == b"via settings"


# === bearer tokens
def test_bearer_anonymous_pull_and_refused_push(token_registry: TokenRegistry, repo_name: str,
                                                tmp_path: Path) -> None:
    reg, tokens = token_registry.registry, token_registry.tokens
    alice = client_for(reg, write_config(tmp_path / "a", reg.host, **basic_entry("alice", PASSWORD)))
    digest = alice.push_blob(reg.host, repo_name, b"public data")
    # Given no credentials, When pulling, Then an anonymous token is enough
    anonymous = client_for(reg, tmp_path / "none")
    assert anonymous.get_blob(reg.host, repo_name, digest) == b"public data"
    assert any(i.account == "" and i.scopes == [f"repository:{repo_name}:pull"] for i in tokens.issued)
    # And pushing anonymously is refused with an auth error naming the registry
    with pytest.raises(AuthenticationFailed, match=f"registry {reg.host}"):
        anonymous.push_blob(reg.host, repo_name, b"not allowed")


def test_bearer_with_credentials_and_token_cache(token_registry: TokenRegistry, repo_name: str,
                                                 tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    reg, tokens = token_registry.registry, token_registry.tokens
    client = client_for(reg, write_config(tmp_path / "a", reg.host, **basic_entry("alice", PASSWORD)))
    # When alice pushes an image and reads it several times
    img = push_image(client, reg.host, repo_name, "v1", [{"x": b"1"}, {"y": b"2"}])
    for _ in range(3):
        client.resolve(parse_reference(f"{reg.host}/{repo_name}:v1"))
        client.fetch_range(reg.host, repo_name, img.layer_digests[0], 0, 10)
    # Then tokens were issued to alice with basic credentials, once per scope (cached)
    assert {i.account for i in tokens.issued} == {"alice"}
    assert {i.grant for i in tokens.issued} == {"basic"}
    scopes = [tuple(i.scopes) for i in tokens.issued]
    assert len(scopes) == len(set(scopes)) <= 3
    assert PASSWORD not in caplog.text


def test_bearer_with_identity_token(token_registry: TokenRegistry, repo_name: str, tmp_path: Path) -> None:
    reg, tokens = token_registry.registry, token_registry.tokens
    client = client_for(reg, write_config(tmp_path / "t", reg.host, identitytoken="rt-alice-1"))
    digest = client.push_blob(reg.host, repo_name, b"with identity token")
    assert client.get_blob(reg.host, repo_name, digest) == b"with identity token"
    assert tokens.issued and all(i.grant == "refresh_token" and i.account == "alice" for i in tokens.issued)


def test_bearer_wrong_password(token_registry: TokenRegistry, repo_name: str, tmp_path: Path) -> None:
    reg = token_registry.registry
    client = client_for(reg, write_config(tmp_path / "w", reg.host, **basic_entry("alice", "wrong-pw-123")))
    with pytest.raises(AuthenticationFailed, match=f"registry {reg.host}: its token service refused") as err:
        client.resolve(parse_reference(f"{reg.host}/{repo_name}:v1"))
    assert "wrong-pw-123" not in str(err.value)
    assert token_registry.tokens.refused >= 1


def test_bearer_refresh_on_401_mid_job(token_registry: TokenRegistry, repo_name: str, tmp_path: Path) -> None:
    reg, tokens = token_registry.registry, token_registry.tokens
    client = client_for(reg, write_config(tmp_path / "a", reg.host, **basic_entry("alice", PASSWORD)))
    data = os.urandom(100_000)
    # Given tokens the registry accepts for 2 s although the client is told they last 300 s
    tokens.registry_validity = 2
    digest = client.push_blob(reg.host, repo_name, data)
    assert client.fetch_range(reg.host, repo_name, digest, 0, 100) == data[:100]
    tokens.issued.clear()
    # When the job goes on after the registry stopped accepting the cached token
    time.sleep(3.5)
    got = client.fetch_range(reg.host, repo_name, digest, 100, 5000)
    # Then the 401 was answered with a fresh token and the same request succeeded
    assert got == data[100:5000]
    assert [i.scopes for i in tokens.issued] == [[f"repository:{repo_name}:pull"]]
    assert len(reg.requests_logged("GET", f"/v2/{repo_name}/blobs/")) >= 2


# === where credentials may go
def test_https_to_http_redirect_on_same_port_is_refused(auth_registry: Registry, repo_name: str,
                                                         tmp_path: Path) -> None:
    # Given alice's credentials and a blob on the htpasswd registry
    direct = client_for(auth_registry, write_config(tmp_path / "d", auth_registry.host,
                                                    **basic_entry("alice", PASSWORD)))
    digest = direct.push_blob(auth_registry.host, repo_name, b"secret layer")
    cert, key = make_cert(tmp_path / "tls")
    # And an HTTPS front (that also answers plain HTTP on its port) whose blob GET redirects to http://
    with FaultProxy(auth_registry.host, tls=(cert, key)) as proxy:
        cfg = write_config(tmp_path / "p", proxy.host, **basic_entry("alice", PASSWORD))
        client = RegistryClient(ca_bundle=str(cert), docker_config=cfg, retry=FAST_RETRY)
        assert client.blob_exists(proxy.host, repo_name, digest) == len(b"secret layer")
        proxy.add(Fault("downgrade", path="/blobs/sha256", method="GET"))
        # When the blob is read, Then the downgrade is refused, saying so
        with pytest.raises(RegistryError, match="refusing its redirect.*https to plain http") as err:
            client.get_blob(proxy.host, repo_name, digest)
        assert not isinstance(err.value, Transient)
        # And the credentials went over TLS only: nothing at all was sent in the clear
        assert any("Authorization" in r.headers for r in proxy.requests if r.tls)
        assert not [r for r in proxy.requests if not r.tls]


def test_no_credentials_to_plain_http_realm_of_https_registry(token_registry: TokenRegistry, repo_name: str,
                                                              tmp_path: Path) -> None:
    reg, tokens = token_registry.registry, token_registry.tokens
    cert, key = make_cert(tmp_path / "tls")
    # Given an HTTPS registry whose bearer challenge names a plain http:// realm
    with FaultProxy(reg.host, tls=(cert, key)) as proxy:
        cfg = write_config(tmp_path / "p", proxy.host, **basic_entry("alice", PASSWORD))
        client = RegistryClient(ca_bundle=str(cert), docker_config=cfg, retry=FAST_RETRY)
        # When alice's client reads from it, Then it refuses, saying why
        with pytest.raises(RegistryError, match="plain http:// token realm") as err:
            client.get_blob(proxy.host, repo_name, "sha256:" + "0" * 64)
        assert PASSWORD not in str(err.value)
        # And the token server never saw her password
        assert all(i.grant != "basic" for i in tokens.issued) and tokens.refused == 0


def test_link_local_token_realm_is_refused(registry: Registry, repo_name: str, tmp_path: Path) -> None:
    # Given a registry whose challenge points at the cloud metadata address
    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("respond", status=401, headers={
            "WWW-Authenticate": 'Bearer realm="http://169.254.169.254/latest/meta-data",service="x"',
            "Content-Type": "application/json"}, body=b'{"errors":[{"code":"UNAUTHORIZED"}]}'))
        client = RegistryClient(insecure_registries=frozenset({proxy.host}), docker_config=tmp_path,
                                retry=FAST_RETRY, timeout=2.0)
        # Then the client refuses to ask it, naming why
        with pytest.raises(RegistryError, match="link-local"):
            client.get_blob(proxy.host, repo_name, "sha256:" + "0" * 64)


# === token scopes, cache and concurrency
def test_scope_comes_from_the_repository_not_the_url(token_registry: TokenRegistry, repo_name: str,
                                                     tmp_path: Path) -> None:
    reg, tokens = token_registry.registry, token_registry.tokens
    repo = f"{repo_name}/blobs/app"
    client = client_for(reg, write_config(tmp_path / "a", reg.host, **basic_entry("alice", PASSWORD)))
    # Given a repository with a 'blobs' path component, When a blob is pushed and read again and again
    digest = client.push_blob(reg.host, repo, b"in a repo named like the API")
    for _ in range(3):
        assert client.get_blob(reg.host, repo, digest) == b"in a repo named like the API"
        assert client.blob_exists(reg.host, repo, digest) is not None
    # Then every token was asked for that repository, one per scope, and then found in the cache
    asked = [s for i in tokens.issued for s in i.scopes]
    assert asked and all(s.startswith(f"repository:{repo}:") for s in asked)
    assert sorted(i.scopes[0] for i in tokens.issued) == [f"repository:{repo}:pull", f"repository:{repo}:pull,push"]


def test_slow_token_fetch_does_not_hold_up_other_scopes(token_registry: TokenRegistry, repo_name: str,
                                                        tmp_path: Path) -> None:
    reg, tokens = token_registry.registry, token_registry.tokens
    cfg = write_config(tmp_path / "a", reg.host, **basic_entry("alice", PASSWORD))
    pusher = client_for(reg, cfg)
    first = pusher.push_blob(reg.host, f"{repo_name}/a", b"first")
    second = pusher.push_blob(reg.host, f"{repo_name}/b", b"second")
    client = client_for(reg, cfg)
    assert client.get_blob(reg.host, f"{repo_name}/a", first) == b"first"
    # Given a token service that now takes 2 s, and a thread waiting on it for another repository
    tokens.delay = 2.0
    try:
        slow = threading.Thread(target=client.get_blob, args=(reg.host, f"{repo_name}/b", second))
        slow.start()
        time.sleep(0.3)
        # When the first repository is read meanwhile, with its cached token
        began = time.monotonic()
        assert client.get_blob(reg.host, f"{repo_name}/a", first) == b"first"
        took = time.monotonic() - began
        slow.join()
    finally:
        tokens.delay = 0.0
    # Then it did not wait for the other fetch
    assert took < 1.0, took


def test_concurrent_401s_lead_to_one_refresh(token_registry: TokenRegistry, repo_name: str, tmp_path: Path) -> None:
    reg, tokens = token_registry.registry, token_registry.tokens
    client = client_for(reg, write_config(tmp_path / "a", reg.host, **basic_entry("alice", PASSWORD)))
    data = os.urandom(64_000)
    # Given a cached pull token that the registry stops accepting while the client still trusts it
    tokens.registry_validity = 2
    digest = client.push_blob(reg.host, repo_name, data)
    assert client.fetch_range(reg.host, repo_name, digest, 0, 10) == data[:10]
    time.sleep(3.5)
    tokens.issued.clear()
    # When 8 threads read ranges at once and all meet a 401
    n = 8
    barrier = threading.Barrier(n)
    got: dict[int, bytes] = {}

    def read(i: int) -> None:
        barrier.wait()
        got[i] = client.fetch_range(reg.host, repo_name, digest, i * 1000, i * 1000 + 1000)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then every range arrived and the token was refreshed once, not once per thread
    assert got == {i: data[i * 1000:i * 1000 + 1000] for i in range(n)}
    assert len(tokens.issued) == 1, [i.scopes for i in tokens.issued]


def test_docker_hub_credentials_found_as_docker_finds_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a credential helper that knows Docker Hub by its server address only, as Docker asks for it
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-hubtest"
    helper.write_text('#!/bin/sh\nread host\nif [ "$host" = "https://index.docker.io/v1/" ]; then\n'
                      '  echo \'{"ServerURL":"https://index.docker.io/v1/","Username":"hubuser","Secret":"hubpw"}\'\n'
                      'else echo "credentials not found in native keychain"; exit 1; fi\n')
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for raw in ({"credHelpers": {"https://index.docker.io/v1/": "hubtest"}},
                {"credHelpers": {"docker.io": "hubtest"}}, {"credsStore": "hubtest"}):
        (tmp_path / "config.json").write_text(json.dumps(raw))
        cfg = DockerConfig.load(tmp_path)
        # Then every name of Docker Hub gets the helper's credential
        for name in ("docker.io", "index.docker.io", "registry-1.docker.io"):
            assert cfg.credential_for(name) == Credential("hubuser", "hubpw"), (raw, name)
    # And in auths, Docker's own key wins over a stale entry under another spelling of Hub
    (tmp_path / "config.json").write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": basic_entry("hubuser", "current"),
        "index.docker.io": basic_entry("hubuser", "stale")}}))
    assert DockerConfig.load(tmp_path).credential_for("docker.io") == Credential("hubuser", "current")


def test_upload_location_downgrade_is_refused(registry: Registry, repo_name: str, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path / "tls")
    # Given an HTTPS registry whose upload session points at plain http on its own port
    with FaultProxy(registry.host, tls=(cert, key)) as proxy:
        proxy.add(Fault("respond", path="/blobs/uploads/", method="POST", status=202,
                        headers={"Location": f"http://{proxy.host}/v2/{repo_name}/blobs/uploads/u1"}))
        client = RegistryClient(ca_bundle=str(cert), docker_config=tmp_path, retry=FAST_RETRY)
        # When a blob is pushed, Then the upload is refused before any byte goes out in the clear
        with pytest.raises(RegistryError, match="refusing its upload location.*https to plain http"):
            client.push_blob(proxy.host, repo_name, b"layer bytes")
        assert not [r for r in proxy.requests if not r.tls]


def test_token_service_redirect_to_link_local_is_refused(registry: Registry, repo_name: str,
                                                         tmp_path: Path) -> None:
    with FaultProxy(registry.host) as proxy:
        # Given a registry whose token realm (on the same proxy) redirects to the cloud metadata address
        proxy.add(Fault("respond", path="^/token", status=302,
                        headers={"Location": "http://169.254.169.254/latest/meta-data/iam"}))
        proxy.add(Fault("respond", path="^/v2/", status=401, headers={
            "WWW-Authenticate": f'Bearer realm="http://{proxy.host}/token",service="x"',
            "Content-Type": "application/json"}, body=b'{"errors":[{"code":"UNAUTHORIZED"}]}'))
        client = RegistryClient(insecure_registries=frozenset({proxy.host}), docker_config=tmp_path,
                                retry=FAST_RETRY, timeout=2.0)
        # Then the redirect is not followed, and the error says why
        with pytest.raises(RegistryError, match="token service's redirect: its host 169.254.169.254 is link-local"):
            client.get_blob(proxy.host, repo_name, "sha256:" + "0" * 64)
        assert [r.path for r in proxy.requests if r.path.startswith("/token")]
