"""A real containerd for the tests, with the prewarm shim as its ``prewarm`` proxy snapshotter.

:func:`run_containerd` starts Debian's ``containerd`` from a config of its own (root,
state, sockets and the shim's socket under one private folder, metrics off, CRI off
unless asked for), and a ``prewarm snapshotter`` process on a content-store root; both
are stopped by PID.  :class:`Containerd` offers ``ctr(*args)``, the shim's log, and
``kill_shim()``/``start_shim()`` for restart tests.

The second half builds small test images by hand: layer tars, their overlay-format
directories in a content store (``ready`` file + chain records, as the pipeline leaves
them), and an OCI archive without layer blobs for ``ctr images import --no-unpack``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc

from prewarm.runtime.snapshot.prewarmed import register_chains
from prewarm.store.layout import Layout
from tests.services import _require, stop_pid, wait_until

#: containerd's gRPC metadata key for the namespace.
NAMESPACE_KEY = "containerd-namespace"


@dataclasses.dataclass
class Containerd:
    """A running containerd and its prewarm shim.

    ``address`` is containerd's socket, ``shim_address`` the shim's, ``store`` the
    shim's ``--root`` (the content store), ``cri_address`` set when CRI is enabled.
    """

    dir: Path
    address: Path
    shim_address: Path
    store: Path
    proc: subprocess.Popen[bytes]
    shim: subprocess.Popen[bytes] | None = None
    cri: bool = False
    shim_starts: int = 0
    #: containerd answered once: a shim started again must also be reachable through it
    up: bool = False

    @property
    def log(self) -> Path:
        return self.dir / "containerd.log"

    @property
    def shim_log(self) -> Path:
        return self.dir / "shim.log"

    def ctr(self, *args: str, namespace: str = "default", check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address ... -n NAMESPACE ARGS``; raise with its stderr when it fails."""
        cmd = [_require("ctr"), "--address", str(self.address), "-n", namespace, *args]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc

    @contextlib.contextmanager
    def lease(self, namespace: str = "k8s.io") -> Iterator[str]:
        """A containerd lease for the block: what is made under it (``containerd-lease``
        gRPC metadata) is safe from containerd's garbage collector until it ends, as
        containerd's own clients do for every resource they create."""
        lease = f"prewarm-test-{uuid.uuid4().hex[:12]}"
        self.ctr("leases", "create", "--id", lease, namespace=namespace)
        try:
            yield lease
        finally:
            self.ctr("leases", "delete", lease, namespace=namespace, check=False)

    def collect_garbage(self, namespace: str = "k8s.io") -> None:
        """Run containerd's garbage collector now and wait for it to finish.

        Why: containerd schedules its next collection at ~49x the average collection time
        after the last one (``pause_threshold`` 0.02), more than a minute on a loaded machine;
        deleting a lease with ``--sync`` runs a collection at once and waits for it.
        """
        lease = f"prewarm-test-gc-{uuid.uuid4().hex[:12]}"
        self.ctr("leases", "create", "--id", lease, namespace=namespace)
        self.ctr("leases", "delete", "--sync", lease, namespace=namespace)

    def start_shim(self) -> None:
        """Start ``prewarm snapshotter`` on the store; its log is appended to ``shim_log``."""
        prewarm = str(Path(sys.executable).parent / "prewarm")
        with open(self.shim_log, "ab") as log:
            self.shim = subprocess.Popen(
                [prewarm, "snapshotter", "--address", str(self.shim_address), "--root", str(self.store),
                 "--log-level", "debug"], stdout=log, stderr=log)
        self.shim_starts += 1
        wait_until(self.shim_address.exists, timeout=60, what=f"the shim socket {self.shim_address}")
        channel = grpc.insecure_channel(f"unix:{self.shim_address}")
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
        finally:
            channel.close()
        if self.up:
            self.wait_proxy()

    def wait_proxy(self) -> None:
        """Wait until containerd reaches the shim as its proxy snapshotter.

        containerd dials the proxy plugin with gRPC's backoff: a shim that was not there
        yet (or was just restarted) is reached only at the next attempt, and a call before
        that fails UNAVAILABLE.  The tests start asking once a call through it works.
        """
        wait_until(lambda: self.ctr("snapshots", "--snapshotter", "prewarm", "ls", check=False,
                                    timeout=10).returncode == 0,
                   timeout=60, what="containerd to reach the prewarm shim")

    def kill_shim(self) -> None:
        """SIGKILL the shim (no clean shutdown), as a crash would."""
        assert self.shim is not None
        self.shim.kill()
        self.shim.wait(10)
        self.shim = None

    def stop_shim(self) -> None:
        if self.shim is not None:
            stop_pid(self.shim)
            self.shim = None

    def snapshots_channel(self) -> grpc.Channel:
        """A channel to containerd's own socket (its Snapshots service fronts the shim)."""
        return grpc.insecure_channel(f"unix:{self.address}")


