"""Inflate with ``Z_BLOCK`` through ctypes: zlib-ng when installed, else the system libz.

Placing checkpoints the way soci does (zlib's zran method) needs to know where deflate
blocks end and how many bits of the last byte are still unused.  Python's ``zlib``
module hides both, so this module drives a C inflate directly: no build step.

Block boundaries and the ``data_type`` bits are properties of the deflate stream, not of
the decoder, so every correct inflater reports the same ones soci's C code sees (the
golden zTOCs check this for both backends).  zlib-ng (its native ``zng_`` API, exported
by the ``zlib-ng`` wheel's extension module) inflates about twice as fast as libz, which
makes the zTOC build faster than a plain single-core ``zlib`` inflate of the same layer.
``PREWARM_ZRAN=zlib`` forces the system libz (for comparison and debugging).

``inflate()`` runs without the GIL (ctypes releases it around foreign calls).

The ``zng_stream`` layout below is copied by hand from zlib-ng's headers, and nothing at
link time checks it (zlib's own ``inflateInit2_`` checks ``sizeof(z_stream)``; zlib-ng's
native API does not).  So a backend is used only after :func:`_self_test` inflated a known
stream through it and every field we read (avail_in, avail_out, total_in, total_out,
data_type, adler) said what zlib's reference says; a wheel whose layout moved falls back
to the system libz, with a warning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import zlib
from dataclasses import dataclass
from typing import Any, Self

from prewarm.errors import ConfigError, CorruptContent

log = logging.getLogger(__name__)

Z_NO_FLUSH = 0
Z_OK = 0
Z_STREAM_END = 1
Z_NEED_DICT = 2
Z_BUF_ERROR = -5
Z_BLOCK = 5

#: ``data_type`` bits after inflate(): at a block boundary / inside the last block.
DT_END_OF_BLOCK = 128
DT_LAST_BLOCK = 64

#: windowBits for automatic zlib/gzip header detection (soci's ``init_flate(&strm, 47)``).
WBITS_AUTO = 47


class _ZStream(ctypes.Structure):
    """zlib's ``z_stream`` (LP64)."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


