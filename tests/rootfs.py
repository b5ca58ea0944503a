"""Reference root filesystems for the tests: ``umoci unpack`` and read-only overlay mounts.

The acceptance test of the pipeline is "the pre-warmed layers, overlay-mounted newest
first, equal what ``umoci unpack`` makes of the same image".  This module gives both
sides; :mod:`tests.treecompare` compares them.  Both need root (umoci keeps owners and
makes devices only as root; ``mount`` needs CAP_SYS_ADMIN).

Debian's umoci (0.4.7) refuses zstd layers ("blob is not correct mediatype") and Docker
schema-2 manifests.  For such an image :func:`umoci_unpack` unpacks a shadow layout in
which each zstd blob is replaced by its decompressed tar (the tar stream, and so the
config's diff_ids and the resulting tree, are the same bytes) and Docker media types are
renamed to their OCI twins (same bytes).  Likewise a tagged multi-platform index or
manifest list is narrowed to the host platform's manifest, which umoci 0.4.7 cannot
choose itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import zstandard

from prewarm.imagebuild import (
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_TAR,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Platform,
    blob_path,
    read_blob,
    tagged_descriptor,
)

_DOCKER_TO_OCI = {DOCKER_LAYER_GZIP: OCI_LAYER_GZIP, DOCKER_LAYER_TAR: OCI_LAYER_TAR}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _shadow_layout(layout: Path, tag: str, shadow: Path) -> bool:
    """Write a umoci-readable twin of ``layout:tag`` into ``shadow``; False if none is needed."""
    desc = tagged_descriptor(layout, tag)
    manifest_desc = desc
    if desc["mediaType"] in (OCI_INDEX, DOCKER_LIST):
        host = Platform.host().as_json()
        index = json.loads(read_blob(layout, str(desc["digest"])))
        matches = [m for m in index["manifests"]
                   if {k: m.get("platform", {}).get(k) for k in host} == host]
        if not matches:
            raise RuntimeError(f"{layout}:{tag} has no manifest for the host platform {host}")
        manifest_desc = matches[0]
    manifest = json.loads(read_blob(layout, str(manifest_desc["digest"])))
    zstd_layers = [layer for layer in manifest["layers"] if layer["mediaType"] == OCI_LAYER_ZSTD]
    docker = manifest.get("mediaType") == DOCKER_MANIFEST
    if manifest_desc is desc and not zstd_layers and not docker:
        return False

    (shadow / "blobs" / "sha256").mkdir(parents=True)
    shutil.copyfile(layout / "oci-layout", shadow / "oci-layout")
    for blob in [manifest["config"], *manifest["layers"]]:
        if blob["mediaType"] != OCI_LAYER_ZSTD:
            _link_or_copy(blob_path(layout, blob["digest"]), blob_path(shadow, blob["digest"]))
    new_layers = []
    for blob in manifest["layers"]:
        if blob["mediaType"] != OCI_LAYER_ZSTD:
            # Docker's layer types name the same bytes as OCI's.
            new_layers.append({**blob, "mediaType": _DOCKER_TO_OCI.get(blob["mediaType"], blob["mediaType"])})
            continue
        tmp = shadow / "blobs" / "sha256" / "tmp.tar"
        sha = hashlib.sha256()
        size = 0
        with open(blob_path(layout, blob["digest"]), "rb") as src, open(tmp, "wb") as dst:
            reader = zstandard.ZstdDecompressor().stream_reader(src)
            while chunk := reader.read(1 << 20):
                sha.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        digest = "sha256:" + sha.hexdigest()
        os.replace(tmp, blob_path(shadow, digest))
        new_layers.append({"mediaType": OCI_LAYER_TAR, "digest": digest, "size": size})
    config = {**manifest["config"], "mediaType": OCI_CONFIG}
    body = json.dumps({**manifest, "mediaType": OCI_MANIFEST, "config": config, "layers": new_layers}).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    blob_path(shadow, digest).write_bytes(body)
    (shadow / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body),
                       "annotations": {REF_NAME_ANNOTATION: tag}}],
    }))
    return True


def umoci_unpack(layout_dir: Path, tag: str, dest: Path) -> Path:
    """``umoci unpack --image layout_dir:tag dest`` (as root); returns ``dest/rootfs``.

    ``dest`` must not exist yet (umoci's rule).  zstd layers and multi-platform indexes
    go through a shadow layout (see the module docstring).
    """
    with tempfile.TemporaryDirectory(prefix="umoci-shadow-", dir=dest.parent) as tmp:
        shadow = Path(tmp) / "layout"
        source = shadow if _shadow_layout(layout_dir, tag, shadow) else layout_dir
        proc = subprocess.run(["umoci", "unpack", "--image", f"{source}:{tag}", str(dest)],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"umoci unpack {source}:{tag} failed: {proc.stderr.strip()}")
    return dest / "rootfs"


@contextlib.contextmanager
def overlay_mount(lowerdirs_newest_first: Sequence[Path | str], target: Path | str) -> Iterator[Path]:
    """Mount the layer directories read-only as one overlay at ``target``; unmount on exit.

    Only lowerdirs, no upper: the merged view is exactly what the layers say (whiteout
    devices and opaque xattrs applied by the kernel).  A single layer gets an empty
    directory beneath it, since overlay needs two lowerdirs without an upper.  The first directory is the newest
    layer, as in ``lowerdir=`` and ``ctr snapshots mounts``.
    """
    lowers = [str(p) for p in lowerdirs_newest_first]
    if not lowers:
        raise ValueError("overlay_mount needs at least one layer directory")
    for p in lowers:
        if ":" in p or "," in p:
            raise ValueError(f"layer directory {p!r} contains ':' or ',' which overlay options cannot carry")
        if not os.path.isdir(p):
            raise ValueError(f"layer directory {p!r} does not exist")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".overlay-empty-", dir=target.parent) as empty:
        if len(lowers) == 1:
            # Overlay wants two lowerdirs when there is no upper; an empty one changes nothing.
            lowers.append(empty)
        options = "ro,lowerdir=" + ":".join(lowers)
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(target)],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"mount -t overlay -o {options} {target} failed: {proc.stderr.strip()}")
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=True, capture_output=True)


def _decompressed(path: Path, media_type: str) -> Iterator[bytes]:
    import zlib

    with open(path, "rb") as f:
        if media_type.endswith("+zstd"):
            reader = zstandard.ZstdDecompressor().stream_reader(f)
            while chunk := reader.read(1 << 20):
                yield chunk
        elif media_type.endswith("gzip"):
            # Concatenated members (pigz) need a fresh decompressor per member.
            d = zlib.decompressobj(wbits=31)
            while raw := f.read(1 << 20):
                while raw:
                    yield d.decompress(raw)
                    if d.eof:
                        raw = d.unused_data
                        d = zlib.decompressobj(wbits=31)
                    else:
                        raw = b""
            yield d.flush()
        else:
            while chunk := f.read(1 << 20):
                yield chunk


def extract_overlay_diff(blob: Path, media_type: str, dest: Path) -> Path:
    """Extract one layer blob into ``dest`` in overlay's diff format, with GNU tar.

    ``.wh.NAME`` becomes a 0/0 char device NAME, ``.wh..wh..opq`` the xattr
    ``trusted.overlay.opaque=y`` on its directory.  A reference implementation for tests,
    independent of prewarm's store, so the two can be compared.
    """
    dest.mkdir(parents=True)
    tar = subprocess.Popen(["tar", "-x", "-p", "--numeric-owner", "--xattrs", "--xattrs-include=user.*",
                            "-f", "-", "-C", str(dest)], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tar.stdin is not None
    for chunk in _decompressed(blob, media_type):
        tar.stdin.write(chunk)
    tar.stdin.close()
    err = tar.stderr.read().decode() if tar.stderr else ""
    if tar.wait() != 0:
        raise RuntimeError(f"tar -x of {blob} failed: {err.strip()}")
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in filenames + dirnames:
            if not name.startswith(".wh."):
                continue
            marker = os.path.join(dirpath, name)
            if name == ".wh..wh..opq":
                os.unlink(marker)
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
                continue
            os.unlink(marker)
            victim = os.path.join(dirpath, name[len(".wh."):])
            if os.path.lexists(victim):
                # The same layer re-creates the name: the new entry hides the lower one.
                continue
            os.mknod(victim, 0o600 | 0o020000, os.makedev(0, 0))
    return dest


def overlay_layer_dirs(layout_dir: Path, tag: str, dest: Path) -> list[Path]:
    """Every layer of ``layout_dir:tag`` extracted by :func:`extract_overlay_diff`, newest first."""
    desc = tagged_descriptor(layout_dir, tag)
    manifest = json.loads(read_blob(layout_dir, str(desc["digest"])))
    dirs = []
    for i, layer in enumerate(manifest["layers"]):
        dirs.append(extract_overlay_diff(blob_path(layout_dir, layer["digest"]), layer["mediaType"],
                                         dest / f"layer-{i}"))
    return dirs[::-1]
