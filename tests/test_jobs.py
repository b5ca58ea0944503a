"""Job records on a real Redis: the cursor, idempotent counting, and state derived from layers."""

from __future__ import annotations

import json

import pytest
import redis

from prewarm.errors import JobError
from prewarm.fleet import jobs, keys
from prewarm.fleet.plan import plan_image


def _digest(i: int) -> str:
    return "sha256:" + f"{i:064x}"


@pytest.fixture()
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def _plan(spans=(3, None)):
    layers, diff_ids, span_layers = [], [], {}
    for i, n in enumerate(spans):
        layers.append((_digest(i), 1000 * (i + 1), "application/vnd.oci.image.layer.v1.tar+gzip"))
        diff_ids.append(_digest(100 + i))
        if n:
            span_layers[_digest(i)] = (_digest(200 + i), n, n * 10)
    return plan_image(reference="127.0.0.1:5000/x@" + _digest(9), manifest_digest=_digest(9),
                      config_digest=_digest(8), layers=layers, diff_ids=diff_ids, span_layers=span_layers)


def test_cursor_hands_out_each_task_once_per_node(r: redis.Redis) -> None:
    # Given a job of 4 tasks on two nodes
    plan = _plan()
    job = jobs.create_job(r, plan, ["a", "b"], window=2, image="x")
    # When each node claims until the plan is exhausted
    claimed = {n: [] for n in "ab"}
    for n in "ab":
        while (k := jobs.claim_next(r, job, n)) is not None:
            claimed[n].append(k)
    # Then every node got every task exactly once, and further claims stay None
    assert claimed == {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}
    assert jobs.claim_next(r, job, "a") is None
    assert int(r.hget(keys.job_node(job, "a"), "cursor")) == 4


def test_a_duplicated_span_report_counts_once(r: redis.Redis) -> None:
    plan = _plan()
    job = jobs.create_job(r, plan, ["a"], window=2, image="x")
    assert jobs.record_span(r, job, "a", 0, 1, 500) is True
    assert jobs.record_span(r, job, "a", 0, 1, 500) is False
    st = jobs.job_status(r, job).nodes["a"]
    assert st.bytes_done == 500 and st.tasks_finished == 1


def test_state_is_derived_and_never_success_with_a_layer_missing(r: redis.Redis) -> None:
    plan = _plan()
    job = jobs.create_job(r, plan, ["a", "b"], window=2, image="x")
    assert jobs.job_status(r, job).state == "pending"
    # Given every span counted on node a but one layer not ready
    for s in range(3):
        jobs.record_span(r, job, "a", 1, s, 10)
    jobs.record_layer(r, job, "a", 0, jobs.LAYER_READY)
    assert jobs.job_status(r, job).nodes["a"].state == "running"
    # When a's last layer is ready but b still has nothing
    jobs.record_layer(r, job, "a", 1, jobs.LAYER_READY)
    st = jobs.job_status(r, job)
    assert st.nodes["a"].state == "succeeded" and st.state == "running"
    # And b fails one layer
    jobs.record_layer(r, job, "b", 0, jobs.LAYER_READY)
    jobs.record_layer(r, job, "b", 1, jobs.LAYER_FAILED, "digest mismatch")
    st = jobs.job_status(r, job)
    # Then the job failed, and the reason names node and layer
    assert st.state == "failed"
    assert st.failures() == [f"b: layer {plan.layers[1].digest}: digest mismatch"]
    # And a later success of that layer wins
    jobs.record_layer(r, job, "b", 1, jobs.LAYER_READY)
    assert jobs.job_status(r, job).state == "succeeded"


def test_present_layers_start_ready(r: redis.Redis) -> None:
    plan = _plan()
    job = jobs.create_job(r, plan, ["a"], window=2, image="x", present={"a": {0, 1}})
    st = jobs.job_status(r, job)
    assert st.state == "succeeded"
    assert st.bytes_done == plan.total_bytes


