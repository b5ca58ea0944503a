"""Answering registry challenges: bearer tokens and basic auth, as ``requests`` auth.

The flow (Docker's token protocol, the same shape as httpx's generator auth):

1. A request goes out with whatever we already know for its registry: a cached
   bearer token for its scope (``repository:<name>:pull`` or ``...:pull,push``, the
   name being the repository the client asked about), basic credentials, or
   nothing the first time.
2. A 401 comes back with ``WWW-Authenticate``.  The response hook parses it
   (``Bearer realm=..., service=..., scope=...`` or ``Basic realm=...``), gets a token
   from the realm (anonymously, with the node's user/password via basic auth, or
   with an ``identitytoken`` via the OAuth2 refresh-token grant) for our scope and
   the challenge's, caches it under our scope (the key the next request looks up),
   and sends the same request once more (rewinding a file body if needed).
3. Later requests for the same scope carry the cached token; one that has expired
   is renewed before use, and a 401 in the middle of a long job (token revoked or
   expired early) simply goes through step 2 again.

One :class:`RegistryAuth` exists per registry and is shared by threads, so the caches
are guarded by a lock (never held across a network call or a credential helper).
Credentials and tokens never appear in logs or messages.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

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


def scope_for(method: str, repository: str | None) -> str | None:
    """The token scope a request on ``repository`` needs: ``repository:<name>:pull[,push]``.

    The repository is the one the client asked about, never parsed back out of a
    URL: a repository may itself have a ``blobs`` or ``manifests`` path component.
    None (no repository: ``/v2/``) asks for no scope.
    """
    if not repository:
        return None
    actions = "pull" if method.upper() in ("GET", "HEAD") else "pull,push"
    return f"repository:{repository}:{actions}"


@dataclasses.dataclass
class _Token:
    value: str
    expires_at: float


@dataclasses.dataclass
class _Flight:
    """A token fetch under way: threads that need the same token wait for it."""

    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None


class _ScopedAuth(AuthBase):
    """The ``requests`` auth for one request: its registry's state and the scope it needs."""

    def __init__(self, owner: RegistryAuth, scope: str | None) -> None:
        self._owner = owner
        self._scope = scope

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return self._owner._prepare(r, self._scope)


class RegistryAuth:
    """Auth for one registry: challenge-driven, token cache per scope.

    The lock guards the caches only: token requests and credential helpers run
    outside it, so a slow token service holds up only the requests that need that
    token.  Those share one fetch: when several requests meet an expired or revoked
    token at once (N range threads all getting a 401), the first fetches and the
    others wait for its token.

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
        # Held while the credential is read (a helper may run): one read, not one per thread.
        self._credential_lock = threading.Lock()
        self._session = session
        self._timeout = timeout
        self._verify = verify
        self._clock = clock
        self._lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._tokens: dict[str, _Token] = {}
        self._flights: dict[str, _Flight] = {}
        #: How many tokens this object fetched (observability, tests).
        self.tokens_fetched = 0

    # === requests entry points
    def for_scope(self, scope: str | None) -> AuthBase:
        """The ``requests`` auth for a request that needs ``scope`` (see :func:`scope_for`)."""
        return _ScopedAuth(self, scope)

    def _prepare(self, r: requests.PreparedRequest, scope: str | None) -> requests.PreparedRequest:
        header = self._header_for(scope, rejected=None, asked=None)
        if header:
            r.headers["Authorization"] = header
        r.register_hook("response", functools.partial(self._on_response, scope=scope))
        return r

    def _on_response(self, response: requests.Response, scope: str | None = None,
                     **kwargs: Any) -> requests.Response:
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
        asked = challenge.params.get("scope") if challenge.scheme == "bearer" else None
        sent = request.headers.get("Authorization")
        rejected = sent.decode("latin-1") if isinstance(sent, bytes) else sent
        header = self._header_for(scope, rejected=rejected, asked=asked)
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
        """This node's credential for the registry, read once (a helper runs at most once)."""
        with self._credential_lock:
            if not self._credential_loaded:
                self._credential = self._credential_source()
                self._credential_loaded = True
            return self._credential

    def _header_for(self, scope: str | None, rejected: str | None, asked: str | None) -> str | None:
        """The Authorization header for ``scope``; None before any challenge.

        Args:
            scope: what the request needs; also the key its token is cached under.
            rejected: the header a 401 just refused: a cached token equal to it is not
                used again (unless another thread already replaced it).
            asked: the scope the registry's challenge named, requested along with ours.
        """
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
        scopes = [s for s in dict.fromkeys([scope, asked]) if s]
        while True:
            with self._lock:
                token = self._tokens.get(key)
                if token is not None and token.expires_at > self._clock() \
                        and f"Bearer {token.value}" != rejected:
                    return f"Bearer {token.value}"
                flight = self._flights.get(key)
                mine = flight is None
                if flight is None:
                    flight = self._flights[key] = _Flight()
            if not mine:
                flight.done.wait()
                if flight.error is not None:
                    raise flight.error
                continue
            try:
                fresh = self._fetch_token(challenge, scopes)
            except BaseException as err:
                flight.error = err
                with self._lock:
                    del self._flights[key]
                flight.done.set()
                raise
            with self._lock:
                self._tokens[key] = fresh
                self.tokens_fetched += 1
                del self._flights[key]
            flight.done.set()
            return f"Bearer {fresh.value}"

    def _check_realm_redirect(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        """A token service's redirect goes where a realm may be, and never from https to http.

        Raises:
            RegistryError: the redirect is refused (before requests follows it).
        """
        if not response.is_redirect:
            return response
        target = urljoin(response.url, response.headers["Location"])
        refusal = realm_refusal(target)
        if refusal is None and urlsplit(response.url).scheme == "https" and urlsplit(target).scheme != "https":
            refusal = "it goes from https to plain http"
        if refusal is not None:
            response.close()
            raise RegistryError(f"registry {self.registry}: refusing the token service's redirect: {refusal}",
                                registry=self.registry)
        return response

    def _fetch_token(self, challenge: Challenge, scopes: list[str]) -> _Token:
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
        scope = " ".join(scopes) or None
        base: list[tuple[str, str]] = [("service", service)] if service else []
        try:
            if cred is not None and cred.identity_token:
                # OAuth2 form: one space-separated scope parameter.
                form = base + ([("scope", scope)] if scope else []) + [
                    ("grant_type", "refresh_token"), ("refresh_token", cred.identity_token),
                    ("client_id", "prewarm")]
                resp = self._session.post(realm, data=form, timeout=self._timeout, verify=self._verify,
                                          hooks={"response": self._check_realm_redirect})
            else:
                # Docker's GET form: one scope parameter per scope.
                auth = ((cred.username or "", cred.password)
                        if cred is not None and cred.password is not None else None)
                resp = self._session.get(realm, params=base + [("scope", s) for s in scopes], auth=auth,
                                         timeout=self._timeout, verify=self._verify,
                                         hooks={"response": self._check_realm_redirect})
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
        log.debug("token for %s scope %s (valid %ss)", self.registry, scope, lifetime)
        return _Token(value, self._clock() + max(float(lifetime) - TOKEN_MARGIN, 1.0))
