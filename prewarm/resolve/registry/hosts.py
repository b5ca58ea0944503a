"""Where a registry may send us, and where this node's containerd pulls a registry from.

**Redirects and token realms.**  A registry answers with URLs we then fetch:
``Location`` on a redirect (blob storage) and ``realm`` in a bearer challenge.  A
registry that is hostile, or a compromised proxy in front of it, could point those at
this node's own neighbourhood: the cloud metadata service on ``169.254.169.254``, a
service on loopback, the private network.  The rules, applied before a request leaves:

* a token realm is never link-local;
* a redirect never goes from ``https`` to ``http``;
* a redirect goes to a link-local address only from a link-local registry, and to a
  loopback or private address only from a registry that is itself loopback, private
  or link-local (a registry on ``127.0.0.1`` may send us to ``127.0.0.1``).

Names are resolved here and checked again when the connection is made by the
resolver of the moment: a name whose answer changes between the two (DNS rebinding)
is not caught.

**containerd's registry hosts** (its ``config_path``, usually ``/etc/containerd/certs.d``;
the format is containerd's ``docs/hosts.md``).  A pre-warm must fetch from the same
places the node's own pulls do, so :func:`registry_endpoints` reads the same files the
same way:

* the folder for ``host:port`` is ``host_port_`` or ``host:port``, else ``_default``;
* its ``hosts.toml`` lists ``[host."<url>"]`` mirrors, tried in file order, then the
  ``server`` (or the registry itself); each may restrict itself to ``capabilities``
  ``pull`` (blobs) and ``resolve`` (manifests), and name ``ca`` files, ``client``
  certificates (a file with both, or ``[cert, key]`` pairs), ``skip_verify``,
  ``header`` values and ``override_path`` (the URL path is the API root, no ``/v2``);
  relative file names are relative to the folder;
* a folder without ``hosts.toml`` holds Docker-style certificate files for the registry
  itself (``*.crt`` CAs, ``*.cert`` with ``*.key`` client pairs);
* requests to a host that is not the registry carry ``?ns=<registry>``, as containerd's do.

Unlike containerd, which logs a ``hosts.toml`` it cannot parse and goes on without it, a
malformed file is a :class:`prewarm.errors.ConfigError` naming the file and the key:
pre-warming from somewhere else than the node pulls from would be wasted egress.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import posixpath
import socket
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prewarm.errors import ConfigError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Sequence[Address]]


def addresses(host: str) -> list[Address]:
    """The addresses ``host`` (a name or an IP literal, brackets allowed) stands for.

    A name that does not resolve gives no addresses: the request itself then fails
    with the resolver's error, which says more than we could.
    """
    host = host.strip("[]")
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def _unmapped(addr: Address) -> Address:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_link_local(addr: Address) -> bool:
    """169.254.0.0/16 or fe80::/10 (metadata services live there)."""
    return _unmapped(addr).is_link_local


def is_internal(addr: Address) -> bool:
    """Loopback, private, link-local or unspecified: not a public address."""
    addr = _unmapped(addr)
    return addr.is_loopback or addr.is_private or addr.is_link_local or addr.is_unspecified


def realm_refusal(realm: str, resolve: Resolver = addresses) -> str | None:
    """Why a token realm URL may not be asked, or None if it may."""
    try:
        parts = urlsplit(realm)  # a registry's header: "[" alone raises
    except ValueError:
        return "it is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "it is not an http(s) URL"
    if any(is_link_local(a) for a in resolve(parts.hostname)):
        return f"its host {parts.hostname} is link-local"
    return None


def redirect_refusal(origin: str, target: str, resolve: Resolver = addresses) -> str | None:
    """Why a redirect from URL ``origin`` (the registry) to URL ``target`` is refused, or None.

    Args:
        origin: the registry's API base URL (``https://host:port``).
        target: where the redirect points.
        resolve: name resolution (tests pass a table).
    """
    try:
        o, t = urlsplit(origin), urlsplit(target)  # a registry's Location header: "[" alone raises
    except ValueError:
        return "it does not point to a valid URL"
    if t.scheme not in ("http", "https") or not t.hostname:
        return "it does not point to an http(s) URL"
    if o.scheme == "https" and t.scheme == "http":
        return "it goes from https to plain http"
    try:
        if (o.hostname, o.port) == (t.hostname, t.port):
            return None
    except ValueError:
        return "it does not point to a valid URL"
    to = resolve(t.hostname)
    if not any(is_internal(a) for a in to):
        return None  # the common case (blob storage on the internet): one lookup only
    origin_addrs = resolve(o.hostname or "")
    if any(is_link_local(a) for a in to) and not any(is_link_local(a) for a in origin_addrs):
        return f"it points to a link-local address ({t.hostname})"
    if not any(is_internal(a) for a in origin_addrs):
        return f"it points to a loopback or private address ({t.hostname})"
    return None


# === containerd's hosts.toml

#: A ``hosts.toml`` larger than this is refused (real ones are a few hundred bytes).
MAX_HOSTS_TOML = 64 << 10
#: Mirrors one ``hosts.toml`` may list.
MAX_HOSTS = 32
#: What a host may do, as containerd names it (``push`` is accepted and not used here).
CAPABILITIES = frozenset({"pull", "resolve", "push"})
_DOCKER_HUB = "docker.io"
_DOCKER_HUB_API = "registry-1.docker.io"


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One place a registry's content is fetched from: a mirror, or the registry itself.

    Attributes:
        scheme: ``http`` or ``https``.
        host: ``host[:port]`` the requests go to.
        path: the API root path, ``/v2`` unless ``override_path`` said otherwise.
        capabilities: what it may be asked (``pull``: blobs, ``resolve``: manifests).
        ca: CA files trusted for it on top of the default store.
        client: client certificate pairs (certificate, key or None: in the same file).
        skip_verify: True: its certificate is not verified; None: not configured.
        header: headers sent with each request to it.
        mirror: it is not the registry itself (requests carry ``?ns=<registry>``).
    """

    scheme: str
    host: str
    path: str = "/v2"
    capabilities: frozenset[str] = CAPABILITIES
    ca: tuple[Path, ...] = ()
    client: tuple[tuple[Path, Path | None], ...] = ()
    skip_verify: bool | None = None
    header: tuple[tuple[str, str], ...] = ()
    mirror: bool = False

    @property
    def api_root(self) -> str:
        """``scheme://host/path``: what repository paths are appended to."""
        return f"{self.scheme}://{self.host}{self.path}"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def host_dir(config_path: Path, registry: str) -> Path | None:
    """The folder of ``registry`` (``host[:port]``) under ``config_path``, as containerd looks it up.

    ``host_port_`` first (a colon is awkward in a file name), then ``host:port``, then
    ``_default``; None if there is none.
    """
    candidates = []
    colon = registry.rfind(":")
    if colon > 0 and "]" not in registry[colon:]:
        candidates.append(f"{registry[:colon]}_{registry[colon + 1:]}_")
    candidates += [registry, "_default"]
    for name in candidates:
        if name in ("", ".", "..") or "/" in name:
            continue
        path = config_path / name
        try:
            if path.is_dir():
                return path
        except OSError:
            continue
    return None


