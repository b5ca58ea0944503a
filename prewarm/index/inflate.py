"""Inflate one span of a gzip layer from its compressed bytes and its checkpoint.

A span starts at a deflate block boundary (a zTOC checkpoint), so it can be inflated on
its own: raw inflate with the checkpoint's 32 KiB window as the dictionary.  Three
complications, all handled here and nowhere else:

* **Leftover bits.**  When ``bits`` is not 0 the block starts in the middle of the
  span's first byte (its top ``bits`` bits).  ISA-L and Python's zlib have no
  ``inflatePrime``.  Shifting the span would break stored blocks (they align to the
  ORIGINAL byte boundaries), so instead empty deflate blocks are put in front, ending
  exactly in the low ``8 - bits`` bits of the first byte: a 10-bit empty fixed block
  and a 99-bit empty dynamic block reach every residue mod 8.  They output nothing and
  leave the dictionary alone; the span itself is not copied.
* **Member boundaries.**  pigz-style layers are several gzip members; when the raw
  stream ends inside a span, the 8-byte trailer is skipped, the next gzip header is
  parsed and inflating goes on (without a dictionary: a member has no history).
* **Trust.**  The output must be exactly ``uncompressed_end - uncompressed_start``
  bytes; with ``next_window`` the last 32 KiB of (window + output) must equal the
  next checkpoint's window, which is how an untrusted zTOC from a registry is checked
  span by span; with ``is_last`` the stream must really end (trailer, nothing after;
  only zero padding past the tar end marker is tolerated, as soci's size stops there).
  That padding is part of the layer's diff_id (the sha256 of the whole decompressed
  stream), so ``keep_padding`` hands it back instead of dropping it.

ISA-L (``isal.isal_zlib``) is used when importable, else the stdlib ``zlib``.
"""

from __future__ import annotations

import zlib as _stdlib_zlib
from types import ModuleType

from prewarm.errors import BadSpan
from prewarm.index.ztoc import MAX_TAR_PADDING, WINDOW_SIZE, Span

_isal_zlib: ModuleType | None
try:
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; zlib keeps us working without
    _isal_zlib = None

#: The inflater in use (ISA-L when available).
INFLATER: ModuleType = _isal_zlib if _isal_zlib is not None else _stdlib_zlib
_INFLATE_ERRORS: tuple[type[BaseException], ...] = (
    (_stdlib_zlib.error, _isal_zlib.error) if _isal_zlib is not None else (_stdlib_zlib.error,))

_FTEXT, _FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 1, 2, 4, 8, 16


def _put_bits(out: list[int], value: int, n: int) -> None:
    out.extend((value >> i) & 1 for i in range(n))  # fields and extra bits: LSB first


def _put_code(out: list[int], code: int, n: int) -> None:
    out.extend((code >> i) & 1 for i in range(n - 1, -1, -1))  # Huffman codes: MSB first


def _empty_fixed_block() -> list[int]:
    b: list[int] = []
    _put_bits(b, 0, 1)   # BFINAL 0
    _put_bits(b, 1, 2)   # BTYPE 01 fixed
    _put_code(b, 0, 7)   # end of block (256) = 0000000
    return b             # 10 bits


def _empty_dynamic_block() -> list[int]:
    """99 bits: complete codes only (literal 0 and EOB; two distances), so any inflater takes it."""
    b: list[int] = []
    _put_bits(b, 0, 1)
    _put_bits(b, 2, 2)   # BTYPE 10 dynamic
    _put_bits(b, 0, 5)   # HLIT 257
    _put_bits(b, 1, 5)   # HDIST 2
    _put_bits(b, 14, 4)  # HCLEN 18
    lens = {1: 1, 17: 2, 18: 2}  # code-length codes: 1 -> '0', 17 -> '10', 18 -> '11'
    for sym in (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1):
        _put_bits(b, lens.get(sym, 0), 3)
    _put_code(b, 0, 1)                          # literal 0: length 1
    _put_code(b, 3, 2)                          # 138 zeros
    _put_bits(b, 138 - 11, 7)
    _put_code(b, 3, 2)                          # 107 zeros
    _put_bits(b, 107 - 11, 7)
    _put_code(b, 2, 2)                          # 10 zeros (literals 1..255 done)
    _put_bits(b, 10 - 3, 3)
    _put_code(b, 0, 1)                          # EOB (256): length 1
    _put_code(b, 0, 1)                          # distance 0: length 1
    _put_code(b, 0, 1)                          # distance 1: length 1
    _put_code(b, 1, 1)                          # the block's only symbol: EOB = '1'
    return b


