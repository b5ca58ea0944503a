"""Node-side commands: ``prewarm worker``, ``prewarm mounts``, ``prewarm images``, ``rm``, ``gc``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from prewarm.cli._common import nonempty, registry_options, root_option, settings_from


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--node", help="This node's name (PREWARM_NODE_NAME, NODE_NAME, else the hostname).")
@click.option("--concurrency", "-c", type=click.IntRange(1, 256), default=None,
              help="Worker processes (default: the container's CPU limit + 2, fewer if its memory "
              "limit cannot hold them; the node's cores + 2 without limits).")
@click.option("--hostname", "-n", default=None, help="Celery worker name (default prewarm@NODE).")
@click.option("--broker-url", envvar="PREWARM_BROKER_URL", help="Redis URL (PREWARM_BROKER_URL).")
@click.option("--quiet", is_flag=True, help="Warnings and errors only.")
@click.option("--task-events/--no-task-events", default=True, show_default=True, envvar="PREWARM_TASK_EVENTS",
              help="Send task events (what Flower shows); a worker nobody monitors saves their cost.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Node label for --selector (repeatable; also PREWARM_NODE_LABELS, comma-separated).")
@click.option("--containerd", "containerd_socket", type=click.Path(path_type=Path), default=None,
              metavar="SOCKET", help="Register each image completed on this node in this containerd "
              "(PREWARM_CONTAINERD_ADDRESS), so CRI sees it present.")
@click.option("--namespace", "containerd_namespace", default=None,
              help="containerd namespace for --containerd (PREWARM_CONTAINERD_NAMESPACE, default k8s.io).")
@registry_options
@root_option
@click.pass_context
def worker_cmd(ctx: click.Context, node: str | None, concurrency: int | None, hostname: str | None,
               broker_url: str | None, quiet: bool, task_events: bool, labels: tuple[str, ...],
               containerd_socket: Path | None,
               containerd_namespace: str | None, insecure_registries: tuple[str, ...],
               ca_bundle: str | None, root: Path | None) -> None:
    """Start this node's worker: it consumes the node's queue and fills the node's store.

    Extra arguments are passed to ``celery worker`` as they are (e.g. ``--pool threads``).
    """
    from prewarm.errors import ConfigError
    from prewarm.fleet import keys
    from prewarm.node.limits import pool_size, read_limits

    # the store is checked before the worker says it is ready: one that cannot be written
    # refuses to start, with the reason, instead of failing every job
    settings = settings_from(store="write", insecure_registries=insecure_registries, ca_bundle=ca_bundle,
                             root=root, broker_url=broker_url, node_name=node,
                             containerd_address=containerd_socket, containerd_namespace=containerd_namespace)
    if not settings.broker_url:
        raise ConfigError("prewarm worker needs a broker: set PREWARM_BROKER_URL or --broker-url "
                          "(redis://host:port/db, rediss://..., unix:///path)")
    if settings.trusted_certs:
        from prewarm.fleet.signing import CERT_WAIT_ENV, trusted_store, wait_for_certificate

        if wait := os.environ.pop(CERT_WAIT_ENV, ""):  # started by an embedded run still making its pair
            wait_for_certificate(settings.trusted_certs, float(wait))
        trusted_store(settings.trusted_certs)  # checked here, before Celery: one line, exit 2
    os.environ.update(settings.to_env())
    os.environ["PREWARM_TASK_EVENTS"] = "1" if task_events else "0"
    # sized to the container's cgroup limits, not the node's cores (prewarm.node.limits)
    pool = pool_size(read_limits(), concurrency=concurrency)
    concurrency = pool.concurrency
    os.environ["PREWARM_MAX_MEMORY_PER_CHILD"] = str(pool.max_memory_per_child_kib)
    metrics_port = settings.metrics_port
    if metrics_port:
        # prometheus_client picks its multiprocess mode at import: set the folder first.
        import tempfile

        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="prewarm-metrics-"))
    from prewarm.fleet.broker import redis_client
    from prewarm.fleet.nodes import Heartbeat, parse_labels
    from prewarm.fleet.recovery import WorkerInstance
    from prewarm.store.content import ContentStore
    from workers.app import app, track_deliveries  # reads the environment set just above

    env_labels = [p for p in os.environ.get("PREWARM_NODE_LABELS", "").split(",") if p.strip()]
    node_labels = parse_labels(env_labels + list(labels))
    from prewarm.fleet.schedule import join_standing_jobs, resend_stalled, start_own_windows

    # A lost task message (see prewarm.fleet.jobs.stalled_jobs) is sent again once nothing has
    # finished for two visibility timeouts: redelivery of unacknowledged ones comes first.
    stall_seconds = 2.0 * settings.visibility_timeout

    from prewarm.node.sharing import serve_peers, withdraw_peers

    def on_beat() -> None:
        if peer_beat is not None:
            peer_beat()
        start_own_windows(r, app, settings.node_name)
        join_standing_jobs(r, app, settings.node_name, node_labels, store.is_ready)
        resend_stalled(r, app, settings.node_name, stall_seconds)

    argv = ["worker", "-Q", keys.node_queue(settings.node_name),
            "-c", str(concurrency),
            "-n", hostname or f"prewarm@{settings.node_name}",
            "--loglevel", "WARNING" if quiet else "INFO",  # events: PREWARM_TASK_EVENTS, set above
            # Gossip and mingle are Celery's own membership, which prewarm.fleet.nodes replaces:
            # two fewer consumers on the broker connection for a Redis restart to break.
            "--without-gossip", "--without-mingle", *ctx.args]
    _check_celery_options(app, argv[1:])  # before the node registers or serves anything

    store = ContentStore(settings.root)
    r = redis_client(settings.broker_url)
    peer_beat = serve_peers(settings, r)  # span sharing (PREWARM_PEER_PORT): serves before tasks run
    # the messages this worker takes come back within a minute if it dies (prewarm.fleet.recovery)
    instance = WorkerInstance(r, settings.node_name)
    track_deliveries(instance)
    beat = Heartbeat(r, settings.node_name, node_labels, settings.root,
                     lambda: frozenset(d for d in store.list_layers() if store.is_ready(d)),
                     on_beat=on_beat, signed_only=bool(settings.trusted_certs), instance=instance)
    beat.start()
    if metrics_port:
        _serve_metrics(metrics_port, settings.broker_url, settings.node_name, settings.root)

    try:
        _run_celery_worker(app, argv, settings.node_name)
    finally:
        if peer_beat is not None:  # stopping: peers stop asking this node at once, not a heartbeat TTL later
            beat.stop()
            withdraw_peers(r, settings.node_name)


def _check_celery_options(app, args: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Parse the options for Celery's worker as Celery will, without running it.

    Why: an option Celery does not take would fail every restart the same way; found here
    it is one line and exit 2, before the node registers, serves peers or starts a pool.

    Raises:
        ConfigError: Celery's worker refuses an option or its value.
    """
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker

    from prewarm.errors import ConfigError

    try:
        worker.make_context("worker", list(args), obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True))
    except click.UsageError as err:
        raise ConfigError(f"celery worker: {err.format_message()} (check the options after `prewarm worker`)") from None


