"""``prewarm index --push`` holds a bound on its memory whatever its zTOC's size (issue 20).

The image here has one gzip layer of ~200,000 small files, whose zTOC is ~32 MB.  A
fresh process runs ``prewarm index IMAGE --push`` against a real registry: it streams the
layer in, builds the zTOC on disk, uploads it and pushes the SOCI index.  Its peak
resident memory above what it held before (``/proc/self/status``, VmHWM reset first) must
stay a fraction of the zTOC's size: a zTOC or layer held whole, for hashing or as a request
body, would show up as the zTOC's size again.  Measured, not timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prewarm.imagebuild import Layer, build_image, push_layout
from prewarm.resolve.registry.client import RegistryClient
from tests.services import Registry
from tests.test_table_memory import ENTRIES, _tar_entries

#: Bytes of anonymous memory the push may keep per entry of the layer (issue 20's bound).
PER_ENTRY = 150
#: What any push costs whatever the layer: the stream's and the spool's buffers, the
#: interpreter's caches, requests' connection.  A 1M-file push (219 MB zTOC) peaks ~12 MB
#: above what it held once the image was resolved; this one ~8 MB.
FIXED = 16 << 20

_INDEXER = r"""
import contextlib, io, json, sys

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) << 10

from prewarm.cli import main
import prewarm.cli.index, prewarm.index.soci, prewarm.index.ztoc_build, prewarm.index.ztoc_spool  # noqa
import prewarm.resolve.registry.client, requests  # noqa: loaded before the baseline

ref, host = sys.argv[1], sys.argv[2]
open("/proc/self/clear_refs", "w").write("5")  # VmHWM: the peak from here
before, rss = status("RssAnon"), status("VmRSS")
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(["index", ref, "--push", "--min-layer-size", "1", "--insecure-registry", host, "--json"])
    except SystemExit as done:
        if done.code:
            raise
print(json.dumps({"peak": status("VmHWM") - rss, "grew": status("RssAnon") - before,
                  "cli": json.loads(out.getvalue())}))
"""


def test_pushing_the_index_of_a_200k_file_layer_holds_a_fraction_of_its_ztoc(
        registry: Registry, repo_name: str, tmp_path: Path) -> None:
    # Given an image of one gzip layer of ~200,000 small files in a registry
    image = build_image(tmp_path / "layout", [Layer(_tar_entries(), "gzip", level=1)], tag="latest")
    client = RegistryClient(insecure_registries=frozenset({registry.host}), docker_config=tmp_path)
    try:
        push_layout(client, tmp_path / "layout", registry.host, repo_name, "latest")
    finally:
        client.close()
    ref = f"{registry.host}/{repo_name}:latest"
    # When a fresh process indexes it and pushes the zTOC and the SOCI index
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PREWARM_ROOT": str(tmp_path / "root"),
           "TMPDIR": str(tmp_path)}
    env.pop("PREWARM_BROKER_URL", None)
    run = subprocess.run([sys.executable, "-c", _INDEXER, ref, registry.host], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    # Then the index is pushed, with the zTOC of the layer (tens of MB: what the bound is against)
    (layer,) = image.layers
    ztoc = measured["cli"]["ztocs"][layer.digest]
    assert measured["cli"]["soci_index"].startswith("sha256:")
    assert ztoc["size"] > 25 << 20, ztoc
    check = RegistryClient(insecure_registries=frozenset({registry.host}), docker_config=tmp_path)
    try:
        assert check.blob_exists(registry.host, repo_name, ztoc["digest"]) == ztoc["size"]
    finally:
        check.close()
    # and the process's peak grew by at most a quarter of the zTOC's size plus a fixed
    # allowance (a zTOC or a layer read whole would add its own size), its anonymous memory
    # by at most 150 bytes per entry
    assert measured["peak"] <= ztoc["size"] // 4 + FIXED, (measured["peak"], ztoc["size"])
    assert measured["grew"] <= PER_ENTRY * ENTRIES + FIXED, (measured["grew"], ENTRIES)
