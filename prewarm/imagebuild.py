"""Build OCI image layouts from files: the images our tests, the demo and the benchmark pull.

Why we build images ourselves instead of pulling them: the pipeline has to be proven on
layers with every oddity real images carry (whiteouts, hardlinks, devices, xattrs, PAX
names, concatenated gzip members, FNAME/FEXTRA headers, plain tar, zstd), and on
hostile ones no honest builder would write.  So a layer is described either as a
directory tree on disk (:class:`DirLayer`) or as an explicit list of tar entries
(:class:`TarEntry`), and this module turns a list of them into an OCI image layout
(``oci-layout``, ``index.json``, ``blobs/sha256/...``) that skopeo, umoci and any registry
accept.

Everything is deterministic: entries carry a fixed mtime, gzip headers a zero mtime, the
config a fixed creation time, so the same description gives the same digests on every
run (tests and the benchmark cache rely on that).

Layers are streamed: the tar goes to a temporary file while its sha256 (the config's
``diff_id``) is computed, then is compressed into the blob file while the blob digest is
computed.  A 1.6 GB layer never sits in memory.

``push_layout`` pushes a built layout to a registry with the project's own registry
client (:class:`prewarm.resolve.registry.client.RegistryClient`): blobs first, then the
manifests of an index by digest, then the tagged top-level manifest.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import platform as host_platform
import shutil
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Literal, Protocol

import zstandard

from prewarm.errors import ConfigError

# Fixed times keep digests stable across runs: 2024-01-01T00:00:00Z.
FIXED_MTIME = 1704067200
FIXED_CREATED = "2024-01-01T00:00:00Z"

Compression = Literal["gzip", "pigz", "gzip-fname-fextra", "uncompressed", "zstd"]
COMPRESSIONS: tuple[str, ...] = ("gzip", "pigz", "gzip-fname-fextra", "uncompressed", "zstd")
MediaTypes = Literal["oci", "docker"]

OCI_LAYOUT_VERSION = "1.0.0"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

_LAYER_MEDIA_TYPES: dict[tuple[str, str], str] = {
    ("oci", "uncompressed"): OCI_LAYER_TAR,
    ("oci", "gzip"): OCI_LAYER_GZIP,
    ("oci", "pigz"): OCI_LAYER_GZIP,
    ("oci", "gzip-fname-fextra"): OCI_LAYER_GZIP,
    ("oci", "zstd"): OCI_LAYER_ZSTD,
    ("docker", "uncompressed"): DOCKER_LAYER_TAR,
    ("docker", "gzip"): DOCKER_LAYER_GZIP,
    ("docker", "pigz"): DOCKER_LAYER_GZIP,
    ("docker", "gzip-fname-fextra"): DOCKER_LAYER_GZIP,
}

EntryType = Literal["file", "dir", "symlink", "hardlink", "fifo", "chardev", "blockdev"]
_TAR_TYPES: dict[str, bytes] = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
}

_CHUNK = 1 << 20


# === descriptions of layers ==================================================


@dataclasses.dataclass(frozen=True)
class TarEntry:
    """One tar member, written exactly as described (hostile names included).

    ``data`` is the content of a regular file, as bytes or as a path to read it from
    (big files are streamed).  ``mode`` holds permission bits only, setuid/setgid/sticky
    included; the type comes from ``type``.  ``xattrs`` become ``SCHILY.xattr.<name>``
    PAX records; values must be UTF-8 text, as PAX records are.
    """

    name: str
    type: EntryType = "file"
    data: bytes | Path = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, bytes] = dataclasses.field(default_factory=dict)
    mtime: int = FIXED_MTIME

    @property
    def size(self) -> int:
        if self.type != "file":
            return 0
        if isinstance(self.data, Path):
            return self.data.stat().st_size
        return len(self.data)


@dataclasses.dataclass(frozen=True)
class DirLayer:
    """A layer made of a directory tree on disk, walked in sorted order.

    ``prefix`` is prepended to every name (``usr/lib/python3.11/site-packages``, say).
    Owners are forced to ``owner`` (root by default) so the digest does not depend on
    who ran the build; modes, symlinks, hardlinks (same inode), fifos, devices and
    ``user.*`` xattrs are kept.  ``exclude`` drops any entry whose path relative to
    ``root`` starts with one of the given prefixes.
    """

    root: Path
    prefix: str = ""
    owner: tuple[int, int] | None = (0, 0)
    exclude: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer: what goes in it and how its blob is compressed.

    ``compression``: ``gzip`` (one member, ``level`` 0-9), ``pigz`` (concatenated gzip
    members of ``member_size`` uncompressed bytes each, as pigz-built and appended
    layers have), ``gzip-fname-fextra`` (a gzip header carrying the FEXTRA and FNAME
    fields), ``uncompressed`` (plain tar) or ``zstd``.
    """

    content: DirLayer | Sequence[TarEntry]
    compression: Compression = "gzip"
    level: int = 6
    member_size: int = 1 << 20
    created_by: str = ""


