"""A fault-injecting HTTP proxy in front of the real registry (loopback, threaded).

It relays every request to the upstream registry unchanged (same Host header, so
the registry's upload Locations point back at the proxy) and counts the body bytes
it relays.  Faults are scheduled per path pattern: on the first N matching requests,
on a seeded random fraction of them, or on all of them.  Kinds:

* ``status``        answer ``status`` (5xx, 429 with ``retry_after``...) without forwarding
* ``reset``         close the connection with a TCP reset, no answer
* ``truncate``      forward, then cut the body in the middle with a reset
* ``ignore_range``  drop the ``Range`` header, so the registry answers 200 with the whole blob
* ``redirect``      answer 307 to the "CDN" listener (a second port): it serves the same
                    path from upstream and records the headers it received, so a test
                    can check Authorization was not forwarded
* ``corrupt``       forward, flipping one byte of the body
* ``stall``         forward half the body, then send nothing for ``stall`` seconds and reset
* ``slow``          forward the whole body, trickled in 50 pieces over ``stall`` seconds (a long,
                    healthy download: the client never waits long for the next bytes)
* ``respond``       answer ``status``/``headers``/``body`` as given (e.g. a schema-1 manifest)
* ``gzip``          forward, gzip-compressing the body when the request's ``Accept-Encoding``
                    allows it (what a compressing proxy or CDN does)
* ``add_headers``   forward, adding ``headers`` to the answer (``OCI-Subject`` on a manifest PUT)
* ``reissue``       answer ``status`` (307 or 308) to the same URL, once the body is read:
                    the client must send the request, body and all, again
* ``downgrade``     answer 307 to the same path on the same host:port over plain ``http://``
                    (with ``tls``, the listener serves both, so the test sees what arrives)

With ``tls=(cert, key)`` the main listener speaks HTTPS, and plain HTTP on the same
port too (it looks at the first byte): :attr:`Seen.tls` says which a request used.
HTTPS requests reach the registry with ``X-Forwarded-Proto: https``, so its upload
Locations are https:// as behind any TLS terminator.

Used by the registry client's retry/range/redirect tests and by fleet fault tests.
"""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import random
import re
import socket
import ssl
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "trailer"}


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up early (ranges from a whole-blob answer) are normal here."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _SniffingServer(_QuietServer):
    """HTTPS and plain HTTP on one port: a TLS ClientHello starts with byte 0x16."""

    def __init__(self, address: tuple[str, int], handler: Any, tls: tuple[Path, Path]) -> None:
        super().__init__(address, handler)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(tls[0]), str(tls[1]))

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        first = request.recv(1, socket.MSG_PEEK)
        if first == b"\x16":
            request = self._context.wrap_socket(request, server_side=True)
        request.settimeout(None)
        super().finish_request(request, client_address)


@dataclasses.dataclass
class Fault:
    """One scheduled fault.

    Attributes:
        kind: see the module docstring.
        path: regular expression searched in the request path (``""`` matches all).
        method: only requests with this method (None: any).
        first: apply to the first ``first`` matching requests only.
        fraction: apply to this fraction of matching requests (seeded).
        status, retry_after, headers, body: what ``status``/``respond`` answer.
        matched / applied: counters the proxy keeps.
    """

    kind: str
    path: str = ""
    method: str | None = None
    first: int | None = None
    fraction: float | None = None
    status: int = 503
    retry_after: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b""
    stall: float = 10.0
    matched: int = 0
    applied: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and re.search(self.path, path) is not None


@dataclasses.dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    status: int | None = None
    tls: bool = False


