"""Where a registry may send us: the address classes behind redirect and token-realm rules.

A registry answers with URLs we then fetch: ``Location`` on a redirect (blob storage)
and ``realm`` in a bearer challenge.  A registry that is hostile, or a compromised
proxy in front of it, could point those at this node's own neighbourhood: the cloud
metadata service on ``169.254.169.254``, a service on loopback, the private network.
The rules, applied before a request leaves:

* a token realm is never link-local;
* a redirect never goes from ``https`` to ``http``;
* a redirect goes to a link-local address only from a link-local registry, and to a
  loopback or private address only from a registry that is itself loopback, private
  or link-local (a registry on ``127.0.0.1`` may send us to ``127.0.0.1``).

Names are resolved here and checked again when the connection is made by the
resolver of the moment: a name whose answer changes between the two (DNS rebinding)
is not caught.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

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
    parts = urlsplit(realm)
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
    o, t = urlsplit(origin), urlsplit(target)
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
