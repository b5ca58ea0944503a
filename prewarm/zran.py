"""zlib's inflate with ``Z_BLOCK``, through ctypes on the system ``libz.so.1``.

Placing checkpoints the way soci does (zlib's zran method) needs to know where deflate
blocks end and how many bits of the last byte are still unused.  Python's ``zlib``
module hides both, so this module drives libz's own ``inflate()`` directly: no build
step, and the same library soci links against, so block boundaries and ``data_type``
bits are exactly what soci's C code sees.

``inflate()`` runs without the GIL (ctypes releases it around foreign calls).
"""

from __future__ import annotations

import ctypes
import ctypes.util

from prewarm.errors import CorruptContent

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


def _load_libz() -> ctypes.CDLL:
    name = ctypes.util.find_library("z") or "libz.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        lib = ctypes.CDLL("libz.so.1")
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int, ctypes.c_char_p,
                                  ctypes.c_int]
    lib.inflateInit2_.restype = ctypes.c_int
    lib.inflate.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int]
    lib.inflate.restype = ctypes.c_int
    lib.inflateReset.argtypes = [ctypes.POINTER(_ZStream)]
    lib.inflateReset.restype = ctypes.c_int
    lib.inflateEnd.argtypes = [ctypes.POINTER(_ZStream)]
    lib.inflateEnd.restype = ctypes.c_int
    return lib


_libz = _load_libz()
ZLIB_VERSION: str = _libz.zlibVersion().decode()


class BlockInflater:
    """One libz inflate stream, stepped one deflate block at a time (``Z_BLOCK``).

    The caller owns the input and output memory: :meth:`set_input` and
    :meth:`set_output` take raw addresses (of a ``bytes`` object or ctypes buffer kept
    alive by the caller), so no byte is copied on the way in or out.
    """

    def __init__(self, window_bits: int = WBITS_AUTO) -> None:
        """Raises:
            CorruptContent: libz refuses to initialise (out of memory, version mismatch).
        """
        self._strm = _ZStream()
        self._ref = ctypes.byref(self._strm)
        ret = _libz.inflateInit2_(self._ref, window_bits, _libz.zlibVersion(),
                                  ctypes.sizeof(_ZStream))
        if ret != Z_OK:
            raise CorruptContent(f"libz inflateInit2 failed with code {ret}")
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
        return _libz.inflate(self._ref, Z_BLOCK)

    def inflate(self) -> int:
        """Run inflate with ``Z_NO_FLUSH``: returns only when out of input or output."""
        return _libz.inflate(self._ref, Z_NO_FLUSH)

    def reset(self) -> None:
        """Start over for a new gzip member (keeps the header detection mode)."""
        _libz.inflateReset(self._ref)

    def close(self) -> None:
        if self._open:
            _libz.inflateEnd(self._ref)
            self._open = False

    def __enter__(self) -> BlockInflater:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
