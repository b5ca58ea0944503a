"""SpanMap: stream ranges to file pieces, checked against a byte-by-byte model."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prewarm.errors import BadZtoc
from prewarm.store.spanmap import SpanMap


@st.composite
def layouts(draw):  # type: ignore[no-untyped-def]
    """Extents separated by gaps (headers, padding), plus cut points splitting the stream."""
    extents = []
    pos = draw(st.integers(0, 600))
    for _ in range(draw(st.integers(0, 12))):
        size = draw(st.integers(0, 2000))
        extents.append((pos, size))
        pos += size + draw(st.integers(0, 1024))
    total = pos + draw(st.integers(0, 100))
    cuts = sorted(set(draw(st.lists(st.integers(0, total), max_size=10)) + [0, total]))
    return extents, cuts


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_pieces_cover_each_data_byte_exactly_once(layout) -> None:  # type: ignore[no-untyped-def]
    extents, cuts = layout
    # Given a stream cut into consecutive ranges (spans)
    smap = SpanMap(extents)
    seen: dict[int, tuple[int, int]] = {}
    # When every range is mapped
    for start, end in itertools.pairwise(cuts):
        for p in smap.pieces(start, end):
            assert start <= p.stream_offset and p.stream_offset + p.length <= end and p.length > 0
            for k in range(p.length):
                pos = p.stream_offset + k
                assert pos not in seen
                seen[pos] = (p.extent, p.file_offset + k)
    # Then every data byte maps to its (extent, offset) once, and nothing else maps
    expected = {s + k: (i, k) for i, (s, n) in enumerate(extents) for k in range(n)}
    assert seen == expected


def test_empty_range_and_gap_give_nothing() -> None:
    smap = SpanMap([(512, 10), (1536, 0), (2048, 100)])
    assert smap.pieces(5, 5) == []
    assert smap.pieces(600, 2048) == []
    [p] = smap.pieces(2050, 9999)
    assert (p.extent, p.file_offset, p.stream_offset, p.length) == (2, 2, 2050, 98)


@pytest.mark.parametrize("extents", [[(0, 10), (5, 10)], [(100, 1), (50, 1)], [(-1, 3)], [(0, -3)]])
def test_lying_extents_are_bad_ztoc(extents) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadZtoc):
        SpanMap(extents)
