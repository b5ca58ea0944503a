"""The kubelet's path: CRI PullImage through containerd 1.6 with ``snapshotter = "prewarm"``,
against the real local registry, counting what the registry served."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from prewarm.runtime.shim._proto.runtime.v1 import api_pb2 as cri
from tests.containerd import (
    WHITEOUT,
    Containerd,
    HandmadeImage,
    cri_images,
    cri_pull,
    install_prewarmed,
    make_image,
    make_layer,
    push_image,
    run_containerd,
    shell_files,
)
from tests.services import Registry

SCRIPT = ("while read l; do echo $l; done < /etc/hello; while read l; do echo $l; done < /etc/top; "
          "[ -e /etc/gone ] && echo gone-present || echo gone-absent")


@pytest.fixture()
def cri_containerd(tmp_path: Path, registry: Registry) -> Iterator[Containerd]:
    with run_containerd(tmp_path / "store", cri=True, registry_hosts={registry.host: registry.url}) as ctrd:
        yield ctrd


def two_layer_image(repo_name: str) -> HandmadeImage:
    base = make_layer({**shell_files(), "etc/hello": b"hello from the store\n", "etc/gone": b"x\n"})
    top = make_layer({"etc/gone": WHITEOUT, "etc/top": f"top of {repo_name}\n".encode()})
    return make_image(repo_name, [base, top])


def layer_gets(registry: Registry, image: HandmadeImage) -> dict[str, int]:
    return {l.digest: len(registry.requests_logged("GET", f"/blobs/{l.digest}")) for l in image.layers}


def test_cri_pull_of_prewarmed_image_fetches_no_layer(cri_containerd: Containerd, registry: Registry,
                                                      repo_name: str) -> None:
    # Given an image in the registry whose two layers are pre-warmed in the node's store
    image = two_layer_image(repo_name)
    ref = push_image(registry.url, repo_name, "v1", image)
    install_prewarmed(cri_containerd.store, image.layers)

    # When the kubelet's path pulls it (CRI PullImage)
    images = cri_images(cri_containerd)
    pulled = cri_pull(images, ref)

    # Then no layer blob was fetched, the shim answered both layers from the store, CRI has the image
    assert layer_gets(registry, image) == {l.digest: 0 for l in image.layers}
    assert cri_containerd.shim_log.read_text().count("answering ALREADY_EXISTS") == 2
    status = images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout=30)
    assert status.image.id == pulled.image_ref
    # And a container of it runs on the pre-warmed layers, whiteout applied
    out = cri_containerd.ctr("run", "--rm", "--snapshotter", "prewarm", ref, "cri-run-1", "/bin/sh", "-c",
                             SCRIPT, namespace="k8s.io").stdout
    assert out.split() == ["hello", "from", "the", "store", "top", "of", *repo_name.split(), "gone-absent"]


def test_cri_pull_of_partly_prewarmed_image_fetches_the_rest(cri_containerd: Containerd, registry: Registry,
                                                             repo_name: str) -> None:
    # Given an image whose base layer only is pre-warmed
    image = two_layer_image(repo_name)
    ref = push_image(registry.url, repo_name, "v1", image)
    install_prewarmed(cri_containerd.store, image.layers[:1])

    # When CRI pulls it
    cri_pull(cri_images(cri_containerd), ref)

    # Then only the missing layer came from the registry and containerd applied it itself
    base, top = image.layers
    assert layer_gets(registry, image) == {base.digest: 0, top.digest: 1}
    assert cri_containerd.shim_log.read_text().count("answering ALREADY_EXISTS") == 1
    out = cri_containerd.ctr("run", "--rm", "--snapshotter", "prewarm", ref, "cri-run-2", "/bin/sh", "-c",
                             SCRIPT, namespace="k8s.io").stdout
    assert out.split()[-1] == "gone-absent" and out.split()[:4] == ["hello", "from", "the", "store"]