def test_cancel_stops_handing_out_work(r: redis.Redis) -> None:
    job = jobs.create_job(r, _plan(), ["a"], window=2, image="x")
    assert jobs.claim_next(r, job, "a") == 0
    jobs.cancel_job(r, job)
    assert jobs.claim_next(r, job, "a") is None
    assert jobs.job_status(r, job).state == "cancelled"


def test_unknown_job_is_a_clear_error(r: redis.Redis) -> None:
    with pytest.raises(JobError, match="job nope does not exist"):
        jobs.job_status(r, "nope")
    with pytest.raises(JobError, match="no node"):
        jobs.create_job(r, _plan(), [], window=1, image="x")


def test_a_node_joining_a_standing_schedule_gets_its_own_cursor(r: redis.Redis) -> None:
    # Given a standing schedule for nodes labelled gpu=true, with no node yet
    plan = _plan()
    job = jobs.create_job(r, plan, [], window=2, image="x", keep={"gpu": "true"})
    assert jobs.job_status(r, job).state == "pending"
    # Then only matching nodes find it
    assert jobs.standing_jobs_for(r, {"gpu": "true", "zone": "a"}) == [job]
    assert jobs.standing_jobs_for(r, {"gpu": "false"}) == []
    # When a node joins twice
    assert jobs.add_node(r, job, "n1", plan, {0}) is True
    assert jobs.add_node(r, job, "n1", plan, set()) is False
    # Then it has one cursor and its present layer counts as ready
    st = jobs.job_status(r, job).nodes["n1"]
    assert st.layers[0] == jobs.LAYER_READY and st.bytes_done == plan.layers[0].size
    assert jobs.claim_next(r, job, "n1") == 0
    # And a cancelled standing schedule is found no more
    jobs.cancel_job(r, job)
    assert jobs.standing_jobs_for(r, {"gpu": "true"}) == []


@pytest.mark.parametrize("nodes", [["a"], ["a", "b"]], ids=["alone", "fleet"])
def test_a_lost_task_is_found_after_a_stall_and_only_then(r: redis.Redis, nodes: list[str]) -> None:
    # Given every task released to node a, all finished but span 2 of layer 0 (its message lost)
    plan = _plan()
    job = jobs.create_job(r, plan, nodes, window=8, image="x")
    while jobs.claim_next(r, job, "a") is not None:
        pass
    jobs.record_layer(r, job, "a", 1, jobs.LAYER_READY)
    for s in (0, 1):
        jobs.record_span(r, job, "a", 0, s, 10)
    # Then while tasks finished recently, nothing is stalled
    assert jobs.stalled_jobs(r, "a", stall_seconds=60) == []
    # But once nothing finished for the stall time, the job is stalled on a, and only span 2 is missing
    r.hset(keys.job_node(job, "a"), "updated", 0)
    assert jobs.stalled_jobs(r, "a", stall_seconds=60) == [job]
    from prewarm.fleet.peers import node_order, spread  # unfinished tasks count in the node's order

    # (the order dispatch.send_task sends them in: the plan's for a node alone, spread in a fleet)
    alone = len(nodes) == 1
    assert jobs.dispatch_flags(r, job) == (False, alone)
    unfinished = jobs.unfinished_tasks(r, job, "a", plan)
    assert [plan.task_at(node_order(plan, k, "a", alone)) for k in unfinished] == [(0, 2)]
    if not alone:
        assert [plan.task_at(spread(plan, k, "a")) for k in unfinished] == [(0, 2)]
    else:
        assert unfinished == [next(k for k in range(plan.task_count) if plan.task_at(k) == (0, 2))]
    # And when it lands the job is not stalled any more, and a finished job leaves the active set
    jobs.record_span(r, job, "a", 0, 2, 10)
    jobs.record_layer(r, job, "a", 0, jobs.LAYER_READY)
    r.hset(keys.job_node(job, "a"), "updated", 0)
    assert jobs.stalled_jobs(r, "a", stall_seconds=60) == []
    jobs.finish_job(r, job)
    assert not r.sismember(keys.ACTIVE_JOBS, job)