@dataclasses.dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def host(cls) -> Platform:
        """This machine's platform in OCI terms (``x86_64`` is ``amd64``)."""
        machine = host_platform.machine().lower()
        arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
                "armv7l": "arm", "i686": "386", "i386": "386", "ppc64le": "ppc64le",
                "s390x": "s390x", "riscv64": "riscv64"}.get(machine, machine)
        variant = "v7" if machine == "armv7l" else ""
        return cls("linux", arch, variant)

    def as_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


# === what a build returns ====================================================


@dataclasses.dataclass(frozen=True)
class BuiltLayer:
    digest: str
    size: int
    media_type: str
    diff_id: str
    uncompressed_size: int
    compression: str


@dataclasses.dataclass(frozen=True)
class BuiltImage:
    """A manifest written into a layout (tagged, or referenced from an index)."""

    layout: Path
    tag: str | None
    manifest_digest: str
    manifest_media_type: str
    manifest_size: int
    config_digest: str
    layers: tuple[BuiltLayer, ...]
    platform: Platform


@dataclasses.dataclass(frozen=True)
class BuiltIndex:
    layout: Path
    tag: str
    index_digest: str
    index_media_type: str
    images: tuple[BuiltImage, ...]


# === blobs ===================================================================


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data: bytes) -> int:  # type: ignore[override]
        view = memoryview(data)
        self.sink.write(view)
        self.hash.update(view)
        self.size += len(view)
        return len(view)

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    return layout / "blobs" / algo / hexpart


def _write_blob_bytes(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(layout, digest)
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return digest, len(data)


def _adopt_blob(layout: Path, tmp: Path, digest: str) -> Path:
    path = blob_path(layout, digest)
    os.replace(tmp, path)
    return path


def _canonical_json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()


# === tar =====================================================================


def _tarinfo(entry: TarEntry) -> tarfile.TarInfo:
    if entry.type not in _TAR_TYPES:
        raise ConfigError(f"tar entry {entry.name!r}: unknown type {entry.type!r}; "
                          f"use one of {', '.join(_TAR_TYPES)}")
    if entry.type in ("symlink", "hardlink") and not entry.linkname:
        raise ConfigError(f"tar entry {entry.name!r}: a {entry.type} needs a linkname")
    info = tarfile.TarInfo(entry.name)
    info.type = _TAR_TYPES[entry.type]
    info.mode = entry.mode & 0o7777
    info.uid, info.gid = entry.uid, entry.gid
    info.uname, info.gname = entry.uname, entry.gname
    info.mtime = entry.mtime
    info.linkname = entry.linkname
    info.devmajor, info.devminor = entry.devmajor, entry.devminor
    try:
        info.size = entry.size
    except OSError as err:
        raise ConfigError(f"tar entry {entry.name!r}: cannot read its data file {entry.data!s}: "
                          f"{err.strerror}") from None
    if entry.xattrs:
        try:
            info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8") for k, v in entry.xattrs.items()}
        except UnicodeDecodeError:
            raise ConfigError(f"tar entry {entry.name!r}: xattr values must be UTF-8 text "
                              "(PAX records carry text)") from None
    return info


def _add_entry(tar: tarfile.TarFile, entry: TarEntry) -> None:
    info = _tarinfo(entry)
    if entry.type != "file":
        tar.addfile(info)
    elif isinstance(entry.data, Path):
        with open(entry.data, "rb") as f:
            tar.addfile(info, f)
    else:
        tar.addfile(info, io.BytesIO(entry.data))


def _walk_sorted_from(root: Path, directory: Path, exclude: tuple[str, ...]) -> Iterator[Path]:
    for name in sorted(os.listdir(directory)):
        path = directory / name
        rel = path.relative_to(root).as_posix()
        if any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in exclude):
            continue
        yield path
        if path.is_dir() and not path.is_symlink():
            yield from _walk_sorted_from(root, path, exclude)


