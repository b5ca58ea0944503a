"""OCI and Docker manifests and indexes: media types, descriptors, parsing, platform choice.

Everything here is pure: bytes in, frozen values out.  The registry client fetches and
verifies the bytes; this module says what they mean.  What it accepts:

* OCI image manifest and Docker schema 2 manifest (``config`` + ``layers``);
* OCI image index and Docker manifest list (``manifests`` with ``platform``);
* nothing else: schema 1 (signed or not) is refused with a message saying what to do.

JSON that we write (SOCI indexes, referrer indexes) goes through :func:`canonical_json`,
which writes what Go's ``encoding/json`` writes for the same structs: compact, fields in
struct order, map keys sorted, ``<``, ``>`` and ``&`` escaped.  soci-snapshotter is a Go
program, and a byte-identical manifest has the same digest.
"""

from __future__ import annotations

import dataclasses
import json
import platform as _platform
import re
from collections.abc import Mapping, Sequence
from typing import Any

from prewarm.errors import MalformedManifest, UnsupportedManifest
from prewarm.resolve.digest import is_digest

#: A registry's words we repeat in messages: media types, platform parts.  Anything
#: else (newlines, markup, megabytes) is not echoed into errors, job records and logs.
_SHOWN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+/-]{0,127}")


def shown(value: object) -> str:
    """``value`` as an error message may show it: a plain token, else a placeholder."""
    if isinstance(value, str) and _SHOWN_RE.fullmatch(value):
        return value
    return "(a value not shown)"


def shown_platform(p: Platform) -> str:
    """A registry-supplied platform for a message (see :func:`shown`)."""
    return "/".join(shown(part) for part in (p.os, p.architecture, p.variant) if part)


# === media types
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

IMAGE_MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
IMAGE_INDEXES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
SCHEMA1 = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
#: What we send as ``Accept`` for manifests, most specific first.
MANIFEST_ACCEPT = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)
#: Manifests are small; anything bigger than this is not a manifest we will parse.
MAX_MANIFEST_BYTES = 4 << 20

_SCHEMA1_HELP = ("Docker schema 1 manifests are not supported (deprecated since 2017); "
                 "push the image again with a current docker, buildah or skopeo "
                 "(schema 2 or OCI)")


@dataclasses.dataclass(frozen=True)
class Platform:
    """An OCI platform: ``os/architecture[/variant]``."""

    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.variant:
            out["variant"] = self.variant
        return out

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Platform:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("os"), str) \
                or not isinstance(raw.get("architecture"), str):
            raise UnsupportedManifest(f"{where}: platform must have string 'os' and 'architecture'")
        variant = raw.get("variant")
        os_version = raw.get("os.version")
        return cls(raw["os"], raw["architecture"], variant if isinstance(variant, str) and variant else None,
                   os_version if isinstance(os_version, str) and os_version else None)


@dataclasses.dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob or manifest is, its digest and size."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)
    platform: Platform | None = None
    artifact_type: str | None = None
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Fields in the order of Go's ``ocispec.Descriptor``; empty ones left out."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Descriptor:
        """Parse one descriptor.

        Raises:
            UnsupportedManifest: a field is missing or of the wrong type (naming ``where``).
        """
        if not isinstance(raw, Mapping):
            raise UnsupportedManifest(f"{where}: a descriptor must be a JSON object")
        media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise UnsupportedManifest(f"{where}: descriptor has no mediaType")
        if not isinstance(digest, str) or not is_digest(digest):
            raise UnsupportedManifest(f"{where}: descriptor digest {shown(digest)} is not sha256:<hex>")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise UnsupportedManifest(f"{where}: descriptor size {shown(str(size))} is not a non-negative integer")
        annotations = raw.get("annotations") or {}
        if not isinstance(annotations, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise UnsupportedManifest(f"{where}: annotations must map strings to strings")
        platform = Platform.from_json(raw["platform"], where) if raw.get("platform") is not None else None
        artifact_type = raw.get("artifactType")
        urls = raw.get("urls") or ()
        return cls(media_type, digest, size, dict(annotations), platform,
                   artifact_type if isinstance(artifact_type, str) and artifact_type else None,
                   tuple(u for u in urls if isinstance(u, str)))


@dataclasses.dataclass(frozen=True)
class ImageManifest:
    """An OCI image manifest or Docker schema 2 manifest."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    subject: Descriptor | None = None
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)
    artifact_type: str | None = None


@dataclasses.dataclass(frozen=True)
class ImageIndex:
    """An OCI image index or Docker manifest list."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    subject: Descriptor | None = None
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)