def _config(d: Path, shim_address: Path, cri: bool, registry_hosts: Mapping[str, str] | None,
            cri_snapshotter: str = "prewarm") -> str:
    lines = [
        "version = 2",
        f'root = "{d / "root"}"',
        f'state = "{d / "state"}"',
        "[grpc]",
        f'  address = "{d / "containerd.sock"}"',
        "[ttrpc]",
        f'  address = "{d / "containerd.sock.ttrpc"}"',
        "[debug]",
        '  level = "debug"',
        "[metrics]",
        '  address = ""',
        "[proxy_plugins.prewarm]",
        '  type = "snapshot"',
        f'  address = "{shim_address}"',
    ]
    if not cri:
        lines.insert(1, 'disabled_plugins = ["io.containerd.grpc.v1.cri"]')
        return "\n".join(lines) + "\n"
    hosts_dir = d / "certs.d"
    for host, server in (registry_hosts or {}).items():
        (hosts_dir / host).mkdir(parents=True, exist_ok=True)
        (hosts_dir / host / "hosts.toml").write_text(
            f'server = "{server}"\n[host."{server}"]\n  capabilities = ["pull", "resolve"]\n')
    for sub in ("opt", "cni-bin", "cni-conf"):
        (d / sub).mkdir(exist_ok=True)
    lines += [
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{d / "opt"}"',
        '[plugins."io.containerd.grpc.v1.cri"]',
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        '  sandbox_image = "registry.k8s.io/pause:3.6"',
        '  [plugins."io.containerd.grpc.v1.cri".containerd]',
        f'    snapshotter = "{cri_snapshotter}"',
        "    disable_snapshot_annotations = false",
        '  [plugins."io.containerd.grpc.v1.cri".cni]',
        f'    bin_dir = "{d / "cni-bin"}"',
        f'    conf_dir = "{d / "cni-conf"}"',
        '  [plugins."io.containerd.grpc.v1.cri".registry]',
        f'    config_path = "{hosts_dir}"',
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def run_containerd(store: Path, *, cri: bool = False, registry_hosts: Mapping[str, str] | None = None,
                   cri_snapshotter: str = "prewarm") -> Iterator[Containerd]:
    """Start containerd with the shim on ``store``; stop both (and unmount leftovers) after.

    ``registry_hosts`` maps ``HOST:PORT`` to ``http://HOST:PORT`` for plain-HTTP
    registries in CRI's hosts directory; ``cri_snapshotter`` is CRI's snapshotter
    (``overlayfs`` for a baseline without the shim).  Unix socket paths must stay short, so the
    private folder is a fresh directory directly under /tmp.
    """
    d = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
    shim_address = d / "prewarm.sock"
    config = d / "config.toml"
    config.write_text(_config(d, shim_address, cri, registry_hosts, cri_snapshotter))
    log = open(d / "containerd.log", "wb")  # noqa: SIM115 - open for containerd's whole life
    proc = subprocess.Popen([_require("containerd"), "--config", str(config)], stdout=log, stderr=log)
    ctrd = Containerd(dir=d, address=d / "containerd.sock", shim_address=shim_address, store=store,
                      proc=proc, cri=cri)
    try:
        ctrd.start_shim()

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"containerd exited:\n{(d / 'containerd.log').read_text()[-3000:]}")
            return ctrd.ctr("version", check=False, timeout=10).returncode == 0

        wait_until(answers, timeout=60, what="containerd to answer")
        ctrd.up = True
        ctrd.wait_proxy()
        yield ctrd
    finally:
        stop_pid(proc, timeout=20)
        ctrd.stop_shim()
        log.close()
        subprocess.run(["umount", "-R", "-l", str(d / "state")], check=False, capture_output=True)
        subprocess.run(["umount", "-R", "-l", str(d / "root")], check=False, capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


# === test images built by hand

#: A whiteout in a layer spec: the path is deleted by this layer.
WHITEOUT = None


def shell_files() -> dict[str, bytes]:
    """/bin/sh (dash) and the shared libraries it needs, copied from the host.

    A layer with these can run ``sh -c`` builtins in a container without any download.
    """
    files: dict[str, bytes] = {}
    sh = Path(os.path.realpath("/bin/sh"))
    files["bin/sh"] = sh.read_bytes()
    ldd = subprocess.run(["ldd", str(sh)], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            files[path.lstrip("/")] = Path(os.path.realpath(path)).read_bytes()
    return files


@dataclasses.dataclass(frozen=True)
class HandmadeLayer:
    """One layer: its spec (path -> bytes, or WHITEOUT), tar.gz blob and digests."""

    files: Mapping[str, bytes | None]
    blob: bytes
    digest: str
    diff_id: str


def _tar_layer(files: Mapping[str, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for path in sorted(files):
            parent = os.path.dirname(path)
            chain = []
            while parent and parent not in dirs:
                chain.append(parent)
                dirs.add(parent)
                parent = os.path.dirname(parent)
            for d in reversed(chain):
                info = tarfile.TarInfo(d)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
                tar.addfile(info)
            content = files[path]
            if content is None:
                name = os.path.join(os.path.dirname(path), ".wh." + os.path.basename(path))
                info = tarfile.TarInfo(name)
                info.mode, info.mtime = 0o644, 1700000000
                tar.addfile(info, io.BytesIO(b""))
                continue
            info = tarfile.TarInfo(path)
            info.size, info.mtime = len(content), 1700000000
            info.mode = 0o755 if path.startswith(("bin/", "lib", "usr/")) else 0o644
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def make_layer(files: Mapping[str, bytes | None]) -> HandmadeLayer:
    tar = _tar_layer(files)
    blob = gzip.compress(tar, mtime=0)
    return HandmadeLayer(files=dict(files), blob=blob,
                     digest="sha256:" + hashlib.sha256(blob).hexdigest(),
                     diff_id="sha256:" + hashlib.sha256(tar).hexdigest())


def write_layer_fs(fs: Path, files: Mapping[str, bytes | None]) -> None:
    """Write a layer in overlay's diff format: whiteouts as 0/0 character devices."""
    fs.mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        target = fs / path
        target.parent.mkdir(parents=True, exist_ok=True)
        for parent in [target.parent, *target.parent.parents]:
            if parent == fs or fs not in parent.parents:
                break
            os.chmod(parent, 0o755)
        if content is None:
            os.mknod(target, 0o600 | 0o020000, os.makedev(0, 0))
            continue
        target.write_bytes(content)
        os.chmod(target, 0o755 if path.startswith(("bin/", "lib", "usr/")) else 0o644)
    os.chmod(fs, 0o755)


def install_prewarmed(store: Path, layers: list[HandmadeLayer]) -> list[str]:
    """Put ``layers`` in the content store as the pipeline would: fs, ready, chain records.

    Returns the chain IDs, bottom first.
    """
    layout = Layout(store)
    for layer in layers:
        write_layer_fs(layout.layer_fs(layer.digest), layer.files)
        layout.layer_ready(layer.digest).write_text(json.dumps({"digest": layer.digest,
                                                                "diff_id": layer.diff_id}))
    return register_chains(layout, [l.digest for l in layers], [l.diff_id for l in layers])


@dataclasses.dataclass(frozen=True)
class HandmadeImage:
    """An image of hand-made layers: config and manifest blobs with their digests."""

    name: str
    layers: list[HandmadeLayer]
    config: bytes
    manifest: bytes

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def config_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.config).hexdigest()


def make_image(name: str, layers: list[HandmadeLayer]) -> HandmadeImage:
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l.digest,
                    "size": len(l.blob)} for l in layers],
    }, sort_keys=True).encode()
    return HandmadeImage(name=name, layers=layers, config=config, manifest=manifest)


