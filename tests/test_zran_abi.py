"""The hand-copied zng_stream layout is checked at load, and a wrong one falls back cleanly (issue 13 item 17)."""

from __future__ import annotations

import ctypes
import dataclasses
import logging

import pytest

from prewarm.index import zran


def _zlib_ng() -> zran._Backend:
    backend = zran._zlib_ng()
    assert backend is not None, "the zlib-ng wheel is a dependency and its layout must match"
    return backend


def test_the_installed_zlib_ng_and_system_zlib_pass_the_self_test() -> None:
    assert zran._self_test(_zlib_ng()) is None
    assert zran._self_test(zran._system_zlib()) is None


class _Shifted(ctypes.Structure):
    """A zng_stream declared with an extra field in front: every offset we read is 8 bytes off."""

    _fields_ = [("pad", ctypes.c_uint64)] + zran._ZngStream._fields_


class _NarrowCounters(ctypes.Structure):
    """total_in/total_out declared 32-bit: the fields behind them move."""

    _fields_ = [(n, ctypes.c_uint32 if n in ("total_in", "total_out") else t) for n, t in zran._ZngStream._fields_]


@pytest.mark.parametrize("layout", [_Shifted, _NarrowCounters, zran._ZStream])
def test_a_layout_that_differs_from_the_library_is_caught(layout: type[ctypes.Structure]) -> None:
    ng = _zlib_ng()
    p = ctypes.POINTER(layout)
    lib = ctypes.CDLL(__import__("zlib_ng.zlib_ng", fromlist=["x"]).__file__)
    wrong = dataclasses.replace(ng, stream=layout,
                                init=zran._declare(lib.zng_inflateInit2, [p, ctypes.c_int32]),
                                inflate=zran._declare(lib.zng_inflate, [p, ctypes.c_int32]),
                                reset=zran._declare(lib.zng_inflateReset, [p]),
                                end=zran._declare(lib.zng_inflateEnd, [p]))
    # (zlib's z_stream has zng_stream's offsets on LP64 but a 64-bit adler: its upper half
    # reads the padding, and the check of the CRC sees it)
    assert zran._self_test(wrong) is not None


def test_a_failed_self_test_falls_back_to_the_system_zlib(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(zran, "_ZngStream", _Shifted)
    monkeypatch.delenv("PREWARM_ZRAN", raising=False)
    zran.backend.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=zran.__name__):
            chosen = zran.backend()
        assert chosen.name.startswith("zlib ") and "zlib-ng" not in chosen.name
        assert "does not match" in caplog.text
        # and zTOC building still works through the fallback
        with zran.BlockInflater() as inflater:
            assert inflater.avail_in == 0
    finally:
        zran.backend.cache_clear()
