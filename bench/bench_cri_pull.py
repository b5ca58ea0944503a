"""CRI PullImage of a pre-warmed image versus a plain overlayfs pull (issue 5, closing note).

Run by hand, as root, from the repository root::

    .venv/bin/python -m bench.bench_cri_pull [--layers 4] [--layer-mb 48]

It starts a private registry, pushes a synthetic image (a shell layer plus ``--layers``
layers of ``--layer-mb`` MB of half-random, half-text files, gzip), and measures with the
CRI ImageService client the kubelet's path, each in a fresh containerd with CRI:

  plain     CRI snapshotter overlayfs: PullImage downloads and unpacks every layer
  prewarm   ``prewarm schedule IMAGE --wait --containerd SOCK --namespace k8s.io`` first
            (timed separately), then PullImage on the prewarm snapshotter

Reported per case: PullImage wall time and the registry's layer-blob egress during the pull,
from the registry's own log.  One run each; machines are noisy, read the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def build_image(name: str, layers: int, layer_mb: int):  # type: ignore[no-untyped-def]
    from tests.containerd import make_image, make_layer, shell_files
    from tests.images import mixed_bytes

    built = [make_layer({**shell_files(), "etc/hello": b"hello\n"})]
    for i in range(layers):
        files = {f"opt/model{i}/shard{j}.bin": mixed_bytes(8 << 20, seed=100 * i + j)
                 for j in range(max(1, layer_mb // 8))}
        built.append(make_layer(files))
    return make_image(name, built)


def layer_bytes(registry, image) -> int:  # type: ignore[no-untyped-def]
    return sum(registry.bytes_served(f"/blobs/{l.digest}") for l in image.layers)


def cri_pull(ctrd, ref: str) -> float:  # type: ignore[no-untyped-def]
    from prewarm.runtime.shim._proto.runtime.v1 import api_pb2 as cri
    from tests.containerd import cri_images

    started = time.perf_counter()
    cri_images(ctrd).PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref)), timeout=1800)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--layer-mb", type=int, default=48)
    args = parser.parse_args()

    from tests.containerd import push_image, run_containerd
    from tests.pipeline_helpers import clean_env, prewarm
    from tests.services import run_registry

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cri-") as tmp_s, run_registry(Path(tmp_s) / "registry") as reg:
        tmp = Path(tmp_s)
        image = build_image("bench/cri", args.layers, args.layer_mb)
        ref = push_image(reg.url, "bench/cri", "v1", image)
        size = sum(len(l.blob) for l in image.layers)
        print(f"image {ref}: {len(image.layers)} layers, {size / 1e6:.1f} MB compressed", file=sys.stderr)
        hosts = {reg.host: reg.url}

        with run_containerd(tmp / "plain-store", cri=True, registry_hosts=hosts, cri_snapshotter="overlayfs") as c:
            before = layer_bytes(reg, image)
            seconds = cri_pull(c, ref)
            results["plain"] = {"pull_seconds": seconds, "layer_bytes": layer_bytes(reg, image) - before}

        with run_containerd(tmp / "store", cri=True, registry_hosts=hosts) as c:
            env = clean_env(c.store)
            before = layer_bytes(reg, image)
            started = time.perf_counter()
            prewarm("schedule", ref, "--wait", "--quiet", "--insecure-registry", reg.host, "--containerd",
                    str(c.address), "--namespace", "k8s.io", env=env, check=True, timeout=1800)
            warm_seconds = time.perf_counter() - started
            warm_bytes = layer_bytes(reg, image) - before
            before = layer_bytes(reg, image)
            seconds = cri_pull(c, ref)
            results["prewarm"] = {"pull_seconds": seconds, "layer_bytes": layer_bytes(reg, image) - before,
                                  "prewarm_schedule_seconds": warm_seconds, "prewarm_layer_bytes": warm_bytes}
            run = c.ctr("run", "--rm", "--snapshotter", "prewarm", ref, "bench-1", "/bin/sh", "-c",
                        "while read l; do echo $l; done < /etc/hello", namespace="k8s.io").stdout.strip()
            results["prewarm"]["container_ran"] = float(run == "hello")

    print(json.dumps({"image_compressed_bytes": size, **results}, indent=1))
    print(f"\n{'case':<8} {'PullImage s':>12} {'layer bytes from registry':>27}")
    for case, r in results.items():
        print(f"{case:<8} {r['pull_seconds']:>12.3f} {int(r['layer_bytes']):>27}")


if __name__ == "__main__":
    main()
