"""Image references: parse what a user types into (registry, repository, tag, digest).

The grammar is Docker's (``distribution/reference``), because that is what users and
containerd write:

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path-component { "/" path-component }
    domain     := host [ ":" port ]          (only if it has a "." or ":" or is "localhost"
                                              or contains an upper-case letter)
    path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest     := algorithm ":" hex

Normalisation follows Docker Hub's rules: no domain means ``docker.io``; a single
path component on Docker Hub gets ``library/``; ``index.docker.io`` and
``registry-1.docker.io`` are ``docker.io`` (so ``registry-1.docker.io/ubuntu`` is
``docker.io/library/ubuntu``);
no tag and no digest means ``:latest``.  Docker Hub's API lives on another host
(``registry-1.docker.io``): :attr:`Reference.api_host` gives the host to talk to,
while :attr:`Reference.registry` keeps the name users (and credential files) know.
"""

from __future__ import annotations

import dataclasses
import re

from prewarm.errors import InvalidReference
from prewarm.resolve.digest import is_digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DEFAULT_TAG = "latest"
#: Docker refuses names (domain + path) longer than this.
MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_COMPONENT_RE = re.compile(rf"^{_COMPONENT}$")
_HOST_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)


@dataclasses.dataclass(frozen=True)
class Reference:
    """A normalised image reference.

    Attributes:
        registry: the registry as users name it (``docker.io``, ``127.0.0.1:5000``).
        repository: the path inside it (``library/ubuntu``).
        tag: the tag, or None when only a digest was given.
        digest: ``sha256:<hex>`` when pinned, else None.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host (and port) whose ``/v2/`` API serves this registry."""
        return registry_api_host(self.registry)

    @property
    def manifest_reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        """The same image pinned to ``digest`` (the tag is kept for display)."""
        return dataclasses.replace(self, digest=digest)


def registry_api_host(registry: str) -> str:
    """Docker Hub's names map to its API host; every other registry is its own host."""
    return DOCKER_HUB_API if registry in _HUB_ALIASES else registry


def _looks_like_domain(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost" or component.lower() != component


def parse_reference(text: str) -> Reference:
    """Parse and normalise an image reference.

    Args:
        text: what the user typed, e.g. ``ubuntu``, ``ghcr.io/org/img:1.0``,
            ``127.0.0.1:5000/x@sha256:...``.

    Returns:
        The normalised :class:`Reference`.

    Raises:
        InvalidReference: naming the text as typed and what is wrong with it.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidReference("empty image reference; expected e.g. 'ubuntu:22.04' or 'registry:5000/repo:tag'")
    original = text
    text = text.strip()

    def bad(why: str) -> InvalidReference:
        return InvalidReference(f"invalid image reference {original!r}: {why}")

    if any(ch.isspace() for ch in text):
        raise bad("it contains whitespace")
    if "://" in text:
        raise bad("drop the scheme (http:// or https://); use --insecure-registry for plain HTTP")

    digest: str | None = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not is_digest(digest):
            raise bad(f"{digest!r} is not a digest (expected sha256:<64 lowercase hex digits>)")

    domain: str | None = None
    first, sep, rest = text.partition("/")
    if sep and _looks_like_domain(first):
        domain, text = first, rest

    tag: str | None = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1:]
        if not _TAG_RE.match(tag):
            raise bad(f"tag {tag!r} must be 1-128 characters of letters, digits, '_', '.' or '-', "
                      "not starting with '.' or '-'")

    if not text:
        raise bad("the repository name is missing")
    for component in text.split("/"):
        if not component:
            raise bad("the repository path has an empty component (a doubled or trailing '/')")
        if not _COMPONENT_RE.match(component):
            if component.lower() != component and _COMPONENT_RE.match(component.lower()):
                raise bad(f"repository name component {component!r} must be lowercase")
            raise bad(f"repository name component {component!r} may only hold lowercase letters, digits "
                      "and single separators ('.', '_', '__', '-')")

    if domain is not None:
        if not _DOMAIN_RE.match(domain):
            raise bad(f"registry {domain!r} is not a valid host[:port]")
        if domain in _HUB_ALIASES:
            domain = DOCKER_HUB
    else:
        domain = DOCKER_HUB
    repository = text
    if domain == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if len(domain) + 1 + len(repository) > MAX_NAME_LENGTH:
        raise bad(f"the name is longer than {MAX_NAME_LENGTH} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=domain, repository=repository, tag=tag, digest=digest)