def test_a_stall_before_every_task_was_released_refills_the_window(r: redis.Redis, redis_url: str) -> None:
    # Given a window of 2 on node a: task 0 finished but its successor's send was lost, and
    # task 1's message was lost too (a Redis restart), so nothing is queued any more
    from prewarm.fleet import dispatch
    from prewarm.fleet.peers import node_order
    from prewarm.fleet.schedule import resend_stalled

    plan = _plan(spans=(4,))
    assert [plan.task_at(k) for k in range(4)] == [(0, s) for s in range(4)]
    # node a, alone in the job, does the layer's four spans in stream order
    order = [plan.task_at(node_order(plan, k, "a", alone=True))[1] for k in range(4)]
    assert order == [0, 1, 2, 3]
    job = jobs.create_job(r, plan, ["a"], window=2, image="x")
    queue = keys.node_queue("a")
    assert [jobs.claim_next(r, job, "a") for _ in range(3)] == [0, 1, 2]
    jobs.record_span(r, job, "a", 0, order[0], 10)
    app = dispatch.sender(redis_url)
    # Then while a task finished recently, nothing is sent
    assert resend_stalled(r, app, "a", stall_seconds=60) == []
    assert r.llen(queue) == 0
    # But after the stall time the lost ones are sent again, in order, without exceeding the window
    r.hset(keys.job_node(job, "a"), "updated", 0)
    assert jobs.stalled_jobs(r, "a", stall_seconds=60) == [job]
    assert resend_stalled(r, app, "a", stall_seconds=60) == [job]
    sent = [json.loads(m)["headers"]["kwargsrepr"] for m in reversed(r.lrange(queue, 0, -1))]
    assert len(sent) == 2 and f"'span': {order[1]}" in sent[0] and f"'span': {order[2]}" in sent[1]
    assert jobs.released(r, job, "a") == 3
    # And the resend counts as activity: the next beat sends nothing
    assert resend_stalled(r, app, "a", stall_seconds=60) == []
    # And when every released task finished but their successors were lost, the rest is released
    r.delete(queue)
    for s in order[1:3]:
        jobs.record_span(r, job, "a", 0, s, 10)
    r.hset(keys.job_node(job, "a"), "updated", 0)
    assert resend_stalled(r, app, "a", stall_seconds=60) == [job]
    assert jobs.released(r, job, "a") == 4
    assert [json.loads(m)["headers"]["kwargsrepr"] for m in r.lrange(queue, 0, -1)] == [
        (f"{{'job': '{job}', 'node': 'a', 'image': '{plan.reference}', 'layer': '{plan.layers[0].digest}', "
         f"'layer_index': 0, 'ztoc': '{plan.layers[0].ztoc_digest}', 'span': {order[3]}, 'count': 1}}")]
    r.delete(queue)


def test_exactly_one_caller_releases_a_nodes_first_window(r: redis.Redis) -> None:
    # Given a job on two nodes whose windows nobody released yet
    job = jobs.create_job(r, _plan(), ["a", "b"], window=2, image="x")
    assert jobs.unstarted_jobs(r, "a") == [job]
    # When the scheduler and node a's worker both try to release a's window
    assert jobs.mark_started(r, job, "a") is True
    assert jobs.mark_started(r, job, "a") is False
    # Then only b still waits for its own worker; a cancelled job waits for nobody
    assert jobs.unstarted_jobs(r, "a") == []
    assert jobs.unstarted_jobs(r, "b") == [job]
    jobs.cancel_job(r, job)
    assert jobs.unstarted_jobs(r, "b") == []


class _CountingConnection(redis.Connection):
    """A real connection that counts what it sends: one send is one round trip."""

    sends = 0

    def send_packed_command(self, command, check_health=True):  # type: ignore[no-untyped-def]
        type(self).sends += 1
        return super().send_packed_command(command, check_health)