def _user_xattrs(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in sorted(names):
        if name.startswith("user."):
            try:
                out[f"SCHILY.xattr.{name}"] = os.getxattr(path, name, follow_symlinks=False).decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
    return out


def _add_dir_layer(tar: tarfile.TarFile, layer: DirLayer) -> None:
    root = layer.root
    if not root.is_dir():
        raise ConfigError(f"layer directory {root} does not exist or is not a directory")
    prefix = layer.prefix.strip("/")
    if prefix:
        # The parents of the prefix, so the layer is self-contained.
        parts = prefix.split("/")
        for i in range(1, len(parts) + 1):
            _add_entry(tar, TarEntry("/".join(parts[:i]), "dir", mode=0o755))
    for path in _walk_sorted_from(root, root, layer.exclude):
        rel = path.relative_to(root).as_posix()
        arcname = f"{prefix}/{rel}" if prefix else rel
        info = tar.gettarinfo(str(path), arcname)  # hardlinks by inode are found here
        if info is None:  # a socket: images cannot carry one
            continue
        info.mtime = FIXED_MTIME
        if layer.owner is not None:
            info.uid, info.gid = layer.owner
            info.uname = info.gname = ""
        xattrs = _user_xattrs(path)
        if xattrs:
            info.pax_headers = xattrs
        if info.isreg():
            with open(path, "rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)


def write_layer_tar(content: DirLayer | Sequence[TarEntry], out: IO[bytes]) -> tuple[str, int]:
    """Write the uncompressed tar of a layer to ``out``.

    Returns:
        (diff_id, size): the sha256 of the tar as written, and its length.

    Raises:
        ConfigError: an entry is malformed or the directory is missing.
    """
    sink = _HashingWriter(out)
    buffered = io.BufferedWriter(sink, _CHUNK)
    with tarfile.open(fileobj=buffered, mode="w", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
                      encoding="utf-8") as tar:
        if isinstance(content, DirLayer):
            _add_dir_layer(tar, content)
        else:
            for entry in content:
                _add_entry(tar, entry)
    buffered.flush()
    return sink.digest, sink.size


# === compression =============================================================


def _copy_chunks(src: IO[bytes]) -> Iterator[bytes]:
    while chunk := src.read(_CHUNK):
        yield chunk


def _gzip_member(src: IO[bytes], dst: IO[bytes], level: int, limit: int | None) -> int:
    """Write one gzip member (mtime 0, no name) of up to ``limit`` bytes of ``src``."""
    crc, size = 0, 0
    comp = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    dst.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + _xfl(level) + b"\xff")
    while limit is None or size < limit:
        want = _CHUNK if limit is None else min(_CHUNK, limit - size)
        chunk = src.read(want)
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
        dst.write(comp.compress(chunk))
    dst.write(comp.flush())
    dst.write(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))
    return size


def _xfl(level: int) -> bytes:
    return b"\x02" if level == 9 else (b"\x04" if level == 1 else b"\x00")


def _compress(tar_path: Path, dst: IO[bytes], layer: Layer) -> None:
    with open(tar_path, "rb") as src:
        if layer.compression == "gzip":
            with gzip.GzipFile(filename="", mode="wb", fileobj=dst, compresslevel=layer.level,
                               mtime=0) as gz:
                for chunk in _copy_chunks(src):
                    gz.write(chunk)
        elif layer.compression == "pigz":
            total = tar_path.stat().st_size
            done = 0
            while True:
                done += _gzip_member(src, dst, layer.level, layer.member_size)
                if done >= total:
                    break
        elif layer.compression == "gzip-fname-fextra":
            # FLG = FEXTRA (0x04) | FNAME (0x08); one "PW" subfield in the extra field.
            extra = b"PW" + struct.pack("<H", 6) + b"prewrm"
            name = b"layer.tar\x00"
            dst.write(b"\x1f\x8b\x08\x0c" + struct.pack("<I", 0) + _xfl(layer.level) + b"\x03"
                      + struct.pack("<H", len(extra)) + extra + name)
            crc, size = 0, 0
            comp = zlib.compressobj(layer.level, zlib.DEFLATED, -zlib.MAX_WBITS)
            for chunk in _copy_chunks(src):
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
                dst.write(comp.compress(chunk))
            dst.write(comp.flush())
            dst.write(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))
        elif layer.compression == "zstd":
            cctx = zstandard.ZstdCompressor(level=min(max(layer.level, 1), 19))
            cctx.copy_stream(src, dst, read_size=_CHUNK, write_size=_CHUNK)
        else:  # uncompressed is handled by the caller (the tar is the blob)
            raise ConfigError(f"unknown compression {layer.compression!r}")


