"""Helpers for the pipeline tests: push a test image, run ``prewarm`` as users do, read the result."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prewarm.imagebuild import BuiltImage, push_layout
from prewarm.resolve.registry.client import RegistryClient
from tests.rootfs import overlay_mount, umoci_unpack
from tests.services import Registry
from tests.treecompare import compare_trees

REPO_ROOT = Path(__file__).resolve().parents[1]


def push(image: BuiltImage, registry: Registry, repository: str) -> str:
    """Push with the project's own client; returns ``host/repo:tag``."""
    client = RegistryClient(insecure_registries=frozenset({registry.host}))
    assert image.tag
    push_layout(client, image.layout, registry.host, repository, image.tag)
    return f"{registry.host}/{repository}:{image.tag}"


def clean_env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREWARM_")}
    env.update({"PREWARM_ROOT": str(root), **extra})
    return env


def prewarm(*args: str, env: dict[str, str], timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "prewarm", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"prewarm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def lowerdirs(ref: str, env: dict[str, str]) -> list[str]:
    out = prewarm("mounts", ref, "/target", env=env, check=True).stdout.strip()
    if "lowerdir=" in out:
        return out.split("lowerdir=", 1)[1].split()[0].split(":")
    return [out.split()[3]]


def assert_matches_umoci(image: BuiltImage, ref: str, env: dict[str, str], tmp: Path) -> None:
    """The pre-warmed layers, overlay-mounted newest first, equal ``umoci unpack``'s rootfs."""
    assert image.tag
    expected = umoci_unpack(image.layout, image.tag, tmp / "umoci")
    with overlay_mount(lowerdirs(ref, env), tmp / "merged") as merged:
        diffs = compare_trees(expected, merged)
    assert diffs == [], "\n".join(diffs[:40])


@dataclasses.dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes, as a crash or the OOM killer would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def start_worker(env: dict[str, str], log: Path, *extra: str, registered: bool = True) -> Worker:
    """Start ``prewarm worker``; by default wait until its node is registered in Redis.

    A schedule names only registered nodes, so a test that schedules right after starting
    a worker waits for it here (unless the worker exits first: a test of a refused start).
    """
    with open(log, "ab") as f:  # the worker has its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "prewarm", "worker", *extra], env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT)
    broker, node = env.get("PREWARM_BROKER_URL"), env.get("PREWARM_NODE_NAME")
    if registered and broker and node:
        import redis

        r = redis.Redis.from_url(broker)
        deadline = time.monotonic() + 60
        while proc.poll() is None and not r.exists(f"prewarm:node:{node}"):
            if time.monotonic() > deadline:
                raise AssertionError(f"worker of node {node} did not register in 60s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        r.close()
    return Worker(proc, log)


def register_node(env: dict[str, str]) -> None:
    """Register the env's node in Redis as its worker would (same identity), before the worker starts.

    A schedule names only registered nodes; a test that queues a job before starting the
    node's worker (the worker then finds the messages waiting) registers the node first.
    """
    import redis

    from prewarm.fleet.nodes import heartbeat

    r = redis.Redis.from_url(env["PREWARM_BROKER_URL"])
    heartbeat(r, env["PREWARM_NODE_NAME"], labels={}, root=Path(env["PREWARM_ROOT"]), layers=frozenset())
    r.close()


def wait_job(job: str, env: dict[str, str], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = prewarm("status", job, "--json", env=env, check=True).stdout
        status = json.loads(out)
        if status["state"] in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"job {job} did not finish in {timeout}s: {out}")
