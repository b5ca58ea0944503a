"""The layer digest and the diff_id, computed over spans that land in any order and in any process.

A layer's digest covers its compressed bytes in order, and its diff_id (from the image
config) the decompressed stream in order, but its spans land in whatever order the
workers finish them.  ``work/hash`` holds both running SHA-256s
(:class:`~prewarm.store.resumable_hash.ResumableSha256`, resumable in another process)
with the next span to hash and the compressed offset hashed so far.  A span that
arrives in order feeds its inflated output to the diff_id hash at once; one that arrives
early waits compressed in ``work/spool`` at its own offset until the spans before it are
in.  Its inflated output waits too, in ``work/ring`` (a ring of :data:`RING_SLOTS` slots,
the span's slot is its index modulo that), when it is close enough to the hashed front
that its slot is free; only a span further ahead is inflated a second time (from its
checkpoint) when its turn comes.  The spool's hashed prefix is given back with a punched
hole.

Why the ring: spans are landed by several processes at once, tasks of 8 adjacent spans
each, so nearly every span lands before the one ahead of it has been hashed (325 of 352
spans of the bench's single-layer image were inflated twice, 289 of them by the one
process that kept finding itself at the hashed front).  The ring's pages stay in the page
cache and are overwritten in place, so parking a span's output and reading it back costs
~0.2 ms per MiB here against ~2.3 ms per MiB to inflate it again (and no block
allocation: the ring is removed with ``work/`` before writeback would reach it).
``work/ringed`` says, per span, how long its parked output is (0: not parked).

Why hash the decompressed stream at all: containerd's unpack commits a layer only when
it hashes to the config's diff_id, and chain IDs (which name snapshots) are built from
diff_ids.  A layer committed under a diff_id that is not its own would let an image
that copies a popular base image's diff_ids put its own tree under that base's chain.

An uncompressed layer is its own decompressed stream: its diff_id is its digest, and
the second hash is not kept.

All of it runs under the layer lock (held by :mod:`prewarm.store.content`), once per
span, before the span's ``landed`` byte is set: a span hashed before a crash that came
before its byte is simply found hashed again.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from prewarm.errors import BadSpan, BadZtoc, StoreError
from prewarm.index.inflate import inflate_span
from prewarm.index.ztoc import MAX_TAR_PADDING
from prewarm.store.resumable_hash import ResumableSha256
from prewarm.store.syscalls import punch_hole
from prewarm.store.table import SpanRange, ZtocView

#: Version of the ``work/hash`` record, kept in ``work/state.json``: a layer half landed
#: by a prewarm that wrote another record starts again.
FORMAT = 2
_HEADER = struct.Struct("<QQ")  # next span to hash, compressed bytes hashed so far
_STATE_SIZE = len(ResumableSha256().state())
#: Slots of the ring of parked inflated spans (page cache: slots times the largest span).
RING_SLOTS = 32
_RINGED = struct.Struct("<Q")  # per span in work/ringed: 1 + bytes parked in its slot (0: none)


@dataclasses.dataclass
class Progress:
    """How far the in-order hashes are: what ``work/hash`` holds."""

    next: int  # the next span to hash
    upto: int  # compressed bytes hashed so far
    layer: ResumableSha256  # over the compressed bytes: the layer digest
    tar: ResumableSha256  # over the decompressed stream: the diff_id (gzip layers only)


def start(work: Path) -> None:
    """Begin the layer's hashes: nothing hashed yet, span 0 next."""
    save(work, Progress(0, 0, ResumableSha256(), ResumableSha256()))


def load(work: Path) -> Progress:
    """The hashes saved in ``work/hash``.

    Raises:
        StoreError: the record is not one this prewarm wrote (remove the layer).
    """
    raw = (work / "hash").read_bytes()
    if len(raw) != _HEADER.size + 2 * _STATE_SIZE:
        raise StoreError(f"{work / 'hash'} holds {len(raw)} bytes, not a hash record; remove the layer "
                         "and warm it again")
    nxt, upto = _HEADER.unpack_from(raw)
    at = _HEADER.size
    return Progress(nxt, upto, ResumableSha256.from_state(raw[at:at + _STATE_SIZE]),
                    ResumableSha256.from_state(raw[at + _STATE_SIZE:]))


def save(work: Path, p: Progress) -> None:
    """Overwrite work/hash in place (once per span, under the layer lock).

    Why not a temp file and a rename: the record has a fixed size and lies in the file's
    first page, so one ``pwrite`` replaces it whole or not at all for a killed process
    (a fatal signal stops a write only between pages); a power loss restarts the layer
    anyway (boot id).  A rename per span cost a file creation and a journal entry.
    """
    fd = os.open(work / "hash", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, _HEADER.pack(p.next, p.upto) + p.layer.state() + p.tar.state(), 0)
    finally:
        os.close(fd)


