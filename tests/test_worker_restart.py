"""A node's worker whose Celery worker fails is started again in place; a crash loop ends it.

Two ways Celery fails, each under the test's control:

* at start-up: ``--statedb`` (passed through to Celery) names a file in a folder that does
  not exist yet, so Celery fails to start until the test creates the folder;
* while running: Celery logs "Unrecoverable error" (what kombu's crash on a Redis restart
  produces, and after which Celery's own shutdown was seen to hang).  A module loaded with
  ``--include`` writes that line once, from the running worker, in place of the crash.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from prewarm.node.restart import (
    CRASH_WINDOW,
    MAX_CRASHES,
    children_of,
    judge_crash,
    set_death_signal,
)
from tests.images import simple_image
from tests.pipeline_helpers import clean_env, prewarm, push, start_worker, wait_job
from tests.services import Registry


def test_crashes_are_counted_within_the_window_only() -> None:
    # Given no history, a crash restarts after a short delay
    v = judge_crash("", now=1000.0)
    assert v.restart and v.crashes == 1 and v.delay == 1.0 and v.history == "1000.000"
    # And old crashes and values we did not write do not count
    v = judge_crash(f"{1000 - CRASH_WINDOW - 1},garbage,,999.5", now=1000.0)
    assert v.restart and v.crashes == 2 and v.history == "999.500,1000.000"
    # But the MAX_CRASHES-th crash within the window is a crash loop
    history = ""
    for i in range(MAX_CRASHES):
        v = judge_crash(history, now=2000.0 + i)
        history = v.history
    assert not v.restart and v.crashes == MAX_CRASHES


def _wait_for(log: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in {log}:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def simple_ref(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> str:
    return push(simple_image(tmp_path_factory.mktemp("restart-oci")), registry, "fleet/restart")


def test_a_worker_that_crashed_is_started_again_in_place_and_warms(
        tmp_path: Path, registry: Registry, redis_url: str, simple_ref: str) -> None:
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                    PREWARM_NODE_NAME="phoenix")
    state_dir = tmp_path / "state"
    # Given a worker whose Celery worker cannot start (its state folder is missing)
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--statedb", str(state_dir / "worker.db"))
    try:
        _wait_for(worker.log, "starting it again")
        # When the cause is fixed while it waits to start again
        state_dir.mkdir()
        # Then the same process (same PID, not a new child) serves the node and warms an image
        job = prewarm("schedule", simple_ref, "--node", "phoenix", env=env, check=True).stdout.strip()
        final = wait_job(job, env, timeout=120)
        assert final["state"] == "succeeded", (final, worker.log.read_text()[-3000:])
        assert worker.proc.poll() is None
        assert any(state_dir.iterdir()), "the Celery worker started again uses its state folder"
    finally:
        worker.stop()
    assert worker.log.read_text().count("starting it again") == 1


def test_a_crash_loop_ends_the_worker_with_a_clear_error(tmp_path: Path, redis_url: str) -> None:
    # Given a worker that already crashed MAX_CRASHES - 2 times in the window (its history)
    recent = ",".join(f"{time.time() - i:.3f}" for i in range(MAX_CRASHES - 2))
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME="doomed",
                    PREWARM_WORKER_CRASHES=recent)
    # When its Celery worker can never start
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--statedb", str(tmp_path / "missing" / "w.db"))
    try:
        code = worker.proc.wait(60)
    finally:
        worker.stop()
    # Then it is started again once, and then gives up with an error that says what to do
    log = worker.log.read_text()
    assert code == 1, log[-3000:]
    assert log.count("starting it again") == 1
    assert f"crashed {MAX_CRASHES} times in {CRASH_WINDOW:.0f} s" in log
    assert "prewarm: error:" in log and "start `prewarm worker` again" in log
    # And each restart and the final error name the exception that ended Celery, not only an exit code
    restart = next(line for line in log.splitlines() if "starting it again" in line)
    assert "stopped (exit code" not in restart and "Error" in restart.split("stopped (", 1)[1], restart
    final = next(line for line in log.splitlines() if line.startswith("prewarm: error:"))
    assert "last of: " in final and "Error" in final.split("last of: ", 1)[1], final


def test_an_option_celery_does_not_take_stops_the_worker_at_once_with_exit_2(tmp_path: Path, redis_url: str) -> None:
    # Given a worker started with an option that Celery's worker does not have
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME="typo")
    started = time.monotonic()
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--no-such-celery-option", registered=False)
    try:
        code = worker.proc.wait(60)
    finally:
        worker.stop()
    # Then it exits 2 at once, without a restart, with one line naming the option
    log = worker.log.read_text()
    assert code == 2, log[-3000:]
    assert "starting it again" not in log and "Traceback" not in log, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("prewarm: error:")]
    assert len(errors) == 1 and "--no-such-celery-option" in errors[0], log[-3000:]
    assert time.monotonic() - started < 20
    # And the node never registered (no heartbeat names a worker that is not there)
    import redis

    client = redis.Redis.from_url(redis_url)
    assert not client.exists("prewarm:node:typo")
    client.close()


_CRASH_ONCE = """
import logging, os
from celery.signals import worker_ready

@worker_ready.connect
def _crash_once(**_):
    marker = os.environ["CRASH_MARKER"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        logging.getLogger("celery.worker").critical("Unrecoverable error: %r", RuntimeError("stand-in"))
"""


def test_a_worker_whose_celery_logs_an_unrecoverable_error_is_started_again_at_once(
        tmp_path: Path, registry: Registry, redis_url: str, simple_ref: str) -> None:
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "crash_once.py").write_text(_CRASH_ONCE)
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                    PREWARM_NODE_NAME="lazarus", CRASH_MARKER=str(tmp_path / "crashed"),
                    PYTHONPATH=str(tmp_path / "mods"))
    # Given a running worker (with its pool) whose Celery reports an unrecoverable error once
    worker = start_worker(env, tmp_path / "w.log", "-c", "2", "--include", "crash_once")
    try:
        _wait_for(worker.log, "starting it again")
        # Then the same process serves the node again and warms an image
        job = prewarm("schedule", simple_ref, "--node", "lazarus", env=env, check=True).stdout.strip()
        final = wait_job(job, env, timeout=120)
        assert final["state"] == "succeeded", (final, worker.log.read_text()[-3000:])
        assert worker.proc.poll() is None
        # And the first image's pool processes did not outlive it: the pool is 2, not 4
        assert len(children_of(worker.proc.pid)) == 2, children_of(worker.proc.pid)
    finally:
        worker.stop()
    log = worker.log.read_text()
    # And the restart names what ended Celery
    assert log.count("starting it again") == 1
    assert "stopped (Unrecoverable error: RuntimeError('stand-in')) without being asked to" in log, log[-3000:]


def test_set_death_signal_is_what_the_kernel_then_reports() -> None:
    # Given a forked child that asks for SIGTERM when its parent dies
    import ctypes

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        got = ctypes.c_int(-1)
        try:
            set_death_signal(signal.SIGTERM)
            ctypes.CDLL(None).prctl(2, ctypes.byref(got))  # PR_GET_PDEATHSIG
        finally:
            os._exit(got.value if got.value >= 0 else 255)
    # Then the kernel has SIGTERM as its death signal
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == signal.SIGTERM
