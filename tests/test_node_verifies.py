"""A node takes a job's identity from the registry, not from Redis (issue 21 items 1 and 4).

Real worker, Redis and registry.  An attacker with write access to Redis makes job and
plan records the scheduler never made (the library calls a scheduler would use, with
lying arguments) and releases their tasks into the node's queue.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import redis

from prewarm.fleet import dispatch, jobs
from prewarm.fleet.plan import plan_resolved
from prewarm.resolve.reference import parse_reference
from prewarm.resolve.registry.client import RegistryClient
from prewarm.runtime.images import list_records
from prewarm.store.layout import Layout
from tests.images import odd_image, simple_image
from tests.pipeline_helpers import clean_env, prewarm, push, start_worker, wait_job
from tests.services import Registry


def _plan(registry: Registry, ref: str, *also_insecure: str):  # type: ignore[no-untyped-def]
    client = RegistryClient(insecure_registries=frozenset({registry.host, *also_insecure}))
    return plan_resolved(client.resolve(parse_reference(ref), None), {})


def _forge(r: redis.Redis, redis_url: str, plan, name: str, node: str) -> str:  # type: ignore[no-untyped-def]
    job = jobs.create_job(r, plan, [node], window=8, image=name)
    jobs.mark_started(r, job, node)
    dispatch.release(dispatch.sender(redis_url), r, plan, job, node, 8)
    return job


def test_a_job_record_naming_another_image_cannot_put_its_name_on_this_tree(
        tmp_path: Path, registry: Registry, redis_url: str) -> None:
    real = push(simple_image(tmp_path / "real"), registry, "verify/real")
    nasty = push(odd_image(tmp_path / "nasty"), registry, "verify/nasty")
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                    PREWARM_NODE_NAME="v1")
    r = redis.Redis.from_url(redis_url)
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@v1")
    try:
        # When the attacker's job fetches its own image but its record names the real image
        job = _forge(r, redis_url, _plan(registry, nasty), real, "v1")
        final = wait_job(job, env)
    finally:
        worker.stop()
    # Then the tree is recorded only under its own pinned reference, never under the real name
    names = [rec.name for rec in list_records(Layout(Path(env["PREWARM_ROOT"])))]
    assert final["state"] == "succeeded", final
    assert real not in names and names and all("@sha256:" in n for n in names), names
    assert "resolves to" in worker.log.read_text()
    assert prewarm("mounts", real, "/mnt", env=env).returncode != 0


def test_a_plan_that_lies_about_diff_ids_is_refused_before_anything_is_recorded(
        tmp_path: Path, registry: Registry, redis_url: str) -> None:
    ref = push(simple_image(tmp_path / "img"), registry, "verify/lying")
    env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_INSECURE_REGISTRIES=registry.host,
                    PREWARM_NODE_NAME="v2")
    r = redis.Redis.from_url(redis_url)
    honest = _plan(registry, ref)
    popular = ["sha256:" + f"{i:064x}" for i in range(len(honest.diff_ids))]
    lying = dataclasses.replace(honest, diff_ids=tuple(popular))
    worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@v2")
    try:
        job = _forge(r, redis_url, lying, "docker.io/library/ubuntu:22.04", "v2")
        final = wait_job(job, env)
    finally:
        worker.stop()
    assert final["state"] == "failed", final
    errors = final["nodes"]["v2"]["errors"]
    assert errors and all("disagrees with the image this node verified" in e and "diff_ids" in e
                          for e in errors.values()), errors
    layout = Layout(Path(env["PREWARM_ROOT"]))
    assert list_records(layout) == []
    assert not layout.chains_dir().exists() or not list(layout.chains_dir().rglob("*.json"))
    # and nothing was fetched: no layer in the store
    assert not (layout.root / "layers").exists() or not any((layout.root / "layers").rglob("ready"))


def test_a_registry_the_node_does_not_allow_is_never_contacted(tmp_path: Path, registry: Registry,
                                                                redis_url: str) -> None:
    from tests.faultproxy import FaultProxy

    push(simple_image(tmp_path / "img"), registry, "verify/allow")
    with FaultProxy(registry.host) as proxy:
        # Given a job for an image behind a registry host the node does not allow
        plan = _plan(registry, f"{proxy.host}/verify/allow:simple", proxy.host)
        proxy.requests.clear()
        env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=redis_url, PREWARM_NODE_NAME="v3",
                        PREWARM_INSECURE_REGISTRIES=registry.host, PREWARM_REGISTRIES=registry.host)
        r = redis.Redis.from_url(redis_url)
        worker = start_worker(env, tmp_path / "w.log", "-c", "1", "--hostname", "w@v3")
        try:
            job = _forge(r, redis_url, plan, "x", "v3")
            final = wait_job(job, env)
        finally:
            worker.stop()
        contacted = list(proxy.requests)
    # Then the job failed naming the setting, and the host got no request at all
    assert final["state"] == "failed", final
    assert all("PREWARM_REGISTRIES" in e for e in final["nodes"]["v3"]["errors"].values()), final
    assert contacted == []
