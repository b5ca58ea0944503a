"""SOCI index manifests: build and push v1 indexes, discover v1 and v2 ones.

A SOCI index lists one zTOC per indexed layer of one image manifest.  We write
exactly what soci-snapshotter writes (so either tool can use the other's index):

* an OCI image manifest in compact JSON, Go field order;
* ``config`` is the 2-byte blob ``{}`` with media type
  ``application/vnd.amazon.soci.index.v1+json`` (v1) or ``...v2+json`` (v2);
* ``layers`` are the zTOCs in image-layer order (un-indexed layers are skipped), each
  ``application/octet-stream`` with the annotations
  ``com.amazon.soci.image-layer-digest``, ``com.amazon.soci.image-layer-mediaType``
  and ``com.amazon.soci.span-size``;
* the manifest annotation ``com.amazon.soci.build-tool-identifier``.

How an index is found for an image manifest (:func:`find_soci_index`), in order:

1. v2: the image manifest's ``com.amazon.soci.index-digest`` annotation;
2. v2: an entry of the image index with ``artifactType`` v2 whose
   ``com.amazon.soci.image-manifest-digest`` annotation names the manifest;
3. v1: a referrer of the manifest (OCI referrers API, or the ``sha256-<hex>``
   fallback tag on registries without it) of artifact type v1.

We push v1 only (:func:`push_soci_index`): it leaves the image and its digest alone.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prewarm.errors import BadZtoc, ManifestNotFound, UnsupportedManifest
from prewarm.index.ztoc_spool import ZtocFile
from prewarm.resolve.digest import digest_hex, sha256_digest
from prewarm.resolve.manifest import (
    OCI_MANIFEST,
    Descriptor,
    ImageManifest,
    manifest_json,
    parse_manifest,
)
from prewarm.resolve.registry.client import RegistryClient, ResolvedImage

log = logging.getLogger(__name__)

SOCI_INDEX_V1 = "application/vnd.amazon.soci.index.v1+json"
SOCI_INDEX_V2 = "application/vnd.amazon.soci.index.v2+json"
ZTOC_MEDIA_TYPE = "application/octet-stream"
ANN_LAYER_DIGEST = "com.amazon.soci.image-layer-digest"
ANN_LAYER_MEDIA_TYPE = "com.amazon.soci.image-layer-mediaType"
ANN_SPAN_SIZE = "com.amazon.soci.span-size"
ANN_BUILD_TOOL = "com.amazon.soci.build-tool-identifier"
ANN_INDEX_DIGEST = "com.amazon.soci.index-digest"
ANN_IMAGE_MANIFEST_DIGEST = "com.amazon.soci.image-manifest-digest"
#: The config blob of every SOCI index.
EMPTY_CONFIG = b"{}"
EMPTY_CONFIG_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
#: zTOCs are about 33 KB per span; a 50 GB layer in 4 MiB spans is under 500 MB.
MAX_ZTOC_BYTES = 1 << 30
GZIP_LAYER_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})
TAR_LAYER_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
})


@dataclasses.dataclass(frozen=True)
class SociIndex:
    """A parsed SOCI index manifest.

    Attributes:
        digest: the index manifest's digest.
        version: ``"v1"`` or ``"v2"``.
        ztocs: the zTOC descriptors, in image-layer order.
        annotations: the manifest's annotations (build tool identifier...).
        subject: the image manifest it indexes (v1 only).
    """

    digest: str
    manifest_bytes: bytes
    version: str
    ztocs: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)
    subject: Descriptor | None = None

    def ztoc_for_layer(self, layer_digest: str) -> Descriptor | None:
        """The zTOC descriptor for ``layer_digest``, or None if the layer is not indexed."""
        for desc in self.ztocs:
            if desc.annotations.get(ANN_LAYER_DIGEST) == layer_digest:
                return desc
        return None

    @property
    def build_tool_identifier(self) -> str | None:
        return self.annotations.get(ANN_BUILD_TOOL)

    @property
    def descriptor(self) -> Descriptor:
        """The index as a referrer descriptor (what the fallback tag lists)."""
        return Descriptor(OCI_MANIFEST, self.digest, len(self.manifest_bytes),
                          annotations=dict(self.annotations),
                          artifact_type=SOCI_INDEX_V1 if self.version == "v1" else SOCI_INDEX_V2)


def parse_soci_index(body: bytes, digest: str, where: str = "SOCI index") -> SociIndex:
    """Parse a SOCI index manifest (already verified against ``digest``).

    Raises:
        UnsupportedManifest: not an OCI manifest whose config is a SOCI index type.
    """
    parsed = parse_manifest(body, OCI_MANIFEST, where)
    if not isinstance(parsed, ImageManifest):
        raise UnsupportedManifest(f"{where}: not an image manifest")
    config_type = parsed.config.media_type
    if config_type == SOCI_INDEX_V1:
        version = "v1"
    elif config_type == SOCI_INDEX_V2:
        version = "v2"
    else:
        raise UnsupportedManifest(f"{where}: config media type {config_type!r} is not a SOCI index")
    return SociIndex(digest, body, version, parsed.layers, dict(parsed.annotations), parsed.subject)


def soci_index_manifest(layers: list[tuple[Descriptor, str, int]], span_size: int, build_tool_identifier: str,
                        subject: Descriptor | None, version: str = "v1") -> bytes:
    """The SOCI index manifest bytes, as soci writes them.

    Args:
        layers: (image layer descriptor, zTOC digest, zTOC size) in image-layer order.
        span_size: the span size the zTOCs were built with.
        build_tool_identifier: written into the manifest annotations.
        subject: the image manifest (v1); None for v2.
        version: ``"v1"`` or ``"v2"``.
    """
    config = Descriptor(SOCI_INDEX_V1 if version == "v1" else SOCI_INDEX_V2, EMPTY_CONFIG_DIGEST,
                        len(EMPTY_CONFIG))
    blobs = [Descriptor(ZTOC_MEDIA_TYPE, ztoc_digest, ztoc_size, annotations={
        ANN_LAYER_DIGEST: layer.digest,
        ANN_LAYER_MEDIA_TYPE: layer.media_type,
        ANN_SPAN_SIZE: str(span_size),
    }) for layer, ztoc_digest, ztoc_size in layers]
    subject_json = Descriptor(subject.media_type, subject.digest, subject.size) if subject else None
    return manifest_json(config, blobs, subject=subject_json,
                         annotations={ANN_BUILD_TOOL: build_tool_identifier})


def push_soci_index(client: RegistryClient, resolved: ResolvedImage, ztocs: Mapping[str, bytes | Path],
                    span_size: int, build_tool_identifier: str) -> str:
    """Push the zTOCs and a v1 SOCI index for ``resolved``; returns the index digest.

    The zTOC blobs and the ``{}`` config go first, then the index manifest (by
    digest, with ``subject`` = the image manifest), then its entry in the
    referrers fallback tag when the registry has no referrers API.  The image itself
    is not changed.

    Args:
        ztocs: serialized zTOC per image-layer digest, as bytes or as a file (read from
            disk as it is pushed: :func:`build_layer_ztocs` makes files); layers missing
            here are un-indexed.

    Raises:
        BadZtoc: a key of ``ztocs`` is not a layer of the image, or there are none.
        RegistryError: a push failed.
    """
    ref = resolved.reference
    known = {layer.digest for layer in resolved.layers}
    stray = sorted(set(ztocs) - known)
    if stray:
        raise BadZtoc(f"zTOCs given for {', '.join(stray)}, which are not layers of {ref}")
    if not ztocs:
        raise BadZtoc(f"no zTOCs to push for {ref}: every layer was skipped (small or zstd)")
    entries: list[tuple[Descriptor, str, int]] = []
    seen: set[str] = set()
    for layer in resolved.layers:
        if layer.digest not in ztocs or layer.digest in seen:
            continue
        seen.add(layer.digest)
        data = ztocs[layer.digest]
        digest = client.push_blob(ref.registry, ref.repository, data)
        entries.append((layer, digest, data.stat().st_size if isinstance(data, Path) else len(data)))
    client.push_blob(ref.registry, ref.repository, EMPTY_CONFIG, digest=EMPTY_CONFIG_DIGEST)
    body = soci_index_manifest(entries, span_size, build_tool_identifier, resolved.manifest_descriptor)
    index = SociIndex(sha256_digest(body), body, "v1", (), {ANN_BUILD_TOOL: build_tool_identifier})
    digest = client.push_referrer(ref.registry, ref.repository, body, OCI_MANIFEST,
                                  subject_digest=resolved.manifest_digest, descriptor=index.descriptor)
    log.info("pushed SOCI index %s for %s (%d zTOCs)", digest, ref, len(entries))
    return digest


@dataclasses.dataclass(frozen=True)
class LayerZtocs:
    """What :func:`build_layer_ztocs` made: a zTOC file per layer, and why others got none."""

    ztocs: dict[str, ZtocFile]
    skipped: dict[str, str]


def layer_ztoc_kind(layer: Descriptor, min_layer_size: int) -> tuple[str | None, str]:
    """How ``layer`` is indexed: ("gzip" | "tar", "") or (None, why it is not)."""
    if layer.size < min_layer_size:
        return None, f"{layer.size} bytes, under the minimum layer size {min_layer_size}"
    if layer.media_type in GZIP_LAYER_TYPES:
        return "gzip", ""
    if layer.media_type in TAR_LAYER_TYPES:
        return "tar", ""
    if "zstd" in layer.media_type:
        return None, "zstd layer (soci indexes no zstd layer; fetched whole)"
    return None, f"media type {layer.media_type} is not a tar layer"


def build_layer_ztocs(client: RegistryClient, resolved: ResolvedImage, *, into: Path, span_size: int,
                      min_layer_size: int, build_tool_identifier: str, workers: int = 4) -> LayerZtocs:
    """Build the zTOC of every indexable layer into ``into/<layer hex>.ztoc``, layers in parallel.

    Each layer is streamed from the registry straight into the one-pass builder
    (:func:`prewarm.index.ztoc_build.build_ztoc_file`), and its digest is checked when
    its stream ends.  Memory grows with neither the layer's size nor its file count: the
    TOC waits in temporary files in ``into`` (room for about three times each zTOC),
    and the zTOCs stay on disk for the caller to push, cache or keep.

    Raises:
        CorruptContent: a layer is not the gzip/tar stream its media type says, or
            does not match its digest (its zTOC file is removed).
        RegistryError: fetching a layer failed (after retries).
        ConfigError: ``into`` cannot be written.
    """
    from prewarm.index.ztoc_build import build_ztoc_file

    ref = resolved.reference
    todo: dict[str, tuple[Descriptor, str]] = {}
    skipped: dict[str, str] = {}
    for layer in resolved.layers:
        kind, why = layer_ztoc_kind(layer, min_layer_size)
        if kind is None:
            skipped[layer.digest] = why
        else:
            todo.setdefault(layer.digest, (layer, kind))

    def one(layer: Descriptor, kind: str) -> ZtocFile:
        path = into / f"{digest_hex(layer.digest)}.ztoc"
        with client.stream_blob(ref.registry, ref.repository, layer.digest) as chunks:
            made = build_ztoc_file(chunks, path, span_size=span_size, build_tool_identifier=build_tool_identifier,
                                   compression="gzip" if kind == "gzip" else "uncompressed")
            try:
                for _ in chunks:  # drain: the digest is verified when the stream ends
                    pass
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        log.info("built zTOC for %s (%d spans, %d files, %d bytes)", layer.digest, made.num_spans,
                 made.num_files, made.size)
        return made

    out: dict[str, ZtocFile] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers),
                                               thread_name_prefix="prewarm-index") as pool:
        futures = {digest: pool.submit(one, layer, kind) for digest, (layer, kind) in todo.items()}
        for digest, future in futures.items():
            out[digest] = future.result()
    return LayerZtocs(out, skipped)


def _fetch_index(client: RegistryClient, resolved: ResolvedImage, digest: str) -> SociIndex | None:
    ref = resolved.reference
    try:
        body, _, digest = client.get_manifest(ref.registry, ref.repository, digest)
    except ManifestNotFound:
        log.warning("%s names SOCI index %s, which the registry does not have", ref, digest)
        return None
    return parse_soci_index(body, digest, f"SOCI index {digest} of {ref}")


def find_soci_index(client: RegistryClient, resolved: ResolvedImage) -> SociIndex | None:
    """The SOCI index for the resolved image manifest (v2 first, then v1), or None.

    Raises:
        RegistryError: the registry failed (not merely "no index").
        DigestMismatch, UnsupportedManifest: an index was named but is corrupt or not SOCI.
    """
    ref = resolved.reference
    annotated = resolved.manifest.annotations.get(ANN_INDEX_DIGEST)
    if annotated:
        found = _fetch_index(client, resolved, annotated)
        if found is not None:
            return found
    if resolved.index is not None:
        for entry in resolved.index.manifests:
            if entry.artifact_type == SOCI_INDEX_V2 and \
                    entry.annotations.get(ANN_IMAGE_MANIFEST_DIGEST) == resolved.manifest_digest:
                found = _fetch_index(client, resolved, entry.digest)
                if found is not None:
                    return found
    candidates = client.referrers(ref.registry, ref.repository, resolved.manifest_digest,
                                  artifact_type=SOCI_INDEX_V1)
    for desc in reversed(candidates):  # the newest entry is last
        found = _fetch_index(client, resolved, desc.digest)
        if found is None:
            continue
        if found.subject is None or found.subject.digest != resolved.manifest_digest:
            log.warning("SOCI index %s is listed for %s but its subject is another manifest; ignored",
                        desc.digest, resolved.manifest_digest)
            continue
        return found
    return None


def index_summary(index: SociIndex) -> dict[str, Any]:
    """A JSON-able view of an index (for ``prewarm inspect --json``)."""
    return {
        "digest": index.digest,
        "version": index.version,
        "build_tool_identifier": index.build_tool_identifier,
        "ztocs": [{"layer": d.annotations.get(ANN_LAYER_DIGEST), "ztoc": d.digest, "size": d.size,
                   "span_size": d.annotations.get(ANN_SPAN_SIZE)} for d in index.ztocs],
    }
