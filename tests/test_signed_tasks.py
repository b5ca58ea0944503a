"""Workers run only tasks the scheduler signed (issue 21 item 3), with Celery's auth serializer.

A real worker with a certificate store holding the scheduler's certificate, a real Redis
and registry.  A signed job runs; messages pushed into the node's queue as an attacker
with Redis rights would (unsigned, signed with another key, a signed body altered) are
refused before any write and counted.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import redis

from prewarm.fleet import dispatch, jobs, keys
from prewarm.fleet.signing import TaskSigner, ensure_keypair
from tests.images import simple_image
from tests.pipeline_helpers import clean_env, prewarm, push, start_worker, wait_job
from tests.services import Registry

SPANS = {"PREWARM_SPAN_SIZE": str(256 * 1024), "PREWARM_MIN_LAYER_SIZE": str(1 << 20)}


def _metric(log: str, needle: str) -> int:
    return log.count(needle)


def test_only_the_schedulers_signed_tasks_run(tmp_path: Path, registry: Registry, redis_url: str) -> None:
    key, cert = ensure_keypair(tmp_path / "scheduler")
    other_key, other_cert = ensure_keypair(tmp_path / "attacker")
    image = simple_image(tmp_path / "oci")
    ref = push(image, registry, "signed/tasks")
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                    PREWARM_NODE_NAME="s1", PREWARM_TRUSTED_CERTS=str(cert), **SPANS)
    scheduler = {**env, "PREWARM_SIGNING_KEY": str(key), "PREWARM_SIGNING_CERT": str(cert)}
    r = redis.Redis.from_url(redis_url)
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@s1")
    try:
        # Given a job launched by the scheduler with its signing key: it runs, signed
        job = prewarm("schedule", ref, "--node", "s1", env=scheduler, check=True).stdout.strip()
        final = wait_job(job, env)
        assert final["state"] == "succeeded", (final, worker.log.read_text()[-3000:])
        assert jobs.dispatch_flags(r, job)[0]
        field = dispatch.signed_field(0, 0)
        body = jobs.signed_body(r, job, field)
        assert body is not None
        # When an attacker with Redis rights pushes messages for that job into s1's queue:
        sender = dispatch.sender(redis_url)
        plan = jobs.load_plan(r, job)
        task_name, kwargs = dispatch.task_kwargs(plan, job, "docker.io/library/ubuntu:22.04", 0)
        before = worker.log.read_text()
        # an unsigned one (json, as the scheduler sent before signing)
        sender.send_task(task_name, kwargs={**kwargs, "node": "s1"}, queue=keys.node_queue("s1"))
        # one signed with a key the node does not trust
        dispatch.publish_signed(sender, keys.node_queue("s1"), task_name,
                                TaskSigner.from_files(other_key, other_cert).sign(kwargs))
        # and the scheduler's own body with one byte of its arguments changed
        raw = bytearray(base64.b64decode(body))
        at = raw.rfind(b'"layer_index": 0')
        raw[at + len(b'"layer_index": ')] = ord("1")
        dispatch.publish_signed(sender, keys.node_queue("s1"), task_name, base64.b64encode(bytes(raw)))
        deadline = time.monotonic() + 60
        while True:
            log = worker.log.read_text()[len(before):]
            if _metric(log, "not signed by a scheduler") >= 1 and _metric(log, "signature does not verify") >= 2:
                break
            assert time.monotonic() < deadline, log[-3000:]
            time.sleep(0.2)
        status = prewarm("status", job, "--json", env=env, check=True).stdout
    finally:
        worker.stop()
    # Then each was refused and counted, and none wrote: the job is as it was
    assert '"state": "succeeded"' in status
    assert "docker.io/library/ubuntu:22.04" not in prewarm("images", env=env, check=True).stdout
    assert "Traceback" not in log.split("refused a task")[0][-2000:]


def test_a_worker_with_a_missing_certificate_store_refuses_to_start(tmp_path: Path, redis_url: str) -> None:
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME="s2",
                    PREWARM_TRUSTED_CERTS=str(tmp_path / "nowhere" / "*.crt"))
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@s2")
    try:
        code = worker.proc.wait(60)
    finally:
        worker.stop()
    text = worker.log.read_text()
    assert code != 0 and "PREWARM_TRUSTED_CERTS" in text and "matches no certificate" in text, text[-2000:]


def test_an_unsigned_job_for_a_node_that_runs_only_signed_tasks_is_refused_at_launch(
        tmp_path: Path, registry: Registry, redis_url: str) -> None:
    _, cert = ensure_keypair(tmp_path / "scheduler")
    ref = push(simple_image(tmp_path / "oci"), registry, "signed/strict")
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                    PREWARM_NODE_NAME="s3", PREWARM_TRUSTED_CERTS=str(cert), **SPANS)
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@s3")
    try:
        proc = prewarm("schedule", ref, "--node", "s3", env=env)
    finally:
        worker.stop()
    assert proc.returncode == 2 and "PREWARM_SIGNING_KEY" in proc.stderr and "s3" in proc.stderr, proc.stderr
    assert not redis.Redis.from_url(redis_url).zcard(keys.JOBS)


def test_runs_making_the_embedded_key_pair_at_once_share_one_matching_pair(tmp_path: Path) -> None:
    import threading

    from kombu.serialization import loads

    from prewarm.fleet.signing import SIGNED_CONTENT_TYPE, install_verifier

    folder = tmp_path / "keys"
    made: list[tuple[Path, Path]] = []
    threads = [threading.Thread(target=lambda: made.append(ensure_keypair(folder))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 1 and sorted(p.name for p in folder.iterdir()) == ["signing.crt", "signing.key"]
    key, cert = made[0]
    refused: list[str] = []
    install_verifier(str(cert), refused.append)
    body = TaskSigner.from_files(key, cert).sign({"job": "j"})
    assert loads(body, SIGNED_CONTENT_TYPE, "utf-8", accept=[SIGNED_CONTENT_TYPE])[1]["job"] == "j"
    assert refused == []


def test_a_worker_started_before_its_certificate_waits_for_it_then_runs_only_signed_tasks(
        tmp_path: Path, registry: Registry, redis_url: str) -> None:
    """The embedded run starts its workers before it makes its key pair (CERT_WAIT_ENV)."""
    from prewarm.fleet.signing import CERT_WAIT_ENV, keypair_paths

    folder = tmp_path / "scheduler"
    key, cert = keypair_paths(folder)
    ref = push(simple_image(tmp_path / "oci"), registry, "signed/late")
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                    PREWARM_NODE_NAME="s4", PREWARM_TRUSTED_CERTS=str(cert), **SPANS)
    r = redis.Redis.from_url(redis_url)
    worker = start_worker({**env, CERT_WAIT_ENV: "60"}, tmp_path / "w.log", "-c", "1", "--hostname", "w@s4",
                          registered=False)
    try:
        time.sleep(1.0)  # the worker is waiting: no certificate yet, and it has not given up
        assert worker.proc.poll() is None, worker.log.read_text()[-2000:]
        assert not r.exists("prewarm:node:s4")
        assert ensure_keypair(folder) == (key, cert)
        start = time.monotonic()
        while not r.exists("prewarm:node:s4"):
            assert worker.proc.poll() is None and time.monotonic() - start < 60, worker.log.read_text()[-2000:]
            time.sleep(0.1)
        scheduler = {**env, "PREWARM_SIGNING_KEY": str(key), "PREWARM_SIGNING_CERT": str(cert)}
        job = prewarm("schedule", ref, "--node", "s4", env=scheduler, check=True).stdout.strip()
        final = wait_job(job, env)
        assert final["state"] == "succeeded", (final, worker.log.read_text()[-3000:])
    finally:
        worker.stop()
        r.close()


def test_a_worker_whose_certificate_never_comes_stops_with_the_usual_message(tmp_path: Path, redis_url: str) -> None:
    from prewarm.fleet.signing import CERT_WAIT_ENV

    cert = tmp_path / "never" / "signing.crt"
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME="s5",
                    PREWARM_TRUSTED_CERTS=str(cert), **{CERT_WAIT_ENV: "0.5"})
    proc = prewarm("worker", "-c", "1", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "PREWARM_TRUSTED_CERTS" in proc.stderr and "matches no certificate" in proc.stderr, proc.stderr


def test_the_embedded_clusters_signer_is_loaded_once_on_first_use(tmp_path: Path) -> None:
    import subprocess

    import pytest

    from prewarm.errors import PrewarmError
    from prewarm.node.embedded import EmbeddedCluster

    # Given a cluster's key pair, and a cluster without one
    pair = ensure_keypair(tmp_path / "keys")
    proc = subprocess.Popen(["true"])
    proc.wait()
    cluster = EmbeddedCluster(tmp_path, proc, [], "unix:///nowhere", signing=pair)
    bare = EmbeddedCluster(tmp_path, proc, [], "unix:///nowhere")
    # When its signer is asked for twice / Then it is one signer, and it signs
    signer = cluster.signer
    assert cluster.signer is signer and signer.sign({"job": "j"})
    # And a cluster without a key pair says so instead of signing with nothing
    with pytest.raises(PrewarmError, match="no task-signing key"):
        _ = bare.signer