def test_status_costs_the_same_round_trips_for_2_and_300_nodes(redis_url: str) -> None:
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=_CountingConnection)
    r = redis.Redis(connection_pool=pool)
    trips = {}
    for n in (2, 300):
        # Given a job on n nodes, some of which reported progress
        job = jobs.create_job(r, _plan(), [f"node{i}" for i in range(n)], window=2, image="x")
        for i in range(0, n, 7):
            jobs.claim_next(r, job, f"node{i}")
        # When its status is read, once reading the plan and once with the plan passed in
        _CountingConnection.sends = 0
        status = jobs.job_status(r, job)
        trips[n] = _CountingConnection.sends
        _CountingConnection.sends = 0
        again = jobs.job_status(r, job, plan=status.plan)
        # Then every node is there, and the number of round trips does not depend on n
        assert len(status.nodes) == n and again.nodes == status.nodes
        assert _CountingConnection.sends == 2
    assert trips[2] == trips[300] == 2, trips


def test_claiming_for_an_unknown_job_or_node_creates_nothing(r: redis.Redis) -> None:
    job = jobs.create_job(r, _plan(), ["a"], window=2, image="x")
    before = sorted(r.keys("*"))
    # When a claim names a job or a node that does not exist (a forged or stale message)
    assert jobs.claim_next(r, "nope", "a") is None
    assert jobs.claim_next(r, job, "ghost") is None
    # Then nothing was created and the script did not fail on the missing keys
    assert sorted(r.keys("*")) == before


def test_a_job_nobody_waits_for_ends_and_its_records_expire(r: redis.Redis) -> None:
    # Given a job on two nodes, started without --wait
    plan = _plan()
    job = jobs.create_job(r, plan, ["a", "b"], window=2, image="x")
    # When node a's layers end, the job is still active (b's are pending)
    for i in range(len(plan.layers)):
        jobs.record_layer(r, job, "a", i, jobs.LAYER_READY)
    assert not jobs.settle(r, job, "a")
    assert r.sismember(keys.ACTIVE_JOBS, job)
    # When node b's end too (one failed), the job leaves the active set
    jobs.record_layer(r, job, "b", 0, jobs.LAYER_FAILED, "boom")
    jobs.record_layer(r, job, "b", 1, jobs.LAYER_READY)
    assert jobs.settle(r, job, "b")
    assert not r.sismember(keys.ACTIVE_JOBS, job)
    # And every record of it will expire
    job_keys = [k for k in r.keys(f"prewarm:job:{job}*")]
    assert job_keys and all(0 < r.ttl(k) <= jobs.JOB_RETENTION for k in job_keys), \
        {k: r.ttl(k) for k in job_keys}
    assert jobs.job_status(r, job).state == "failed"


def test_a_cancelled_job_refuses_its_queued_tasks(r: redis.Redis) -> None:
    job = jobs.create_job(r, _plan(), ["a"], window=2, image="x")
    assert jobs.task_refusal(r, job, "a", 0, "a") is None
    jobs.cancel_job(r, job)
    assert jobs.task_refusal(r, job, "a", 0, "a") == jobs.CANCELLED


def test_waiting_for_a_job_outlasts_a_client_read_timeout_shorter_than_its_pauses(redis_url: str) -> None:
    # Given a job that makes no progress, watched through a client whose read timeout is
    # shorter than the pauses between polls (they grow to 2 s; in a large fleet, a
    # millisecond per node)
    from prewarm.errors import JobTimeout
    from prewarm.fleet.schedule import wait_for_job

    client = redis.Redis.from_url(redis_url, socket_timeout=0.4)
    job = jobs.create_job(client, _plan(), ["a"], window=8, image="x")
    # When the scheduler waits on it, Then it times out as a job, not as a socket
    with pytest.raises(JobTimeout):
        wait_for_job(client, job, interval=0.3, timeout=2.5)
    # And a node reaching its end still wakes a waiter at once
    for i, layer in enumerate(_plan().layers):
        jobs.record_layer(client, job, "a", i, jobs.LAYER_READY)
    assert jobs.settle(client, job, "a")
    assert client.llen(keys.job_wake(job)) == 1
