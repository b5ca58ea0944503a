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
