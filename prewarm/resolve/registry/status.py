"""HTTP answers from a registry, turned into the error tree in one place.

Every non-success status the client sees goes through :func:`error_for_status`, so
the mapping (and the wording users read) is the same for manifests, blobs, uploads
and tokens:

    401, 403        -> AuthenticationFailed (names the registry and the scope asked for)
    404             -> ManifestNotFound / BlobNotFound (by what was asked for)
    416             -> RangeNotHonored
    429             -> RateLimited (Transient, carries Retry-After)
    5xx, 408        -> RegistryUnavailable (Transient)
    anything else   -> RegistryError

Messages never contain credentials, tokens or signed URLs: only registry,
repository, digest or tag, and status.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from typing import Any, Literal

import requests

from prewarm.errors import (
    AuthenticationFailed,
    BlobNotFound,
    ManifestNotFound,
    RangeNotHonored,
    RateLimited,
    RegistryError,
    RegistryUnavailable,
)

#: The distribution spec's error codes: what may be repeated from a registry's error body.
_ERROR_CODE_RE = re.compile(r"[A-Z_]{1,64}")
#: What a retry can cure: the network, the server's moment.
_TRANSIENT_EXCEPTIONS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
#: Subclasses of those that no retry cures (requests files InvalidProxyURL etc. under them).
_FINAL_EXCEPTIONS = (requests.exceptions.SSLError, requests.exceptions.InvalidURL,
                     requests.exceptions.InvalidHeader, requests.exceptions.InvalidSchema,
                     requests.exceptions.MissingSchema, requests.TooManyRedirects)
Kind = Literal["manifest", "blob", "upload", "referrers", "token", "ping"]
#: The longest Retry-After we honour; a server asking for more gets this much.
MAX_RETRY_AFTER = 300.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _registry_message(response: requests.Response) -> str:
    """The registry's own error code (``MANIFEST_UNKNOWN``...), if it sent one of the spec's form.

    Only a code of the distribution spec's shape (upper-case letters and ``_``, at
    most 64) is repeated: anything else a registry puts there (newlines, markup, a
    forged log line) would be reflected into our messages, job records and logs, so
    it is dropped and the HTTP status alone speaks.
    """
    if response.request is not None and response.request.method == "HEAD" or response.status_code == 416:
        return ""
    length = response.headers.get("Content-Length")
    if length is None or not length.isdigit() or int(length) > 65536:
        return ""
    try:
        body = json.loads(response.content or b"{}")
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors and isinstance(errors, list) and isinstance(errors[0], dict):
            code = errors[0].get("code")
            return f" ({code})" if isinstance(code, str) and _ERROR_CODE_RE.fullmatch(code) else ""
    except (ValueError, RuntimeError, requests.RequestException):
        pass
    return ""


def error_for_status(response: requests.Response, *, kind: Kind, registry: str, repository: str | None,
                     subject: str | None = None, scope: str | None = None) -> RegistryError:
    """The error that ``response`` (not a success) means.

    Args:
        response: the failed response (its body is read, at most 64 KiB are looked at).
        kind: what was asked for; picks ManifestNotFound or BlobNotFound for a 404.
        registry: the registry as users name it.
        repository: the repository, if any.
        subject: tag or digest asked for.
        scope: the token scope, named in auth errors.
    """
    status = response.status_code
    what = f"{registry}/{repository}" if repository else registry
    target = f"{kind} {subject} in {what}" if subject else f"{kind} request to {what}"
    kw: dict[str, Any] = {"registry": registry, "repository": repository, "digest": subject, "status": status}
    detail = _registry_message(response)
    if status in (401, 403):
        verb = "was refused access" if status == 403 else "needs credentials that were not accepted"
        hint = (f"check the credentials for {registry} in your Docker config.json (docker login {registry})"
                if status == 401 else "the credentials are valid but lack permission for it")
        return AuthenticationFailed(
            f"authentication failed for registry {registry}: {target} {verb} (HTTP {status}{detail}"
            f"{', scope ' + scope if scope else ''}); {hint}", **kw)
    if status == 404:
        if kind == "blob":
            return BlobNotFound(f"not found: blob {subject} in {what} (HTTP 404{detail})", **kw)
        return ManifestNotFound(f"not found: {subject or 'image'} in {what} (HTTP 404{detail}); "
                                "check the name and tag", **kw)
    if status == 416:
        return RangeNotHonored(f"{target}: range not satisfiable (HTTP 416)", **kw)
    if status == 429:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return RateLimited(f"rate limited by {registry}: {target} (HTTP 429"
                           f"{f', retry after {retry_after:.0f}s' if retry_after is not None else ''})",
                           retry_after=retry_after, **kw)
    if status >= 500 or status == 408:
        return RegistryUnavailable(f"registry {registry} unavailable: {target} answered HTTP {status}{detail}",
                                   **kw)
    return RegistryError(f"registry {registry}: {target} answered HTTP {status}{detail}", **kw)


def error_for_exception(err: requests.RequestException, *, kind: Kind, registry: str,
                        repository: str | None, subject: str | None = None) -> RegistryError:
    """The error a failed request means.

    Connection failures, timeouts and broken bodies are transient (retried); TLS
    problems and requests that cannot succeed as sent (an invalid URL or header, a
    redirect loop) are final: retrying them only delays the same error.
    """
    what = f"{registry}/{repository}" if repository else registry
    target = f"{kind} {subject} in {what}" if subject else f"{kind} request to {what}"
    kw: dict[str, Any] = {"registry": registry, "repository": repository, "digest": subject, "status": None}
    if isinstance(err, requests.exceptions.SSLError):
        return RegistryError(f"TLS to registry {registry} failed for {target}: certificate not trusted or "
                             "not HTTPS; pass --ca-bundle FILE, or --insecure-registry "
                             f"{registry} if it serves plain HTTP", **kw)
    reason = err.__class__.__name__
    if isinstance(err, _TRANSIENT_EXCEPTIONS) and not isinstance(err, _FINAL_EXCEPTIONS):
        return RegistryUnavailable(f"registry {registry} unreachable: {target} failed ({reason})", **kw)
    return RegistryError(f"registry {registry}: {target} failed ({reason}); the request cannot succeed as "
                         "sent, so it is not retried", **kw)