def registry_endpoints(config_path: Path | None, registry: str, default: Endpoint) -> list[Endpoint]:
    """Where to fetch ``registry``'s content from, in order: mirrors first, the registry last.

    Args:
        config_path: containerd's host folder (None, or missing: ``[default]``).
        registry: the registry as references name it (``docker.io``, ``host:5000``).
        default: the registry itself as this node would reach it without containerd's
            files (its scheme follows ``insecure_registries``).

    Raises:
        ConfigError: the folder's ``hosts.toml`` is unreadable, too large or malformed.
    """
    folder = host_dir(config_path, registry) if config_path is not None else None
    if folder is None:
        return [default]
    toml_path = folder / "hosts.toml"
    try:
        with open(toml_path, "rb") as f:
            data = f.read(MAX_HOSTS_TOML + 1)
    except FileNotFoundError:
        data = b""
    except OSError as err:
        raise ConfigError(f"cannot read {toml_path} ({err.strerror}); fix its permissions or remove it") from None
    if len(data) > MAX_HOSTS_TOML:
        raise ConfigError(f"{toml_path} is more than {MAX_HOSTS_TOML} bytes; a registry host file is a few "
                          "hundred bytes: is it the right file?")
    if not data:
        return [dataclasses.replace(default, **_docker_cert_files(folder))]
    return parse_hosts_toml(data, registry, folder, default, source=str(toml_path))


def _docker_cert_files(folder: Path) -> dict[str, Any]:
    """Docker's layout: ``*.crt`` CA files, ``*.cert`` client certificates with their ``*.key``."""
    ca: list[Path] = []
    client: list[tuple[Path, Path | None]] = []
    try:
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
    except OSError:
        return {}
    for name in names:
        if name.endswith(".crt"):
            ca.append(folder / name)
        elif name.endswith(".cert"):
            key = folder / (name[:-5] + ".key")
            client.append((folder / name, key if key.is_file() else None))
    out: dict[str, Any] = {}
    if ca:
        out["ca"] = tuple(ca)
    if client:
        out["client"] = tuple(client)
    return out


