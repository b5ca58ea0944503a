"""`prewarm inspect` as users run it (a real process): output, and errors users can act on."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prewarm.resolve.registry.client import RegistryClient
from tests.registry_images import push_image
from tests.services import Registry, free_port


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the CLI in its own process, the way users do (no in-process shortcuts)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PREWARM_") and k != "DOCKER_CONFIG"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "prewarm", *args], env=full_env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_inspect_prints_image(registry: Registry, repo_name: str, tmp_path: Path) -> None:
    # Given an image of two layers
    client = RegistryClient(insecure_registries=frozenset({registry.host}), docker_config=tmp_path)
    img = push_image(client, registry.host, repo_name, "v1", [{"a": b"1"}, {"b": b"2"}])
    env = {"DOCKER_CONFIG": str(tmp_path)}
    # When inspected (insecure registry given as a flag)
    out = run(["inspect", f"{registry.host}/{repo_name}:v1", "--insecure-registry", registry.host], env)
    # Then digest, platform, config, layers and diff_ids are shown
    assert out.returncode == 0, out.stderr
    assert img.manifest_digest in out.stdout and "linux/amd64" in out.stdout
    assert all(d in out.stdout for d in img.layer_digests)
    assert "diff_id sha256:" in out.stdout and "no SOCI index" in out.stdout
    # And --json (insecure registry from the environment) gives the same facts to scripts
    out = run(["inspect", f"{registry.host}/{repo_name}:v1", "--json"],
              {**env, "PREWARM_INSECURE_REGISTRIES": f"other:1,{registry.host}"})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["manifest_digest"] == img.manifest_digest and data["platform"] == "linux/amd64"
    assert [layer["digest"] for layer in data["layers"]] == img.layer_digests
    assert all(layer["diff_id"].startswith("sha256:") for layer in data["layers"])


def _assert_clean_error(out: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prewarm: error: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_inspect_unknown_image_is_not_found(registry: Registry, repo_name: str, tmp_path: Path) -> None:
    out = run(["inspect", f"{registry.host}/{repo_name}:nope"],
              {"PREWARM_INSECURE_REGISTRIES": registry.host, "DOCKER_CONFIG": str(tmp_path)})
    _assert_clean_error(out, 1, "not found", f"{registry.host}/{repo_name}")


def test_inspect_wrong_password(auth_registry: Registry, repo_name: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"auths": {auth_registry.host: {"auth": base64.b64encode(b"alice:WrongPass99").decode()}}}))
    out = run(["inspect", f"{auth_registry.host}/{repo_name}:v1"],
              {"PREWARM_INSECURE_REGISTRIES": auth_registry.host, "DOCKER_CONFIG": str(tmp_path)})
    _assert_clean_error(out, 4, f"authentication failed for registry {auth_registry.host}")
    assert "WrongPass99" not in out.stderr


def test_inspect_unreachable_registry(tmp_path: Path) -> None:
    host = f"127.0.0.1:{free_port()}"
    out = run(["inspect", f"{host}/some/image:1"], {"PREWARM_INSECURE_REGISTRIES": host,
                                                     "DOCKER_CONFIG": str(tmp_path)})
    _assert_clean_error(out, 5, f"registry {host} unreachable")


@pytest.mark.parametrize("bad,why", [("Ubuntu:22.04", "must be lowercase"), ("a//b", "empty component"),
                                     ("img@sha256:123", "not a digest")])
def test_inspect_malformed_reference(bad: str, why: str, tmp_path: Path) -> None:
    out = run(["inspect", bad], {"DOCKER_CONFIG": str(tmp_path)})
    _assert_clean_error(out, 2, "invalid image reference", why)


def test_inspect_https_registry_without_ca_says_what_to_do(tmp_path: Path) -> None:
    # A plain-HTTP registry not named insecure: the client speaks HTTPS and the error says which flag to use
    from tests.services import run_registry

    with run_registry(tmp_path / "reg") as reg:
        out = run(["inspect", f"{reg.host}/a/b:1"], {"DOCKER_CONFIG": str(tmp_path)})
        _assert_clean_error(out, 3, "--insecure-registry")
