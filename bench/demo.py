"""The README's main-job demo: build an image from real files, push it, pre-warm it.

Run from the repository root (``bash scripts/bootstrap demo`` does, after installing
what is missing)::

    .venv/bin/python -m bench.demo [--workdir DIR] [--no-verify]

What it does, all on this machine and cleaned up afterwards:

1. builds a three-layer OCI image from files already here: Debian's Python standard
   library, and this virtualenv's ``site-packages`` split in two (a few hundred MB);
2. starts a private docker-registry on a free loopback port (stopped by PID at the end)
   and pushes the image with prewarm's own registry client;
3. runs ``prewarm schedule IMAGE --wait`` with a private content store: with no broker
   configured, prewarm starts its own Redis and workers, shows a progress bar, and
   stops them again;
4. as root, overlay-mounts the pre-warmed layers the way ``prewarm mounts`` prints and
   compares the tree with ``umoci unpack`` of the same image;
5. prints a short summary.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from prewarm.imagebuild import BuiltImage, DirLayer, Layer, build_image, push_layout

REPOSITORY = "demo/python-packages"
TAG = "v1"


def demo_layers() -> list[Layer]:
    """Debian's Python stdlib, then this venv's site-packages in two halves by name."""
    site = Path(sysconfig.get_paths()["purelib"])
    names = sorted(n for n in os.listdir(site) if not n.startswith("__editable__") and n != "__pycache__")
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    pyver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    in_image = f"usr/local/lib/{pyver}/site-packages"
    stdlib = Path(f"/usr/lib/{pyver}")
    if not stdlib.is_dir():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [
        Layer(DirLayer(stdlib, prefix=f"usr/lib/{pyver}", exclude=("test", "site-packages", "dist-packages")),
              "gzip", created_by=f"COPY {stdlib}  # Python standard library"),
        Layer(DirLayer(site, prefix=in_image, exclude=(*second, "__pycache__")), "gzip",
              created_by=f"RUN pip install {first[0]} .. {first[-1]}"),
        Layer(DirLayer(site, prefix=in_image, exclude=(*first, "__pycache__")), "gzip",
              created_by=f"RUN pip install {second[0]} .. {second[-1]}"),
    ]


def _have_schedule() -> bool:
    proc = subprocess.run([sys.executable, "-m", "prewarm", "schedule", "--help"],
                          capture_output=True, check=False)
    return proc.returncode == 0


def _verify(layout: Path, ref: str, store: Path, work: Path) -> str:
    """Overlay-mount the pre-warmed layers and compare with umoci's unpack of the image."""
    from tests.rootfs import overlay_mount, umoci_unpack
    from tests.treecompare import compare_trees

    out = subprocess.run([sys.executable, "-m", "prewarm", "mounts", ref, str(work / "merged"),
                          "--root", str(store)], capture_output=True, text=True, check=False)
    if out.returncode != 0 or "lowerdir=" not in out.stdout:
        return f"could not get the mount from `prewarm mounts`: {(out.stderr or out.stdout).strip()}"
    print(f"\n$ prewarm mounts {ref}\n{out.stdout.strip()}")
    lowers = out.stdout.split("lowerdir=", 1)[1].split()[0].split(",")[0].split(":")
    rootfs = umoci_unpack(layout, TAG, work / "umoci")
    with overlay_mount(lowers, work / "merged") as merged:
        diffs = compare_trees(rootfs, merged)
    if diffs:
        return f"DIFFERS from umoci unpack in {len(diffs)} places, e.g. {'; '.join(diffs[:3])}"
    return "identical to `umoci unpack` (content, modes, owners, links, xattrs)"


def run(work: Path, verify: bool, layers: list[Layer] | None = None) -> int:
    """Build, push, pre-warm and check; returns the exit status for the shell.

    Args:
        work: an empty directory for the layout, the registry and the content store.
        verify: compare the overlay-mounted result with ``umoci unpack`` (root only).
        layers: the image's layers; :func:`demo_layers` when None (tests pass small ones).
    """
    from prewarm.resolve.registry.client import RegistryClient
    from tests.services import run_registry

    print("building the demo image from this machine's Python files ...", flush=True)
    t0 = time.monotonic()
    image: BuiltImage = build_image(work / "layout", layers if layers is not None else demo_layers(), tag=TAG)
    t_build = time.monotonic() - t0
    usize = sum(layer.uncompressed_size for layer in image.layers)
    csize = sum(layer.size for layer in image.layers)
    print(f"  {len(image.layers)} layers, {usize / 1e6:.0f} MB as tar, {csize / 1e6:.0f} MB gzip, "
          f"built in {t_build:.1f} s", flush=True)

    with run_registry(work / "registry") as reg:
        ref = f"{reg.host}/{REPOSITORY}:{TAG}"
        print(f"pushing to a private registry at {reg.host} (pid {reg.proc.pid}) ...", flush=True)
        client = RegistryClient(insecure_registries=frozenset({reg.host}))
        t0 = time.monotonic()
        try:
            digest = push_layout(client, image.layout, reg.host, REPOSITORY, TAG)
        finally:
            client.close()
        t_push = time.monotonic() - t0
        print(f"  pushed {ref}@{digest} in {t_push:.1f} s", flush=True)

        if not _have_schedule():
            print("\n`prewarm schedule` is not available in this checkout; pre-warming comes with the "
                  "span pipeline. The image above is what it would pre-warm.")
            return 0

        store = work / "store"
        env = {k: v for k, v in os.environ.items() if k != "PREWARM_BROKER_URL"}
        env["PREWARM_ROOT"] = str(store)
        cmd = [sys.executable, "-m", "prewarm", "schedule", ref, "--wait", "--insecure-registry", reg.host]
        print(f"\n$ PREWARM_ROOT={store} prewarm schedule {ref} --wait --insecure-registry {reg.host}",
              flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(cmd, env=env, check=False).returncode
        t_warm = time.monotonic() - t0
        fetched = reg.bytes_served("/blobs/")

        if rc != 0:
            verdict = "not checked: the pre-warm failed (its message is above)"
        elif not verify:
            verdict = "not checked (--no-verify)"
        elif os.geteuid() != 0:
            verdict = "not checked (needs root for umoci and mount)"
        else:
            verdict = _verify(image.layout, ref, store, work)

    print("\nsummary")
    print(f"  image      {ref}  ({len(image.layers)} layers, {usize / 1e6:.0f} MB, {csize / 1e6:.0f} MB compressed)")
    print(f"  build      {t_build:6.1f} s")
    print(f"  push       {t_push:6.1f} s")
    print(f"  pre-warm   {t_warm:6.1f} s  exit {rc}  ({csize / 1e6 / max(t_warm, 1e-6):.0f} MB/s of compressed "
          f"layers; the registry served {fetched / 1e6:.0f} MB of blob bytes)")
    print(f"  rootfs     {verdict}")
    return rc if rc != 0 else (1 if verdict.startswith(("DIFFERS", "could not")) else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="keep everything here instead of a temporary directory")
    ap.add_argument("--no-verify", action="store_true", help="skip the overlay-vs-umoci comparison")
    args = ap.parse_args()
    if args.workdir:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            sys.exit(f"--workdir {args.workdir} is not empty; give an empty or new directory")
        args.workdir.mkdir(parents=True, exist_ok=True)
        sys.exit(run(args.workdir, not args.no_verify))
    work = Path(tempfile.mkdtemp(prefix="prewarm-demo-", dir="/var/tmp"))
    try:
        rc = run(work, not args.no_verify)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
