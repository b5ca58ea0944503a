"""Settings: read once from ``PREWARM_*`` environment variables, CLI flags win.

Only the CLI, the workers and the shim build a :class:`Settings`; every other module
receives one (or the plain values it needs) as an argument and never reads the
environment itself.  The defaults below are the documented ones.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Mapping
from pathlib import Path

from prewarm.errors import ConfigError

#: Where a node keeps its content store (layers, zTOC cache, snapshots).
DEFAULT_ROOT = Path("/var/lib/prewarm")
#: Uncompressed bytes between two gzip checkpoints, as soci uses.
DEFAULT_SPAN_SIZE = 4 << 20
#: Layers smaller than this get no zTOC and are fetched whole, as soci does.
DEFAULT_MIN_LAYER_SIZE = 10 << 20
#: Adjacent spans one span task fetches (one Range request) and lands: 32 MiB of soci's
#: 4 MiB spans.  Why: every task costs a Celery message, a registry request and Redis
#: accounting whatever its size (the CNCF registry alone spends ~12 ms of CPU per request);
#: a cold pre-warm of the bench image took ~0.5 s and ~1 CPU-s less with 8 than with 4 (four
#: alternating pairs, each won by 8; 16 and 32 were no better).  A task holds its compressed
#: bytes in memory: at most ~32 MiB for data that does not compress, well inside a worker's
#: 300 MB.
DEFAULT_SPANS_PER_TASK = 8
#: Ceiling on one span's bytes (compressed or uncompressed).  soci places a checkpoint at
#: the first deflate block end past 4 MiB, and real spans stay within a few MiB of that;
#: 64 MiB leaves room for odd compressors and still bounds a task's memory.
DEFAULT_MAX_SPAN_BYTES = 64 << 20
#: What a layer may unpack to, times its compressed size.  Real layers unpack 2-10x (text
#: and sparse files more); gzip's own limit is ~1000x, which is what a bomb uses.
DEFAULT_MAX_EXPANSION = 100
#: containerd's registry host configuration (its ``config_path``): one folder per host.
DEFAULT_CONTAINERD_HOSTS_DIR = Path("/etc/containerd/certs.d")
#: Docker Hub under the names a reference may carry; always allowed.
DOCKER_HUB_HOSTS = frozenset({"docker.io", "registry-1.docker.io", "index.docker.io"})
#: Peer server port of a worker (0: no span sharing, the node fetches everything from the
#: registry); deploy/kubernetes sets 7313.
DEFAULT_PEER_PORT = 0
#: Peer cache size when PREWARM_PEER_CACHE is unset: 10% of the store's filesystem, at most
#: this (it keeps compressed spans the node also has unpacked, so it is pure extra space).
DEFAULT_PEER_CACHE_CAP = 20 << 30
#: Concurrent uploads a peer server takes before it answers 503 (the asker tries another holder).
DEFAULT_PEER_UPLOADS = 8
#: Seconds before an unacknowledged task is delivered to another worker (PREWARM_VISIBILITY_TIMEOUT).
DEFAULT_VISIBILITY_TIMEOUT = 900
#: Build-tool identifier written into the zTOCs we build.
BUILD_TOOL_IDENTIFIER = "prewarm"


# === Converters ==========================================================================
# One converter per kind of value.  Each takes the raw text and the name it came under
# (``PREWARM_SPAN_SIZE`` or ``--span-size``) and raises ConfigError naming that name, so an
# environment variable and its flag fail with the same one-line message (exit 2).

#: Largest number any count or size setting takes: 2**50 (1 PiB).  Bigger is a typo
#: (``1e30``), and would overflow the 64-bit integers of Redis and of the store's records.
MAX_NUMBER = 1 << 50


def split_csv(value: str | None) -> frozenset[str]:
    """``"a, b,,c"`` -> {"a", "b", "c"}."""
    if not value:
        return frozenset()
    return frozenset(part.strip() for part in value.split(",") if part.strip())


def whole_number(raw: str, name: str, *, minimum: int = 1, maximum: int = MAX_NUMBER) -> int:
    """A whole number in [minimum, maximum] (decimal, or 0x.. hex).

    Raises:
        ConfigError: not a whole number, or out of range; the message names ``name``.
    """
    try:
        value = int(raw.strip(), 0)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number; give one from {minimum} to {maximum}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}={raw!r} is out of range; give a whole number from {minimum} to {maximum}")
    return value


def port_number(raw: str, name: str) -> int:
    """A TCP port, 0 meaning off.

    Raises:
        ConfigError: not a port number.
    """
    if not raw.strip().isdigit() or not 0 <= int(raw) < 65536:
        raise ConfigError(f"{name}={raw!r} is not a port number (1-65535; 0 turns it off)")
    return int(raw)


def seconds(raw: str, name: str, *, maximum: float = 30 * 86400.0) -> float:
    """A positive number of seconds, at most ``maximum`` (30 days by default).

    Raises:
        ConfigError: not a number, not positive, not finite or too large.
    """
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if not 0 < value <= maximum:
        raise ConfigError(f"{name}={raw!r} is out of range; give seconds above 0, at most {maximum:g}")
    return value


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def registry_host(raw: str, name: str) -> str:
    """``HOST[:PORT]`` as a registry is named in an image reference: a DNS name, an IPv4
    address or a bracketed IPv6 address, and an optional port 1-65535.

    Raises:
        ConfigError: anything else (empty, spaces, a scheme, a path).
    """
    text = raw.strip()
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end] if end > 0 else "", text[end + 1:] if end > 0 else ""
        if rest:
            port = rest[1:] if rest.startswith(":") else "x"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if host and not text.startswith("[") and not all(_HOST_LABEL.fullmatch(p) for p in host.split(".")):
        host = ""
    if not host or (port is not None and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ConfigError(f"{name}={raw!r} is not a registry HOST[:PORT] (e.g. registry.example:5000, "
                          "10.0.0.5:5000, [::1]:5000)")
    return text


def existing_file(raw: str, name: str) -> Path:
    """A path that names a readable regular file (a CA bundle, a key, a certificate).

    Raises:
        ConfigError: missing, not a file, or unreadable.
    """
    path = Path(raw)
    if not path.is_file():
        raise ConfigError(f"{name}={raw!r}: no such file; give the path of an existing file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{name}={raw!r}: the file is not readable by this user")
    return path


def unix_socket(raw: str, name: str) -> Path:
    """A path that names a unix socket now (containerd's, checked before anything is fetched).

    Raises:
        ConfigError: missing or not a socket.
    """
    path = Path(raw)
    try:
        is_socket = stat.S_ISSOCK(path.stat().st_mode)
    except OSError as err:
        raise ConfigError(f"{name}={raw!r}: {err.strerror.lower() if err.strerror else err}; start containerd, "
                          "or give its socket (e.g. /run/containerd/containerd.sock)") from None
    if not is_socket:
        raise ConfigError(f"{name}={raw!r} is not a socket; start containerd, or give its socket "
                          "(e.g. /run/containerd/containerd.sock)")
    return path


def one_of(raw: str, name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (case and surrounding blanks ignored).

    Raises:
        ConfigError: anything else, naming the choices.
    """
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return value


def _env(env: Mapping[str, str], name: str, convert, default, **kw):  # type: ignore[no-untyped-def]
    """The converted value of ``name`` in ``env``, or ``default`` when it is unset or empty."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    return convert(raw, name, **kw)


def default_node_name(env: Mapping[str, str]) -> str:
    """The node's name: ``PREWARM_NODE_NAME``, then the downward API's ``NODE_NAME``, then the hostname."""
    return env.get("PREWARM_NODE_NAME") or env.get("NODE_NAME") or socket.gethostname()


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything configurable, frozen so it can be passed around without surprises."""

    root: Path = DEFAULT_ROOT
    broker_url: str | None = None
    insecure_registries: frozenset[str] = frozenset()
    ca_bundle: str | None = None
    docker_config: Path | None = None
    node_name: str = dataclasses.field(default_factory=socket.gethostname)
    span_size: int = DEFAULT_SPAN_SIZE
    min_layer_size: int = DEFAULT_MIN_LAYER_SIZE
    spans_per_task: int = DEFAULT_SPANS_PER_TASK
    platform: str | None = None
    #: containerd socket a worker registers completed images in (None: do not register).
    containerd_address: Path | None = None
    containerd_namespace: str = "k8s.io"
    #: Ceiling on one span's compressed and uncompressed bytes (PREWARM_MAX_SPAN): a span is
    #: held in memory whole, so a zTOC (or a gzip stream of one giant deflate block) cannot
    #: make a worker read or inflate more than this per span.
    max_span_bytes: int = DEFAULT_MAX_SPAN_BYTES
    #: A layer may unpack to at most this many times its compressed size
    #: (PREWARM_MAX_EXPANSION): a whole layer while it streams, a zTOC's claimed size.
    max_expansion: int = DEFAULT_MAX_EXPANSION
    #: How often a task is tried again after a transient registry error, and the longest
    #: pause between two tries (PREWARM_TRANSIENT_RETRIES, PREWARM_RETRY_MAX_DELAY; the
    #: pause doubles from 0.5 s, with jitter).  Then the layer fails with the last reason.
    transient_retries: int = 10
    retry_max_delay: float = 60.0
    #: The scheduler's task-signing key and certificate (PREWARM_SIGNING_KEY, _CERT): every
    #: task body of a job it launches is signed (prewarm.fleet.signing).
    signing_key: Path | None = None
    signing_cert: Path | None = None
    #: A worker's trusted signing certificates, a glob (PREWARM_TRUSTED_CERTS): with it the
    #: worker runs only tasks signed by one of them.
    trusted_certs: str | None = None
    #: Registry hosts a node's worker may fetch from (PREWARM_REGISTRIES, comma-separated;
    #: ``*`` for any).  Besides these: the insecure registries, Docker Hub, and every host
    #: containerd has a hosts.toml folder for under :attr:`containerd_hosts_dir`, so that a
    #: node pre-warms from the registries its own pulls use and from no other.
    registries: frozenset[str] = frozenset()
    containerd_hosts_dir: Path = DEFAULT_CONTAINERD_HOSTS_DIR

    def registry_allowed(self, host: str) -> bool:
        """Whether a worker of this node may connect to registry ``host`` (HOST[:PORT])."""
        if "*" in self.registries:
            return True
        allowed = self.registries | self.insecure_registries | DOCKER_HUB_HOSTS
        if host in allowed:
            return True
        if host in ("_default", "", ".", "..") or "/" in host:
            return False
        # containerd's folder for host:port is host_port_ (or host:port)
        colon = host.rfind(":")
        names = [host] + ([f"{host[:colon]}_{host[colon + 1:]}_"] if colon > 0 else [])
        try:
            return any((self.containerd_hosts_dir / name).is_dir() for name in names)
        except OSError:
            return False
    #: Span sharing (prewarm.node.peerserver): port (0: off), where to bind, the address
    #: other nodes reach it at (None: POD_IP or the bind address, with the port), the bearer
    #: token peers must send (None: none), the cache size in bytes (None: the default
    #: above), the upload rate in bytes/s (None: unlimited), concurrent uploads, and the
    #: lease of a registry-fetch claim in seconds.
    peer_port: int = DEFAULT_PEER_PORT
    peer_bind: str = "0.0.0.0"
    peer_address: str | None = None
    peer_token: str | None = dataclasses.field(default=None, repr=False)
    peer_cache: int | None = None
    peer_rate: int | None = None
    peer_uploads: int = DEFAULT_PEER_UPLOADS
    peer_lease: float = 30.0
    #: Checked here once, read again by the modules that use them (prewarm.store.landing,
    #: prewarm.index.zran, workers.app, the worker's metrics), which children inherit through
    #: the environment: the span writer (``c`` or ``python``), the zTOC inflater (None: zlib-ng
    #: if installed), seconds before an unacknowledged task is redelivered, the metrics port (0: none).
    landing: str = "c"
    zran: str | None = None
    visibility_timeout: int = 900
    metrics_port: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from the environment; keyword arguments that are not None win.

        Raises:
            ConfigError: a variable's value is malformed or out of range (the message names it).
        """
        env = os.environ if env is None else env
        docker_config = env.get("DOCKER_CONFIG")
        values: dict[str, object] = {
            "root": Path(env.get("PREWARM_ROOT") or DEFAULT_ROOT),
            "broker_url": env.get("PREWARM_BROKER_URL") or None,
            "insecure_registries": frozenset(registry_host(h, "PREWARM_INSECURE_REGISTRIES")
                                             for h in split_csv(env.get("PREWARM_INSECURE_REGISTRIES"))),
            "ca_bundle": str(_env(env, "PREWARM_CA_BUNDLE", existing_file, None) or "") or None,
            "docker_config": Path(docker_config) if docker_config else None,
            "node_name": default_node_name(env),
            "span_size": _env(env, "PREWARM_SPAN_SIZE", whole_number, DEFAULT_SPAN_SIZE),
            "min_layer_size": _env(env, "PREWARM_MIN_LAYER_SIZE", whole_number, DEFAULT_MIN_LAYER_SIZE),
            "spans_per_task": _env(env, "PREWARM_SPANS_PER_TASK", whole_number, DEFAULT_SPANS_PER_TASK,
                                   maximum=1024),
            "platform": env.get("PREWARM_PLATFORM") or None,
            "containerd_address": Path(env["PREWARM_CONTAINERD_ADDRESS"])
            if env.get("PREWARM_CONTAINERD_ADDRESS") else None,
            "containerd_namespace": env.get("PREWARM_CONTAINERD_NAMESPACE") or "k8s.io",
            "max_span_bytes": _env(env, "PREWARM_MAX_SPAN", whole_number, DEFAULT_MAX_SPAN_BYTES),
            "max_expansion": _env(env, "PREWARM_MAX_EXPANSION", whole_number, DEFAULT_MAX_EXPANSION),
            "transient_retries": _env(env, "PREWARM_TRANSIENT_RETRIES", whole_number, 10, maximum=1000),
            "retry_max_delay": _env(env, "PREWARM_RETRY_MAX_DELAY", seconds, 60.0, maximum=86400.0),
            "signing_key": _env(env, "PREWARM_SIGNING_KEY", existing_file, None),
            "signing_cert": _env(env, "PREWARM_SIGNING_CERT", existing_file, None),
            "trusted_certs": env.get("PREWARM_TRUSTED_CERTS") or None,
            "registries": frozenset(h if h == "*" else registry_host(h, "PREWARM_REGISTRIES")
                                    for h in split_csv(env.get("PREWARM_REGISTRIES"))),
            "containerd_hosts_dir": Path(env.get("PREWARM_CONTAINERD_HOSTS_DIR") or DEFAULT_CONTAINERD_HOSTS_DIR),
            "peer_port": _env(env, "PREWARM_PEER_PORT", port_number, DEFAULT_PEER_PORT),
            "peer_bind": env.get("PREWARM_PEER_BIND") or "0.0.0.0",
            "peer_address": env.get("PREWARM_PEER_ADDRESS") or env.get("POD_IP") or None,
            "peer_token": env.get("PREWARM_PEER_TOKEN") or None,
            "peer_cache": _env(env, "PREWARM_PEER_CACHE", whole_number, None),
            "peer_rate": _env(env, "PREWARM_PEER_RATE", whole_number, None),
            "peer_uploads": _env(env, "PREWARM_PEER_UPLOADS", whole_number, DEFAULT_PEER_UPLOADS, maximum=4096),
            "peer_lease": _env(env, "PREWARM_PEER_LEASE", seconds, 30.0),
            "landing": _env(env, "PREWARM_LANDING", one_of, "c", choices=("c", "python")),
            "zran": _env(env, "PREWARM_ZRAN", one_of, None, choices=("zlib-ng", "zlib")),
            "visibility_timeout": _env(env, "PREWARM_VISIBILITY_TIMEOUT", whole_number,
                                       DEFAULT_VISIBILITY_TIMEOUT, maximum=30 * 86400),
            "metrics_port": _env(env, "PREWARM_METRICS_PORT", port_number, 0),
        }
        for key, value in overrides.items():
            if key not in values:
                raise TypeError(f"unknown setting {key!r}")
            if value is None:
                continue
            if key == "insecure_registries":
                value = values["insecure_registries"] | frozenset(value)  # type: ignore[operator, arg-type, call-overload]
            values[key] = value
        return cls(**values)  # type: ignore[arg-type]

    def peer_advertised(self) -> str | None:
        """The ``host:port`` other nodes reach this node's peer server at (None: sharing is off).

        ``peer_address`` (``PREWARM_PEER_ADDRESS``, else the pod IP the downward API puts in
        ``POD_IP``; a host, ``host:port`` or an IPv6 address), else the bind address unless
        it is a wildcard.

        Raises:
            ConfigError: sharing is on but there is no address to give.
        """
        if not self.peer_port:
            return None
        host = self.peer_address or (self.peer_bind if self.peer_bind not in ("0.0.0.0", "::", "") else None)
        if host is None:
            raise ConfigError("PREWARM_PEER_PORT is set but other nodes cannot be told where: set "
                              "PREWARM_PEER_ADDRESS (host:port), POD_IP, or PREWARM_PEER_BIND to a "
                              "specific address")
        if host.startswith("["):  # bracketed IPv6, with or without a port
            return host if "]:" in host else f"{host}:{self.peer_port}"
        if host.count(":") == 1:  # host:port
            return host
        if ":" in host:  # bare IPv6
            return f"[{host}]:{self.peer_port}"
        return f"{host}:{self.peer_port}"

    def to_env(self) -> dict[str, str]:
        """The environment that makes a child process (a worker) build these same settings."""
        env = {
            "PREWARM_ROOT": str(self.root),
            "PREWARM_NODE_NAME": self.node_name,
            "PREWARM_SPAN_SIZE": str(self.span_size),
            "PREWARM_MIN_LAYER_SIZE": str(self.min_layer_size),
            "PREWARM_SPANS_PER_TASK": str(self.spans_per_task),
            "PREWARM_INSECURE_REGISTRIES": ",".join(sorted(self.insecure_registries)),
            "PREWARM_MAX_SPAN": str(self.max_span_bytes),
            "PREWARM_MAX_EXPANSION": str(self.max_expansion),
            "PREWARM_REGISTRIES": ",".join(sorted(self.registries)),
            "PREWARM_CONTAINERD_HOSTS_DIR": str(self.containerd_hosts_dir),
        }
        if self.broker_url:
            env["PREWARM_BROKER_URL"] = self.broker_url
        if self.ca_bundle:
            env["PREWARM_CA_BUNDLE"] = self.ca_bundle
        if self.docker_config:
            env["DOCKER_CONFIG"] = str(self.docker_config)
        if self.platform:
            env["PREWARM_PLATFORM"] = self.platform
        if self.trusted_certs:
            env["PREWARM_TRUSTED_CERTS"] = self.trusted_certs
        if self.peer_port:
            env["PREWARM_PEER_PORT"] = str(self.peer_port)
            env["PREWARM_PEER_BIND"] = self.peer_bind
            env["PREWARM_PEER_UPLOADS"] = str(self.peer_uploads)
            env["PREWARM_PEER_LEASE"] = repr(self.peer_lease)
            for name, value in (("PREWARM_PEER_ADDRESS", self.peer_address), ("PREWARM_PEER_TOKEN", self.peer_token),
                                ("PREWARM_PEER_CACHE", self.peer_cache), ("PREWARM_PEER_RATE", self.peer_rate)):
                if value is not None:
                    env[name] = str(value)
        if self.containerd_address:
            env["PREWARM_CONTAINERD_ADDRESS"] = str(self.containerd_address)
            env["PREWARM_CONTAINERD_NAMESPACE"] = self.containerd_namespace
        return env