def canonical_json(value: Any) -> bytes:
    """Compact JSON as Go's ``encoding/json`` writes it (dict order is the caller's)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode("utf-8")


def media_type_of(body: bytes, content_type: str | None, where: str = "manifest") -> str:
    """The manifest's media type: its own ``mediaType`` field, else the HTTP Content-Type.

    Raises:
        UnsupportedManifest: the body is not JSON, or it is schema 1.
    """
    ctype = (content_type or "").split(";", 1)[0].strip()
    if ctype in SCHEMA1:
        raise UnsupportedManifest(f"{where}: {_SCHEMA1_HELP}")
    raw = _load(body, where)
    if raw.get("schemaVersion") == 1:
        raise UnsupportedManifest(f"{where}: {_SCHEMA1_HELP}")
    declared = raw.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if ctype in IMAGE_MANIFESTS or ctype in IMAGE_INDEXES:
        return ctype
    # OCI allows leaving mediaType out: tell the two shapes apart by their fields.
    if "manifests" in raw:
        return OCI_INDEX
    if "config" in raw and "layers" in raw:
        return OCI_MANIFEST
    raise UnsupportedManifest(f"{where}: unknown manifest type {shown(ctype) if ctype else '(no Content-Type)'}")


def _load(body: bytes, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MalformedManifest(f"{what} is not valid JSON ({err.__class__.__name__}: {err})") from None
    if not isinstance(raw, dict):
        raise MalformedManifest(f"{what} is not a JSON object")
    return raw


def _descriptors(raw: Any, where: str) -> tuple[Descriptor, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise UnsupportedManifest(f"{where} must be a list of descriptors")
    return tuple(Descriptor.from_json(item, f"{where}[{i}]") for i, item in enumerate(raw))


def parse_manifest(body: bytes, media_type: str, where: str = "manifest") -> ImageManifest | ImageIndex:
    """Parse an image manifest or index.

    Args:
        body: the verified manifest bytes.
        media_type: from :func:`media_type_of`.
        where: names the manifest in error messages (the reference as typed).

    Raises:
        UnsupportedManifest: schema 1, an unknown media type, or malformed fields.
    """
    if media_type in SCHEMA1:
        raise UnsupportedManifest(f"{where}: {_SCHEMA1_HELP}")
    raw = _load(body, where)
    if raw.get("schemaVersion") != 2:
        if raw.get("schemaVersion") == 1:
            raise UnsupportedManifest(f"{where}: {_SCHEMA1_HELP}")
        raise UnsupportedManifest(f"{where}: schemaVersion {raw.get('schemaVersion')!r} is not 2")
    annotations = raw.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        raise UnsupportedManifest(f"{where}: annotations must be an object")
    subject = Descriptor.from_json(raw["subject"], f"{where}.subject") if raw.get("subject") else None
    if media_type in IMAGE_INDEXES:
        return ImageIndex(media_type, _descriptors(raw.get("manifests"), f"{where}.manifests"),
                          subject, dict(annotations))
    if media_type in IMAGE_MANIFESTS:
        if "config" not in raw:
            raise UnsupportedManifest(f"{where}: image manifest has no config")
        artifact_type = raw.get("artifactType")
        return ImageManifest(media_type, Descriptor.from_json(raw["config"], f"{where}.config"),
                             _descriptors(raw.get("layers"), f"{where}.layers"), subject,
                             dict(annotations), artifact_type if isinstance(artifact_type, str) else None)
    raise UnsupportedManifest(f"{where}: unsupported manifest media type {shown(media_type)}; expected an OCI or "
                              "Docker schema 2 image manifest or index")


# === platforms
_MACHINE_TO_ARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv7": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"),
    "i386": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
}


def host_platform() -> Platform:
    """This machine's platform in OCI terms (``linux/amd64``, ``linux/arm64/v8``...)."""
    machine = _platform.machine().lower()
    arch, variant = _MACHINE_TO_ARCH.get(machine, (machine, None))
    return Platform("linux", arch, variant)


