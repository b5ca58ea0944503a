"""Small real images for the registry tests, pushed with prewarm's own client.

Layers are real gzip tarballs; configs carry the diff_ids of the layers; manifests are
OCI or Docker schema 2.  Nothing here talks to the registry except through
:class:`prewarm.resolve.registry.client.RegistryClient`.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import tarfile

from prewarm.resolve.digest import sha256_digest
from prewarm.resolve.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    canonical_json,
    index_json,
    manifest_json,
)
from prewarm.resolve.registry.client import RegistryClient


def make_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzip tar layer holding ``files``; returns (compressed bytes, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), sha256_digest(tar_bytes)


@dataclasses.dataclass
class PushedImage:
    manifest_digest: str
    manifest: bytes
    layers: list[bytes]
    layer_digests: list[str]
    config: bytes


def push_image(client: RegistryClient, registry: str, repository: str, tag: str | None,
               layers: list[dict[str, bytes]], *, arch: str = "amd64", variant: str | None = None,
               docker: bool = False, annotations: dict[str, str] | None = None) -> PushedImage:
    """Build and push a small image; returns what was pushed."""
    blobs, diff_ids = [], []
    for files in layers:
        blob, diff_id = make_layer(files)
        blobs.append(blob)
        diff_ids.append(diff_id)
    config_raw: dict[str, object] = {"architecture": arch, "os": "linux",
                                     "rootfs": {"type": "layers", "diff_ids": diff_ids},
                                     "config": {"Cmd": ["/bin/true"]}}
    if variant:
        config_raw["variant"] = variant
    config = json.dumps(config_raw).encode()
    layer_type = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
    descs = []
    for blob in blobs:
        descs.append(Descriptor(layer_type, client.push_blob(registry, repository, blob), len(blob)))
    config_desc = Descriptor(DOCKER_CONFIG if docker else OCI_CONFIG,
                             client.push_blob(registry, repository, config), len(config))
    if docker:
        body = canonical_json({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": config_desc.to_json(),
                               "layers": [d.to_json() for d in descs]})
        media_type = DOCKER_MANIFEST
    else:
        body = manifest_json(config_desc, descs, annotations=annotations)
        media_type = OCI_MANIFEST
    digest = client.push_manifest(registry, repository, tag or sha256_digest(body), body, media_type)
    return PushedImage(digest, body, blobs, [d.digest for d in descs], config)


def push_index(client: RegistryClient, registry: str, repository: str, tag: str,
               entries: list[tuple[PushedImage, Platform]], extra: list[Descriptor] = ()) -> str:
    """Push an OCI image index over already pushed images."""
    manifests = [Descriptor(OCI_MANIFEST, img.manifest_digest, len(img.manifest), platform=p)
                 for img, p in entries]
    body = index_json([*manifests, *extra])
    return client.push_manifest(registry, repository, tag, body, OCI_INDEX)