def _check_layer(layer: Layer, media_types: str, index: int) -> None:
    if layer.compression not in COMPRESSIONS:
        raise ConfigError(f"layer {index}: unknown compression {layer.compression!r}; "
                          f"use one of {', '.join(COMPRESSIONS)}")
    if (media_types, layer.compression) not in _LAYER_MEDIA_TYPES:
        raise ConfigError(f"layer {index}: Docker schema-2 has no media type for {layer.compression} "
                          "layers; build with media_types='oci'")
    if not 0 <= layer.level <= 9 and layer.compression != "zstd":
        raise ConfigError(f"layer {index}: gzip level {layer.level} is outside 0-9")
    if layer.member_size <= 0:
        raise ConfigError(f"layer {index}: member_size must be positive, not {layer.member_size}")


def build_layer(layout: Path, layer: Layer, media_types: MediaTypes = "oci", index: int = 0) -> BuiltLayer:
    """Write one layer's blob into ``layout/blobs`` and describe it.

    Raises:
        ConfigError: unknown compression, a compression the media types cannot name, a
            level outside 0-9, or a malformed entry.
    """
    _check_layer(layer, media_types, index)
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".layer-", suffix=".tar", dir=blobs)
    tar_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            diff_id, usize = write_layer_tar(layer.content, out)
        if layer.compression == "uncompressed":
            digest, size = diff_id, usize
            _adopt_blob(layout, tar_path, digest)
        else:
            fd2, blob_tmp = tempfile.mkstemp(prefix=".blob-", dir=blobs)
            try:
                with os.fdopen(fd2, "wb") as raw:
                    sink = _HashingWriter(raw)
                    buffered = io.BufferedWriter(sink, _CHUNK)
                    _compress(tar_path, buffered, layer)  # type: ignore[arg-type]
                    buffered.flush()
                digest, size = sink.digest, sink.size
                _adopt_blob(layout, Path(blob_tmp), digest)
            finally:
                Path(blob_tmp).unlink(missing_ok=True)
    finally:
        tar_path.unlink(missing_ok=True)
    return BuiltLayer(digest, size, _LAYER_MEDIA_TYPES[(media_types, layer.compression)], diff_id, usize,
                      layer.compression)


# === layout, manifests, configs ==============================================