def parse_platform(text: str) -> Platform:
    """Parse ``os/arch[/variant]`` as given to ``--platform``.

    Raises:
        UnsupportedManifest: the text is not of that form.
    """
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UnsupportedManifest(f"platform {text!r} must be os/arch or os/arch/variant, e.g. linux/amd64")
    return Platform(parts[0].lower(), parts[1].lower(), parts[2].lower() if len(parts) == 3 else None)


def _normal_variant(p: Platform) -> str | None:
    if p.architecture == "arm64" and p.variant in (None, "v8"):
        return None
    if p.architecture == "amd64" and p.variant == "v1":
        return None
    return p.variant


def choose_platform(index: ImageIndex, wanted: Platform, where: str = "image") -> Descriptor:
    """Pick the manifest of ``index`` for ``wanted``, as containerd's matcher does.

    Only image manifests without an ``artifactType`` qualify (a SOCI v2 index sits in
    the image index with the image's platform).  Same os and architecture are
    required; the variant must match when the index
    says one and we asked for one (``arm64`` and ``arm64/v8`` are the same).  When
    several entries qualify, an exact variant wins over a missing one.

    Raises:
        UnsupportedManifest: no entry fits; the message lists the platforms there are.
    """
    exact: list[Descriptor] = []
    loose: list[Descriptor] = []
    for desc in index.manifests:
        p = desc.platform
        if p is None or desc.media_type not in IMAGE_MANIFESTS or desc.artifact_type:
            continue  # artifacts (a SOCI v2 index, attestations) are never the image
        if p.os != wanted.os or p.architecture != wanted.architecture:
            continue
        have, want = _normal_variant(p), _normal_variant(wanted)
        if have == want:
            exact.append(desc)
        elif want is None or have is None:
            loose.append(desc)
    if exact:
        return exact[0]
    if loose:
        return loose[0]
    available = sorted({shown_platform(d.platform) for d in index.manifests
                        if d.platform is not None and d.platform.os != "unknown"})
    raise UnsupportedManifest(
        f"{where}: no manifest for platform {wanted}; the image has "
        f"{', '.join(available) if available else 'no platforms'}; pick one with --platform")


def index_json(manifests: Sequence[Descriptor], *, annotations: Mapping[str, str] | None = None,
               subject: Descriptor | None = None) -> bytes:
    """An OCI image index, in Go's field order (used for referrer fallback tags)."""
    out: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                           "manifests": [d.to_json() for d in manifests]}
    if subject is not None:
        out["subject"] = subject.to_json()
    if annotations:
        out["annotations"] = dict(sorted(annotations.items()))
    return canonical_json(out)


def manifest_json(config: Descriptor, layers: Sequence[Descriptor], *, subject: Descriptor | None = None,
                  annotations: Mapping[str, str] | None = None, artifact_type: str | None = None) -> bytes:
    """An OCI image manifest, in the field order of Go's ``ocispec.Manifest``."""
    out: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
    if artifact_type:
        out["artifactType"] = artifact_type
    out["config"] = config.to_json()
    out["layers"] = [d.to_json() for d in layers]
    if subject is not None:
        out["subject"] = subject.to_json()
    if annotations:
        out["annotations"] = dict(sorted(annotations.items()))
    return canonical_json(out)
