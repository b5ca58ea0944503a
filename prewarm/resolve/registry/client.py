"""The OCI distribution client: manifests, blobs, byte ranges, uploads, referrers.

This is the only module that speaks the registry's HTTP API.  Its contract:

* **Nothing unverified leaves it.**  Manifests are checked against the digest asked
  for (or the one the registry vouches for in ``Docker-Content-Digest``), small blobs
  against their digest before they are returned, streamed blobs when the stream ends
  (:class:`prewarm.errors.DigestMismatch` if not).  Byte ranges cannot be verified
  here (only whole blobs have digests): callers check span digests from the zTOC.
* **Bodies are streamed.**  A layer is never held in memory: ranges read exactly the
  bytes asked for, even from a server that ignores ``Range`` and sends the whole blob.
* **Errors are the tree's.**  Every HTTP failure goes through
  :func:`prewarm.resolve.registry.status.error_for_status`; transient ones (connection
  errors, 5xx, 429) are retried by the :class:`RetryPolicy` before they surface.
* **Credentials stay on this node.**  They come from this node's Docker config, go
  only to the registry (and its token realm), and are never forwarded on a redirect
  to another origin (blob storage on S3 or a CDN).
* **Redirects stay out of the node's neighbourhood.**  No https-to-http downgrade;
  no link-local, loopback or private target unless the registry itself is one
  (see :mod:`prewarm.resolve.registry.hosts`).
* **Plain HTTP only when asked.**  Registries named in ``insecure_registries`` use
  ``http://``; everything else is HTTPS verified against ``ca_bundle`` (or the
  system store).
* **The node's mirrors first, as containerd.**  With ``hosts_dir`` (containerd's
  ``config_path``), manifests and blobs are read from the hosts its ``hosts.toml`` lists
  for the registry, in order, each with its own CA files, client certificate and
  ``skip_verify`` (:func:`prewarm.resolve.registry.hosts.registry_endpoints`).  A host
  that fails (unreachable, an error status, not found) hands the request to the next;
  one that could not be reached is skipped for :data:`MIRROR_COOLDOWN` seconds.  Only
  the last host's failure is raised (and retried).  Pushes and referrers go to the
  registry itself.

The pull pipeline, in the order :meth:`RegistryClient.resolve` runs it::

    GET manifest (tag or digest) -> verify digest
    === index / manifest list: choose the platform, GET that manifest -> verify
    === GET config blob -> verify -> diff_ids
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from prewarm.config import Settings
from prewarm.errors import (
    BlobNotFound,
    ConfigError,
    CorruptContent,
    DigestMismatch,
    MalformedManifest,
    ManifestNotFound,
    RangeNotHonored,
    RegistryError,
    RegistryUnavailable,
    UnsupportedManifest,
)
from prewarm.resolve.digest import is_digest, new_hasher, parse_digest, sha256_digest, verify
from prewarm.resolve.manifest import (
    IMAGE_INDEXES,
    IMAGE_MANIFESTS,
    MANIFEST_ACCEPT,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    SCHEMA1,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
    choose_platform,
    host_platform,
    index_json,
    media_type_of,
    parse_manifest,
    parse_platform,
    shown,
    shown_platform,
)
from prewarm.resolve.reference import Reference, registry_api_host
from prewarm.resolve.registry.auth import RegistryAuth, scope_for
from prewarm.resolve.registry.dockerconfig import Credential, DockerConfig
from prewarm.resolve.registry.hosts import Endpoint, redirect_refusal, registry_endpoints
from prewarm.resolve.registry.retry import RetryPolicy
from prewarm.resolve.registry.status import Kind, error_for_exception, error_for_status

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Seconds a mirror that could not be reached is skipped (its requests go to the next host).
MIRROR_COOLDOWN = 30.0
#: Seconds a registry's hosts.toml is used before it is read again (containerd reads it per pull).
HOSTS_RELOAD = 10.0
#: A CA file named by a hosts.toml larger than this is refused.
MAX_CA_FILE = 4 << 20
#: Default ceiling for :meth:`RegistryClient.get_blob` (configs, zTOCs).
DEFAULT_MAX_BLOB = 64 << 20
#: Image configs bigger than this are refused (real ones are kilobytes).
MAX_CONFIG_BYTES = 32 << 20
#: Redirects followed per request (registries send one, to blob storage).
MAX_REDIRECTS = 5
#: Pages of a referrers answer followed through ``Link: <...>; rel="next"``.
MAX_REFERRER_PAGES = 64
#: Writes of the referrers fallback tag before giving up on concurrent pushers.
FALLBACK_TAG_ATTEMPTS = 6
#: Seconds to wait before checking a fallback-tag write survived; doubles with each
#: write and is jittered (times 1-2), so at most about 6 s in all.
FALLBACK_TAG_SETTLE = 0.05
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_READ_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)
#: Manifests are read raw and hashed: a compressing proxy must leave their bytes alone
#: (and a HEAD's Content-Length must be the manifest's size, not a compressed one).
_MANIFEST_HEADERS = {"Accept": ", ".join(MANIFEST_ACCEPT), "Accept-Encoding": "identity"}


@dataclasses.dataclass(frozen=True)
class ResolvedImage:
    """An image reference resolved to one platform's manifest, config and layers.

    Every byte here was checked against its digest.  ``index_digest``/``index`` are set
    when the reference named an image index (multi-platform image).
    """

    reference: Reference
    manifest_digest: str
    manifest_bytes: bytes
    media_type: str
    manifest: ImageManifest
    config_digest: str
    config_bytes: bytes
    config: dict[str, Any]
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]
    platform: str | None
    index_digest: str | None = None
    index_bytes: bytes | None = None
    index: ImageIndex | None = None

    @property
    def manifest_descriptor(self) -> Descriptor:
        """The image manifest as a descriptor (the subject of its referrers)."""
        return Descriptor(self.media_type, self.manifest_digest, len(self.manifest_bytes))

    @property
    def pinned(self) -> Reference:
        """The reference pinned to the manifest digest (what tasks should carry)."""
        return self.reference.with_digest(self.manifest_digest)


@dataclasses.dataclass(frozen=True)
class _Context:
    """What one request is about: named in every error it raises (and its auth scope)."""

    registry: str
    repository: str | None
    kind: Kind
    subject: str | None = None

    @property
    def fields(self) -> dict[str, Any]:
        """The keyword arguments :class:`prewarm.errors.RegistryError` takes for it."""
        return {"registry": self.registry, "repository": self.repository, "digest": self.subject}


class _RawBody:
    """A streamed body as sent, from byte ``skip`` on: the one skip/read loop.

    Never decoded: digests are of the bytes the registry stored, and a server that
    ignores ``Range`` is skipped through here rather than held in memory.  Read
    errors propagate to the caller, which knows what broke.

    Attributes:
        skip: bytes still to skip (non-zero after the loop: the body ended first).
        seen: bytes received in all, skipped ones included.
    """

    def __init__(self, resp: requests.Response, skip: int = 0) -> None:
        self._resp = resp
        self.skip = skip
        self.seen = 0

    def chunks(self, size: int) -> Iterator[bytes]:
        """The body's bytes after ``skip``, in chunks of at most ``size``."""
        for chunk in self._resp.raw.stream(size, decode_content=False):
            self.seen += len(chunk)
            if self.skip >= len(chunk):
                self.skip -= len(chunk)
                continue
            if self.skip:
                chunk, self.skip = chunk[self.skip:], 0
            yield chunk