def init_layout(layout: Path) -> None:
    """Create an empty OCI layout (or leave an existing one as it is)."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    marker = layout / "oci-layout"
    if not marker.exists():
        marker.write_text(json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
    index = layout / "index.json"
    if not index.exists():
        index.write_bytes(_canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}))


def _tag_in_layout(layout: Path, tag: str, descriptor: dict[str, object]) -> None:
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    kept = [m for m in index.get("manifests", [])
            if m.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag]
    kept.append({**descriptor, "annotations": {REF_NAME_ANNOTATION: tag}})
    index["manifests"] = kept
    tmp = index_path.with_name("index.json.tmp")
    tmp.write_bytes(_canonical_json(index))
    os.replace(tmp, index_path)


def _check_tag(tag: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", tag):
        raise ConfigError(f"tag {tag!r} is not a valid tag (letters, digits, '_', '.', '-'; at most 128)")


def build_image(layout: Path, layers: Sequence[Layer], *, tag: str | None = "latest",
                media_types: MediaTypes = "oci", platform: Platform | None = None,
                config: Mapping[str, object] | None = None,
                annotations: Mapping[str, str] | None = None) -> BuiltImage:
    """Build an image from ``layers`` (lowest first) into the OCI layout at ``layout``.

    The config's ``rootfs.diff_ids`` are the sha256 of each uncompressed tar, its
    ``history`` has one entry per layer, and ``os``/``architecture`` are the host's
    unless ``platform`` says otherwise.  With ``tag`` the manifest is named in
    ``index.json`` (replacing an older manifest of that tag); with ``tag=None`` it is
    only stored, for :func:`build_index` to reference.

    Args:
        layout: the layout directory; created if missing, added to if present.
        layers: the layers, the base first.
        tag: the ``org.opencontainers.image.ref.name`` to give it, or None.
        media_types: ``oci`` or ``docker`` (Docker schema-2 manifest and config).
        platform: the platform written into the config.
        config: the image's runtime ``config`` section (Env, Cmd, ...).
        annotations: manifest annotations (OCI only).

    Raises:
        ConfigError: no layers, a bad tag, unknown media types or a bad layer.
    """
    if media_types not in ("oci", "docker"):
        raise ConfigError(f"media types {media_types!r}: use 'oci' or 'docker'")
    if not layers:
        raise ConfigError("an image needs at least one layer")
    if tag is not None:
        _check_tag(tag)
    plat = platform or Platform.host()
    init_layout(layout)
    built = [build_layer(layout, layer, media_types, i) for i, layer in enumerate(layers)]
    image_config = {
        "created": FIXED_CREATED,
        **plat.as_json(),
        "config": dict(config) if config is not None else {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in built]},
        "history": [{"created": FIXED_CREATED,
                     "created_by": layer.created_by or f"prewarm.imagebuild layer {i} ({b.compression})"}
                    for i, (layer, b) in enumerate(zip(layers, built))],
    }
    config_digest, config_size = _write_blob_bytes(layout, _canonical_json(image_config))
    manifest_type = OCI_MANIFEST if media_types == "oci" else DOCKER_MANIFEST
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": OCI_CONFIG if media_types == "oci" else DOCKER_CONFIG,
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size} for b in built],
    }
    if annotations and media_types == "oci":
        manifest["annotations"] = dict(annotations)
    manifest_digest, manifest_size = _write_blob_bytes(layout, _canonical_json(manifest))
    if tag is not None:
        _tag_in_layout(layout, tag, {"mediaType": manifest_type, "digest": manifest_digest,
                                     "size": manifest_size})
    return BuiltImage(layout, tag, manifest_digest, manifest_type, manifest_size, config_digest,
                      tuple(built), plat)


def build_index(layout: Path, per_platform: Mapping[Platform, Sequence[Layer]], *, tag: str = "latest",
                media_types: MediaTypes = "oci") -> BuiltIndex:
    """Build a multi-platform image: one manifest per platform under one tagged index.

    With ``media_types='docker'`` the index is a Docker manifest list.

    Raises:
        ConfigError: no platforms, or anything :func:`build_image` refuses.
    """
    if not per_platform:
        raise ConfigError("an image index needs at least one platform")
    _check_tag(tag)
    images = tuple(build_image(layout, layers, tag=None, media_types=media_types, platform=plat)
                   for plat, layers in per_platform.items())
    index_type = OCI_INDEX if media_types == "oci" else DOCKER_LIST
    body = _canonical_json({
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [{"mediaType": img.manifest_media_type, "digest": img.manifest_digest,
                       "size": img.manifest_size, "platform": img.platform.as_json()} for img in images],
    })
    digest, size = _write_blob_bytes(layout, body)
    _tag_in_layout(layout, tag, {"mediaType": index_type, "digest": digest, "size": size})
    return BuiltIndex(layout, tag, digest, index_type, images)


def read_blob(layout: Path, digest: str) -> bytes:
    """The bytes of a small blob (manifest, config, index) in the layout.

    Raises:
        ConfigError: the blob is not in the layout.
    """
    path = blob_path(layout, digest)
    if not path.is_file():
        raise ConfigError(f"blob {digest} is not in the layout {layout}")
    return path.read_bytes()


def tagged_descriptor(layout: Path, tag: str) -> dict[str, object]:
    """The ``index.json`` descriptor named ``tag``.

    Raises:
        ConfigError: the layout is missing or has no such tag (the message lists the tags).
    """
    index_path = layout / "index.json"
    if not index_path.is_file():
        raise ConfigError(f"{layout} is not an OCI image layout (no index.json)")
    manifests = json.loads(index_path.read_text()).get("manifests", [])
    for desc in manifests:
        if desc.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag:
            return dict(desc)
    tags = sorted(d.get("annotations", {}).get(REF_NAME_ANNOTATION, "?") for d in manifests)
    raise ConfigError(f"layout {layout} has no tag {tag!r} (tags: {', '.join(tags) or 'none'})")


def _referenced_blobs(layout: Path, desc: Mapping[str, object]) -> Iterator[str]:
    """Every digest a descriptor reaches: itself, and for manifests their blobs, recursively."""
    digest, media_type = str(desc["digest"]), str(desc["mediaType"])
    yield digest
    doc = json.loads(read_blob(layout, digest))
    if media_type in (OCI_INDEX, DOCKER_LIST):
        for child in doc["manifests"]:
            yield from _referenced_blobs(layout, child)
    elif media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
        yield str(doc["config"]["digest"])
        for layer in doc["layers"]:
            yield str(layer["digest"])


def copy_image(src_layout: Path, src_tag: str, dst_layout: Path, dst_tag: str) -> dict[str, object]:
    """Copy the image tagged ``src_tag`` into another layout as ``dst_tag``.

    Blobs are hardlinked when both layouts are on one filesystem (copied otherwise), so
    an expensive, deterministic image can be built once and handed out cheaply.

    Returns:
        The descriptor now tagged ``dst_tag`` in ``dst_layout``.

    Raises:
        ConfigError: no such tag in the source, a blob missing, or a bad ``dst_tag``.
    """
    _check_tag(dst_tag)
    desc = tagged_descriptor(src_layout, src_tag)
    init_layout(dst_layout)
    for digest in dict.fromkeys(_referenced_blobs(src_layout, desc)):
        src, dst = blob_path(src_layout, digest), blob_path(dst_layout, digest)
        if dst.exists():
            continue
        if not src.is_file():
            raise ConfigError(f"blob {digest} is not in the layout {src_layout}")
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    plain = {k: v for k, v in desc.items() if k != "annotations"}
    _tag_in_layout(dst_layout, dst_tag, plain)
    return {**plain, "annotations": {REF_NAME_ANNOTATION: dst_tag}}


# === push ====================================================================


class BlobPusher(Protocol):
    """What :func:`push_layout` needs of a registry client (RegistryClient has it)."""

    def push_blob(self, registry: str, repository: str, source: bytes | Path, *,
                  digest: str | None = None, chunk_size: int | None = None) -> str: ...

    def push_manifest(self, registry: str, repository: str, reference: str, body: bytes,
                      media_type: str) -> str: ...


def _push_manifest_tree(client: BlobPusher, layout: Path, registry: str, repository: str,
                        desc: Mapping[str, object], reference: str) -> str:
    digest = str(desc["digest"])
    media_type = str(desc["mediaType"])
    body = read_blob(layout, digest)
    doc = json.loads(body)
    if media_type in (OCI_INDEX, DOCKER_LIST):
        for child in doc["manifests"]:
            _push_manifest_tree(client, layout, registry, repository, child, str(child["digest"]))
    elif media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
        for blob in [doc["config"], *doc["layers"]]:
            client.push_blob(registry, repository, blob_path(layout, str(blob["digest"])),
                             digest=str(blob["digest"]))
    else:
        raise ConfigError(f"layout {layout}: manifest {digest} has unknown media type {media_type!r}")
    return client.push_manifest(registry, repository, reference, body, media_type)


def push_layout(client: BlobPusher, layout_dir: Path, registry: str, repository: str, tag: str) -> str:
    """Push the image tagged ``tag`` in the layout to ``registry/repository:tag``.

    Blobs go first (the client skips the ones the registry has), then, for an index,
    each platform's manifest by digest, then the top-level manifest under ``tag``.

    Returns:
        The digest of the top-level manifest (or index), as the registry reports it.

    Raises:
        ConfigError: the layout has no such tag or a blob is missing.
        RegistryError: whatever the client raises for the registry's answers.
    """
    desc = tagged_descriptor(layout_dir, tag)
    return _push_manifest_tree(client, layout_dir, registry, repository, desc, tag)
