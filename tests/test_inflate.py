"""inflate_span against ``gzip -d``: random tar.gz layers, every level, member split and span size."""

from __future__ import annotations

import gzip
import io
import random
import subprocess
import tarfile
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prewarm.errors import BadSpan
from prewarm.index.inflate import INFLATER, gzip_header_length, inflate_span
from prewarm.index.ztoc import Span, Ztoc
from prewarm.index.ztoc_build import build_tar_ztoc, build_ztoc

_contents = st.one_of(
    st.binary(max_size=3000),                                            # incompressible
    st.builds(lambda w, n: w * n, st.binary(min_size=1, max_size=12), st.integers(1, 4000)),
    st.builds(lambda n: bytes(n), st.integers(0, 70_000)),               # long runs
)


@st.composite
def layers(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    """(tar bytes, gzip bytes of it, span size): levels 0-9, 1-3 members, header flags."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i, data in enumerate(draw(st.lists(_contents, min_size=1, max_size=6))):
            ti = tarfile.TarInfo(f"d/file{i}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    tar = buf.getvalue()
    cuts = sorted(set(draw(st.lists(st.integers(1, len(tar) - 1), max_size=2))))
    parts = [tar[a:b] for a, b in zip([0, *cuts], [*cuts, len(tar)])]
    members = []
    for part in parts:
        level = draw(st.integers(0, 9))
        if draw(st.booleans()):
            members.append(gzip.compress(part, compresslevel=level, mtime=0))
        else:  # FNAME header flag, as `gzip file` writes
            out = io.BytesIO()
            with gzip.GzipFile(filename="layer.tar", mode="wb", fileobj=out,
                               compresslevel=level, mtime=0) as g:
                g.write(part)
            members.append(out.getvalue())
    span = draw(st.sampled_from([1, 100, 1000, 4096, 20_000, 65_536]))
    return tar, b"".join(members), span


def gzip_d(comp: bytes) -> bytes:
    return subprocess.run(["gzip", "-dc"], input=comp, check=True, capture_output=True).stdout


def inflate_all(z: Ztoc, comp: bytes) -> list[bytes]:
    out = []
    for i in range(z.num_spans):
        s = z.span(i)
        nxt = z.checkpoint(i + 1).window if i + 1 < z.num_spans else None
        out.append(inflate_span(s, comp[s.compressed_start:s.compressed_end], next_window=nxt,
                                is_last=i == z.num_spans - 1))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(layers())
def test_spans_concatenate_to_gzip_d_and_each_inflates_alone(layer: tuple[bytes, bytes, int]) -> None:
    tar, comp, span_size = layer
    # Given the zTOC of a random layer
    z = build_ztoc([comp], span_size=span_size, build_tool_identifier="t")
    full = gzip_d(comp)
    assert full == tar
    # When every span is inflated on its own, from its bytes and checkpoint only
    parts = inflate_all(z, comp)
    # Then each has exactly its size, and together they are gzip -d's output
    for i, part in enumerate(parts):
        s = z.span(i)
        assert len(part) == s.uncompressed_end - s.uncompressed_start
        assert part == full[s.uncompressed_start:s.uncompressed_end]
    joined = b"".join(parts)
    assert joined == full[:len(joined)]
    assert full[len(joined):] == bytes(len(full) - len(joined))  # only tar record padding


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(layers(), st.integers(0, 32767), st.integers(1, 255))
def test_a_wrong_next_window_is_detected(layer: tuple[bytes, bytes, int], at: int,
                                         flip: int) -> None:
    _, comp, span_size = layer
    z = build_ztoc([comp], span_size=span_size, build_tool_identifier="t")
    for i in range(z.num_spans - 1):
        s = z.span(i)
        bad = bytearray(z.checkpoint(i + 1).window)
        bad[at] ^= flip
        with pytest.raises(BadSpan, match="window mismatch"):
            inflate_span(s, comp[s.compressed_start:s.compressed_end], next_window=bytes(bad))


def _two_span_layer() -> tuple[Ztoc, bytes]:
    rng = random.Random(5)
    words = [bytes(rng.choices(b"abcdefghij", k=rng.randrange(2, 9))) for _ in range(500)]
    data = b" ".join(rng.choice(words) for _ in range(60_000))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    comp = gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)
    z = build_ztoc([comp], span_size=50_000, build_tool_identifier="t")
    assert z.num_spans >= 3
    return z, comp


def test_a_wrong_dictionary_gives_a_window_mismatch_or_corrupt_data() -> None:
    # Given span 1 with its checkpoint window replaced by zeros
    z, comp = _two_span_layer()
    s = z.span(1)
    assert s.checkpoint is not None
    forged = Span(s.index, s.compressed_start, s.compressed_end, s.uncompressed_start,
                  s.uncompressed_end, s.digest,
                  type(s.checkpoint)(s.checkpoint.compressed_offset,
                                     s.checkpoint.uncompressed_offset, s.checkpoint.bits,
                                     bytes(32768)))
    nxt = z.checkpoint(2).window if z.num_spans > 2 else None
    # Then inflating it fails loudly instead of producing wrong bytes silently
    with pytest.raises(BadSpan):
        inflate_span(forged, comp[s.compressed_start:s.compressed_end], next_window=nxt,
                     is_last=z.num_spans == 2)


def test_wrong_sizes_and_endings_are_bad_spans() -> None:
    z, comp = _two_span_layer()
    s0 = z.span(0)
    data = comp[s0.compressed_start:s0.compressed_end]
    with pytest.raises(BadSpan, match="compressed bytes, expected"):
        inflate_span(s0, data[:-1])
    # a span that is not the last does not end the stream
    with pytest.raises(BadSpan, match="does not end"):
        inflate_span(s0, data, is_last=True)
    # the zTOC claims more output than the bytes hold
    longer = Span(s0.index, s0.compressed_start, s0.compressed_end, s0.uncompressed_start,
                  s0.uncompressed_end + 1, s0.digest, s0.checkpoint)
    with pytest.raises(BadSpan, match="inflates to"):
        inflate_span(longer, data)
    shorter = Span(s0.index, s0.compressed_start, s0.compressed_end, s0.uncompressed_start,
                   s0.uncompressed_end - 1, s0.digest, s0.checkpoint)
    with pytest.raises(BadSpan, match="more than"):
        inflate_span(shorter, data)
    # garbage instead of deflate data
    with pytest.raises(BadSpan):
        inflate_span(s0, b"\xff" * len(data))
    # the last span with its trailer cut off
    last = z.span(z.num_spans - 1)
    cut = Span(last.index, last.compressed_start, last.compressed_end - 3,
               last.uncompressed_start, last.uncompressed_end, last.digest, last.checkpoint)
    with pytest.raises(BadSpan):
        inflate_span(cut, comp[cut.compressed_start:cut.compressed_end], is_last=True)


def test_data_after_the_last_member_is_refused() -> None:
    z, comp = _two_span_layer()
    last = z.span(z.num_spans - 1)
    extra = comp + gzip.compress(b"x" * 100, mtime=0)  # a member with non-zero bytes
    longer = Span(last.index, last.compressed_start, len(extra), last.uncompressed_start,
                  last.uncompressed_end, last.digest, last.checkpoint)
    with pytest.raises(BadSpan, match="not tar padding"):
        inflate_span(longer, extra[longer.compressed_start:], is_last=True)


def test_uncompressed_layer_spans_are_their_own_bytes() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("f")
        ti.size = 5000
        tf.addfile(ti, io.BytesIO(b"q" * 5000))
    tar = buf.getvalue()
    z = build_tar_ztoc([tar], span_size=4096, build_tool_identifier="t")
    # tarfile pads to 10 KiB records: soci's size stops at the end marker
    assert z.uncompressed_archive_size == 512 + 5120 + 1024 < len(tar) == z.compressed_archive_size
    parts = [inflate_span(s, tar[s.compressed_start:s.compressed_end],
                          is_last=s.index == z.num_spans - 1) for s in z.spans()]
    joined = b"".join(parts)
    assert joined == tar[:z.uncompressed_archive_size]
    assert tar[len(joined):] == bytes(len(tar) - len(joined))
    # the spans tile [0, end marker): the last ones lie in the padding and yield nothing
    assert z.span(z.num_spans - 1).uncompressed_end == z.uncompressed_archive_size
    assert [s.uncompressed_end - s.uncompressed_start for s in z.spans()][-1] == 0
    with pytest.raises(BadSpan):
        inflate_span(z.span(0), tar[:4095])
    # non-zero bytes after the tar end are refused
    last = z.span(z.num_spans - 1)
    forged = tar[last.compressed_start:last.compressed_end - 1] + b"x"
    with pytest.raises(BadSpan, match="not tar padding"):
        inflate_span(last, forged, is_last=True)


def test_gzip_header_length_reads_every_flag() -> None:
    # FEXTRA + FNAME + FCOMMENT + FHCRC
    hdr = b"\x1f\x8b\x08" + bytes([4 | 8 | 16 | 2]) + bytes(6) + b"\x03\x00abc" + b"name\0" \
        + b"comment\0" + b"\x00\x00"
    assert gzip_header_length(hdr + b"rest") == len(hdr)
    assert gzip_header_length(gzip.compress(b"x", mtime=0)) == 10
    with pytest.raises(BadSpan):
        gzip_header_length(hdr[:-1])
    with pytest.raises(BadSpan):
        gzip_header_length(b"\x1f\x8b\x07\x00" + bytes(6))
    with pytest.raises(BadSpan):
        gzip_header_length(b"\x1f\x8b\x08\xe0" + bytes(6))


def test_the_fast_inflater_is_isal() -> None:
    assert INFLATER.__name__ == "isal.isal_zlib"
    assert INFLATER.decompressobj(-15).decompress(zlib.compress(b"abc")[2:-4]) == b"abc"
