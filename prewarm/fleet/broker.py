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

from prewarm.errors import BrokerError, ConfigError, PrewarmError

#: Seconds to open a connection to Redis, and to wait for an answer: nothing waits forever.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0

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


class _TlsConnection(redis.connection.SSLConnection):
    """A TLS connection whose handshake counts as connecting: bounded by the connect timeout.

    redis-py does the handshake under the read timeout (30 s), and a plain Redis port never
    answers a ClientHello: ``rediss://`` against it would sit silent for 30 s before saying so.
    """

    def _connect(self):  # type: ignore[no-untyped-def]
        sock = redis.connection.Connection._connect(self)
        sock.settimeout(self.socket_connect_timeout)
        try:
            tls = self._wrap_socket_with_ssl(sock)
        except (OSError, redis.exceptions.RedisError):
            sock.close()
            raise
        tls.settimeout(self.socket_timeout)
        return tls


def redis_client(url: str, *, reachable: bool = False, **kwargs: object) -> redis.Redis:
    """A redis-py client for the broker URL (TLS, ACL user and password come from the URL).

    A ping checks the credentials at once, so a wrong password is one clear message rather
    than a traceback from whichever command happens to run first.  With ``reachable`` a
    Redis that does not answer is an error too (a command that needs it now, before it
    does anything else); without, the caller waits for it (a worker, while Redis restarts).

    Raises:
        ConfigError: the URL is not a Redis URL, or Redis refused its user or password.
        BrokerError: Redis cannot be used (with ``reachable``: cannot be reached either).
    """
    url = redis_url(url)
    kwargs.setdefault("health_check_interval", 30)
    kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
    kwargs.setdefault("socket_timeout", READ_TIMEOUT)
    if not url.startswith("unix://"):
        kwargs.setdefault("socket_keepalive", True)  # TCP only: unix sockets take no such option
    if url.startswith("rediss://"):
        kwargs.setdefault("connection_class", _TlsConnection)
    client = redis.Redis.from_url(url, **kwargs)  # type: ignore[arg-type]
    try:
        client.ping()
        if reachable:  # and a read of our own keys: a wrong DB or an ACL user without rights shows here
            client.exists("prewarm:nodes")
    except redis.exceptions.AuthenticationError as err:
        raise ConfigError(f"Redis at {redact(url)} refused the credentials in the broker URL ({err}); "
                          "fix the user and password in PREWARM_BROKER_URL") from None
    except redis.exceptions.ConnectionError as err:
        if reachable:
            raise broker_error(err, url) from None
        # not up yet (or restarting): callers retry or report it when they use the client
    except redis.exceptions.RedisError as err:  # a wrong DB, a server that is not Redis, ...
        raise broker_error(err, url) from None
    return client


def broker_error(err: BaseException, url: str | None) -> BrokerError:
    """One of our errors for anything redis-py (or kombu) raised: what failed, and what to do."""
    where = f"Redis at {redact(url)}" if url else "Redis (PREWARM_BROKER_URL)"
    text = str(err).strip() or type(err).__name__
    first = text.split()[0].upper() if text.split() else ""
    if isinstance(err, redis.exceptions.AuthenticationError) or first in ("WRONGPASS", "NOAUTH"):
        hint = f"{where} refused the credentials: fix the user and password in PREWARM_BROKER_URL"
    elif isinstance(err, redis.exceptions.NoPermissionError) or first == "NOPERM":
        hint = (f"{where}: the ACL user lacks a right this command needs ({text}); grant it, or use the "
                "scheduler's or the workers' user (deploy/kubernetes/20-redis.yaml)")
    elif first == "READONLY":
        hint = f"{where} is a read-only replica: point PREWARM_BROKER_URL at the primary"
    elif first == "OOM":
        hint = f"{where} is out of memory (maxmemory): free it or raise maxmemory"
    elif "DB index is out of range" in text or "invalid DB index" in text:
        hint = f"{where}: no such database number; fix the /DB at the end of PREWARM_BROKER_URL"
    elif isinstance(err, redis.exceptions.TimeoutError):
        tls = " (rediss:// speaks TLS: is that port Redis's tls-port?)" if url and url.startswith("rediss:") else ""
        hint = f"cannot reach {where}: it did not answer in time ({text}){tls}; check that it is up and reachable"
    elif isinstance(err, (redis.exceptions.ConnectionError, OSError)):
        hint = (f"cannot reach {where} ({text}); check PREWARM_BROKER_URL, that Redis is up, and TLS "
                "(rediss://) against the server's port")
    elif isinstance(err, (redis.exceptions.InvalidResponse, redis.exceptions.DataError)):
        hint = f"{where} does not answer like Redis ({text}); check the host and port in PREWARM_BROKER_URL"
    else:
        hint = f"{where} failed: {text}"
    return BrokerError(hint)


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
