"""The peer protocol, both sides: a worker serves its peer cache, and fetches from other nodes' caches.

Server (:class:`PeerServer`): aiohttp in a thread of the worker's main process, so one
event loop takes many concurrent requests and ``web.FileResponse`` copies each file with
``sendfile``.  A request names content, never a path:

    GET /v1/spans/sha256:<64 hex>/<span index>   compressed bytes of one verified span
    GET /v1/blobs/sha256:<64 hex>                a whole verified layer (small layers)
    GET /healthz                                 "ok"

Both names are checked strictly and mapped onto the cache's own file names, which hold
only verified bytes (:mod:`prewarm.node.peercache`).  With ``PREWARM_PEER_TOKEN`` set, a
request without ``Authorization: Bearer <token>`` gets 401 (compared in constant time).
Uploads are paced to ``PREWARM_PEER_RATE`` bytes/s for the whole node, and past
``PREWARM_PEER_UPLOADS`` concurrent uploads the server answers 503 at once, so the asker
tries another holder instead of queueing here.

Client (:func:`fetch`): bounded in every direction, because peers are untrusted: the
answer must be exactly the expected length, a peer that makes no progress for
``stall`` seconds (or crawls below a floor rate) is given up on, and the caller verifies
the bytes against the zTOC's digest before anything lands.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import BinaryIO

import requests

from prewarm.errors import PrewarmError
from prewarm.node.metrics import PEER_BYTES

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_INDEX = re.compile(r"^(?:0|[1-9][0-9]{0,8})$")

#: Seconds without a byte from a peer before the fetch gives up on it.
STALL_SECONDS = 3.0
#: Below this rate (bytes/s) a peer is too slow to wait for, whatever it says.
FLOOR_RATE = 512 << 10


class PeerFailure(PrewarmError):
    """A peer did not deliver: ``kind`` is stalled, refused, busy, missing, corrupt or error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class PeerServer:
    """The worker's peer server; :meth:`start` binds (or raises) and serves in a daemon thread."""

    def __init__(self, cache_dir: Path, *, bind: str, port: int, token: str | None = None,
                 rate: int | None = None, max_uploads: int = 8) -> None:
        self.cache_dir, self.bind, self.port = cache_dir, bind, port
        self.token, self.rate, self.max_uploads = token, rate, max_uploads
        self.active = 0
        self._next_free = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind and start serving; returns the bound port.

        Raises:
            OSError: the address cannot be bound (in use, not ours).
        """
        started = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(started, failure), name="prewarm-peers",
                                        daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self.port

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def _run(self, started: threading.Event, failure: list[BaseException]) -> None:
        from aiohttp import web

        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/v1/spans/{digest}/{index}", self._span)
        app.router.add_get("/v1/blobs/{digest}", self._blob)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.bind, self.port, reuse_address=True)
            loop.run_until_complete(site.start())
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        except BaseException as err:  # noqa: BLE001 - handed to start(), which raises it
            failure.append(err)
            started.set()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    async def _healthz(self, request):  # type: ignore[no-untyped-def]
        from aiohttp import web

        return web.Response(text="ok\n")

    async def _span(self, request):  # type: ignore[no-untyped-def]
        from aiohttp import web

        m = _DIGEST.match(request.match_info["digest"])
        index = request.match_info["index"]
        if m is None or not _INDEX.match(index):
            raise web.HTTPBadRequest(text="want /v1/spans/sha256:<64 lowercase hex>/<span index>\n")
        return await self._serve(request, self.cache_dir / m.group(1) / index)

    async def _blob(self, request):  # type: ignore[no-untyped-def]
        from aiohttp import web

        m = _DIGEST.match(request.match_info["digest"])
        if m is None:
            raise web.HTTPBadRequest(text="want /v1/blobs/sha256:<64 lowercase hex>\n")
        return await self._serve(request, self.cache_dir / m.group(1) / "blob")

    async def _serve(self, request, path: Path):  # type: ignore[no-untyped-def]
        from aiohttp import web

        if self.token is not None:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
                raise web.HTTPUnauthorized(text="peer token required\n",
                                           headers={"WWW-Authenticate": 'Bearer realm="prewarm-peer"'})
        if self.active >= self.max_uploads:
            raise web.HTTPServiceUnavailable(text="too many uploads, ask another holder\n",
                                             headers={"Retry-After": "1"})
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise web.HTTPNotFound(text="not held here\n") from None
        self.active += 1
        try:
            await self._pace(size)
            try:
                os.utime(path)  # served: recently used, evicted last
            except FileNotFoundError:
                raise web.HTTPNotFound(text="not held here\n") from None
            response = _sent_file_class()(path, chunk_size=256 << 10,
                                          headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)  # sent here, so the upload slot is held while it is
            PEER_BYTES.labels("out").inc(size)
            return response
        finally:
            self.active -= 1

    async def _pace(self, nbytes: int) -> None:
        """Wait this upload's turn so the node's uploads average at most ``rate`` bytes/s."""
        if not self.rate:
            return
        now = time.monotonic()
        start = max(now, self._next_free)
        self._next_free = start + nbytes / self.rate
        if start > now:
            await asyncio.sleep(start - now)


@functools.cache
def _sent_file_class():  # type: ignore[no-untyped-def]
    """Made when first served: importing aiohttp costs a worker ~0.25 s of its start-up
    (its connector builds an SSL context), and a node without peers never serves."""
    from aiohttp import web

    class SentFile(web.FileResponse):
        """A FileResponse sent inside the handler: aiohttp's second ``prepare`` after the
        handler returns must then do nothing."""

        async def prepare(self, request):  # type: ignore[no-untyped-def]
            if self.prepared:
                return None
            return await super().prepare(request)

    return SentFile


def fetch(session: requests.Session, address: str, what: str, expected: int, *, token: str | None,
          stall: float = STALL_SECONDS, sink: BinaryIO | None = None) -> bytes:
    """GET ``what`` (``spans/<digest>/<i>`` or ``blobs/<digest>``) from the peer at ``address``.

    Returns exactly ``expected`` bytes, not yet verified: the caller checks their digest.
    With ``sink`` (a whole layer), the bytes are written there instead and b"" returned.

    Raises:
        PeerFailure: the peer refused, errs, does not hold it, is busy, stalled for
            ``stall`` seconds, crawled below :data:`FLOOR_RATE`, or sent a different length.
    """
    url = f"http://{address}/v1/{what}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + stall + expected / FLOOR_RATE
    try:
        with session.get(url, headers=headers, stream=True, timeout=(stall, stall)) as resp:
            if resp.status_code != 200:
                kind = {404: "missing", 503: "busy", 401: "refused", 403: "refused"}.get(resp.status_code, "error")
                raise PeerFailure(kind, f"peer {address} answered {resp.status_code} for {what}")
            length = resp.headers.get("Content-Length")
            if length != str(expected):
                raise PeerFailure("corrupt", f"peer {address} offers {length} bytes of {what}, {expected} expected")
            out = bytearray()
            got = 0
            for chunk in resp.iter_content(1 << 16):
                got += len(chunk)
                if sink is None:
                    out += chunk
                else:
                    sink.write(chunk)
                if got > expected:
                    raise PeerFailure("corrupt", f"peer {address} sent more than {expected} bytes of {what}")
                if time.monotonic() > deadline:
                    raise PeerFailure("stalled", f"peer {address} is too slow sending {what}")
            if got != expected:
                raise PeerFailure("stalled", f"peer {address} sent {got} of {expected} bytes of {what}")
            return bytes(out)
    except requests.Timeout as err:
        raise PeerFailure("stalled", f"peer {address} made no progress for {stall:.0f} s on {what}") from err
    except requests.ConnectionError as err:
        if "timed out" in str(err).lower():  # a read timeout inside iter_content comes as this
            raise PeerFailure("stalled", f"peer {address} made no progress for {stall:.0f} s on {what}") from err
        raise PeerFailure("refused", f"peer {address} unreachable for {what}: {err}") from err
    except requests.RequestException as err:
        raise PeerFailure("error", f"peer {address} failed on {what}: {err}") from err
