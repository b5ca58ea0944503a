"""The Celery app every node's worker runs.

Settings come from the environment (``PREWARM_BROKER_URL``, ``PREWARM_ROOT``, ...); the
``prewarm worker`` command sets them from its flags before Celery imports this module.

Why these options:

* ``acks_late`` + ``reject_on_worker_lost``: a worker killed mid-span leaves its message
  to be delivered again; tasks are idempotent by (layer digest, span) so that is safe.
* ``prefetch_multiplier = 1``: a node takes one task per process at a time, so the
  window of released tasks is spread over the nodes' processes, not hoarded.
* ``visibility_timeout``: longer than the slowest task (a whole-layer task on a large
  layer).  It is the last resort only: a dead worker's messages come back within about a
  minute of its last heartbeat (:func:`track_deliveries`, :mod:`prewarm.fleet.recovery`).
* events on (``worker_send_task_events``, ``task_send_sent_event``) so Flower shows the
  span tasks with their names and arguments; off with ``PREWARM_TASK_EVENTS=0`` (what
  ``prewarm worker --no-task-events`` sets), for workers nobody watches.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from celery import Celery

from prewarm.config import Settings
from prewarm.errors import ConfigError
from prewarm.fleet import keys
from prewarm.fleet.broker import celery_url

if TYPE_CHECKING:
    from prewarm.fleet.recovery import WorkerInstance

#: Seconds before an unacknowledged task is delivered to another worker.
DEFAULT_VISIBILITY_TIMEOUT = 900


def max_memory_per_child() -> int:
    """Celery's per-child ceiling in KiB, so a leak cannot grow a pool process without bound.

    ``prewarm worker`` sets ``PREWARM_MAX_MEMORY_PER_CHILD`` from the container's memory
    limit (:func:`prewarm.node.limits.pool_size`), so every process at its ceiling still fits.
    """
    from prewarm.node.limits import MAX_CHILD_MEMORY

    value = os.environ.get("PREWARM_MAX_MEMORY_PER_CHILD", "")
    return int(value) if value.isdigit() and int(value) > 0 else MAX_CHILD_MEMORY >> 10


def _pool_death_signal_through_ctypes() -> None:
    """Have billiard's pool processes set their death signal through ctypes, not cffi.

    Why: billiard takes cffi whenever it is importable (cryptography installs it), and then
    every pool process loads pycparser and parses a C declaration to call one prctl: ~80 ms
    of CPU per process at each worker start, on the path to the first span.  The same call
    through ctypes costs nothing.  Celery ignores an OSError here, as it does billiard's.
    """
    import celery.platforms

    from prewarm.node.restart import set_death_signal

    celery.platforms._set_pdeathsig = set_death_signal


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery("prewarm", include=["workers.tasks"])
    broker = settings.broker_url or "redis://127.0.0.1:6379/0"
    visibility = int(os.environ.get("PREWARM_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT))
    # `prewarm worker --no-task-events` (the embedded workers: no Flower to watch them)
    events = os.environ.get("PREWARM_TASK_EVENTS", "1") != "0"
    app.conf.update(
        broker_url=celery_url(broker),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": visibility,
            # kombu scans for unacknowledged messages every interval x throttle seconds
            # (100 s by default): scan at a quarter of the visibility timeout instead, so a
            # killed worker's spans go to another worker soon after the timeout.
            "unacked_restore_interval": max(1, min(30, visibility // 4)),
            "unacked_restore_throttle": 1,
            # the scan holds a Redis mutex; one held by a worker killed mid-scan would block
            # every restore for kombu's default 300 s
            "unacked_mutex_expire": max(10, min(300, visibility)),
            # named here because prewarm.fleet.recovery reads them to restore a dead worker's tasks
            "unacked_key": keys.KOMBU_UNACKED,
            "unacked_index_key": keys.KOMBU_UNACKED_INDEX,
        },
        task_serializer="json",
        # json: Celery's own control messages (and unsigned tasks, which a worker with
        # PREWARM_TRUSTED_CERTS refuses in workers.tasks); auth: the scheduler's signed tasks
        accept_content=["json", "auth"] if settings.trusted_certs else ["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=events,
        task_send_sent_event=events,
        task_default_queue="prewarm.default",
        worker_hijack_root_logger=False,
        worker_max_memory_per_child=max_memory_per_child(),
    )
    app.conf.prewarm_settings = settings
    _pool_death_signal_through_ctypes()
    if settings.trusted_certs:
        from prewarm.fleet.signing import install_verifier
        from prewarm.node.metrics import TASKS_REFUSED

        def refused(why: str) -> None:
            TASKS_REFUSED.labels("bad signature").inc()
            logging.getLogger("prewarm.worker").warning("refused a task whose signature does not verify: %s", why)

        try:
            install_verifier(settings.trusted_certs, refused)
        except ConfigError as err:
            raise SystemExit(f"prewarm worker: {err}") from None
    return app


def track_deliveries(instance: WorkerInstance) -> None:
    """Record each task message this process's consumer takes in ``instance``'s held set.

    Why: when the worker dies, the fleet puts exactly these messages back in their queue
    within about a minute (:mod:`prewarm.fleet.recovery`) instead of after the visibility
    timeout.  Celery sends ``task_received`` in the consumer, after kombu recorded the
    message as unacknowledged and before the task runs or waits for its ETA.
    """
    from celery.signals import task_received

    log = logging.getLogger("prewarm.worker")

    def received(request, **_: object) -> None:  # type: ignore[no-untyped-def]
        tag = getattr(request.message, "delivery_tag", None)
        if not tag:
            return
        try:
            instance.hold(str(tag))
        except Exception as err:  # noqa: BLE001 - Redis away: the visibility timeout still covers it
            log.warning("could not record task message %s as held by this worker (%s); if the worker dies "
                        "now, the message returns after the visibility timeout", tag, err)

    task_received.connect(received, weak=False)


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as err:  # pragma: no cover - reported by celery at start-up
        raise SystemExit(f"prewarm worker: {err}") from None


app = make_app(_settings())