def parse_hosts_toml(data: bytes, registry: str, folder: Path, default: Endpoint, *,
                     source: str = "hosts.toml") -> list[Endpoint]:
    """The endpoints one ``hosts.toml`` names for ``registry``: ``[host."..."]`` in file order, then ``server``.

    Args:
        data: the file's bytes.
        folder: where relative ``ca`` and ``client`` paths are found.
        default: the registry itself, used when the file names no ``server``.
        source: the file's name, for messages.

    Raises:
        ConfigError: not UTF-8 TOML, or a key of the wrong type or value.
    """
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{source} is not valid TOML ({err}); containerd's format is described in its "
                          "docs/hosts.md") from None
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise ConfigError(f"{source}: 'host' must be tables like [host.\"https://mirror.example.com\"]")
    if len(hosts) > MAX_HOSTS:
        raise ConfigError(f"{source} lists {len(hosts)} hosts; at most {MAX_HOSTS} are read")
    out = []
    for name, table in hosts.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: host {name!r} must be a table ([host.\"{name}\"])")
        out.append(_endpoint(name, table, registry, folder, f"{source} [host.{name!r}]"))
    server = doc.get("server")
    if server is None:
        root = _options(doc, folder, f"{source} (top level)")
        # as containerd: the registry itself serves everything, whatever capabilities say
        root.pop("capabilities", None)
        root.pop("override_path", None)
        if root.get("skip_verify") is None:
            root.pop("skip_verify", None)
        out.append(dataclasses.replace(default, **root))
    else:
        if not isinstance(server, str) or not server:
            raise ConfigError(f"{source}: 'server' must be a URL string such as \"https://{registry}\"")
        out.append(_endpoint(server, doc, registry, folder, f"{source} server"))
    return out


def _endpoint(url: str, table: dict[str, Any], registry: str, folder: Path, where: str) -> Endpoint:
    if not url.startswith(("http://", "https://")):
        if "://" in url:
            raise ConfigError(f"{where}: {url!r} must be an http or https URL")
        url = "https://" + url
    try:
        parts = urlsplit(url)  # raises on an unbalanced [ or ] ("Invalid IPv6 URL")
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError(f"{where}: {url!r} is not a valid URL (invalid port or host)") from None
    if not parts.hostname or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"{where}: {url!r} must be scheme://host[:port][/path], without user, query or fragment")
    options = _options(table, folder, where)
    override = options.pop("override_path", False)
    path = posixpath.normpath(parts.path) if parts.path not in ("", "/") else ""
    if not override and not path.endswith("/v2"):
        path += "/v2"
    host = parts.netloc.lower()
    mirror = host != registry.lower() and not (registry == _DOCKER_HUB and host == _DOCKER_HUB_API)
    return Endpoint(scheme=parts.scheme, host=host, path=path.rstrip("/"), mirror=mirror, **options)


def _options(table: dict[str, Any], folder: Path, where: str) -> dict[str, Any]:
    """The per-host keys of a table (a ``[host]`` or the top level), checked as containerd's types."""
    out: dict[str, Any] = {}
    caps = table.get("capabilities")
    if caps is not None:
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ConfigError(f"{where}: 'capabilities' must be a list such as [\"pull\", \"resolve\"]")
        wrong = sorted({c for c in caps if c.lower() not in CAPABILITIES})
        if wrong:
            raise ConfigError(f"{where}: unknown capability {', '.join(map(repr, wrong))}; "
                              "use pull, resolve and push")
        if caps:
            out["capabilities"] = frozenset(c.lower() for c in caps)
    ca = table.get("ca")
    if ca is not None:
        if isinstance(ca, str):
            ca = [ca]
        if not isinstance(ca, list) or not all(isinstance(c, str) and c for c in ca):
            raise ConfigError(f"{where}: 'ca' must be a file name or a list of file names")
        out["ca"] = tuple(_path(c, folder) for c in ca)
    client = table.get("client")
    if client is not None:
        pairs: list[tuple[Path, Path | None]] = []
        for item in [client] if isinstance(client, str) else client if isinstance(client, list) else [None]:
            if isinstance(item, str) and item:
                pairs.append((_path(item, folder), None))
            elif isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) and x for x in item):
                pairs.append((_path(item[0], folder), _path(item[1], folder)))
            else:
                raise ConfigError(f"{where}: 'client' must be a file with certificate and key, a list of "
                                  "such files, or a list of [certificate, key] pairs")
        out["client"] = tuple(pairs)
    skip = table.get("skip_verify")
    if skip is not None and not isinstance(skip, bool):
        raise ConfigError(f"{where}: 'skip_verify' must be true or false")
    out["skip_verify"] = skip
    override = table.get("override_path", False)
    if not isinstance(override, bool):
        raise ConfigError(f"{where}: 'override_path' must be true or false")
    out["override_path"] = override
    header = table.get("header")
    if header is not None:
        if not isinstance(header, dict):
            raise ConfigError(f"{where}: 'header' must be a table of names to values")
        values: list[tuple[str, str]] = []
        for name, value in header.items():
            listed = [value] if isinstance(value, str) else value
            if not isinstance(listed, list) or not all(isinstance(v, str) for v in listed) \
                    or any(c in name + "".join(listed) for c in "\r\n\0"):
                raise ConfigError(f"{where}: header {name!r} must be a string or a list of strings on one line")
            values += [(name, v) for v in listed]
        out["header"] = tuple(values)
    timeout = table.get("dial_timeout")
    if timeout is not None and not isinstance(timeout, str):
        raise ConfigError(f"{where}: 'dial_timeout' must be a duration string such as \"3s\"")
    return out


def _path(name: str, folder: Path) -> Path:
    path = Path(name)
    return path if path.is_absolute() else folder / path