class _ZngStream(ctypes.Structure):
    """zlib-ng's native ``zng_stream``: fixed-width counters, a 32-bit ``adler``."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint32),
        ("total_in", ctypes.c_size_t),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint32),
        ("total_out", ctypes.c_size_t),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_uint32),
        ("reserved", ctypes.c_ulong),
    ]


@dataclass(frozen=True)
class _Backend:
    name: str          # what builds the zTOCs: "zlib-ng 2.3.3" or "zlib 1.2.13"
    stream: type[ctypes.Structure]
    init: Any          # (stream*, windowBits) -> int
    inflate: Any       # (stream*, flush) -> int
    reset: Any
    end: Any


def _declare(fn: Any, argtypes: list[Any]) -> Any:
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


def _zlib_ng() -> _Backend | None:
    try:
        from zlib_ng import zlib_ng  # the wheel's extension module exports zng_* symbols
    except ImportError:
        return None
    p = ctypes.POINTER(_ZngStream)
    try:
        lib = ctypes.CDLL(zlib_ng.__file__)
        version = lib.zlibng_version
        version.restype = ctypes.c_char_p
        ng = _Backend(f"zlib-ng {version().decode()}", _ZngStream,
                      _declare(lib.zng_inflateInit2, [p, ctypes.c_int32]),
                      _declare(lib.zng_inflate, [p, ctypes.c_int32]),
                      _declare(lib.zng_inflateReset, [p]), _declare(lib.zng_inflateEnd, [p]))
    except (OSError, AttributeError):  # a build of the wheel that keeps its symbols private
        return None
    problem = _self_test(ng)
    if problem is not None:
        log.warning("%s does not match prewarm's zng_stream layout (%s): building zTOCs with the system zlib",
                    ng.name, problem)
        return None
    return ng


#: The known stream of :func:`_self_test`, inflated in two deflate blocks (a full flush
#: between its halves) so a block end is seen before the stream's end.
_SELF_TEST_DATA = b"".join(i.to_bytes(4, "little") * 3 for i in range(2_000))


def _self_test(b: _Backend) -> str | None:
    """Inflate a known gzip stream through ``b`` with ``Z_BLOCK``; None if every field read right.

    Returns what disagreed, for the warning.  The stream struct is allocated with room to
    spare behind it, so a library whose struct is larger than our declaration writes into
    the spare room, not past our memory.
    """
    co = zlib.compressobj(6, zlib.DEFLATED, 31)
    half = len(_SELF_TEST_DATA) // 2
    gz = (co.compress(_SELF_TEST_DATA[:half]) + co.flush(zlib.Z_FULL_FLUSH)
          + co.compress(_SELF_TEST_DATA[half:]) + co.flush())
    holder = (ctypes.c_char * (ctypes.sizeof(b.stream) + 256))()
    strm = b.stream.from_buffer(holder)
    ref = ctypes.byref(strm)
    if b.init(ref, WBITS_AUTO) != Z_OK:
        return "inflateInit2 failed"
    inp = ctypes.create_string_buffer(gz, len(gz))
    out = ctypes.create_string_buffer(len(_SELF_TEST_DATA) + 64)
    try:
        strm.next_in, strm.avail_in = ctypes.addressof(inp), len(gz)
        strm.next_out, strm.avail_out = ctypes.addressof(out), len(out)
        blocks, ret = 0, Z_OK
        for _ in range(10_000):
            ret = b.inflate(ref, Z_BLOCK)
            if ret != Z_OK:
                break
            if strm.data_type & DT_END_OF_BLOCK:
                blocks += 1
        if ret != Z_STREAM_END:
            return f"inflate returned {ret}"
        n = len(_SELF_TEST_DATA)
        checks = {
            "output": out.raw[:n] == _SELF_TEST_DATA,
            "avail_in": strm.avail_in == 0,
            "avail_out": strm.avail_out == len(out) - n,
            "total_in": strm.total_in == len(gz),
            "total_out": strm.total_out == n,
            "adler": strm.adler == zlib.crc32(_SELF_TEST_DATA),
            "data_type": blocks >= 1,
        }
        wrong = [k for k, ok in checks.items() if not ok]
        return f"wrong {', '.join(wrong)}" if wrong else None
    finally:
        b.end(ref)


def _system_zlib() -> _Backend:
    name = ctypes.util.find_library("z") or "libz.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        lib = ctypes.CDLL("libz.so.1")
    lib.zlibVersion.restype = ctypes.c_char_p
    version = lib.zlibVersion()
    p = ctypes.POINTER(_ZStream)
    init2 = _declare(lib.inflateInit2_, [p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int])

    def init(strm: Any, window_bits: int) -> int:
        return int(init2(strm, window_bits, version, ctypes.sizeof(_ZStream)))

    return _Backend(f"zlib {version.decode()}", _ZStream, init, _declare(lib.inflate, [p, ctypes.c_int]),
                    _declare(lib.inflateReset, [p]), _declare(lib.inflateEnd, [p]))


@functools.cache
def backend() -> _Backend:
    """The inflater zTOCs are built with (chosen once per process).

    Raises:
        ConfigError: ``PREWARM_ZRAN`` names no inflater, or one that is not installed.
    """
    want = os.environ.get("PREWARM_ZRAN", "").strip().lower()
    if want not in ("", "zlib-ng", "zlib"):
        raise ConfigError(f"PREWARM_ZRAN={want!r} is not an inflater: use 'zlib-ng' or 'zlib' (or unset it)")
    if want != "zlib":
        ng = _zlib_ng()
        if ng is not None:
            return ng
        if want == "zlib-ng":
            raise ConfigError("PREWARM_ZRAN=zlib-ng but the zlib-ng package is not installed: "
                              "pip install zlib-ng, or unset PREWARM_ZRAN")
    return _system_zlib()


class BlockInflater:
    """One inflate stream, stepped one deflate block at a time (``Z_BLOCK``).

    The caller owns the input and output memory: :meth:`set_input` and
    :meth:`set_output` take raw addresses (of a ``bytes`` object or ctypes buffer kept
    alive by the caller), so no byte is copied on the way in or out.
    """

    def __init__(self, window_bits: int = WBITS_AUTO) -> None:
        """Raises:
            ConfigError: as :func:`backend`.
            CorruptContent: the inflater refuses to initialise (out of memory).
        """
        self._open = False
        b = backend()
        self._strm = b.stream()
        self._ref = ctypes.byref(self._strm)
        self._inflate = b.inflate
        self._reset = b.reset
        self._end = b.end
        ret = b.init(self._ref, window_bits)
        if ret != Z_OK:
            raise CorruptContent(f"{b.name} inflateInit2 failed with code {ret}")
        self._open = True

    def set_input(self, address: int, length: int) -> None:
        self._strm.next_in = address
        self._strm.avail_in = length

    def set_output(self, address: int, length: int) -> None:
        self._strm.next_out = address
        self._strm.avail_out = length

    @property
    def avail_in(self) -> int:
        return self._strm.avail_in

    @property
    def avail_out(self) -> int:
        return self._strm.avail_out

    @property
    def data_type(self) -> int:
        return self._strm.data_type

    def message(self) -> str:
        msg = self._strm.msg
        return msg.decode(errors="replace") if msg else "no message"

    def inflate_block(self) -> int:
        """Run inflate with ``Z_BLOCK``: returns at a block end, or out of input/output."""
        return self._inflate(self._ref, Z_BLOCK)

    def inflate(self) -> int:
        """Run inflate with ``Z_NO_FLUSH``: returns only when out of input or output."""
        return self._inflate(self._ref, Z_NO_FLUSH)

    def reset(self) -> None:
        """Start over for a new gzip member (keeps the header detection mode)."""
        self._reset(self._ref)

    def close(self) -> None:
        if self._open:
            self._end(self._ref)
            self._open = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
