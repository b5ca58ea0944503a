"""Real services for the tests: redis-server and the CNCF distribution registry.

Each runs from Debian's package on loopback, on a free port, with a private data
folder, and is stopped by PID.  Nothing here is a mock; the set-up command installs
the packages, so a missing binary is an error, not a skip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from prewarm.node.embedded import stop_process as stop_pid  # the tests stop what they start by PID


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/bin/{binary}" if os.path.exists(f"/usr/bin/{binary}") else None)
    if path is None:
        raise RuntimeError(f"{binary} is not installed; run the README's test command, which installs it")
    return path


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclasses.dataclass
class RedisServer:
    """A running redis-server; ``url`` for TCP, ``unix_url`` for its unix socket."""

    proc: subprocess.Popen[bytes]
    port: int
    dir: Path
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_socket(self) -> Path:
        return self.dir / "redis.sock"

    def stop(self) -> None:
        stop_pid(self.proc)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> None:
        """Stop (SIGTERM, which saves the RDB) and start again on the same port and data."""
        self.stop()
        self.start()

    def start(self) -> None:
        """Start again after :meth:`stop`, on the same port and data."""
        self.proc = _spawn_redis(self.dir, self.port, self.password)
        _wait_redis(self)


def _spawn_redis(data: Path, port: int, password: str | None) -> subprocess.Popen[bytes]:
    args = [
        _require("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
        "--dir", str(data), "--unixsocket", str(data / "redis.sock"), "--unixsocketperm", "700",
        "--save", "60 1", "--appendonly", "yes", "--daemonize", "no",
        "--logfile", str(data / "redis.log"),
    ]
    if password:
        args += ["--requirepass", password]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_redis(server: RedisServer) -> None:
    import redis

    def up() -> bool:
        if server.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {(server.dir / 'redis.log').read_text()[-2000:]}")
        try:
            return bool(redis.Redis.from_url(server.url).ping())
        except redis.exceptions.ConnectionError:
            return False

    wait_until(up, what="redis-server")


@contextlib.contextmanager
def run_redis(data: Path, password: str | None = None) -> Iterator[RedisServer]:
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = RedisServer(_spawn_redis(data, port, password), port, data, password)
    try:
        _wait_redis(server)
        yield server
    finally:
        server.stop()


@dataclasses.dataclass
class Registry:
    """A running docker-registry (CNCF distribution) on loopback."""

    proc: subprocess.Popen[bytes]
    port: int
    dir: Path
    log_path: Path
    htpasswd: tuple[str, str] | None = None
    scheme: str = "http"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def stop(self) -> None:
        stop_pid(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def bytes_served(self, path_fragment: str = "/blobs/") -> int:
        """Response bytes the registry logged for requests whose URI contains the fragment.

        distribution logs each request with ``http.request.uri`` and
        ``http.response.written``; this is registry egress as an operator sees it.
        """
        total = 0
        for line in self.log().splitlines():
            if "http.response.written" not in line or path_fragment not in line:
                continue
            m = re.search(r"http\.response\.written=(\d+)", line)
            if m:
                total += int(m.group(1))
        return total

    def requests_logged(self, method: str | None = None, path_fragment: str = "") -> list[str]:
        out = []
        for line in self.log().splitlines():
            if "http.response.status" not in line or path_fragment not in line:
                continue
            if method and f'http.request.method={method}' not in line:
                continue
            out.append(line)
        return out


@contextlib.contextmanager
def run_registry(data: Path, htpasswd: tuple[str, str] | None = None, *, auth_config: str | None = None,
                 tls: tuple[Path, Path] | None = None) -> Iterator[Registry]:
    """Start ``docker-registry serve`` with a filesystem store under ``data``.

    With ``htpasswd=(user, password)`` the registry requires basic auth; ``auth_config``
    is a whole ``auth:`` block of its own (token auth); ``tls=(cert, key)`` serves HTTPS.
    """
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth = ""
    if htpasswd:
        user, password = htpasswd
        pwfile = data / "htpasswd"
        subprocess.run([_require("htpasswd"), "-Bbc", str(pwfile), user, password],
                       check=True, capture_output=True)
        auth = f"auth:\n  htpasswd:\n    realm: prewarm-test\n    path: {pwfile}\n"
    if auth_config:
        auth = auth_config
    tls_block = f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n" if tls else ""
    config = data / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {data / 'store'}\n  delete:\n    enabled: true\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  headers:\n    X-Content-Type-Options: [nosniff]\n"
        + tls_block + auth
    )
    log_path = data / "registry.log"
    with open(log_path, "wb") as log:  # the registry has its own copy of the descriptor
        proc = subprocess.Popen([_require("docker-registry"), "serve", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)
    reg = Registry(proc, port, data, log_path, htpasswd, "https" if tls else "http")

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {reg.log()[-2000:]}")
        try:
            return requests.get(f"{reg.url}/v2/", timeout=1, verify=False).status_code in (200, 401)
        except requests.ConnectionError:
            return False

    try:
        wait_until(up, what="docker-registry")
        yield reg
    finally:
        reg.stop()
