"""Which file bytes an uncompressed stream range holds (pure).

A span's inflated output is a slice ``[start, end)`` of the layer's tar stream; the
store writes the parts of it that are file data straight into the pre-sized files.
:class:`SpanMap` answers "which (file, file offset, length) pieces lie in this range"
with one bisect per range, so landing a span costs one Python call per piece, never
per byte or per file of the layer.
"""

from __future__ import annotations

import bisect
import dataclasses
from array import array
from collections.abc import Iterable, Sequence

from prewarm.errors import BadZtoc


@dataclasses.dataclass(frozen=True, slots=True)
class Piece:
    """``length`` bytes at stream offset ``stream_offset`` belong at ``file_offset`` of extent ``extent``."""

    extent: int
    file_offset: int
    stream_offset: int
    length: int


class SpanMap:
    """Data extents of a tar stream, sorted by offset, queried by stream range.

    ``extents[i] = (stream_offset, size)`` is where extent ``i``'s data lies in the
    stream; empty extents are allowed and never yield pieces.
    """

    def __init__(self, extents: Iterable[tuple[int, int]]) -> None:
        """Index the extents (8 bytes per number: a layer may have a million).

        Raises:
            BadZtoc: extents out of order, overlapping or with negative offset/size: a TOC
                that says two files share bytes is lying.
        """
        self._starts: array[int] = array("q")
        self._ends: array[int] = array("q")
        self._ids: array[int] = array("q")
        starts, ends, ids = self._starts, self._ends, self._ids
        last_end = 0
        for i, (start, size) in enumerate(extents):
            if start < 0 or size < 0 or start + size >= 1 << 63:
                raise BadZtoc(f"data extent {i} has a negative or too large offset or size ({start}, {size})")
            if size == 0:
                continue
            if start < last_end:
                raise BadZtoc(f"data extent {i} at {start} overlaps or precedes the one ending at {last_end}")
            starts.append(start)
            ends.append(start + size)
            ids.append(i)
            last_end = start + size

    def arrays(self) -> tuple[Sequence[int], Sequence[int], Sequence[int]]:
        """The index as three columns (starts, ends, extent ids), e.g. to persist it."""
        return self._starts, self._ends, self._ids

    @classmethod
    def from_arrays(cls, starts: Sequence[int], ends: Sequence[int], ids: Sequence[int]) -> SpanMap:
        """Rebuild an index saved with :meth:`arrays`, checking it as the constructor does.

        Why: re-deriving the extents needs the whole TOC; a saved index is loaded in
        milliseconds by every other process of the node.

        Raises:
            BadZtoc: the lists differ in length, or extents are empty, out of order or overlap.
        """
        if not len(starts) == len(ends) == len(ids):
            raise BadZtoc("saved span map has lists of different lengths")
        last_end = 0
        for s, e in zip(starts, ends):
            if s < last_end or e <= s:
                raise BadZtoc(f"saved span map has an extent [{s}, {e}) after one ending at {last_end}")
            last_end = e
        smap = cls(())
        try:
            smap._starts, smap._ends, smap._ids = array("q", starts), array("q", ends), array("q", ids)
        except OverflowError:
            raise BadZtoc("saved span map has an offset beyond 64 bits") from None
        return smap

    def pieces(self, start: int, end: int) -> list[Piece]:
        """The data pieces inside stream range ``[start, end)``, in stream order."""
        out: list[Piece] = []
        if end <= start:
            return out
        k = bisect.bisect_right(self._ends, start)
        starts, ends, ids = self._starts, self._ends, self._ids
        n = len(starts)
        while k < n and starts[k] < end:
            s = max(start, starts[k])
            e = min(end, ends[k])
            out.append(Piece(ids[k], s - starts[k], s, e - s))
            k += 1
        return out