def oci_archive(image: HandmadeImage, path: Path, *, with_layers: bool) -> Path:
    """An OCI image-layout tar of ``image``; without layer blobs when ``with_layers`` is False."""
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": image.manifest_digest, "size": len(image.manifest),
                       "annotations": {"io.containerd.image.name": image.name,
                                       "org.opencontainers.image.ref.name": image.name.rsplit(":", 1)[-1]}}],
    }).encode()
    blobs = {image.manifest_digest: image.manifest, image.config_digest: image.config}
    if with_layers:
        blobs.update({l.digest: l.blob for l in image.layers})
    with tarfile.open(path, "w") as tar:
        entries = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": index}
        entries.update({f"blobs/sha256/{d.split(':', 1)[1]}": b for d, b in blobs.items()})
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def push_image(registry_url: str, repository: str, tag: str, image: HandmadeImage) -> str:
    """Upload ``image`` (blobs, then the manifest) to a registry; returns ``host:port/repo:tag``."""
    import requests

    blobs = [(l.digest, l.blob) for l in image.layers] + [(image.config_digest, image.config)]
    for digest, data in blobs:
        start = requests.post(f"{registry_url}/v2/{repository}/blobs/uploads/", timeout=30)
        start.raise_for_status()
        location = start.headers["Location"]
        if location.startswith("/"):
            location = registry_url + location
        sep = "&" if "?" in location else "?"
        put = requests.put(f"{location}{sep}digest={digest}", data=data, timeout=60,
                           headers={"Content-Type": "application/octet-stream"})
        put.raise_for_status()
    resp = requests.put(f"{registry_url}/v2/{repository}/manifests/{tag}", data=image.manifest, timeout=30,
                        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    resp.raise_for_status()
    return f"{registry_url.split('://', 1)[1]}/{repository}:{tag}"


def cri_pull(images: object, ref: str, *, attempts: int = 3) -> object:
    """CRI PullImage of ``ref``, tried again when containerd could not dial the shim.

    Why: containerd dials the proxy snapshotter's socket lazily and again after a broken
    connection, with gRPC's backoff; once in ~30 loaded runs a pull failed UNAVAILABLE
    with "Error while dialing ... connection refused" although the shim answered before and
    after.  The kubelet tries a failed pull again; so do the tests, for that error alone.
    """
    from prewarm.runtime.shim._proto.runtime.v1 import api_pb2 as cri

    for attempt in range(attempts):
        try:
            return images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref)),  # type: ignore[attr-defined]
                                    timeout=120)
        except grpc.RpcError as err:
            redial = err.code() == grpc.StatusCode.UNAVAILABLE and "Error while dialing" in (err.details() or "")
            if not redial or attempt == attempts - 1:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def cri_images(ctrd: Containerd) -> object:
    """A CRI ``runtime.v1.ImageService`` stub on containerd's socket (the kubelet's view)."""
    from prewarm.runtime.shim._proto.runtime.v1 import api_pb2_grpc

    assert ctrd.cri, "start containerd with cri=True for CRI calls"
    return api_pb2_grpc.ImageServiceStub(grpc.insecure_channel(f"unix:{ctrd.address}"))
