"""SHA-256 whose running state can be saved as bytes and resumed in another process.

Why: a layer's digest must be verified by hashing its compressed bytes in order as
spans land, but spans land in different worker processes (and a worker may be killed
between two spans).  ``hashlib`` objects cannot be serialised, so this wraps OpenSSL's
low-level ``SHA256_Init/Update/Final`` through ctypes and copies the ``SHA256_CTX``
struct as raw bytes.  The struct layout (eight 32-bit chaining words, a 64-bit bit
count as two 32-bit halves, a 64-byte block buffer, ``num`` and ``md_len``) has been
the same 112 bytes in every OpenSSL since 0.9.8; a state saved on one node is only
ever resumed on the same node.

ctypes releases the GIL around foreign calls, so hashing a large span does not stall
the worker's other threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct

from prewarm.errors import StoreError

#: sizeof(SHA256_CTX): h[8], Nl, Nh, data[16], num, md_len (all 32-bit).
CTX_SIZE = 112
_NUM_OFFSET = 104  # num and md_len, after h[8], Nl, Nh and data[16]
_BLOCK = 64
_DIGEST_SIZE = 32
_MAGIC = b"PWSHA256\x01"


def _load_libcrypto() -> ctypes.CDLL:
    """Find libcrypto and declare the four functions we use.

    Raises:
        StoreError: no usable libcrypto on this machine.
    """
    # The sonames first: find_library runs ``ldconfig -p`` in a subprocess (~30 ms at
    # every process start, and each worker and the CLI import this module).
    for name in ("libcrypto.so.3", "libcrypto.so", "crypto"):
        if name == "crypto":
            name = ctypes.util.find_library("crypto") or ""
            if not name:
                continue
        try:
            lib = ctypes.CDLL(name)
            lib.SHA256_Init.argtypes = [ctypes.c_void_p]
            lib.SHA256_Init.restype = ctypes.c_int
            lib.SHA256_Update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
            lib.SHA256_Update.restype = ctypes.c_int
            lib.SHA256_Final.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            lib.SHA256_Final.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    raise StoreError("libcrypto (OpenSSL) with SHA256_Init is needed for resumable hashing; "
                     "install libssl3 (Debian) or equivalent")


_lib = _load_libcrypto()


class ResumableSha256:
    """An in-progress SHA-256 that can be frozen to bytes with :meth:`state`.

    ``ResumableSha256.from_state(h.state())`` continues exactly where ``h`` was.
    """

    __slots__ = ("_ctx",)

    def __init__(self) -> None:
        self._ctx = ctypes.create_string_buffer(CTX_SIZE)
        if _lib.SHA256_Init(self._ctx) != 1:
            raise StoreError("SHA256_Init failed")

    @classmethod
    def from_state(cls, state: bytes) -> ResumableSha256:
        """Resume from bytes made by :meth:`state`.

        Raises:
            StoreError: ``state`` is not a saved hash state (truncated or foreign file).
        """
        if len(state) != len(_MAGIC) + CTX_SIZE or not state.startswith(_MAGIC):
            raise StoreError(f"not a saved sha256 state ({len(state)} bytes); remove the layer's work "
                             "directory to restart it")
        h = cls.__new__(cls)
        h._ctx = ctypes.create_string_buffer(state[len(_MAGIC):], CTX_SIZE)
        # SHA256_Update copies into data[num:]: a num past the 64-byte block (a corrupt
        # file) would write past the context.  num is the bytes hashed mod 64, md_len 32.
        num, md_len = struct.unpack_from("=II", h._ctx.raw, _NUM_OFFSET)
        if num != h.length % _BLOCK or md_len != _DIGEST_SIZE:
            raise StoreError(f"saved sha256 state is corrupt ({num} bytes buffered after {h.length} hashed, "
                             f"digest length {md_len}); remove the layer's work directory to restart it")
        return h

    def state(self) -> bytes:
        """The running state as bytes (safe to write to a file and resume elsewhere)."""
        return _MAGIC + self._ctx.raw

    @property
    def length(self) -> int:
        """Bytes hashed so far (from the context's bit count)."""
        nl, nh = struct.unpack_from("=II", self._ctx.raw, 32)
        return ((nh << 32) | nl) >> 3

    def update(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        """Hash ``data[offset:]``; bytes and writable buffers are passed without copying.

        ``offset`` exists so a span whose first byte was already hashed (neighbouring
        spans share a byte) is hashed without slicing a copy of it.
        """
        n = (len(data) if not isinstance(data, memoryview) else data.nbytes) - offset
        if n <= 0:
            return
        if isinstance(data, memoryview) and data.readonly and isinstance(data.obj, bytes) \
                and data.c_contiguous and data.nbytes == len(data.obj):
            data = data.obj  # a view of a whole bytes object (an inflated span): no copy
        if isinstance(data, bytes):
            base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
            ok = _lib.SHA256_Update(self._ctx, base + offset, n)
        elif isinstance(data, memoryview) and data.readonly:
            ok = _lib.SHA256_Update(self._ctx, data[offset:].tobytes(), n)
        else:
            buf = (ctypes.c_char * n).from_buffer(data, offset)
            ok = _lib.SHA256_Update(self._ctx, buf, n)
            del buf
        if ok != 1:
            raise StoreError("SHA256_Update failed")

    def digest(self) -> bytes:
        """The final digest; the running state is left untouched (Final works on a copy)."""
        ctx = ctypes.create_string_buffer(self._ctx.raw, CTX_SIZE)
        out = ctypes.create_string_buffer(32)
        if _lib.SHA256_Final(out, ctx) != 1:
            raise StoreError("SHA256_Final failed")
        return out.raw

    def hexdigest(self) -> str:
        return self.digest().hex()
