"""The container image of scripts/build-image, pushed to a real registry and run by a real containerd.

The image is built once per session (mmdebstrap, the wheel, umoci: about three minutes on
two cores) and pushed by the script itself to the session's docker-registry.  containerd
(Debian's, started by tests/containerd.py) then pulls it and runs ``prewarm`` inside it
with runc, as a node would; and prewarm pre-warms its own image, which then runs on the
prewarm snapshotter without containerd fetching a layer.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containerd import Containerd, run_containerd
from tests.pipeline_helpers import clean_env, prewarm
from tests.services import Registry

# The first test to use the image waits for its build (about three minutes here, more on a
# slow mirror): longer than the suite's 600 s default would allow.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

REPO_ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


@dataclasses.dataclass(frozen=True)
class BuiltImage:
    layout: Path  # the OCI image layout, tagged VERSION
    manifest: str  # its manifest digest
    ref: str  # where the script pushed it
    pushed: str  # the digest the registry has

    def blob(self, digest: str) -> Path:
        return self.layout / "blobs" / "sha256" / digest.split(":", 1)[1]

    def json(self, digest: str) -> dict:
        return json.loads(self.blob(digest).read_text())


@pytest.fixture(scope="session")
def built_image(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> BuiltImage:
    """scripts/build-image --push to the session's registry, once per session."""
    out = tmp_path_factory.mktemp("image")
    ref = f"{registry.host}/prewarm/prewarm:{VERSION}"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "build-image"), "--out", str(out),
                           "--push", ref, "--insecure"], capture_output=True, text=True, timeout=1100, check=False)
    assert proc.returncode == 0, f"build-image failed:\n{proc.stderr[-6000:]}\n{proc.stdout}"
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.strip())
    return BuiltImage(layout=out / "oci", manifest=lines["manifest"], ref=ref,
                      pushed=lines["pushed"].rsplit("@", 1)[1])


@pytest.fixture()
def containerd(tmp_path: Path, registry: Registry) -> Iterator[Containerd]:
    with run_containerd(tmp_path / "store", cri=True, registry_hosts={registry.host: registry.url}) as ctrd:
        yield ctrd


def test_the_layout_is_the_pushed_image_with_prewarm_as_entrypoint(built_image: BuiltImage) -> None:
    # Given the built OCI layout
    manifest = built_image.json(built_image.manifest)
    config = built_image.json(manifest["config"]["digest"])
    # Then the registry holds the very same manifest (skopeo kept the digests)
    assert built_image.pushed == built_image.manifest
    # And it is one layer whose config runs prewarm from the venv, with no fetched base
    assert len(manifest["layers"]) == 1
    assert config["config"]["Entrypoint"] == ["prewarm"]
    assert config["config"]["Cmd"] == ["--help"]
    assert config["config"]["Env"][0].startswith("PATH=/opt/prewarm/bin:")
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    # And its times are the commit's (SOURCE_DATE_EPOCH), not the build's
    epoch = int(subprocess.run(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%ct"], capture_output=True,
                               text=True, check=True).stdout)
    created = datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert config["created"] == labels["org.opencontainers.image.created"] == created
    assert [h["created"] for h in config["history"]] == [created]
    # And no file in the layer is newer than the commit, none is owned by a build user
    with tarfile.open(built_image.blob(manifest["layers"][0]["digest"]), "r:gz") as layer:
        members = layer.getmembers()
    names = {m.name.removeprefix("./") for m in members}
    assert {"opt/prewarm/bin/prewarm", "usr/bin/ctr", "usr/bin/python3"} <= names
    assert not [m.name for m in members if m.mtime > epoch][:5]
    assert not [m.name for m in members if m.name.removeprefix("./").startswith("tmp/") and m.isfile()]
    # And pip, the installer, was removed again
    assert not [n for n in names if n.startswith("opt/prewarm/lib/python3.11/site-packages/pip/")]


def test_containerd_pulls_the_image_and_runs_prewarm_in_it(built_image: BuiltImage, containerd: Containerd) -> None:
    # Given the image in the registry
    # When containerd pulls it (overlayfs, its default snapshotter)
    containerd.ctr("images", "pull", "--plain-http", built_image.ref, timeout=300)
    # Then `prewarm --version` inside it prints the package's version
    out = containerd.ctr("run", "--rm", built_image.ref, "image-version", "prewarm", "--version")
    assert out.stdout.strip() == f"prewarm, version {VERSION}"
    # And with no arguments the entrypoint is prewarm, showing its help
    out = containerd.ctr("run", "--rm", built_image.ref, "image-help")
    assert out.stdout.startswith("Usage: prewarm")
    # And the snapshotter's gRPC modules and the C extensions load, and ctr is there for the worker
    script = ("import prewarm.store._landing, prewarm.index._ztoc; "
              "from prewarm.runtime.shim._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc; "
              "print('imports-ok')")
    out = containerd.ctr("run", "--rm", built_image.ref, "image-imports", "python3", "-c", script)
    assert out.stdout.strip() == "imports-ok"
    out = containerd.ctr("run", "--rm", built_image.ref, "image-ctr", "ctr", "--version")
    assert out.stdout.startswith("ctr github.com/containerd/containerd")


def test_prewarm_prewarms_its_own_image_which_then_runs_on_the_prewarm_snapshotter(
        built_image: BuiltImage, containerd: Containerd, registry: Registry) -> None:
    # Given the image in the registry, pre-warmed on the node and registered with containerd
    env = clean_env(containerd.store)
    prewarm("schedule", built_image.ref, "--wait", "--quiet", "--insecure-registry", registry.host,
            "--containerd", str(containerd.address), "--namespace", "k8s.io", env=env, check=True, timeout=600)
    layer = built_image.json(built_image.manifest)["layers"][0]["digest"]
    served = registry.bytes_served(f"/blobs/{layer}")
    # When a container of it runs on the prewarm snapshotter
    out = containerd.ctr("run", "--rm", "--snapshotter", "prewarm", built_image.ref, "image-warm",
                         "prewarm", "--version", namespace="k8s.io")
    # Then it is prewarm's own image, and containerd fetched no layer byte for it
    assert out.stdout.strip() == f"prewarm, version {VERSION}"
    assert registry.bytes_served(f"/blobs/{layer}") == served


def test_the_manifests_run_this_image_at_the_package_version() -> None:
    # Given every container image named in deploy/kubernetes
    images = {}
    for manifest in sorted((REPO_ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for line in manifest.read_text().splitlines():
            if line.strip().startswith("image:"):
                images.setdefault(line.split(":", 1)[1].strip(), []).append(manifest.name)
    # Then every one but Redis is the image the README tells how to build and push, at this version
    ours = {name: files for name, files in images.items() if not name.startswith("redis:")}
    assert list(ours) == [f"registry.example.com/prewarm:{VERSION}"], images
    # And the worker, the shim, Flower and the schedule job all use it
    assert len(ours[f"registry.example.com/prewarm:{VERSION}"]) >= 4
    assert f"registry.example.com/prewarm:{VERSION}" in (REPO_ROOT / "README.md").read_text()
