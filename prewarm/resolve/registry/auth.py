"""Answering registry challenges: bearer tokens and basic auth, as a ``requests`` AuthBase.

The flow (Docker's token protocol, the same shape as httpx's generator auth):

1. A request goes out with whatever we already know for its registry: a cached
   bearer token for its scope (``repository:<name>:pull`` or ``...:pull,push``),
   basic credentials, or nothing the first time.
2. A 401 comes back with ``WWW-Authenticate``.  The response hook parses it
   (``Bearer realm=..., service=..., scope=...`` or ``Basic realm=...``), gets a token
   from the realm (anonymously, with the node's user/password via basic auth, or
   with an ``identitytoken`` via the OAuth2 refresh-token grant), caches it per
   scope, and sends the same request once more (rewinding a file body if needed).
3. Later requests for the same scope carry the cached token; one that has expired
   is renewed before use, and a 401 in the middle of a long job (token revoked or
   expired early) simply goes through step 2 again.

One :class:`RegistryAuth` exists per registry and is shared by threads, so the caches
are guarded by a lock.  Credentials and tokens never appear in logs or messages.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.auth import AuthBase
from requests.utils import rewind_body

from prewarm.errors import AuthenticationFailed, RegistryError
from prewarm.resolve.registry.dockerconfig import Credential
from prewarm.resolve.registry.hosts import realm_refusal
from prewarm.resolve.registry.status import error_for_exception, error_for_status

log = logging.getLogger(__name__)

#: Tokens without ``expires_in`` live this long (the spec's default).
DEFAULT_TOKEN_LIFETIME = 60.0
#: Renew a token this many seconds before it runs out, so it does not expire in flight.
TOKEN_MARGIN = 5.0
_PATH_RE = re.compile(r"^/v2/(?P<name>.+?)/(?:manifests|blobs|tags|referrers)(?:/|$)")
_PARAM_RE = re.compile(r'([A-Za-z_][\w.-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclasses.dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header."""

    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse ``Bearer realm="...",service="...",scope="..."`` (or ``Basic realm=...``)."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {m.group(1).lower(): (m.group(2).replace('\\"', '"') if m.group(2) is not None else m.group(3))
              for m in _PARAM_RE.finditer(rest)}
    return Challenge(scheme.lower(), params)


def scope_for(method: str, url: str) -> str | None:
    """The token scope a request needs: ``repository:<name>:pull[,push]``, None for ``/v2/``."""
    m = _PATH_RE.match(urlsplit(url).path)
    if not m:
        return None
    actions = "pull" if method.upper() in ("GET", "HEAD") else "pull,push"
    return f"repository:{m.group('name')}:{actions}"


@dataclasses.dataclass
class _Token:
    value: str
    expires_at: float