def referrers_tag(digest: str) -> str:
    """The fallback tag that lists referrers of ``digest``: ``sha256-<hex>``."""
    algo, hexpart = parse_digest(digest)
    return f"{algo}-{hexpart}"[:128]


class RegistryClient:
    """A thread-safe client for OCI registries (one per process is enough).

    Args:
        insecure_registries: registries (``host:port`` as users name them) spoken to
            over plain HTTP; every other one is HTTPS.
        ca_bundle: CA bundle file for HTTPS verification; None uses the system store.
        docker_config: the directory holding ``config.json``; None means ``~/.docker``
            (:meth:`from_settings` passes ``$DOCKER_CONFIG`` from the settings).
        retry: when to retry transient failures; default 5 attempts.
        timeout: seconds to wait for a connection or for the next bytes.
        pool_size: connections kept per host (threads fetching ranges in parallel).
        hosts_dir: containerd's registry host folder (``/etc/containerd/certs.d``): its
            mirrors and TLS settings are used for manifests and blobs; None: none.
    """

    def __init__(self, *, insecure_registries: frozenset[str] = frozenset(), ca_bundle: str | None = None,
                 docker_config: Path | None = None, retry: RetryPolicy | None = None,
                 timeout: float = 30.0, pool_size: int = 32, hosts_dir: Path | None = None) -> None:
        self.insecure_registries = frozenset(insecure_registries)
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._docker_config_dir = docker_config
        self._docker_config: DockerConfig | None = None
        self._session = requests.Session()
        # Passed on every request: requests lets $REQUESTS_CA_BUNDLE override ``session.verify``.
        self._verify: str | bool = ca_bundle if ca_bundle else True
        self._session.verify = self._verify
        self._session.headers["User-Agent"] = "prewarm/0.1 (+requests)"
        adapter = HTTPAdapter(pool_connections=8, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._auths: dict[str, RegistryAuth] = {}
        self._lock = threading.Lock()
        self.hosts_dir = hosts_dir
        self._endpoints: dict[str, tuple[float, list[Endpoint]]] = {}
        self._cooling: dict[str, float] = {}  # mirror api root -> monotonic time it may be tried again
        self._bundles: dict[tuple[Path, ...], str] = {}  # CA files -> combined bundle file
        self._bundle_dir: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RegistryClient:
        """A client configured from :class:`prewarm.config.Settings` (insecure registries, CA, config)."""
        kw: dict[str, Any] = {"insecure_registries": settings.insecure_registries,
                              "ca_bundle": settings.ca_bundle, "docker_config": settings.docker_config,
                              "hosts_dir": settings.containerd_hosts_dir}
        kw.update(overrides)
        return cls(**kw)

    def close(self) -> None:
        self._session.close()
        if self._bundle_dir is not None:
            shutil.rmtree(self._bundle_dir, ignore_errors=True)
            self._bundle_dir = None
            self._bundles.clear()

    # === plumbing: URLs, auth, one request
    def base_url(self, registry: str) -> str:
        """``http(s)://api-host`` for ``registry``."""
        host = registry_api_host(registry)
        scheme = "http" if registry in self.insecure_registries or host in self.insecure_registries else "https"
        return f"{scheme}://{host}"

    def _credential(self, registry: str) -> Credential | None:
        with self._lock:
            if self._docker_config is None:
                self._docker_config = DockerConfig.load(self._docker_config_dir)
            config = self._docker_config
        return config.credential_for(registry)

    def auth_for(self, registry: str) -> RegistryAuth:
        """The (shared) auth state of ``registry``."""
        with self._lock:
            auth = self._auths.get(registry)
            if auth is None:
                netloc = urlsplit(self.base_url(registry)).netloc
                auth = RegistryAuth(registry, netloc, lambda: self._credential(registry), self._session,
                                    timeout=self.timeout, verify=self._verify,
                                    scheme=urlsplit(self.base_url(registry)).scheme)
                self._auths[registry] = auth
            return auth

    # === containerd's hosts: mirrors, per-host TLS
    def _default_endpoint(self, registry: str) -> Endpoint:
        parts = urlsplit(self.base_url(registry))
        return Endpoint(scheme=parts.scheme, host=parts.netloc)

    def endpoints(self, registry: str, capability: str) -> list[Endpoint]:
        """Where ``registry``'s manifests (``resolve``) or blobs (``pull``) are read from, in order.

        Raises:
            ConfigError: the registry's hosts.toml is malformed, or lists no host that may
                do ``capability``.
        """
        now = time.monotonic()
        with self._lock:
            cached = self._endpoints.get(registry)
        if cached is None or now - cached[0] > HOSTS_RELOAD:
            found = registry_endpoints(self.hosts_dir, registry, self._default_endpoint(registry))
            cached = (now, found)
            with self._lock:
                self._endpoints[registry] = cached
        able = [ep for ep in cached[1] if ep.can(capability)]
        if not able:
            raise ConfigError(f"containerd's hosts.toml for {registry} (under {self.hosts_dir}) lists no host "
                              f"with the {capability!r} capability; add it to one, as containerd's own "
                              "pulls would fail too")
        return able

    def _on_endpoints(self, registry: str, capability: str, what: str,
                      attempt: Callable[[Endpoint], _T]) -> _T:
        """``attempt`` on each host in turn until one answers; the last one's failure is raised.

        A mirror that failed with no status (unreachable, or its connection broke) is
        skipped for :data:`MIRROR_COOLDOWN` seconds, so a dead mirror costs one failed
        connection per period, not one per request.
        """
        hosts = self.endpoints(registry, capability)
        now = time.monotonic()
        with self._lock:
            usable = [ep for ep in hosts[:-1] if self._cooling.get(ep.api_root, 0.0) <= now] + hosts[-1:]
        for i, ep in enumerate(usable):
            if i == len(usable) - 1:
                return attempt(ep)
            try:
                return attempt(ep)
            except RegistryError as err:
                if err.status is None and isinstance(err, RegistryUnavailable):
                    with self._lock:
                        self._cooling[ep.api_root] = time.monotonic() + MIRROR_COOLDOWN
                log.info("%s: host %s failed (%s); trying %s", what, ep.host, err, usable[i + 1].host)
        raise AssertionError("unreachable: the last host returns or raises")

    def _endpoint_url(self, ep: Endpoint, registry: str, repository: str, *parts: str) -> str:
        url = "/".join([ep.api_root, repository, *parts])
        return _with_query(url, ns=registry) if ep.mirror else url

    def _tls(self, ep: Endpoint) -> tuple[str | bool, str | tuple[str, str] | None]:
        """(``verify``, ``cert``) for requests to ``ep``.

        Raises:
            ConfigError: a CA or client certificate file it names cannot be read.
        """
        if ep.skip_verify:
            verify: str | bool = False
        elif ep.ca:
            verify = self._bundle(ep.ca)
        else:
            verify = self._verify
        cert: str | tuple[str, str] | None = None
        if ep.client:  # requests presents one certificate: the first pair, as it is listed
            cert_file, key_file = ep.client[0]
            for f in (cert_file, key_file):
                if f is not None and not f.is_file():
                    raise ConfigError(f"client certificate file {f} for registry host {ep.host} (containerd's "
                                      "hosts.toml) does not exist")
            cert = (str(cert_file), str(key_file)) if key_file is not None else str(cert_file)
        return verify, cert

    def _bundle(self, ca: tuple[Path, ...]) -> str:
        """One file with the default CAs and ``ca``: containerd adds a host's CAs to the system pool."""
        with self._lock:
            if ca in self._bundles:
                return self._bundles[ca]
        parts = []
        for f in (Path(self._verify) if isinstance(self._verify, str) else _system_cas(), *ca):
            try:
                with open(f, "rb") as fh:
                    data = fh.read(MAX_CA_FILE + 1)
            except OSError as err:
                raise ConfigError(f"CA file {f} (containerd's hosts.toml or --ca-bundle) cannot be read: "
                                  f"{err.strerror}") from None
            if len(data) > MAX_CA_FILE:
                raise ConfigError(f"CA file {f} is more than {MAX_CA_FILE} bytes; is it a certificate?")
            parts.append(data.rstrip(b"\n") + b"\n")
        with self._lock:
            if self._bundle_dir is None:
                self._bundle_dir = tempfile.mkdtemp(prefix="prewarm-ca-")
            path = str(Path(self._bundle_dir) / f"bundle-{len(self._bundles)}.pem")
            Path(path).write_bytes(b"".join(parts))
            self._bundles[ca] = path
            return path

    def _endpoint_auth(self, registry: str, ep: Endpoint | None) -> RegistryAuth:
        if ep is None or (not ep.mirror and ep.api_root == f"{self.base_url(registry)}/v2"):
            return self.auth_for(registry)
        key = f"{registry} {ep.api_root}"
        with self._lock:
            auth = self._auths.get(key)
        if auth is None:
            # a mirror is asked with the node's credential for the mirror; the registry's own
            # server with the registry's
            owner = ep.host if ep.mirror else registry
            auth = RegistryAuth(owner, ep.host, lambda: self._credential(owner), self._session,
                                timeout=self.timeout, verify=self._tls(ep)[0], scheme=ep.scheme)
            with self._lock:
                auth = self._auths.setdefault(key, auth)
        return auth

    def _send(self, method: str, url: str, ctx: _Context, *, ok: tuple[int, ...],
              headers: Mapping[str, str] | None = None, data: Any = None,
              params: Mapping[str, str] | None = None, stream: bool = False,
              endpoint: Endpoint | None = None) -> requests.Response:
        """One request (no retry), redirects followed by hand; non-``ok`` statuses raise.

        Redirects to another origin (host, port or scheme) are followed without our
        auth: blob storage gets a pre-signed URL, never the registry's credentials.
        Redirects that downgrade to ``http`` or lead into this node's neighbourhood
        (link-local, loopback, private addresses) from a registry outside it are
        refused (:func:`prewarm.resolve.registry.hosts.redirect_refusal`).

        Raises:
            RegistryError: the mapped status or connection failure.
        """
        registry, repository = ctx.registry, ctx.repository
        api_origin = _origin(endpoint.api_root if endpoint is not None else self.base_url(registry))
        auth = self._endpoint_auth(registry, endpoint).for_scope(scope_for(method, repository))
        verify, cert = self._tls(endpoint) if endpoint is not None else (self._verify, None)
        hdrs = dict(headers or {})
        if endpoint is not None:
            for name, value in endpoint.header:
                hdrs[name] = f"{hdrs[name]}, {value}" if name in hdrs else value
        # A 307/308 means "send the same request there": a file body starts over.
        body_start = data.tell() if hasattr(data, "seek") and hasattr(data, "tell") else None
        for _ in range(MAX_REDIRECTS + 1):
            same_host = _origin(url) == api_origin
            try:
                resp = self._session.request(method, url, headers=hdrs, data=data, params=params,
                                             auth=auth if same_host else None,
                                             stream=stream, timeout=self.timeout, allow_redirects=False,
                                             verify=verify if same_host else self._verify,
                                             cert=cert if same_host else None)
            except requests.RequestException as err:
                raise error_for_exception(err, kind=ctx.kind, registry=registry, repository=repository,
                                          subject=ctx.subject) from None
            if resp.status_code in (301, 302, 303, 307, 308) and "Location" in resp.headers \
                    and resp.status_code not in ok:
                url = urljoin(resp.url, resp.headers["Location"])
                resp.close()
                self._check_target(url, ctx, "redirect", endpoint)
                params = None
                if resp.status_code == 303 or (resp.status_code in (301, 302) and method == "POST"):
                    method, data = "GET", None
                elif body_start is not None:
                    data.seek(body_start)
                if _origin(url) != api_origin:
                    hdrs.pop("Authorization", None)
                continue
            if resp.status_code not in ok:
                try:
                    raise error_for_status(resp, kind=ctx.kind, registry=registry, repository=repository,
                                           subject=ctx.subject,
                                           scope=f"repository:{repository}" if repository else None)
                finally:
                    resp.close()
            return resp
        raise RegistryError(f"registry {registry}: too many redirects for {ctx.kind} {ctx.subject or ''} "
                            f"in {repository}", **ctx.fields)

    def _check_target(self, url: str, ctx: _Context, what: str, endpoint: Endpoint | None = None) -> None:
        """Refuse a URL the registry sent us to (a redirect, an upload location).

        Raises:
            RegistryError: (final) ``url`` downgrades to http or leads into this node's
                neighbourhood; the URL itself is not named (it may be signed).
        """
        origin = endpoint.api_root if endpoint is not None else self.base_url(ctx.registry)
        refusal = redirect_refusal(origin, url)
        if refusal is not None:
            raise RegistryError(f"registry {ctx.registry}: refusing its {what} for {ctx.kind} "
                                f"{ctx.subject or ''} in {ctx.repository}: {refusal}", **ctx.fields)

    def _url(self, registry: str, repository: str, *parts: str) -> str:
        return "/".join([self.base_url(registry), "v2", repository, *parts])

    @staticmethod
    def _read_limited(resp: requests.Response, limit: int, what: str) -> bytes:
        """Read a whole (small) body, refusing more than ``limit`` bytes.

        Raises:
            CorruptContent: the body is larger than ``limit``.
            RegistryUnavailable: the connection broke while reading.
        """
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise CorruptContent(f"{what} is {int(declared)} bytes, more than the {limit} allowed")
        # BytesIO hands its buffer over as the bytes (no copy): a bytearray and bytes() of it
        # held a 220 MB zTOC twice (the schedule CLI peaked at ~500 MB for a 1M-file layer).
        buf, got = io.BytesIO(), 0
        try:
            for chunk in _RawBody(resp).chunks(1 << 16):
                buf.write(chunk)
                got += len(chunk)
                if got > limit:
                    raise CorruptContent(f"{what} is more than the {limit} bytes allowed")
        except _READ_ERRORS as err:
            raise RegistryUnavailable(f"{what}: connection broke after {got} bytes "
                                      f"({err.__class__.__name__})") from None
        return buf.getvalue()

    # === manifests
    def get_manifest(self, registry: str, repository: str, reference: str) -> tuple[bytes, str, str]:
        """Fetch a manifest or index by tag or digest, verified.

        Returns:
            (body, media type, digest).

        Raises:
            ManifestNotFound: no such tag or digest.
            UnsupportedManifest: schema 1 or not a manifest.
            DigestMismatch: the bytes do not match the digest asked for or vouched for.
        """
        where = f"{registry}/{repository}{'@' if is_digest(reference) else ':'}{reference}"
        ctx = _Context(registry, repository, "manifest", reference)

        def at(ep: Endpoint) -> tuple[bytes, str, str]:
            resp = self._send("GET", self._endpoint_url(ep, registry, repository, "manifests", reference), ctx,
                              ok=(200,), headers=_MANIFEST_HEADERS, stream=True, endpoint=ep)
            with resp:
                body = self._read_limited(resp, MAX_MANIFEST_BYTES, f"manifest {where}")
                ctype = resp.headers.get("Content-Type")
                vouched = resp.headers.get("Docker-Content-Digest")
            if (ctype or "").split(";", 1)[0].strip() in SCHEMA1:
                media_type_of(body, ctype, where)  # raises the schema-1 explanation
            if is_digest(reference):
                verify(body, reference, what=f"manifest {where}")
                digest = reference
            else:
                digest = sha256_digest(body)
                if vouched and is_digest(vouched):
                    verify(body, vouched, what=f"manifest {where} (Docker-Content-Digest)")
            return body, media_type_of(body, ctype, where), digest

        def once() -> tuple[bytes, str, str]:
            return self._on_endpoints(registry, "resolve", f"GET manifest {where}", at)

        return self.retry.run(once, f"GET manifest {where}")

    def head_manifest(self, registry: str, repository: str, reference: str) -> Descriptor | None:
        """The manifest's descriptor from a HEAD, or None if it does not exist.

        Raises:
            RegistryError: anything but 200 or 404 (after retries).
        """
        ctx = _Context(registry, repository, "manifest", reference)

        def at(ep: Endpoint) -> Descriptor:
            resp = self._send("HEAD", self._endpoint_url(ep, registry, repository, "manifests", reference), ctx,
                              ok=(200,), headers=_MANIFEST_HEADERS, endpoint=ep)
            with resp:
                digest = resp.headers.get("Docker-Content-Digest") or (reference if is_digest(reference) else "")
                size = int(resp.headers.get("Content-Length") or 0)
                media_type = (resp.headers.get("Content-Type") or "").split(";", 1)[0]
            if not is_digest(digest):
                raise RegistryError(f"registry {registry}: HEAD {repository}:{reference} gave no digest",
                                    registry=registry, repository=repository)
            return Descriptor(media_type, digest, size)

        def once() -> Descriptor | None:
            try:
                return self._on_endpoints(registry, "resolve", f"HEAD manifest {registry}/{repository}:{reference}",
                                          at)
            except ManifestNotFound:
                return None

        return self.retry.run(once, f"HEAD manifest {registry}/{repository}:{reference}")

    def resolve(self, ref: Reference, platform: str | None = None) -> ResolvedImage:
        """Resolve ``ref`` to one platform's manifest, config and layers.

        Args:
            ref: the image reference.
            platform: ``os/arch[/variant]``; default this host's platform.  A
                single-platform image (no index) must match it too: its config says
                which platform it is.

        Raises:
            ManifestNotFound: the image or the chosen manifest does not exist.
            UnsupportedManifest: schema 1, no manifest for the platform, a config without diff_ids.
            DigestMismatch: a manifest or the config does not match its digest.
            AuthenticationFailed, RateLimited, RegistryUnavailable: as the registry says.
        """
        where = str(ref)
        wanted: Platform | None = parse_platform(platform) if platform else None
        body, media_type, digest = self.get_manifest(ref.registry, ref.repository, ref.manifest_reference)
        index_digest = index_bytes = index = None
        chosen_platform: str | None = None
        if media_type in IMAGE_INDEXES:
            parsed = parse_manifest(body, media_type, where)
            assert isinstance(parsed, ImageIndex)
            index, index_digest, index_bytes = parsed, digest, body
            desc = choose_platform(index, wanted or host_platform(), where)
            assert desc.platform is not None
            chosen_platform = str(desc.platform)
            body, media_type, digest = self.get_manifest(ref.registry, ref.repository, desc.digest)
            if media_type not in IMAGE_MANIFESTS:
                raise UnsupportedManifest(f"{where}: the {shown_platform(desc.platform)} entry is a "
                                          f"{shown(media_type)}, not an image manifest")
        manifest = parse_manifest(body, media_type, where)
        if not isinstance(manifest, ImageManifest):
            raise UnsupportedManifest(f"{where}: expected an image manifest, got {shown(media_type)}")
        config_bytes = self.get_blob(ref.registry, ref.repository, manifest.config.digest,
                                     max_size=MAX_CONFIG_BYTES)
        try:
            config = json.loads(config_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MalformedManifest(f"{where}: config {manifest.config.digest} is not JSON") from None
        if not isinstance(config, dict):
            raise MalformedManifest(f"{where}: config {manifest.config.digest} is not a JSON object")
        rootfs = config.get("rootfs") if isinstance(config.get("rootfs"), dict) else {}
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest.layers) \
                or not all(isinstance(d, str) and is_digest(d) for d in diff_ids):
            raise UnsupportedManifest(
                f"{where}: config {manifest.config.digest} lists "
                f"{len(diff_ids) if isinstance(diff_ids, list) else 'no'} diff_ids for "
                f"{len(manifest.layers)} layers; this is not a runnable container image")
        if chosen_platform is None:
            os_, arch = config.get("os"), config.get("architecture")
            if isinstance(os_, str) and isinstance(arch, str):
                variant = config.get("variant") if isinstance(config.get("variant"), str) else None
                have = Platform(os_, arch, variant or None)
                fit = wanted or host_platform()
                if (have.os, have.architecture) != (fit.os, fit.architecture):
                    named = shown_platform(have)
                    if wanted is not None:
                        raise UnsupportedManifest(f"{where}: the image is {named} only, not {wanted}")
                    raise UnsupportedManifest(f"{where}: the image is {named} only and this host is {fit}; "
                                              f"pass --platform {named} to prewarm it for {named} nodes anyway")
                chosen_platform = str(have)
        return ResolvedImage(
            reference=ref, manifest_digest=digest, manifest_bytes=body, media_type=media_type,
            manifest=manifest, config_digest=manifest.config.digest, config_bytes=config_bytes,
            config=config, layers=manifest.layers, diff_ids=tuple(diff_ids), platform=chosen_platform,
            index_digest=index_digest, index_bytes=index_bytes, index=index)

    # === blobs
    def _blob_url(self, registry: str, repository: str, digest: str, ep: Endpoint | None = None) -> str:
        if not is_digest(digest):
            raise BlobNotFound(f"{digest!r} is not a blob digest (expected sha256:<hex>)",
                               registry=registry, repository=repository, digest=digest)
        if ep is None:  # the registry itself (pushes)
            return self._url(registry, repository, "blobs", digest)
        return self._endpoint_url(ep, registry, repository, "blobs", digest)

    def blob_exists(self, registry: str, repository: str, digest: str, *, upstream: bool = False) -> int | None:
        """The blob's size if the registry (or a mirror of it) has it, else None.

        ``upstream``: ask the registry itself, not its mirrors (before a push).
        """
        ctx = _Context(registry, repository, "blob", digest)

        def at(ep: Endpoint | None) -> int:
            resp = self._send("HEAD", self._blob_url(registry, repository, digest, ep), ctx, ok=(200,), endpoint=ep)
            with resp:
                return int(resp.headers.get("Content-Length") or 0)

        def once() -> int | None:
            try:
                if upstream:
                    return at(None)
                return self._on_endpoints(registry, "pull", f"HEAD blob {digest}", at)
            except BlobNotFound:
                return None

        return self.retry.run(once, f"HEAD blob {digest}")

    def get_blob(self, registry: str, repository: str, digest: str, *, max_size: int = DEFAULT_MAX_BLOB) -> bytes:
        """A small blob (config, zTOC), read whole and verified.

        Raises:
            BlobNotFound: no such blob.
            CorruptContent: larger than ``max_size``.
            DigestMismatch: the bytes do not match ``digest``.
        """
        what = f"blob {digest} in {registry}/{repository}"
        ctx = _Context(registry, repository, "blob", digest)

        def at(ep: Endpoint) -> bytes:
            resp = self._send("GET", self._blob_url(registry, repository, digest, ep), ctx, ok=(200,), stream=True,
                              headers={"Accept-Encoding": "identity"}, endpoint=ep)
            with resp:
                return self._read_limited(resp, max_size, what)

        def once() -> bytes:
            return self._on_endpoints(registry, "pull", f"GET {what}", at)

        data = self.retry.run(once, f"GET {what}")
        verify(data, digest, what=what)
        return data

    def fetch_range(self, registry: str, repository: str, digest: str, start: int,
                    end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of a blob (``end`` None: to the end of the blob).

        Uses one ``Range`` GET.  A 206 is read for exactly the bytes asked; a server
        that answers 200 with the whole blob is streamed, the bytes before ``start``
        skipped and the connection closed at ``end`` (never holding the blob).  Ranges
        are not digest-checked here: callers verify span digests.

        Raises:
            RangeNotHonored: the range lies (partly) beyond the blob (416, or a short blob).
            BlobNotFound, RegistryUnavailable, RateLimited, AuthenticationFailed.
        """
        if start < 0 or (end is not None and end <= start):
            raise ValueError(f"bad range [{start}, {end}) for blob {digest}")
        what = f"blob {digest} in {registry}/{repository} [{start}, {'' if end is None else end})"
        spec = f"bytes={start}-{'' if end is None else end - 1}"
        ctx = _Context(registry, repository, "blob", digest)

        def at(ep: Endpoint) -> bytes:
            resp = self._send("GET", self._blob_url(registry, repository, digest, ep), ctx, ok=(200, 206),
                              stream=True, headers={"Range": spec, "Accept-Encoding": "identity"}, endpoint=ep)
            with resp:
                if resp.status_code == 206:
                    _, total = self._check_content_range(resp, start, end, what, ctx)
                    want = (end - start) if end is not None else None
                    if want is None and total is not None:
                        want = total - start
                    return self._read_exact(resp, 0, want, what)
                return self._read_exact(resp, start, None if end is None else end - start, what,
                                        whole_blob=True)

        def once() -> bytes:
            return self._on_endpoints(registry, "pull", f"GET {what}", at)

        return self.retry.run(once, f"GET {what}")

    @staticmethod
    def _check_content_range(resp: requests.Response, start: int, end: int | None, what: str,
                             ctx: _Context) -> tuple[int, int | None]:
        ctype = resp.headers.get("Content-Type", "")
        if ctype.startswith("multipart/"):
            raise RangeNotHonored(f"{what}: the server answered a multipart range; ask one range at a time",
                                  status=206, **ctx.fields)
        m = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", "").strip())
        if not m:
            raise RangeNotHonored(f"{what}: 206 without a usable Content-Range",
                                  status=206, **ctx.fields)
        first, last = int(m.group(1)), int(m.group(2))
        total = None if m.group(3) == "*" else int(m.group(3))
        if first != start or (end is not None and last != end - 1):
            size = f" (the blob is {total} bytes)" if total is not None else ""
            raise RangeNotHonored(f"{what}: the server sent bytes {first}-{last}{size}",
                                  status=206, **ctx.fields)
        return first, total

    @staticmethod
    def _read_exact(resp: requests.Response, skip: int, length: int | None, what: str,
                    whole_blob: bool = False) -> bytes:
        """Skip ``skip`` bytes, then read ``length`` (None: to the end) and stop.

        Raises:
            RangeNotHonored: a whole-blob answer ends before the range does.
            RegistryUnavailable: the connection broke (or a 206 came short).
        """
        if not skip and length is not None and not whole_blob:
            # A 206 of known length: one read, no intermediate copies.
            try:
                data = resp.raw.read(length, decode_content=False)
            except _READ_ERRORS as err:
                raise RegistryUnavailable(f"{what}: connection broke ({err.__class__.__name__})") from None
            if len(data) != length:
                raise RegistryUnavailable(f"{what}: got {len(data)} of {length} bytes")
            return data
        out = bytearray()
        body = _RawBody(resp, skip)
        try:
            for chunk in body.chunks(1 << 20):
                out += chunk
                if length is not None and len(out) >= length:
                    del out[length:]
                    return bytes(out)
        except _READ_ERRORS as err:
            raise RegistryUnavailable(f"{what}: connection broke after {len(out)} bytes "
                                      f"({err.__class__.__name__})") from None
        if length is not None and len(out) < length or body.skip:
            if whole_blob:
                raise RangeNotHonored(f"{what}: the blob ends at byte {body.seen}")
            raise RegistryUnavailable(f"{what}: got {len(out)} of {length} bytes")
        return bytes(out)

    @contextlib.contextmanager
    def stream_blob(self, registry: str, repository: str, digest: str, *,
                    chunk_size: int = 1 << 20) -> Iterator[Iterator[bytes]]:
        """Stream a whole blob; the digest is verified when the iterator is exhausted.

        A connection that breaks mid-stream is resumed with a ``Range`` request from
        the last byte received (up to the retry policy's attempts), so a 20 GB layer
        does not start over.  Use as ``with client.stream_blob(...) as chunks:``.

        Raises:
            DigestMismatch: at the end of the stream, if the bytes are not ``digest``.
            BlobNotFound, RegistryUnavailable (after retries), AuthenticationFailed.
        """
        what = f"blob {digest} in {registry}/{repository}"
        self._blob_url(registry, repository, digest)  # a digest, or BlobNotFound now
        ctx = _Context(registry, repository, "blob", digest)
        holder: dict[str, requests.Response | None] = {"resp": None}

        def open_at(offset: int) -> requests.Response:
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"

            def at(ep: Endpoint) -> requests.Response:
                resp = self._send("GET", self._blob_url(registry, repository, digest, ep), ctx, ok=(200, 206),
                                  stream=True, headers=headers, endpoint=ep)
                if resp.status_code == 206:
                    try:
                        self._check_content_range(resp, offset, None, what, ctx)
                    except RangeNotHonored:
                        resp.close()
                        raise
                return resp

            return self._on_endpoints(registry, "pull", f"GET {what}", at)

        def chunks() -> Generator[bytes, None, None]:
            hasher = new_hasher(digest)
            received = 0
            breaks = 0
            while True:
                resp = self.retry.run(functools.partial(open_at, received), f"GET {what}")
                holder["resp"] = resp
                skip = received if resp.status_code == 200 else 0
                try:
                    for chunk in _RawBody(resp, skip).chunks(chunk_size):
                        hasher.update(chunk)
                        received += len(chunk)
                        yield chunk
                    break
                except _READ_ERRORS as err:
                    breaks += 1
                    if breaks >= self.retry.attempts:
                        raise RegistryUnavailable(
                            f"{what}: connection broke {breaks} times, last after {received} bytes "
                            f"({err.__class__.__name__})", **ctx.fields) from None
                    log.info("%s: stream broke at %d bytes (%s); resuming", what, received, err)
                finally:
                    resp.close()
            actual = f"{hasher.name}:{hasher.hexdigest()}"
            if actual != digest:
                raise DigestMismatch(f"{what}: expected {digest}, got {actual} ({received} bytes)",
                                     expected=digest, actual=actual)

        gen = chunks()
        try:
            yield gen
        finally:
            gen.close()
            if holder["resp"] is not None:
                holder["resp"].close()

    # === uploads
    def push_blob(self, registry: str, repository: str, source: bytes | Path, *, digest: str | None = None,
                  chunk_size: int | None = None) -> str:
        """Upload a blob unless the registry already has it; returns its digest.

        Monolithic (POST, then one PUT with the body) when ``chunk_size`` is None,
        otherwise PATCH uploads of ``chunk_size`` bytes and a closing PUT.  A transient
        failure restarts the upload in a new session.

        Raises:
            DigestMismatch: ``digest`` given and the content is something else, or the
                registry computed another digest.
            AuthenticationFailed: no push permission.
        """
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        actual = _digest_of(source)
        if digest is not None and digest != actual:
            raise DigestMismatch(f"blob to push to {registry}/{repository}: expected {digest}, got {actual}",
                                 expected=digest, actual=actual)
        digest = actual
        if self.blob_exists(registry, repository, digest, upstream=True) is not None:
            return digest

        def once() -> str:
            resp = self._send("POST", self._url(registry, repository, "blobs", "uploads/"),
                              _Context(registry, repository, "upload", digest), ok=(202,),
                              headers={"Content-Length": "0"})
            with resp:
                location = urljoin(resp.url, resp.headers["Location"])
            self._check_target(location, _Context(registry, repository, "upload", digest), "upload location")
            if chunk_size is None:
                return self._put_monolithic(registry, repository, location, source, digest)
            return self._put_chunked(registry, repository, location, source, digest, chunk_size)

        return self.retry.run(once, f"push blob {digest} to {registry}/{repository}")

    def _finish_upload(self, registry: str, repository: str, location: str, digest: str, body: Any,
                       length: int) -> str:
        resp = self._send("PUT", _with_query(location, digest=digest),
                          _Context(registry, repository, "upload", digest), ok=(201,), data=body,
                          headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)})
        with resp:
            vouched = resp.headers.get("Docker-Content-Digest")
        if vouched and vouched != digest:
            raise DigestMismatch(f"registry {registry} stored blob {digest} as {vouched}",
                                 expected=digest, actual=vouched)
        return digest

    def _put_monolithic(self, registry: str, repository: str, location: str, source: bytes | Path,
                        digest: str) -> str:
        if isinstance(source, Path):
            with open(source, "rb") as f:
                return self._finish_upload(registry, repository, location, digest, f, source.stat().st_size)
        return self._finish_upload(registry, repository, location, digest, source, len(source))

    def _put_chunked(self, registry: str, repository: str, location: str, source: bytes | Path, digest: str,
                     chunk_size: int) -> str:
        offset = 0
        ctx = _Context(registry, repository, "upload", digest)
        with _chunks_of(source, chunk_size) as chunks:
            for chunk in chunks:
                resp = self._send("PATCH", location, ctx, ok=(202,), data=chunk,
                                  headers={"Content-Type": "application/octet-stream",
                                           "Content-Length": str(len(chunk)),
                                           "Content-Range": f"{offset}-{offset + len(chunk) - 1}"})
                with resp:
                    location = urljoin(resp.url, resp.headers["Location"])
                self._check_target(location, ctx, "upload location")
                offset += len(chunk)
        return self._finish_upload(registry, repository, location, digest, b"", 0)

    def push_manifest(self, registry: str, repository: str, reference: str, body: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or its digest; returns its digest.

        Raises:
            DigestMismatch: ``reference`` is a digest that ``body`` does not have, or the
                registry stored something else.
            RegistryError: the registry refused it (e.g. HTTP 400 MANIFEST_INVALID).
        """
        digest = sha256_digest(body)
        if is_digest(reference):
            verify(body, reference, what=f"manifest to push to {registry}/{repository}")

        def once() -> str:
            resp = self._send("PUT", self._url(registry, repository, "manifests", reference),
                              _Context(registry, repository, "manifest", reference), ok=(201,), data=body,
                              headers={"Content-Type": media_type})
            with resp:
                vouched = resp.headers.get("Docker-Content-Digest")
            if vouched and vouched != digest:
                raise DigestMismatch(f"registry {registry} stored manifest {digest} as {vouched}",
                                     expected=digest, actual=vouched)
            return digest

        return self.retry.run(once, f"push manifest {registry}/{repository}:{reference}")

    # === referrers
    def push_referrer(self, registry: str, repository: str, body: bytes, media_type: str, *,
                      subject_digest: str, descriptor: Descriptor) -> str:
        """Push a manifest that has a ``subject`` and make it findable as a referrer.

        A registry with the referrers API acknowledges the subject with an
        ``OCI-Subject`` header and indexes it itself; otherwise ``descriptor`` is added
        to the ``sha256-<hex>`` fallback tag.  Returns the pushed manifest's digest.
        """
        digest = sha256_digest(body)
        if descriptor.digest != digest:
            raise DigestMismatch(f"referrer descriptor says {descriptor.digest} for a manifest that is {digest}",
                                 expected=descriptor.digest, actual=digest)

        def once() -> bool:
            resp = self._send("PUT", self._url(registry, repository, "manifests", digest),
                              _Context(registry, repository, "manifest", digest), ok=(201,), data=body,
                              headers={"Content-Type": media_type})
            with resp:
                return resp.headers.get("OCI-Subject") == subject_digest

        if not self.retry.run(once, f"push referrer {digest} to {registry}/{repository}"):
            self.add_referrer_to_fallback_tag(registry, repository, subject_digest, descriptor)
        return digest

    def referrers(self, registry: str, repository: str, digest: str,
                  artifact_type: str | None = None) -> list[Descriptor]:
        """Manifests whose ``subject`` is ``digest``, optionally of one artifact type.

        Asks the OCI referrers API first, following its ``Link: <...>; rel="next"``
        pages (on the registry's own origin, at most :data:`MAX_REFERRER_PAGES`); a
        registry without it (404, 400, 405: Debian's distribution 2.8) is read through
        the ``sha256-<hex>`` fallback tag instead.

        Raises:
            RegistryError: the registry failed in another way.
        """
        ctx = _Context(registry, repository, "referrers", digest)
        api_origin = _origin(self.base_url(registry))

        def api() -> list[Descriptor] | None:
            url = self._url(registry, repository, "referrers", digest)
            params = {"artifactType": artifact_type} if artifact_type else None
            found: list[Descriptor] = []
            for page in range(MAX_REFERRER_PAGES):
                try:
                    resp = self._send("GET", url, ctx, ok=(200, 400, 404, 405), params=params,
                                      headers={"Accept": OCI_INDEX}, stream=True)
                except ManifestNotFound:
                    return None
                with resp:
                    ctype = (resp.headers.get("Content-Type") or "").split(";", 1)[0]
                    if resp.status_code != 200 or ctype != OCI_INDEX:
                        return None if page == 0 else found
                    body = self._read_limited(resp, MAX_MANIFEST_BYTES, f"referrers of {digest}")
                    following = resp.links.get("next", {}).get("url")
                    here = resp.url
                parsed = parse_manifest(body, OCI_INDEX, f"referrers of {digest} in {registry}/{repository}")
                assert isinstance(parsed, ImageIndex)
                found.extend(parsed.manifests)
                if not following:
                    return found
                url, params = urljoin(here, following), None
                if _origin(url) != api_origin:
                    raise RegistryError(f"registry {registry}: the next page of referrers of {digest} in "
                                        f"{repository} is on another host; refusing to follow it", **ctx.fields)
            raise RegistryError(f"registry {registry}: referrers of {digest} in {repository} run past "
                                f"{MAX_REFERRER_PAGES} pages", **ctx.fields)

        found = self.retry.run(api, f"referrers of {digest}")
        if found is None:
            index = self._fallback_index(registry, repository, digest)
            found = list(index.manifests) if index is not None else []
        if artifact_type:
            found = [d for d in found if d.artifact_type == artifact_type]
        return found

    def _fallback_index(self, registry: str, repository: str, digest: str) -> ImageIndex | None:
        return self._fallback_tag(registry, repository, digest)[0]

    def _fallback_tag(self, registry: str, repository: str, digest: str) -> tuple[ImageIndex | None, str | None]:
        """The fallback tag's index and its manifest digest, or (None, None) if there is none."""
        try:
            body, media_type, tag_digest = self.get_manifest(registry, repository, referrers_tag(digest))
        except ManifestNotFound:
            return None, None
        parsed = parse_manifest(body, media_type, f"{registry}/{repository}:{referrers_tag(digest)}")
        if not isinstance(parsed, ImageIndex):
            raise UnsupportedManifest(f"{registry}/{repository}:{referrers_tag(digest)} is not an image index; "
                                      "the referrers fallback tag holds something else")
        return parsed, tag_digest

    def add_referrer_to_fallback_tag(self, registry: str, repository: str, subject_digest: str,
                                     referrer: Descriptor) -> str:
        """Add ``referrer`` (a manifest with ``subject``) to the ``sha256-<hex>`` tag index.

        Read, merge (replacing an entry with the same digest), write back: what
        registries without the referrers API need (the OCI spec's fallback).  The
        registry offers no conditional write, so two pushers can each write an index
        without the other's entry; each therefore reads the tag again after a pause
        and, if its entry is gone, merges into what is there now (putting back every
        entry it has seen, so it also repairs what its own write dropped) and writes
        again, up to :data:`FALLBACK_TAG_ATTEMPTS` times.  Returns the digest of the
        tag index.

        Raises:
            RegistryError: the entry kept disappearing (a pusher without this check).
        """
        tag = referrers_tag(subject_digest)
        # Every entry ever read here: a write puts back what a race dropped from the tag.
        seen: dict[str, Descriptor] = {}
        index, _ = self._fallback_tag(registry, repository, subject_digest)
        for attempt in range(FALLBACK_TAG_ATTEMPTS):
            current = [d for d in (index.manifests if index else ()) if d.digest != referrer.digest]
            seen.update((d.digest, d) for d in current)
            there = {d.digest for d in current}
            restored = [d for digest, d in seen.items() if digest not in there]
            body = index_json(current + restored + [referrer], annotations=index.annotations if index else None)
            self.push_manifest(registry, repository, tag, body, OCI_INDEX)
            # Long enough for a concurrent read-then-write to land, growing with contention.
            time.sleep(FALLBACK_TAG_SETTLE * (2 ** attempt) * (1 + random.random()))
            index, tag_digest = self._fallback_tag(registry, repository, subject_digest)
            if index is not None and tag_digest is not None \
                    and any(d.digest == referrer.digest for d in index.manifests):
                return tag_digest
            log.info("%s/%s:%s lost referrer %s to a concurrent push; merging again",
                     registry, repository, tag, referrer.digest)
        raise RegistryError(f"registry {registry}: referrer {referrer.digest} kept disappearing from "
                            f"{repository}:{tag} after {FALLBACK_TAG_ATTEMPTS} writes; another pusher "
                            "overwrites the fallback tag", registry=registry, repository=repository,
                            digest=subject_digest)


def _system_cas() -> Path:
    """The system's CA bundle (Debian's ca-certificates), else certifi's."""
    import ssl

    cafile = ssl.get_default_verify_paths().cafile
    if cafile:
        return Path(cafile)
    import certifi

    return Path(certifi.where())


def _digest_of(source: bytes | Path) -> str:
    if isinstance(source, Path):
        hasher = new_hasher("sha256:" + "0" * 64)
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                hasher.update(block)
        return f"sha256:{hasher.hexdigest()}"
    return sha256_digest(source)


@contextlib.contextmanager
def _chunks_of(source: bytes | Path, size: int) -> Iterator[Iterator[bytes]]:
    if isinstance(source, Path):
        with open(source, "rb") as f:
            yield iter(lambda: f.read(size), b"")
    else:
        view = memoryview(source)
        yield (bytes(view[i:i + size]) for i in range(0, len(view), size))


def _origin(url: str) -> tuple[str, str]:
    """(scheme, host:port) of ``url``: what must match for our credentials to go along."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))

