"""Content digests (``sha256:<hex>``): parsing, verifying, and a digesting reader.

Every manifest and blob that comes from a registry is checked against the digest that
vouches for it before anything trusts it (containers/image warns callers of the same).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

from prewarm.errors import DigestMismatch

_DIGEST_RE = re.compile(r"^(sha256):([0-9a-f]{64})$|^(sha512):([0-9a-f]{128})$")


def is_digest(value: str) -> bool:
    return bool(_DIGEST_RE.match(value))


def parse_digest(value: str) -> tuple[str, str]:
    """Split ``sha256:<hex>`` into (algorithm, hex).

    Raises:
        ValueError: the string is not a sha256/sha512 digest in canonical form.
    """
    m = _DIGEST_RE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a digest (expected sha256:<64 hex digits>)")
    return (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))


def digest_hex(value: str) -> str:
    return parse_digest(value)[1]


def sha256_digest(data: bytes | bytearray | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def new_hasher(digest: str) -> hashlib._Hash:
    return hashlib.new(parse_digest(digest)[0])


def verify(data: bytes | bytearray | memoryview, expected: str, what: str = "content") -> None:
    """Check ``data`` against ``expected``.

    Raises:
        DigestMismatch: naming ``what`` and both digests.
    """
    algo, want = parse_digest(expected)
    got = hashlib.new(algo, data).hexdigest()
    if got != want:
        raise DigestMismatch(
            f"{what}: expected {expected}, got {algo}:{got}", expected=expected, actual=f"{algo}:{got}"
        )


class DigestingIterator(Iterator[bytes]):
    """Pass chunks through while hashing them; :meth:`verify` once exhausted."""

    def __init__(self, chunks: Iterable[bytes], expected: str, what: str = "blob") -> None:
        self._chunks = iter(chunks)
        self.expected = expected
        self.what = what
        self._hash = new_hasher(expected)
        self.size = 0

    def __next__(self) -> bytes:
        chunk = next(self._chunks)
        self._hash.update(chunk)
        self.size += len(chunk)
        return chunk

    @property
    def actual(self) -> str:
        return f"{self._hash.name}:{self._hash.hexdigest()}"

    def verify(self) -> None:
        if self.actual != self.expected:
            raise DigestMismatch(
                f"{self.what}: expected {self.expected}, got {self.actual} ({self.size} bytes)",
                expected=self.expected, actual=self.actual,
            )