class RegistryAuth(AuthBase):
    """Auth for one registry: challenge-driven, token cache per scope.

    Args:
        registry: the registry as users name it (used in messages and for credentials).
        api_netloc: ``host:port`` the registry API answers on; 401s from other hosts
            (a CDN after a redirect) are not ours to answer.
        credential: a callable returning the node's credential for this registry (read
            lazily, once), or None for anonymous access.
        session: the session used to reach the token realm.
        timeout: seconds for token requests.
        clock: monotonic clock (tests use the real one).
        verify: TLS verification for the token realm (CA bundle path or True).
        scheme: ``https``, or ``http`` for a registry named insecure: the scheme 401s
            must come over to be answered, and the only one under which a plain
            ``http://`` token realm may receive credentials.
    """

    def __init__(self, registry: str, api_netloc: str, credential: Callable[[], Credential | None],
                 session: requests.Session, timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, verify: str | bool = True,
                 scheme: str = "https") -> None:
        self.registry = registry
        self.api_netloc = api_netloc
        self.scheme = scheme
        self._credential_source = credential
        self._credential: Credential | None = None
        self._credential_loaded = False
        self._session = session
        self._timeout = timeout
        self._verify = verify
        self._clock = clock
        self._lock = threading.RLock()
        self._challenge: Challenge | None = None
        self._tokens: dict[str, _Token] = {}
        #: How many tokens this object fetched (observability, tests).
        self.tokens_fetched = 0

    # === requests entry points
    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        scope = scope_for(r.method or "GET", r.url or "")
        header = self._header_for(scope, force_new=False)
        if header:
            r.headers["Authorization"] = header
        r.register_hook("response", self._on_response)
        return r

    def _on_response(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        request = response.request
        if response.status_code != 401 or getattr(request, "_prewarm_auth_retried", False):
            return response
        answered = urlsplit(response.url)
        if (answered.scheme, answered.netloc) != (self.scheme, self.api_netloc):
            return response
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None or challenge.scheme not in ("bearer", "basic"):
            return response
        with self._lock:
            self._challenge = challenge
        scope = scope_for(request.method or "GET", request.url or "")
        if challenge.scheme == "bearer":
            scope = challenge.params.get("scope") or scope
        header = self._header_for(scope, force_new=True)
        if header is None:
            return response
        retry = request.copy()
        retry.headers["Authorization"] = header
        retry._prewarm_auth_retried = True  # type: ignore[attr-defined]
        if getattr(request, "_body_position", None) is not None:
            rewind_body(retry)
        _ = response.content  # drain so the connection can be reused
        response.close()
        assert response.connection is not None
        new = response.connection.send(retry, **kwargs)
        new.history.append(response)
        new.request = retry
        return new

    # === credentials and tokens
    def credential(self) -> Credential | None:
        with self._lock:
            if not self._credential_loaded:
                self._credential = self._credential_source()
                self._credential_loaded = True
            return self._credential

    def _header_for(self, scope: str | None, force_new: bool) -> str | None:
        with self._lock:
            challenge = self._challenge
            if challenge is None:
                return None
            if challenge.scheme == "basic":
                cred = self.credential()
                if cred is None or cred.password is None or cred.username is None:
                    return None
                raw = f"{cred.username}:{cred.password}".encode()
                return "Basic " + base64.b64encode(raw).decode()
            key = scope or ""
            token = self._tokens.get(key)
            if force_new or token is None or token.expires_at <= self._clock():
                token = self._fetch_token(challenge, scope)
                self._tokens[key] = token
            return f"Bearer {token.value}"

    def _fetch_token(self, challenge: Challenge, scope: str | None) -> _Token:
        """Ask the realm for a token (anonymous, basic credentials or identity token).

        Credentials go to an ``http://`` realm only when the registry itself is plain
        HTTP (named insecure): an HTTPS registry pointing us at a plain realm would
        otherwise have our password sent in the clear.  A link-local realm (a cloud
        metadata service) is never asked.

        Raises:
            AuthenticationFailed: the token service refused us (naming registry and scope).
            RegistryUnavailable: the token service is down or unreachable.
            RegistryError: the challenge has no realm, a realm we refuse to ask, or the
                answer holds no token.
        """
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryError(f"registry {self.registry} sent a bearer challenge without a realm",
                                registry=self.registry)
        refusal = realm_refusal(realm)
        if refusal is not None:
            raise RegistryError(f"registry {self.registry} names a token realm we will not ask: {refusal}; "
                                "check the registry's auth configuration", registry=self.registry)
        service = challenge.params.get("service")
        cred = self.credential()
        if cred is not None and urlsplit(realm).scheme != "https" and self.scheme == "https":
            raise RegistryError(f"registry {self.registry} is HTTPS but names a plain http:// token realm "
                                f"({urlsplit(realm).hostname}); refusing to send your credentials there "
                                "in the clear; fix the registry's token realm", registry=self.registry)
        form: dict[str, str] = {}
        if service:
            form["service"] = service
        if scope:
            form["scope"] = scope
        try:
            if cred is not None and cred.identity_token:
                form.update(grant_type="refresh_token", refresh_token=cred.identity_token, client_id="prewarm")
                resp = self._session.post(realm, data=form, timeout=self._timeout, verify=self._verify)
            else:
                auth = ((cred.username or "", cred.password)
                        if cred is not None and cred.password is not None else None)
                resp = self._session.get(realm, params=form, auth=auth, timeout=self._timeout,
                                         verify=self._verify)
        except requests.RequestException as err:
            raise error_for_exception(err, kind="token", registry=self.registry, repository=None,
                                      subject=scope) from None
        with resp:
            if resp.status_code != 200:
                failure = error_for_status(resp, kind="token", registry=self.registry, repository=None,
                                           subject=None, scope=scope)
                if isinstance(failure, AuthenticationFailed):
                    who = "the credentials from your Docker config" if cred is not None else "anonymous access"
                    raise AuthenticationFailed(
                        f"authentication failed for registry {self.registry}: its token service refused "
                        f"{who} for scope {scope or '(none)'} (HTTP {resp.status_code}); "
                        f"run docker login {self.registry} or fix DOCKER_CONFIG",
                        registry=self.registry, status=resp.status_code) from None
                raise failure
            try:
                body = resp.json()
            except ValueError:
                body = None
        value = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise RegistryError(f"registry {self.registry}: the token service answered without a token",
                                registry=self.registry)
        lifetime = body.get("expires_in") if isinstance(body, dict) else None
        if not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        self.tokens_fetched += 1
        log.debug("token for %s scope %s (valid %ss)", self.registry, scope, lifetime)
        return _Token(value, self._clock() + max(float(lifetime) - TOKEN_MARGIN, 1.0))
