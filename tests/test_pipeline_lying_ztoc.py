"""A zTOC from the registry is untrusted: one that lies ends the job in an error, never a wrong tree."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from prewarm.index.soci import push_soci_index
from prewarm.index.ztoc import Ztoc, serialize_ztoc
from prewarm.index.ztoc_build import build_ztoc
from prewarm.resolve.reference import parse_reference
from prewarm.resolve.registry.client import RegistryClient
from tests.images import odd_image
from tests.pipeline_helpers import clean_env, prewarm, push
from tests.services import Registry

SPAN = 256 * 1024
WINDOW_AT = 12 + 17  # zinfo header, then in/out/bits of a checkpoint record
RECORD = 32785


def _lie(z: Ztoc, how: str) -> Ztoc:
    blob = bytearray(z.checkpoints_blob)
    files = list(z.files)
    if how == "window":
        # flip bytes in the 32 KiB window of checkpoint 3
        pos = WINDOW_AT + 3 * RECORD + 1000
        blob[pos:pos + 8] = bytes(b ^ 0xFF for b in blob[pos:pos + 8])
    else:
        i = max(range(len(files)), key=lambda k: files[k].uncompressed_size if files[k].type == "reg" else -1)
        if how == "file-offset":
            # move the data of the biggest regular file by one tar block
            files[i] = dataclasses.replace(files[i], uncompressed_offset=files[i].uncompressed_offset + 512)
        else:
            # claim the biggest regular file is one block shorter than it is
            files[i] = dataclasses.replace(files[i], uncompressed_size=files[i].uncompressed_size - 512)
    return Ztoc(version=z.version, build_tool_identifier="liar", compressed_archive_size=z.compressed_archive_size,
                uncompressed_archive_size=z.uncompressed_archive_size, files=files, compression=z.compression,
                span_digests=z.span_digests, checkpoints_blob=bytes(blob))


@pytest.mark.parametrize("how", ["window", "file-offset", "file-size"])
def test_a_lying_ztoc_fails_the_layer_and_never_marks_it_ready(tmp_path: Path, registry: Registry, how: str) -> None:
    # Given an image whose big layer has a SOCI index in the registry that lies
    image = odd_image(tmp_path / "oci")
    ref = push(image, registry, f"lying/{how}")
    client = RegistryClient(insecure_registries=frozenset({registry.host}))
    resolved = client.resolve(parse_reference(ref))
    big = max(image.layers, key=lambda layer: layer.size if layer.compression == "gzip" else 0)
    r = parse_reference(ref)
    with client.stream_blob(r.registry, r.repository, big.digest) as chunks:
        honest = build_ztoc(chunks, span_size=SPAN, build_tool_identifier="liar")
    assert honest.num_spans > 4
    push_soci_index(client, resolved, {big.digest: serialize_ztoc(_lie(honest, how))}, SPAN, "liar")
    env = clean_env(tmp_path / "store")
    # When it is pre-warmed (the registry's index is used)
    proc = prewarm("schedule", ref, "--wait", "--json", "--insecure-registry", registry.host, env=env)
    # Then it fails without a traceback: either the zTOC is refused when it is read (exit 6,
    # before any layer byte is fetched) or the layer fails when its spans meet the real stream
    assert proc.returncode in (6, 8), proc.stderr
    assert "Traceback" not in proc.stderr
    if how == "window":
        assert proc.returncode == 8, proc.stderr
    if proc.returncode == 8:
        summary = json.loads(proc.stdout)
        assert summary["state"] == "failed"
        errors = summary["nodes"][next(iter(summary["nodes"]))]["errors"]
        assert list(errors) == [big.digest]
        reason = errors[big.digest].lower()
        assert ("window" in reason) if how == "window" else ("toc" in reason or "header" in reason), reason
        assert big.digest in proc.stderr
    else:
        assert "ztoc" in proc.stderr.lower()
    # And the layer is not ready, and the image is not offered for mounting
    layer_dir = tmp_path / "store" / "layers" / "sha256" / big.digest.split(":")[1]
    assert not (layer_dir / "ready").exists()
    assert prewarm("mounts", ref, "/x", env=env).returncode != 0
