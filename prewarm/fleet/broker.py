"""One Redis URL, two dialects: redis-py's and kombu's.

Users give one URL (``PREWARM_BROKER_URL``): ``redis://[user:pass@]host:port/db``,
``rediss://...`` for TLS, or ``unix:///path/to/redis.sock``.  redis-py reads those as
they are; kombu spells a unix socket ``redis+socket:///path``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import urlsplit

import redis

from prewarm.errors import ConfigError, PrewarmError

_SCHEMES = ("redis", "rediss", "unix", "redis+socket")


def _check(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"broker URL {redact(url)!r} is not a Redis URL; use redis://host:port/db, "
            "rediss://host:port/db (TLS) or unix:///path/to/redis.sock"
        )
    return scheme


def redact(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def celery_url(url: str) -> str:
    scheme = _check(url)
    if scheme == "unix":
        return "redis+socket://" + url[len("unix://"):]
    return url


def redis_url(url: str) -> str:
    scheme = _check(url)
    if scheme == "redis+socket":
        return "unix://" + url[len("redis+socket://"):]
    return url


def redis_client(url: str, **kwargs: object) -> redis.Redis:
    """A redis-py client for the broker URL (TLS, ACL user and password come from the URL).

    A ping checks the credentials at once, so a wrong password is one clear message rather
    than a traceback from whichever command happens to run first.

    Raises:
        ConfigError: the URL is not a Redis URL, or Redis refused its user or password.
    """
    url = redis_url(url)
    kwargs.setdefault("health_check_interval", 30)
    if not url.startswith("unix://"):
        kwargs.setdefault("socket_keepalive", True)  # TCP only: unix sockets take no such option
    client = redis.Redis.from_url(url, **kwargs)  # type: ignore[arg-type]
    try:
        client.ping()
    except redis.exceptions.AuthenticationError as err:
        raise ConfigError(f"Redis at {redact(url)} refused the credentials in the broker URL ({err}); "
                          "fix the user and password in PREWARM_BROKER_URL") from None
    except redis.exceptions.ConnectionError:
        pass  # not up yet (or restarting): callers retry or report it when they use the client
    return client


def wait_until_answers(client: redis.Redis, *, what: str, timeout: float,
                       alive: Callable[[], None] | None = None, interval: float = 0.01) -> None:
    """Block until ``client``'s Redis answers a ping.

    Why: a redis-server just started refuses connections (its unix socket may not even
    exist yet) or answers LOADING for a moment; the first real command must not be the
    one that finds out.  ``alive`` is called before each try and may raise, so a server
    that died at start-up is reported at once instead of after ``timeout``.

    Raises:
        PrewarmError: no answer within ``timeout`` seconds (``what`` names the server).
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        try:
            if client.ping():
                return
        except (redis.exceptions.ConnectionError, FileNotFoundError):  # BusyLoadingError is one too
            pass
        if time.monotonic() > deadline:
            raise PrewarmError(f"{what} did not answer within {timeout}s")
        time.sleep(interval)
