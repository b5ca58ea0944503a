"""A small token server for the bearer-flow tests, trusted by a real docker-registry.

It signs JWTs with an ES256 test key whose self-signed certificate is the registry's
``rootcertbundle``; the ``kid`` header is the key's libtrust key ID, which is how
distribution 2.8 picks the key to verify with.  It implements the two ways Docker
clients get tokens:

* ``GET /token?service=..&scope=..`` anonymously or with HTTP basic credentials;
* ``POST /token`` with ``grant_type=refresh_token`` (an ``identitytoken``) or ``password``.

``registry_validity`` makes tokens the registry accepts for only that many seconds
(distribution adds 60 s of leeway to ``exp``, so ``exp`` is set in the past) while the
client is told ``expires_in`` = ``reported_lifetime``: the way to provoke a 401 in the
middle of a job.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: Clock leeway distribution (2.8) allows past ``exp`` (and before ``nbf``).
REGISTRY_LEEWAY = 60


def make_cert(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed EC certificate (also its own CA) and key for ``host``; returns (cert, key) paths."""
    import ipaddress

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def libtrust_key_id(public_key: Any) -> str:
    """The key ID docker/libtrust derives from a public key (what distribution matches ``kid`` to)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    s = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(s[i:i + 4] for i in range(0, len(s), 4))


@dataclasses.dataclass
class Issued:
    account: str
    scopes: list[str]
    grant: str


class TokenServer:
    """Use as ``with TokenServer(tmp_path) as ts:``; ``ts.auth_config()`` is the registry's auth block."""

    def __init__(self, folder: Path, *, users: dict[str, str] | None = None,
                 refresh_tokens: dict[str, str] | None = None, service: str = "prewarm-test-registry",
                 issuer: str = "prewarm-test-issuer", reported_lifetime: int = 300,
                 registry_validity: int | None = None, allow_anonymous: bool = True) -> None:
        self.users = dict(users or {})
        self.refresh_tokens = dict(refresh_tokens or {})
        self.service = service
        self.issuer = issuer
        self.reported_lifetime = reported_lifetime
        self.registry_validity = registry_validity
        self.allow_anonymous = allow_anonymous
        #: Seconds every answer waits first (a slow token service).
        self.delay = 0.0
        self.issued: list[Issued] = []
        self.refused = 0
        self.cert_path, key_path = make_cert(folder / "token-signing")
        self._key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        self._kid = libtrust_key_id(self._key.public_key())
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def auth_config(self) -> str:
        return ("auth:\n  token:\n"
                f"    realm: {self.realm}\n    service: {self.service}\n    issuer: {self.issuer}\n"
                f"    rootcertbundle: {self.cert_path}\n")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _grant(self, account: str, scopes: list[str]) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            name, wanted = ":".join(parts[1:-1]), parts[-1].split(",")
            allowed = [a for a in wanted if account != "" or a == "pull"]
            if allowed:
                access.append({"type": "repository", "name": name, "actions": allowed})
        return access

    def _token(self, account: str, scopes: list[str], grant: str) -> dict[str, Any]:
        now = int(time.time())
        exp = now + self.reported_lifetime
        if self.registry_validity is not None:
            exp = now + self.registry_validity - REGISTRY_LEEWAY
        claims = {"iss": self.issuer, "sub": account, "aud": self.service, "exp": exp, "nbf": now - 1,
                  "iat": now, "jti": uuid.uuid4().hex, "access": self._grant(account, scopes)}
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._kid})
        self.issued.append(Issued(account, scopes, grant))
        return {"token": token, "access_token": token, "expires_in": self.reported_lifetime,
                "issued_at": datetime.datetime.now(datetime.UTC).isoformat()}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                if server.delay:
                    time.sleep(server.delay)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _refuse(self) -> None:
                server.refused += 1
                self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                scopes = query.get("scope", [])
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if server.users.get(user) != password:
                        return self._refuse()
                    return self._reply(200, server._token(user, scopes, "basic"))
                if not server.allow_anonymous:
                    return self._refuse()
                return self._reply(200, server._token("", scopes, "anonymous"))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                scopes = form.get("scope", "").split(" ") if form.get("scope") else []
                if form.get("grant_type") == "refresh_token":
                    account = server.refresh_tokens.get(form.get("refresh_token", ""))
                    if account is None:
                        return self._refuse()
                    return self._reply(200, server._token(account, scopes, "refresh_token"))
                if form.get("grant_type") == "password":
                    user = form.get("username", "")
                    if server.users.get(user) != form.get("password"):
                        return self._refuse()
                    return self._reply(200, server._token(user, scopes, "password"))
                return self._reply(400, {"error": "unsupported_grant_type"})

        return Handler


@dataclasses.dataclass
class TokenRegistry:
    """A real docker-registry whose ``auth: token:`` trusts a :class:`TokenServer`."""

    registry: Any
    tokens: TokenServer
