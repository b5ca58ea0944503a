"""A zTOC fetched from the registry goes to the node cache as it streams, verified, bounded.

Against the real docker-registry: a layer of a million files has a zTOC of ~220 MB, and
reading it whole was that much more peak memory in the ``schedule`` CLI.
"""

from __future__ import annotations

import gzip
import io
import os
import tracemalloc
from pathlib import Path

import pytest

from prewarm.errors import BadZtoc
from prewarm.imagebuild import TarEntry, write_layer_tar
from prewarm.index.ztoc import serialize_ztoc
from prewarm.index.ztoc_build import build_ztoc
from prewarm.resolve.registry.client import RegistryClient
from prewarm.store import ztoc_cache
from prewarm.store.layout import Layout
from prewarm.store.ztoc_cache import ZtocCache
from tests.services import Registry

REPO = "ztoc/fetch"


def _client(registry: Registry) -> RegistryClient:
    return RegistryClient(insecure_registries=frozenset({registry.host}))


def _ztoc_bytes() -> bytes:
    tar = io.BytesIO()
    write_layer_tar([TarEntry(f"dir/file-{i}", data=b"x" * i) for i in range(50)], tar)
    return serialize_ztoc(build_ztoc([gzip.compress(tar.getvalue())], span_size=1 << 16,
                                     build_tool_identifier="prewarm-test"))


def _cache_files(cache: ZtocCache, digest: str) -> list[str]:
    return sorted(os.listdir(cache.path(digest).parent))


def test_a_ztoc_from_the_registry_is_cached_byte_for_byte_and_parsed(registry: Registry, tmp_path: Path) -> None:
    client = _client(registry)
    data = _ztoc_bytes()
    digest = client.push_blob(registry.host, REPO, data)
    cache = ZtocCache(Layout(tmp_path / "store"))
    z = cache.get(digest, client, registry.host, REPO)
    assert cache.path(digest).read_bytes() == data
    assert [e.name for e in z.files][:2] == ["dir/file-0", "dir/file-1"]
    assert _cache_files(cache, digest) == [cache.path(digest).name]  # no temporary file left


def test_a_ztoc_is_fetched_in_memory_that_does_not_grow_with_its_size(registry: Registry, tmp_path: Path) -> None:
    client = _client(registry)
    blob = os.urandom(48 << 20)  # (not a zTOC: what counts here is the fetch, before the parse)
    digest = client.push_blob(registry.host, REPO, blob)
    del blob
    cache = ZtocCache(Layout(tmp_path / "store"))
    tracemalloc.start()
    try:
        with pytest.raises(BadZtoc):
            cache.get(digest, client, registry.host, REPO)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cache.has(digest)  # stored verified; only the parse refused it
    assert peak < 8 << 20, f"fetching a 48 MiB zTOC peaked at {peak / 2**20:.1f} MiB of Python memory"


def test_a_ztoc_over_the_limit_is_refused_and_nothing_is_kept(registry: Registry, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(registry)
    data = _ztoc_bytes()
    digest = client.push_blob(registry.host, REPO, data)
    monkeypatch.setattr(ztoc_cache, "MAX_ZTOC_BYTES", len(data) - 1)
    cache = ZtocCache(Layout(tmp_path / "store"))
    with pytest.raises(BadZtoc, match=f"zTOC {digest} from {registry.host}/{REPO} is more than"):
        cache.get(digest, client, registry.host, REPO)
    assert not cache.has(digest)
    assert _cache_files(cache, digest) == []


def test_a_ztoc_the_registry_serves_altered_is_refused_and_nothing_is_kept(registry: Registry, tmp_path: Path) -> None:
    """The cache trusts the stream's own digest check (it hashes the bytes once): a registry
    whose stored blob was altered on its disk, size kept, gets nothing into the cache."""
    from prewarm.errors import DigestMismatch

    client = _client(registry)
    data = _ztoc_bytes()
    digest = client.push_blob(registry.host, REPO, data)
    hex_ = digest.split(":")[1]
    stored = registry.dir / "store" / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"
    altered = bytearray(stored.read_bytes())
    altered[len(altered) // 2] ^= 0xFF
    stored.write_bytes(bytes(altered))
    cache = ZtocCache(Layout(tmp_path / "store"))
    with pytest.raises(DigestMismatch, match=digest):
        cache.get(digest, client, registry.host, REPO)
    assert not cache.has(digest)
    assert _cache_files(cache, digest) == []


def test_putting_a_cached_ztoc_again_writes_nothing_and_still_refuses_other_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prewarm.errors import DigestMismatch

    data = _ztoc_bytes()
    cache = ZtocCache(Layout(tmp_path / "store"))
    digest = cache.put(data)

    def no_write(*args: object, **kwargs: object) -> None:
        raise AssertionError("a zTOC already in the cache was written again")

    monkeypatch.setattr(ztoc_cache.tempfile, "mkstemp", no_write)
    assert cache.put(data, digest) == digest
    with pytest.raises(DigestMismatch):
        cache.put(data + b"x", digest)
    assert cache.path(digest).read_bytes() == data
