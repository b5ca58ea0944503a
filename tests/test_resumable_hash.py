"""The resumable sha256 matches hashlib, and a saved state resumes in another process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prewarm.errors import StoreError
from prewarm.store.resumable_hash import ResumableSha256


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(0, 2))
def test_chunks_hash_like_hashlib(chunks: list[bytes], offset: int) -> None:
    # Given arbitrary chunks, some passed as bytearray, memoryview or a view into a larger bytes, with an offset
    h = ResumableSha256()
    expected = hashlib.sha256()
    for i, chunk in enumerate(chunks):
        kind = i % 4
        data: bytes | bytearray | memoryview = (chunk, bytearray(chunk), memoryview(chunk),
                                                memoryview(b"pad" + chunk)[3:])[kind]
        # When each is hashed from the offset on, the state frozen and thawed in between
        h.update(data, offset)
        expected.update(chunk[offset:])
        h = ResumableSha256.from_state(h.state())
    # Then the digest and length are hashlib's
    assert h.hexdigest() == expected.hexdigest()
    assert h.length == sum(len(c[offset:]) for c in chunks)


def test_digest_leaves_state_running() -> None:
    h = ResumableSha256()
    h.update(b"abc")
    assert h.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    h.update(b"def")
    assert h.hexdigest() == hashlib.sha256(b"abcdef").hexdigest()


def test_state_resumes_in_another_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Given a state saved after 1 MB + 7 bytes (not a block multiple)
    first = os.urandom(1 << 20) + b"1234567"
    second = os.urandom(100_000)
    h = ResumableSha256()
    h.update(first)
    (tmp_path / "state").write_bytes(h.state())
    (tmp_path / "second").write_bytes(second)
    # When another interpreter resumes it and hashes the rest
    code = ("import sys, pathlib; from prewarm.store.resumable_hash import ResumableSha256 as R; "
            "p = pathlib.Path(sys.argv[1]); h = R.from_state((p / 'state').read_bytes()); "
            "h.update((p / 'second').read_bytes()); print(h.hexdigest())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True,
                         text=True).stdout.strip()
    # Then it is the digest of everything
    assert out == hashlib.sha256(first + second).hexdigest()


def test_garbage_state_is_a_clear_error() -> None:
    with pytest.raises(StoreError, match="not a saved sha256 state"):
        ResumableSha256.from_state(b"junk")
