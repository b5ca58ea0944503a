"""deploy/containerd: the config snippet and RuntimeClass agree with each other and with the DaemonSet."""

from __future__ import annotations

import tomllib
from pathlib import Path

import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_containerd_snippet_points_at_the_shim_and_keeps_overlayfs_default() -> None:
    # Given the snippet and the DaemonSet that runs the shim
    config = tomllib.loads((DEPLOY / "containerd" / "config.toml").read_text())
    daemonset = next(d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "40-worker-daemonset.yaml").read_text())
                     if d and d["kind"] == "DaemonSet")
    shim = next(c for c in daemonset["spec"]["template"]["spec"]["containers"] if c["name"] == "snapshotter")
    address = shim["command"][shim["command"].index("--address") + 1]

    # Then containerd dials the socket the shim listens on, as a snapshot plugin
    assert config["proxy_plugins"]["prewarm"] == {"type": "snapshot", "address": address}
    # And CRI passes layer annotations, keeps overlayfs as default, and offers an opt-in handler
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["disable_snapshot_annotations"] is False
    assert cri["snapshotter"] == "overlayfs"
    assert cri["runtimes"]["prewarm"]["snapshotter"] == "prewarm"


def test_runtimeclass_names_the_handler_of_the_snippet() -> None:
    config = tomllib.loads((DEPLOY / "containerd" / "config.toml").read_text())
    rc = yaml.safe_load((DEPLOY / "containerd" / "runtimeclass.yaml").read_text())
    kubernetes_validate.validate(rc, "1.30", strict=True)
    assert rc["handler"] in config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