def _serve_metrics(port: int, broker_url: str, node: str, root: Path) -> None:
    """The worker's /metrics (its pool's counters, the store, its jobs) and /healthz (consumer and Redis)."""
    from celery.signals import heartbeat_sent

    from prewarm.fleet.broker import redis_client
    from prewarm.node.metrics import (
        HEALTH_PING_TIMEOUT,
        Health,
        JobCollector,
        StoreCollector,
        serve,
    )

    # its own client, with short timeouts: a probe or scrape must answer while Redis is away
    probe = redis_client(broker_url, socket_timeout=HEALTH_PING_TIMEOUT, socket_connect_timeout=HEALTH_PING_TIMEOUT,
                         health_check_interval=0)
    health = Health(probe.ping)
    heartbeat_sent.connect(health.beat, weak=False)
    serve(port, multiprocess=True, collectors=[StoreCollector(root), JobCollector(probe, node)], health=health)


def _run_celery_worker(app, argv: list[str], node: str) -> None:  # type: ignore[no-untyped-def]
    """Run Celery's worker; if it fails without being asked to stop, start it again in place
    (:mod:`prewarm.node.restart`), so that its node's jobs do not stall."""
    import logging
    import sys
    import time

    from celery.signals import worker_shutting_down

    from prewarm.errors import ConfigError, PrewarmError
    from prewarm.node.restart import (
        CRASH_WINDOW,
        CRASHES_ENV,
        MAX_CRASHES,
        is_unrecoverable,
        judge_crash,
        kill_children,
        reason,
        restart_in_place,
    )

    log = logging.getLogger("prewarm.worker")
    told_to_stop: list[object] = []
    worker_shutting_down.connect(lambda **kw: told_to_stop.append(kw.get("sig")), weak=False)

    def crashed(what: str) -> str:
        """Start again in place (does not return), or say it is a crash loop."""
        verdict = judge_crash(os.environ.get(CRASHES_ENV, ""), time.time())
        if verdict.restart:
            log.error("the Celery worker of node %s stopped (%s) without being asked to; "
                      "starting it again in %.0f s (crash %d; %d in %.0f s is a crash loop)",
                      node, what, verdict.delay, verdict.crashes, MAX_CRASHES, CRASH_WINDOW)
            restart_in_place(verdict)  # the pool processes are killed just before
        return (f"the Celery worker of node {node} crashed {verdict.crashes} times in "
                f"{CRASH_WINDOW:.0f} s, last of: {what}; fix that and start `prewarm worker` again")

    class _OnUnrecoverable(logging.Handler):
        """Celery's own shutdown after an unrecoverable error can hang: act on its log line."""

        def emit(self, record: logging.LogRecord) -> None:
            if is_unrecoverable(record) and not told_to_stop:
                message = crashed(reason(record.exc_info[1] if record.exc_info else None,
                                         record.getMessage().splitlines()[0]))
                kill_children()
                # fd 2 itself: Celery has redirected sys.stderr into its logger by now
                os.write(2, f"prewarm: error: {message}\n".encode())
                os._exit(PrewarmError.exit_code)

    logging.getLogger("celery.worker").addHandler(_OnUnrecoverable(logging.CRITICAL))
    try:
        code = _celery_worker_main(app, argv[1:])
    except click.UsageError as err:
        # An option Celery does not take: a restart would fail the same way, so stop at once.
        raise ConfigError(f"celery worker: {err.format_message()} (check the options after `prewarm worker`)") from None
    except Exception as err:  # Celery failed to start: logged, then started again below
        log.exception("the Celery worker of node %s failed", node)
        if not told_to_stop:
            raise PrewarmError(crashed(reason(err, "failed to start"))) from None
        code = 1
    if code and not told_to_stop:
        raise PrewarmError(crashed(f"exit code {code}"))
    sys.exit(code or 0)


