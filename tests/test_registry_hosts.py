"""Where a registry may send the client: the redirect and token-realm decisions, by address class."""

from __future__ import annotations

import ipaddress

import pytest

from prewarm.resolve.registry.hosts import Address, addresses, realm_refusal, redirect_refusal

#: Names as a resolver would answer them (the decision functions take the resolver).
TABLE = {
    "registry.example": ["93.184.215.14"],
    "cdn.example": ["151.101.1.57", "2a04:4e42::57"],
    "evil-to-loopback.example": ["127.0.0.1"],
    "evil-to-private.example": ["151.101.65.57", "10.1.2.3"],
    "evil-to-metadata.example": ["169.254.169.254"],
    "internal-registry.corp": ["10.0.0.5"],
    "internal-blobs.corp": ["10.0.0.6"],
    "mapped.example": ["::ffff:127.0.0.1"],
}


def resolve(host: str) -> list[Address]:
    if host in TABLE:
        return [ipaddress.ip_address(a) for a in TABLE[host]]
    return addresses(host)  # IP literals


@pytest.mark.parametrize("origin,target,why", [
    # public registry: public blob storage is fine, its own host too
    ("https://registry.example", "https://cdn.example/blob?sig=x", None),
    ("https://registry.example", "https://registry.example/v2/other", None),
    ("http://registry.example:5000", "https://cdn.example/blob", None),
    # never a downgrade, even on the same host and port
    ("https://registry.example", "http://cdn.example/blob", "https to plain http"),
    ("https://registry.example:443", "http://registry.example:443/v2/x", "https to plain http"),
    # a public registry may not send us into this node's neighbourhood
    ("https://registry.example", "https://127.0.0.1:8080/x", "loopback or private"),
    ("https://registry.example", "https://[::1]/x", "loopback or private"),
    ("https://registry.example", "https://evil-to-loopback.example/x", "loopback or private"),
    ("https://registry.example", "https://evil-to-private.example/x", "loopback or private"),
    ("https://registry.example", "https://mapped.example/x", "loopback or private"),
    ("https://registry.example", "http://169.254.169.254/latest/meta-data", "https to plain http"),
    ("https://registry.example", "https://evil-to-metadata.example/x", "link-local"),
    ("https://registry.example", "https://[fe80::1]/x", "link-local"),
    # a private registry may use private storage, but not the metadata service
    ("https://internal-registry.corp", "https://internal-blobs.corp/x", None),
    ("https://internal-registry.corp", "https://evil-to-metadata.example/x", "link-local"),
    # a loopback registry (the tests' registries) may redirect to loopback
    ("http://127.0.0.1:5000", "http://127.0.0.1:5001/cdn/x", None),
    # and what is not an http(s) URL is refused
    ("https://registry.example", "file:///etc/passwd", "http(s) URL"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:99999/x", "valid URL"),
])
def test_redirect_decision(origin: str, target: str, why: str | None) -> None:
    refusal = redirect_refusal(origin, target, resolve)
    if why is None:
        assert refusal is None
    else:
        assert refusal is not None and why in refusal


def test_realm_decision() -> None:
    assert realm_refusal("https://auth.example/token", resolve) is None
    assert realm_refusal("http://127.0.0.1:5001/token", resolve) is None
    assert "link-local" in (realm_refusal("http://169.254.169.254/token", resolve) or "")
    assert "link-local" in (realm_refusal("https://evil-to-metadata.example/token", resolve) or "")
    assert "link-local" in (realm_refusal("http://[fe80::1%25eth0]/token", resolve) or "")
    assert realm_refusal("ftp://auth.example/token", resolve) is not None
