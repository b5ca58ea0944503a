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

Issue 16 adds the shape real AI images mostly have: one huge gzip layer.  The
*single-layer twin* of an image holds the same files as its layers merged (a path in a
later layer replaces the same path in an earlier one, as overlay does; a directory keeps
its first position and takes its last metadata), in one gzip level-6 layer, cached
beside the original (``ai-image-1layer``).  ``--small`` builds a small 3-layer image
from a few standard-library packages (and its twin), for checking the benchmark itself
in seconds.

Command line (by hand)::

    .venv/bin/python -m bench.images --cache /var/tmp/prewarm-bench [--small] [--push HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from prewarm.errors import ConfigError
from prewarm.imagebuild import (
    DirLayer,
    Layer,
    TarEntry,
    blob_path,
    build_image,
    push_layout,
    read_blob,
    tagged_descriptor,
)

TORCH_REQUIREMENT = "torch==2.13.0"
TAG = "latest"
REPOSITORY = "bench/ai"
LAYOUT_NAME = "ai-image"
SMALL_LAYOUT_NAME = "ai-image-small"
#: Appended to a layout's name for its single-layer twin.
SINGLE_SUFFIX = "-1layer"
#: The image config of every bench image.
CONFIG = {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["python3"]}
#: Standard-library packages making up the small image's three layers.
SMALL_PACKAGES = ("email", "json", "asyncio")
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


def build_cached(layout: Path, layers: Iterator[Layer] | list[Layer]) -> Path:
    """Build ``layers`` into ``layout`` unless a complete build is there; a half-built one is redone."""
    if (layout / "complete").is_file():
        return layout
    building = layout.with_name(layout.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    t0 = time.monotonic()
    image = build_image(building, list(layers), tag=TAG, config=CONFIG)
    (building / "complete").write_text(image.manifest_digest + "\n")
    shutil.rmtree(layout, ignore_errors=True)
    building.rename(layout)
    print(f"built {layout} in {time.monotonic() - t0:.0f} s: "
          + ", ".join(f"{b.uncompressed_size / 1e6:.0f} MB -> {b.size / 1e6:.0f} MB" for b in image.layers),
          flush=True)
    return layout


def build_ai_image(cache: Path) -> Path:
    """Build (or reuse) the benchmark image; returns its OCI layout directory (tag ``latest``).

    Raises:
        ConfigError: torch could not be installed.
    """
    cache.mkdir(parents=True, exist_ok=True)
    layout = cache / LAYOUT_NAME
    if (layout / "complete").is_file():
        return layout
    return build_cached(layout, ai_layers(install_torch(cache)))


def small_layers() -> list[Layer]:
    """Three small layers (a few standard-library packages each): the benchmark's self-check image."""
    lib = Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["stdlib"])
    return [Layer(DirLayer(lib / name, prefix=f"usr/local/lib/{_pyver()}/{name}"), "gzip", level=6,
                  created_by=f"COPY {name}") for name in SMALL_PACKAGES]


def build_small_image(cache: Path) -> Path:
    """Build (or reuse) the small 3-layer image (seconds, not minutes); returns its layout."""
    cache.mkdir(parents=True, exist_ok=True)
    return build_cached(cache / SMALL_LAYOUT_NAME, small_layers())


def _layer_members(layout: Path, digest: str) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    from isal import igzip

    with igzip.open(blob_path(layout, digest)) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            yield member, tar


def _as_entry(member: tarfile.TarInfo, tar: tarfile.TarFile) -> TarEntry:
    kinds = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
             tarfile.LNKTYPE: "hardlink", tarfile.FIFOTYPE: "fifo", tarfile.CHRTYPE: "chardev",
             tarfile.BLKTYPE: "blockdev"}
    if member.type not in kinds:
        raise ConfigError(f"{member.name}: tar type {member.type!r} cannot go into the single-layer twin")
    data = b""
    if member.isreg():
        f = tar.extractfile(member)
        assert f is not None
        data = f.read()
    xattrs = {k.removeprefix("SCHILY.xattr."): v.encode("utf-8")
              for k, v in member.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    return TarEntry(member.name, kinds[member.type], data, mode=member.mode, uid=member.uid, gid=member.gid,  # type: ignore[arg-type]
                    uname=member.uname, gname=member.gname, linkname=member.linkname,
                    devmajor=member.devmajor, devminor=member.devminor, xattrs=xattrs, mtime=int(member.mtime))


def merged_entries(layout: Path) -> Iterator[TarEntry]:
    """The files of ``layout``'s layers as one layer: what overlay shows when they are stacked.

    Two passes over the layers: the first notes where each path last occurs, the second
    writes each non-directory from its last layer only, and each directory at its first
    position (so its children follow it) with the metadata of its last occurrence.

    Raises:
        ConfigError: a layer holds a whiteout, or a hardlink whose target a later layer
            replaces (neither can be merged into one tar by this simple rule).
    """
    digests = [d for d, _, _ in layer_list(layout)]
    last: dict[str, tuple[int, tarfile.TarInfo]] = {}
    for i, digest in enumerate(digests):
        for member, _ in _layer_members(layout, digest):
            base = member.name.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith(".wh."):
                raise ConfigError(f"layer {i} of {layout} has the whiteout {member.name}; "
                                  "the single-layer twin merges only layers without whiteouts")
            last[member.name.rstrip("/")] = (i, member)
    written: set[str] = set()
    for i, digest in enumerate(digests):
        for member, tar in _layer_members(layout, digest):
            name = member.name.rstrip("/")
            owner, final = last[name]
            if member.isdir():
                if name in written:
                    continue
                written.add(name)
                yield _as_entry(final, tar) if final.isdir() and owner != i else _as_entry(member, tar)
                continue
            if owner != i:
                continue
            if member.islnk() and last.get(member.linkname.rstrip("/"), (i,))[0] != i:
                raise ConfigError(f"layer {i} of {layout}: hardlink {member.name} -> {member.linkname}, "
                                  "whose target a later layer replaces")
            written.add(name)
            yield _as_entry(member, tar)


def build_single_layer(source: Path) -> Path:
    """Build (or reuse) the single-layer twin of the image at ``source``, beside it.

    Returns:
        The twin's layout: ``<source>-1layer``, tag ``latest``.

    Raises:
        ConfigError: see :func:`merged_entries`.
    """
    return build_cached(source.with_name(source.name + SINGLE_SUFFIX),
                         [Layer(merged_entries(source), "gzip", level=6,  # type: ignore[arg-type]
                                created_by=f"COPY {source.name} (all layers as one)")])


def layer_list(layout: Path) -> list[tuple[str, int, str]]:
    """(digest, compressed size, media type) of each layer of the cached image, base first."""
    manifest = json.loads(read_blob(layout, str(tagged_descriptor(layout, TAG)["digest"])))
    return [(d["digest"], int(d["size"]), d["mediaType"]) for d in manifest["layers"]]


def push_ai_image(layout: Path, registry: object,
                  repository: str = REPOSITORY) -> tuple[str, list[tuple[str, int, str]]]:
    """Push the image to a plain-HTTP registry with the project's client.

    Args:
        layout: what :func:`build_ai_image` returned.
        registry: ``host:port``, or an object with a ``host`` attribute (tests.services.Registry).
        repository: where to push it (the same image under two names keeps one without a
            SOCI index while the other gets one).

    Returns:
        (reference ``host:port/<repository>:latest``, the layers as in :func:`layer_list`).
    """
    from prewarm.resolve.registry.client import RegistryClient

    host = str(getattr(registry, "host", registry))
    client = RegistryClient(insecure_registries=frozenset({host}))
    try:
        push_layout(client, layout, host, repository, TAG)
    finally:
        client.close()
    return f"{host}/{repository}:{TAG}", layer_list(layout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path("/var/tmp/prewarm-bench"))
    ap.add_argument("--small", action="store_true", help="the small self-check image instead of the AI one")
    ap.add_argument("--push", metavar="HOST:PORT", help="push to this plain-HTTP registry")
    args = ap.parse_args()
    layout = build_small_image(args.cache) if args.small else build_ai_image(args.cache)
    single = build_single_layer(layout)
    for lay in (layout, single):
        layers = layer_list(lay)
        print(f"{lay}: {len(layers)} layer(s), {sum(s for _, s, _ in layers) / 1e6:.0f} MB compressed")
        if args.push:
            ref, _ = push_ai_image(lay, args.push, f"bench/{lay.name}")
            print(f"pushed {ref}")


if __name__ == "__main__":
    main()