def _celery_worker_main(app, args: list[str]) -> int | None:  # type: ignore[no-untyped-def]
    """Run Celery's ``worker`` command with ``args``; its exit code.

    Why not ``app.start``: that goes through Celery's command group, which first imports every
    plugin command (Flower's web app, the amqp shell's prompt_toolkit): ~0.3 s of CPU at every
    worker start, on the embedded run's path to its first span.  The group adds nothing
    else here (the app is given, and it declares no user or preload options).
    """
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker

    try:
        worker.main(args=args, prog_name="celery worker", standalone_mode=False,
                    obj=CLIContext(app=app, no_color=False, workdir=None, quiet=False))
    except click.exceptions.Exit as done:
        return done.exit_code
    return None


@click.command()
@click.argument("image")
@click.argument("target", required=False, default="/mnt/prewarm")
@root_option
def mounts_cmd(image: str, target: str, root: Path | None) -> None:
    """Print the overlay mount of IMAGE's pre-warmed rootfs, as `ctr snapshots mounts` does."""
    from prewarm.errors import NotPrewarmed, PrewarmError
    from prewarm.runtime.images import find_record
    from prewarm.store.content import ContentStore
    from prewarm.store.layout import Layout

    nonempty(image, "image name")
    settings = settings_from(store="read", root=root)
    layout = Layout(settings.root)
    record = find_record(layout, image)
    if record is None:
        raise NotPrewarmed(f"{image} is not pre-warmed in {settings.root}; run `prewarm schedule {image}` first")
    store = ContentStore(settings.root)
    missing = [d for d in record.layer_digests if not store.is_ready(d)]
    if missing:
        raise PrewarmError(f"{image}: layer(s) {', '.join(missing)} are not ready in {settings.root}; "
                           f"run `prewarm schedule {image}` again")
    lowers = [str(layout.layer_fs(d)) for d in reversed(record.layer_digests)]
    if len(lowers) == 1:
        click.echo(f"mount -t bind {lowers[0]} {target} -o ro,rbind")
    else:
        click.echo(f"mount -t overlay overlay {target} -o lowerdir={':'.join(lowers)}")