class FaultProxy:
    """Start with ``with FaultProxy("127.0.0.1:5000") as proxy:``; ``proxy.host`` is its address."""

    def __init__(self, upstream: str, *, seed: int = 0, cdn_upstream_headers: dict[str, str] | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.requests: list[Seen] = []
        self.cdn_requests: list[Seen] = []
        self.bytes_relayed = 0
        self.cdn_upstream_headers = dict(cdn_upstream_headers or {})
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = (_SniffingServer(("127.0.0.1", 0), self._handler(cdn=False), tls) if tls is not None
                        else _QuietServer(("127.0.0.1", 0), self._handler(cdn=False)))
        self._cdn = _QuietServer(("127.0.0.1", 0), self._handler(cdn=True))
        self._threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
                         for s in (self._server, self._cdn)]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def cdn_host(self) -> str:
        return f"127.0.0.1:{self._cdn.server_address[1]}"

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for s in (self._server, self._cdn):
            s.shutdown()
            s.server_close()

    def _pick(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if not fault.matches(method, path):
                    continue
                fault.matched += 1
                if fault.first is not None and fault.matched > fault.first:
                    continue
                if fault.fraction is not None and self._rng.random() >= fault.fraction:
                    continue
                fault.applied += 1
                return fault
        return None

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_relayed += n

    def _handler(self, cdn: bool) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                seen = Seen(self.command, self.path, {k: v for k, v in self.headers.items()},
                            tls=isinstance(self.connection, ssl.SSLSocket))
                (proxy.cdn_requests if cdn else proxy.requests).append(seen)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if seen.tls:
                    # As a TLS terminator says it: the registry builds https:// Locations.
                    headers["X-Forwarded-Proto"] = "https"
                path = self.path
                if cdn:
                    path = path.removeprefix("/cdn").split("?", 1)[0]
                    headers = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "host")}
                    headers.update(proxy.cdn_upstream_headers)
                    fault = None
                else:
                    fault = proxy._pick(self.command, self.path)
                if fault is not None:
                    if fault.kind == "status":
                        extra = dict(fault.headers)
                        if fault.retry_after is not None:
                            extra["Retry-After"] = fault.retry_after
                        extra.setdefault("Content-Type", "application/json")
                        seen.status = fault.status
                        return self._answer(fault.status, extra, fault.body or
                                            b'{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}')
                    if fault.kind == "respond":
                        seen.status = fault.status
                        return self._answer(fault.status, dict(fault.headers), fault.body)
                    if fault.kind == "reset":
                        return self._reset()
                    if fault.kind == "redirect":
                        seen.status = 307
                        return self._answer(307, {"Location": f"http://{proxy.cdn_host}/cdn{self.path}?sig=s3cr3t"},
                                            b"")
                    if fault.kind == "reissue":
                        seen.status = fault.status
                        return self._answer(fault.status, {"Location": self.path}, b"")
                    if fault.kind == "downgrade":
                        seen.status = 307
                        return self._answer(307, {"Location": f"http://{proxy.host}{self.path}"}, b"")
                    if fault.kind == "ignore_range":
                        headers.pop("Range", None)
                        headers.pop("range", None)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    seen.status = resp.status
                    out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
                    length = resp.getheader("Content-Length")
                    no_body = self.command == "HEAD" or resp.status in (204, 304, 416)
                    compress = (fault is not None and fault.kind == "gzip" and not no_body
                                and "gzip" in self.headers.get("Accept-Encoding", ""))
                    if (length is None or compress) and not no_body:
                        data = resp.read()
                        if compress:
                            data = gzip.compress(data)
                            out_headers.append(("Content-Encoding", "gzip"))
                        out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-length"]
                        out_headers.append(("Content-Length", str(len(data))))
                        chunks = [data]
                    else:
                        chunks = None
                    if fault is not None and fault.kind == "add_headers":
                        out_headers += list(fault.headers.items())
                    self.send_response(resp.status)
                    for k, v in out_headers:
                        self.send_header(k, v)
                    self.end_headers()
                    if no_body:
                        if resp.status == 416:
                            self.close_connection = True
                        return
                    total = len(chunks[0]) if chunks is not None else int(length)  # type: ignore[arg-type]
                    sent = 0
                    source = iter(chunks) if chunks is not None else iter(lambda: resp.read(1 << 16), b"")
                    for chunk in source:
                        if fault is not None and fault.kind == "corrupt" and sent <= total // 2 < sent + len(chunk):
                            i = total // 2 - sent
                            chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
                        if fault is not None and fault.kind == "stall" and sent + len(chunk) > total // 2:
                            self.wfile.write(chunk[: total // 2 - sent])
                            self.wfile.flush()
                            time.sleep(fault.stall)
                            return self._reset()
                        if fault is not None and fault.kind == "slow":
                            piece = max(1, total // 50)
                            for i in range(0, len(chunk), piece):
                                self.wfile.write(chunk[i:i + piece])
                                self.wfile.flush()
                                time.sleep(fault.stall / 50)
                            sent += len(chunk)
                            proxy._count(len(chunk))
                            continue
                        if fault is not None and fault.kind == "truncate" and sent + len(chunk) > total // 2:
                            self.wfile.write(chunk[: total // 2 - sent])
                            self.wfile.flush()
                            proxy._count(total // 2 - sent)
                            return self._reset()
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        proxy._count(len(chunk))
                except (http.client.HTTPException, OSError):
                    self.close_connection = True
                finally:
                    conn.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return Handler
