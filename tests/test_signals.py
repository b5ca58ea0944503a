"""Signals end an embedded schedule as Ctrl-C does, and nothing is left behind (issue 19 items 4 and 7).

A real `prewarm schedule` (embedded: private redis-server and workers) is stopped mid-job
with SIGTERM (what a Job's pod gets when it is deleted, and what `timeout` sends) and
SIGHUP, and killed outright with SIGKILL; each time the private Redis, the workers and
the temp folder must go, found by their command lines and the folder, not trusted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.images import odd_image
from tests.pipeline_helpers import REPO_ROOT, clean_env, prewarm, push
from tests.services import Registry


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in raw and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    return pids


def _start(tmp_path: Path, registry: Registry, ref: str) -> tuple[subprocess.Popen[bytes], dict[str, str], Path]:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    env = clean_env(tmp_path / "store", TMPDIR=str(tmpdir), PREWARM_SPAN_SIZE=str(256 * 1024),
                    PREWARM_MIN_LAYER_SIZE=str(1 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "prewarm", "schedule", ref, "--wait", "--quiet",
                             "--insecure-registry", registry.host], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(tmpdir.glob("prewarm-embedded-*/redis.sock")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the embedded cluster did not start"
        time.sleep(0.05)
    return proc, env, tmpdir


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_ends_the_embedded_schedule_like_ctrl_c(tmp_path: Path, registry: Registry,
                                                         sig: signal.Signals) -> None:
    ref = push(odd_image(tmp_path / "oci"), registry, "signals/term")
    proc, env, tmpdir = _start(tmp_path, registry, ref)
    run_dir = next(tmpdir.glob("prewarm-embedded-*"))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    # Then: exit 128 + the signal, one line, and the cluster gone
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert err.decode().strip().splitlines() == [f"prewarm: stopped by {sig.name}"], err
    deadline = time.monotonic() + 20
    while _processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(run_dir)) == []
    assert not run_dir.exists()
    # And the store is consistent: the image is then pre-warmed in full
    again = prewarm("schedule", ref, "--wait", "--json", "--insecure-registry", registry.host, env=env, check=True)
    assert json.loads(again.stdout)["state"] == "succeeded"


def test_a_killed_schedule_takes_its_cluster_with_it(tmp_path: Path, registry: Registry) -> None:
    ref = push(odd_image(tmp_path / "oci"), registry, "signals/kill")
    proc, env, tmpdir = _start(tmp_path, registry, ref)
    run_dir = next(tmpdir.glob("prewarm-embedded-*"))
    proc.kill()
    proc.wait(10)
    # Then its Redis and workers stop by themselves (they are told when their parent dies)
    deadline = time.monotonic() + 60
    while _processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(run_dir)) == []
    # And the next embedded run removes the folder the killed one could not
    prewarm("schedule", ref, "--wait", "--insecure-registry", registry.host, env=env, check=True)
    assert not run_dir.exists()


def test_an_empty_listing_says_so(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "store")
    assert prewarm("status", env=env, check=True).stdout.startswith("no job")
    assert json.loads(prewarm("status", "--json", env=env, check=True).stdout) == []


def _slow_image(tmp_path: Path, registry: Registry) -> str:
    """Six whole layers of 400 KB of incompressible bytes: under a budget each task takes a while."""
    from prewarm.imagebuild import Layer, TarEntry, build_image
    from tests.images import mixed_bytes

    layers = [Layer([TarEntry(f"data{i}", "dir", mode=0o755),
                     TarEntry(f"data{i}/blob", data=mixed_bytes(400 * 1024, seed=100 + i, random_share=1.0))])
              for i in range(6)]
    return push(build_image(tmp_path / "slow-oci", layers, tag="slow"), registry, "signals/slow")


def test_the_workers_own_sigterm_is_a_warm_shutdown_and_the_tasks_it_leaves_come_back(
        tmp_path: Path, registry: Registry, redis_url: str) -> None:
    import redis

    from prewarm.fleet import keys
    from tests.pipeline_helpers import start_worker, wait_job

    ref = _slow_image(tmp_path, registry)
    # Redelivery by the visibility timeout cannot explain anything below: it is 15 minutes
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                    PREWARM_NODE_NAME="calm", PREWARM_VISIBILITY_TIMEOUT="900")
    prewarm("budget", registry.host, "--rate", "300KB", "--burst", "300KB", env=env, check=True)
    # Given a node's worker (one process) in the middle of a job that has tasks queued behind the running one
    first = start_worker(env, tmp_path / "first.log", "-c", "1")
    try:
        job = prewarm("schedule", ref, "--node", "calm", env=env, check=True).stdout.strip()
        r = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 60
        while json.loads(prewarm("status", job, "--json", env=env, check=True).stdout)["bytes_done"] == 0:
            assert time.monotonic() < deadline, first.log.read_text()[-3000:]
            time.sleep(0.2)
        # When the worker's own process gets SIGTERM (a pod stopping: only PID 1 is signalled)
        os.kill(first.proc.pid, signal.SIGTERM)
        started = time.monotonic()
        code = first.proc.wait(45)
        took = time.monotonic() - started
    finally:
        first.stop()
    log = first.log.read_text()
    # Then it shuts down warm, within a pod's grace period, without restarting itself
    assert code == 0, log[-3000:]
    assert took < 30, took
    assert "starting it again" not in log and "Traceback" not in log, log[-3000:]
    # And none of its pool processes outlives it
    assert not [p for p in _processes_mentioning("PREWARM_NODE_NAME=calm")], "a pool process outlived its worker"
    # And the tasks it had not run are back in the node's queue at once, not after the visibility timeout
    status = json.loads(prewarm("status", job, "--json", env=env, check=True).stdout)
    assert status["state"] == "running", status
    assert r.llen(keys.node_queue("calm")) > 0, "the unfinished tasks must be back in the queue"
    assert r.hlen("unacked") == 0, "a message left unacknowledged would wait out the visibility timeout"
    # And a new worker of the node finishes the job from them
    second = start_worker(env, tmp_path / "second.log", "-c", "2")
    try:
        prewarm("budget", registry.host, "--clear", env=env, check=True)
        final = wait_job(job, env, timeout=90)
    finally:
        second.stop()
        r.close()
    assert final["state"] == "succeeded", (final, second.log.read_text()[-3000:])