def _prime_prefix(bits: int) -> tuple[bytes, int]:
    """(whole prefix bytes, value of the low ``8 - bits`` bits of the first span byte).

    The empty blocks end exactly where the span's first byte hands over its top
    ``bits`` bits, so the inflater continues there with the same byte alignment.
    """
    t = 8 - bits
    odd = t % 2
    fixed = ((t - 3 * odd) % 8) // 2
    stream = (_empty_dynamic_block() if odd else []) + _empty_fixed_block() * fixed
    whole = len(stream) - t
    assert whole >= 0 and whole % 8 == 0
    prefix = bytearray(whole // 8)
    for i in range(whole):
        if stream[i]:
            prefix[i >> 3] |= 1 << (i & 7)
    low = sum(bit << i for i, bit in enumerate(stream[whole:]))
    return bytes(prefix), low


#: For bits 1..7: (prefix bytes, low bits for the first byte).
_PRIME = {bits: _prime_prefix(bits) for bits in range(1, 8)}


def gzip_header_length(buf: bytes | memoryview, pos: int = 0) -> int:
    """Length of the gzip member header at ``buf[pos:]`` (RFC 1952, every flag).

    Raises:
        BadSpan: not a gzip header, or it runs past the end of ``buf``.
    """
    end = len(buf)
    if end - pos < 10 or buf[pos] != 0x1F or buf[pos + 1] != 0x8B:
        raise BadSpan(f"no gzip member header at span offset {pos}")
    if buf[pos + 2] != 8:
        raise BadSpan(f"gzip member at span offset {pos} uses compression method {buf[pos + 2]}, "
                      f"not deflate")
    flags = buf[pos + 3]
    if flags & 0xE0:
        raise BadSpan(f"gzip member at span offset {pos} sets reserved header flags")
    p = pos + 10
    if flags & _FEXTRA:
        if p + 2 > end:
            raise BadSpan("gzip header extra field runs past the span")
        p += 2 + (buf[p] | buf[p + 1] << 8)
    for flag in (_FNAME, _FCOMMENT):
        if flags & flag:
            while p < end and buf[p]:
                p += 1
            p += 1
    if flags & _FHCRC:
        p += 2
    if p > end:
        raise BadSpan(f"gzip member header at span offset {pos} runs past the span")
    return p - pos


def inflate_span(span: Span, data: bytes | memoryview, *,
                 next_window: bytes | memoryview | None = None, is_last: bool = False,
                 keep_padding: bool = False) -> bytes:
    """Inflate one span and return exactly its uncompressed bytes.

    Args:
        span: the span (from :meth:`prewarm.index.ztoc.Ztoc.span`).
        data: its compressed bytes ``[compressed_start, compressed_end)`` (digest
            already checked by the caller).
        next_window: the next checkpoint's window, to check this span's output
            against (None to skip: last span, or trusted zTOC).
        is_last: this is the layer's last span: the gzip stream must end in it.
        keep_padding: with ``is_last``, return the zero padding after the archive end
            too (checked zero, at most ``MAX_TAR_PADDING`` bytes): the output is then the
            rest of the decompressed stream, whose sha256 the diff_id covers.

    Raises:
        BadSpan: the bytes do not inflate to exactly this span (wrong size, corrupt
            deflate data, window mismatch, stream not ending where it should).
    """
    want = span.uncompressed_end - span.uncompressed_start
    clen = span.compressed_end - span.compressed_start
    if len(data) != clen:
        raise BadSpan(f"span {span.index}: got {len(data)} compressed bytes, expected {clen}")
    cp = span.checkpoint
    if cp is None:
        # An uncompressed layer: the span is its own bytes, up to the tar end marker where
        # its uncompressed range is clamped; what follows must be zero record padding.
        clamped = span.uncompressed_end != span.compressed_end
        if want > clen or (want < clen and not clamped) or (
                span.uncompressed_start != span.compressed_start and want):
            raise BadSpan(f"span {span.index} of an uncompressed layer: {clen} bytes in, "
                          f"{want} expected out")
        tail = memoryview(data)[want:]
        if bytes(tail).count(0) != len(tail):
            raise BadSpan(f"span {span.index}: data continues past the end of the archive "
                          f"({len(tail)} bytes that are not tar padding)")
        out = bytes(data) if is_last and keep_padding else bytes(memoryview(data)[:want])
    else:
        out = _inflate(span, memoryview(data), cp.window, cp.bits, want, is_last)
    if next_window is not None:
        _check_window(span, cp.window if cp is not None else b"", memoryview(out)[:want], next_window)
    return out if len(out) == want or keep_padding else out[:want]


def _inflate(span: Span, orig: memoryview, window: bytes, bits: int, want: int,
             is_last: bool) -> bytes:
    try:
        return _inflate_unchecked(span, orig, window, bits, want, is_last)
    except _INFLATE_ERRORS as err:
        raise BadSpan(f"span {span.index}: corrupt deflate data ({err})") from None


def _inflate_unchecked(span: Span, orig: memoryview, window: bytes, bits: int, want: int,
                       is_last: bool) -> bytes:
    d = INFLATER.decompressobj(-15, zdict=window)
    base = 0  # index in orig of stream[0]
    if bits:
        if not orig:
            raise BadSpan(f"span {span.index} is empty but starts inside a byte")
        prefix, low = _PRIME[bits]
        mask = (1 << (8 - bits)) - 1
        if d.decompress(prefix + bytes(((orig[0] & ~mask) | low,))) or d.eof:
            raise BadSpan(f"span {span.index}: its first byte does not start a deflate block")
        base = 1
    stream: bytes | memoryview = orig[base:]
    limit = want + (MAX_TAR_PADDING if is_last else 0) + 1
    parts: list[bytes] = []
    produced = 0
    ended = False  # the stream ended (member end) exactly at the end of the span
    while True:
        piece = d.decompress(stream, limit - produced)
        parts.append(piece)
        produced += len(piece)
        if produced >= limit:
            raise BadSpan(f"span {span.index} inflates to more than the {want} bytes its zTOC "
                          f"says")
        if d.eof:
            trailer = base + len(stream) - len(d.unused_data)
            after = trailer + 8
            if after > len(orig):
                raise BadSpan(f"span {span.index}: gzip member trailer cut off by the span end")
            if after == len(orig):
                ended = True
                break
            base = after + gzip_header_length(orig, after)
            stream = orig[base:]
            d = INFLATER.decompressobj(-15)
            if base == len(orig):
                break
            continue
        if d.unconsumed_tail:
            stream = d.unconsumed_tail
            continue
        break
    out = b"".join(parts)
    if len(out) < want:
        raise BadSpan(f"span {span.index} inflates to {len(out)} bytes, its zTOC says {want}")
    if is_last:
        if not ended:
            raise BadSpan(f"span {span.index} is the last but the gzip stream does not end in it")
        if out[want:].count(0) != len(out) - want:
            raise BadSpan(f"span {span.index}: data continues past the end of the archive "
                          f"({len(out) - want} bytes that are not tar padding)")
        return out  # the caller drops the padding unless asked to keep it
    if len(out) > want:
        raise BadSpan(f"span {span.index} inflates to more than the {want} bytes its zTOC says")
    return out


def _check_window(span: Span, window: bytes, out: memoryview, next_window: bytes | memoryview) -> None:
    if len(out) >= WINDOW_SIZE:
        tail = out[-WINDOW_SIZE:]
    else:
        tail = memoryview(window[len(out):] + bytes(out))
    if tail != memoryview(next_window):
        raise BadSpan(f"span {span.index}: window mismatch: its output does not lead into the "
                      f"next checkpoint's window (zTOC and layer disagree)")
