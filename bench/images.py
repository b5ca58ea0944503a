"""The AI-style benchmark image: a Python runtime, many installed packages, PyTorch (CPU).

Issue 4 measures prewarm against the classic pull paths on an image shaped like the
ones people actually pre-warm: one big layer of framework binaries over a layer of
thousands of small Python files over a runtime.  Built from real files on this machine:

- layer 0, runtime: this interpreter's installation (``sys.base_prefix``) without its
  ``site-packages`` and its ``test`` suite, under ``/usr/local``;
- layer 1, packages: that interpreter's ``site-packages`` (tens of thousands of files);
- layer 2, PyTorch: ``pip install torch==2.13.0 --target DIR`` (the CPU wheel that lies
  on this disk, and its dependencies), under ``/usr/local/lib/pythonX.Y/site-packages``.

All layers are gzip level 6, one member: what ``docker build`` writes.  Building takes
minutes of one core, so the finished layout is cached under the caller's directory and
reused (a ``complete`` marker is written last; a half-built layout is never reused).

Command line (by hand)::

    .venv/bin/python -m bench.images --cache /var/tmp/prewarm-bench [--push HOST:PORT]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from prewarm.errors import ConfigError
from prewarm.imagebuild import (
    DirLayer,
    Layer,
    build_image,
    push_layout,
    read_blob,
    tagged_descriptor,
)

TORCH_REQUIREMENT = "torch==2.13.0"
TAG = "latest"
REPOSITORY = "bench/ai"
LAYOUT_NAME = "ai-image"
TORCH_DIR_NAME = "torch-target"


def _pyver() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


def install_torch(cache: Path) -> Path:
    """``pip install torch --target`` into ``cache``, once; later calls reuse the directory.

    Raises:
        ConfigError: pip failed (its output is in ``cache/pip.log``).
    """
    target = cache / TORCH_DIR_NAME
    if target.is_dir():
        return target
    partial = cache / (TORCH_DIR_NAME + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log = cache / "pip.log"
    with open(log, "wb") as out:
        rc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
                             "--disable-pip-version-check", TORCH_REQUIREMENT, "--target", str(partial)],
                            stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        raise ConfigError(f"pip install {TORCH_REQUIREMENT} --target {partial} failed (exit {rc}); see {log}")
    partial.rename(target)
    return target


def ai_layers(torch_dir: Path) -> list[Layer]:
    """The three layers, from the running interpreter's files and the torch directory."""
    base = Path(sys.base_prefix)
    base_site = Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"])
    site_rel = base_site.relative_to(base).as_posix()
    lib_rel = f"lib/{_pyver()}"
    site_in_image = f"usr/local/lib/{_pyver()}/site-packages"
    return [
        Layer(DirLayer(base, prefix="usr/local", exclude=(site_rel, f"{lib_rel}/test")), "gzip", level=6,
              created_by=f"COPY {base} /usr/local  # python runtime"),
        Layer(DirLayer(base_site, prefix=site_in_image), "gzip", level=6,
              created_by="RUN pip install -r requirements.txt  # many packages"),
        Layer(DirLayer(torch_dir, prefix=site_in_image), "gzip", level=6,
              created_by=f"RUN pip install {TORCH_REQUIREMENT}  # PyTorch CPU"),
    ]


def build_ai_image(cache: Path) -> Path:
    """Build (or reuse) the benchmark image; returns its OCI layout directory (tag ``latest``).

    Raises:
        ConfigError: torch could not be installed.
    """
    cache.mkdir(parents=True, exist_ok=True)
    layout = cache / LAYOUT_NAME
    if (layout / "complete").is_file():
        return layout
    torch_dir = install_torch(cache)
    building = cache / (LAYOUT_NAME + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    t0 = time.monotonic()
    image = build_image(building, ai_layers(torch_dir), tag=TAG,
                        config={"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["python3"]})
    (building / "complete").write_text(image.manifest_digest + "\n")
    shutil.rmtree(layout, ignore_errors=True)
    building.rename(layout)
    print(f"built {layout} in {time.monotonic() - t0:.0f} s: "
          + ", ".join(f"{b.uncompressed_size / 1e6:.0f} MB -> {b.size / 1e6:.0f} MB" for b in image.layers),
          flush=True)
    return layout


def layer_list(layout: Path) -> list[tuple[str, int, str]]:
    """(digest, compressed size, media type) of each layer of the cached image, base first."""
    import json

    manifest = json.loads(read_blob(layout, str(tagged_descriptor(layout, TAG)["digest"])))
    return [(d["digest"], int(d["size"]), d["mediaType"]) for d in manifest["layers"]]


def push_ai_image(layout: Path, registry: object) -> tuple[str, list[tuple[str, int, str]]]:
    """Push the image to a plain-HTTP registry with the project's client.

    Args:
        layout: what :func:`build_ai_image` returned.
        registry: ``host:port``, or an object with a ``host`` attribute (tests.services.Registry).

    Returns:
        (reference ``host:port/bench/ai:latest``, the layers as in :func:`layer_list`).
    """
    from prewarm.resolve.registry.client import RegistryClient

    host = str(getattr(registry, "host", registry))
    client = RegistryClient(insecure_registries=frozenset({host}))
    try:
        push_layout(client, layout, host, REPOSITORY, TAG)
    finally:
        client.close()
    return f"{host}/{REPOSITORY}:{TAG}", layer_list(layout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path("/var/tmp/prewarm-bench"))
    ap.add_argument("--push", metavar="HOST:PORT", help="push to this plain-HTTP registry")
    args = ap.parse_args()
    layout = build_ai_image(args.cache)
    layers = layer_list(layout)
    print(f"{layout}: {len(layers)} layers, {sum(s for _, s, _ in layers) / 1e6:.0f} MB compressed")
    if args.push:
        ref, _ = push_ai_image(layout, args.push)
        print(f"pushed {ref}")


if __name__ == "__main__":
    main()
