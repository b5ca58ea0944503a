"""The layer digest, computed over spans that land in any order and in any process.

A layer's digest covers its compressed bytes in order, but its spans land in whatever
order the workers finish them.  ``work/hash`` holds the running SHA-256
(:class:`~prewarm.store.resumable_hash.ResumableSha256`, resumable in another process)
with the next span to hash and the compressed offset hashed so far; a span that arrives
early waits in ``work/spool`` at its own offset until the spans before it are in, and
the spool's hashed prefix is given back with a punched hole.

All of it runs under the layer lock (held by :mod:`prewarm.store.content`), once per
span, before the span's ``landed`` byte is set: a span hashed before a crash that came
before its byte is simply found hashed again.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

from prewarm.errors import BadZtoc, StoreError
from prewarm.store.resumable_hash import ResumableSha256
from prewarm.store.syscalls import punch_hole
from prewarm.store.table import SpanRange

_HEADER = struct.Struct("<QQ")  # next span to hash, compressed bytes hashed so far


def start(work: Path) -> None:
    """Begin the layer's hash: nothing hashed yet, span 0 next."""
    save(work, 0, 0, ResumableSha256())


def load(work: Path) -> tuple[int, int, ResumableSha256]:
    """(next span to hash, compressed bytes hashed so far, the running hash)."""
    raw = (work / "hash").read_bytes()
    nxt, upto = _HEADER.unpack_from(raw)
    return nxt, upto, ResumableSha256.from_state(raw[_HEADER.size:])


def save(work: Path, nxt: int, upto: int, h: ResumableSha256) -> None:
    """Overwrite work/hash in place (once per span, under the layer lock).

    Why not a temp file and a rename: the record has a fixed size and lies in the file's
    first page, so one ``pwrite`` replaces it whole or not at all for a killed process
    (a fatal signal stops a write only between pages); a power loss restarts the layer
    anyway (boot id).  A rename per span cost a file creation and a journal entry.
    """
    fd = os.open(work / "hash", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, _HEADER.pack(nxt, upto) + h.state(), 0)
    finally:
        os.close(fd)


def hash_or_spool(digest: str, work: Path, spans: Sequence[SpanRange], index: int, compressed: bytes | memoryview,
                  base: int, landed: bytearray) -> None:
    """Advance the in-order layer hash with this span (and spooled followers), or spool it.

    ``compressed`` starts at layer offset ``base``; ``landed`` says which spans are in.

    Raises:
        BadZtoc: the span leaves a gap after the bytes before it.
        StoreError: the spool lost bytes of a span marked landed.
    """
    nxt, upto, h = load(work)
    if index < nxt:
        return  # hashed before a crash that came before its landed byte was set
    spool = work / "spool"
    if index > nxt:
        fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, compressed, base)
        finally:
            os.close(fd)
        return
    # Neighbouring spans share a byte when the checkpoint has bits: hash it once.
    if base > upto:
        raise BadZtoc(f"layer {digest}: span {index} starts at compressed offset {base}, but the bytes "
                      f"before it end at {upto}; the layer digest cannot be verified")
    h.update(compressed, upto - base)
    upto = spans[index].compressed_end
    nxt = index + 1
    if nxt < len(landed) and landed[nxt]:
        fd = os.open(spool, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while nxt < len(landed) and landed[nxt]:
                s = spans[nxt]
                data = os.pread(fd, s.compressed_end - upto, upto)
                if len(data) != s.compressed_end - upto:
                    raise StoreError(f"layer {digest}: spool is short for span {nxt}; remove the layer "
                                     "and warm it again")
                h.update(data)
                upto, nxt = s.compressed_end, nxt + 1
        finally:
            os.close(fd)
    save(work, nxt, upto, h)
    if nxt < len(landed) and spool.exists():
        punch_hole(spool, upto)