def _image_state(store, record) -> str:  # type: ignore[no-untyped-def]
    return "ready" if all(store.is_ready(d) for d in record.layer_digests) else "incomplete"


@click.command()
@click.option("--json", "as_json", is_flag=True)
@root_option
def images_cmd(as_json: bool, root: Path | None) -> None:
    """List the images pre-warmed on this node, with size and state."""
    from prewarm.fleet.progress import human_bytes
    from prewarm.runtime.images import list_records
    from prewarm.store.content import ContentStore
    from prewarm.store.layout import Layout

    settings = settings_from(store="read", root=root)
    store = ContentStore(settings.root)
    records = list_records(Layout(settings.root))
    if as_json:
        click.echo(json.dumps([{"name": r.name, "reference": r.reference, "manifest_digest": r.manifest_digest,
                                "size": r.size, "layers": len(r.layer_digests),
                                "state": _image_state(store, r)} for r in records], indent=2))
        return
    if not records:
        click.echo(f"no image is pre-warmed in {settings.root}")
        return
    click.echo(f"{'IMAGE':<50} {'SIZE':>10} {'LAYERS':>6}  STATE  DIGEST")
    for r in records:
        click.echo(f"{r.name:<50} {human_bytes(r.size):>10} {len(r.layer_digests):>6}  "
                   f"{_image_state(store, r):<6} {r.manifest_digest[:19]}")


@click.command()
@click.argument("image")
@root_option
def rm_cmd(image: str, root: Path | None) -> None:
    """Forget IMAGE on this node and remove its layers that nothing else uses."""
    from prewarm.errors import NotPrewarmed
    from prewarm.runtime.gc import collect
    from prewarm.runtime.images import find_record, remove_record
    from prewarm.store.layout import Layout

    nonempty(image, "image name")
    settings = settings_from(store="write", root=root)
    layout = Layout(settings.root)
    record = find_record(layout, image)
    if record is None:
        raise NotPrewarmed(f"{image} is not pre-warmed in {settings.root} (prewarm images lists them)")
    remove_record(layout, record)
    removed = collect(layout)
    click.echo(f"removed {image}; {len(removed)} layer(s) no longer used were deleted")


@click.command()
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@root_option
def gc_cmd(dry_run: bool, root: Path | None) -> None:
    """Remove layers that no pre-warmed image and no snapshot uses."""
    from prewarm.runtime.gc import collect
    from prewarm.store.layout import Layout

    settings = settings_from(store="write", root=root)
    removed = collect(Layout(settings.root), dry_run=dry_run)
    for digest in removed:
        click.echo(("would remove " if dry_run else "removed ") + digest)
    if not removed:
        click.echo("nothing to remove")


def register(main: click.Group) -> None:
    main.add_command(worker_cmd, "worker")
    main.add_command(mounts_cmd, "mounts")
    main.add_command(images_cmd, "images")
    main.add_command(rm_cmd, "rm")
    main.add_command(gc_cmd, "gc")