def hash_or_spool(digest: str, work: Path, ztoc: ZtocView, spans: Sequence[SpanRange], index: int,
                  compressed: bytes | memoryview, base: int, stream: bytes | memoryview | None,
                  landed: bytearray) -> None:
    """Advance the in-order hashes with this span (and spooled followers), or spool it.

    ``compressed`` starts at layer offset ``base``; ``stream`` is the span's part of the
    decompressed stream (for the last span, with the zero padding after the archive end:
    ``inflate_span(..., keep_padding=True)``), or None to inflate it again here;
    ``landed`` says which spans are in.

    Raises:
        BadZtoc: the span leaves a gap after the bytes before it.
        StoreError: the spool lost bytes of a span marked landed.
    """
    p = load(work)
    if index < p.next:
        return  # hashed before a crash that came before its landed byte was set
    spool = work / "spool"
    if index > p.next:
        fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, compressed, base)
        finally:
            os.close(fd)
        if stream is not None and index - p.next < RING_SLOTS and spans[index].uncompressed_end > \
                spans[index].uncompressed_start:
            _park(work, spans, index, stream)
        return
    # Neighbouring spans share a byte when the checkpoint has bits: hash it once.
    if base > p.upto:
        raise BadZtoc(f"layer {digest}: span {index} starts at compressed offset {base}, but the bytes "
                      f"before it end at {p.upto}; the layer digest cannot be verified")
    p.layer.update(compressed, p.upto - base)
    _hash_stream(digest, ztoc, index, len(spans), p, memoryview(compressed)[spans[index].compressed_start - base:],
                 stream)
    p.upto = spans[index].compressed_end
    p.next = index + 1
    if p.next < len(landed) and landed[p.next]:
        fd = os.open(spool, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while p.next < len(landed) and landed[p.next]:
                i, s = p.next, spans[p.next]
                # The span's own bytes: its first may be the previous span's last (bits).
                data = os.pread(fd, s.compressed_end - s.compressed_start, s.compressed_start)
                if len(data) != s.compressed_end - s.compressed_start or s.compressed_start > p.upto:
                    raise StoreError(f"layer {digest}: spool is short for span {i}; remove the layer "
                                     "and warm it again")
                p.layer.update(data, p.upto - s.compressed_start)
                _hash_stream(digest, ztoc, i, len(spans), p, data, _parked(work, spans, i))
                p.upto, p.next = s.compressed_end, i + 1
        finally:
            os.close(fd)
    save(work, p)
    if p.next < len(landed) and spool.exists():
        punch_hole(spool, p.upto)


def _slot_size(spans: Sequence[SpanRange]) -> int:
    """Bytes of one ring slot: the layer's largest span (the last one with its tar padding)."""
    key = id(spans)
    cached = _SLOT_SIZES.get(key)
    if cached is None or cached[0] is not spans:
        size = max(s.uncompressed_end - s.uncompressed_start for s in spans) + MAX_TAR_PADDING
        cached = _SLOT_SIZES[key] = (spans, -(-size // 4096) * 4096)
        if len(_SLOT_SIZES) > 16:
            _SLOT_SIZES.pop(next(iter(_SLOT_SIZES)))
    return cached[1]


_SLOT_SIZES: dict[int, tuple[Sequence[SpanRange], int]] = {}


def _park(work: Path, spans: Sequence[SpanRange], index: int, stream: bytes | memoryview) -> None:
    """Keep span ``index``'s inflated output in its ring slot until its turn (under the layer lock).

    The caller checked that the slot is free: its previous span (``index - RING_SLOTS``)
    is behind the hashed front.
    """
    size = _slot_size(spans)
    if len(stream) > size:
        return  # (cannot happen: the slot fits the largest span) it is inflated again instead
    fd = os.open(work / "ring", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, stream, (index % RING_SLOTS) * size)
    finally:
        os.close(fd)
    fd = os.open(work / "ringed", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, _RINGED.pack(1 + len(stream)), index * _RINGED.size)
    finally:
        os.close(fd)


def _parked(work: Path, spans: Sequence[SpanRange], index: int) -> bytes | None:
    """Span ``index``'s parked output, or None (it was not parked: inflate it again)."""
    try:
        fd = os.open(work / "ringed", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        raw = os.pread(fd, _RINGED.size, index * _RINGED.size)
    finally:
        os.close(fd)
    if len(raw) != _RINGED.size or not (n := _RINGED.unpack(raw)[0]):
        return None
    size = _slot_size(spans)
    fd = os.open(work / "ring", os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, n - 1, (index % RING_SLOTS) * size)
    finally:
        os.close(fd)
    return data if len(data) == n - 1 else None


def tar_digest(ztoc: ZtocView, p: Progress) -> str:
    """The diff_id the landed layer really has, once every span is hashed.

    An uncompressed layer's decompressed stream is the layer itself.
    """
    h = p.tar if ztoc.span(0).checkpoint is not None else p.layer
    return "sha256:" + h.hexdigest()


def _hash_stream(digest: str, ztoc: ZtocView, index: int, num_spans: int, p: Progress, body: bytes | memoryview,
                 stream: bytes | memoryview | None) -> None:
    """Feed span ``index``'s part of the decompressed stream to the diff_id hash.

    ``stream`` when the caller has it, else inflated again from the span's compressed
    ``body`` and checkpoint (the bytes were checked against the span digest and inflated
    once when they landed: failing now means the spool changed under us).

    Raises:
        StoreError: the bytes no longer inflate to the span.
    """
    span = ztoc.span(index)
    if span.checkpoint is None:
        return  # an uncompressed layer: its diff_id is its digest
    if stream is None:
        try:
            stream = inflate_span(span, body, is_last=index == num_spans - 1, keep_padding=True)
        except BadSpan as err:
            raise StoreError(f"layer {digest}: span {index} no longer inflates from the spool ({err}); "
                             "remove the layer and warm it again") from None
    p.tar.update(stream)
