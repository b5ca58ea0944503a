"""``prewarm schedule``, ``prewarm status`` and ``prewarm cancel``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click

from prewarm.cli._common import (
    nonempty,
    registry_options,
    remember_broker,
    root_option,
    settings_from,
)
from prewarm.config import Settings

if TYPE_CHECKING:
    from prewarm.fleet.jobs import JobStatus
    from prewarm.fleet.progress import ProgressView
    from prewarm.fleet.submit import IndexPolicy
    from prewarm.resolve.registry.client import ResolvedImage


def _say(msg: str) -> None:
    click.echo(f"prewarm: {msg}", err=True)


def _finish(status: JobStatus, as_json: bool) -> None:
    from prewarm.errors import JobError
    from prewarm.fleet.jobs import job_summary_json
    from prewarm.fleet.progress import human_bytes

    if as_json:
        click.echo(job_summary_json(status))
    if status.state == "succeeded":
        if not as_json:
            click.echo(f"{status.image}: pre-warmed on {len(status.nodes)} node(s), "
                       f"{human_bytes(status.bytes_total)} (job {status.job_id})")
        return
    failures = "\n  ".join(status.failures()) or "no layer failed, but not every layer is ready"
    raise JobError(f"job {status.job_id} for {status.image} {status.state}:\n  {failures}")


class _Progress:
    """The progress display, made at the first status (its module imports Redis)."""

    def __init__(self) -> None:
        self.view: ProgressView | None = None

    def __call__(self, status: JobStatus, final: bool = False) -> None:
        if self.view is None:
            from prewarm.fleet.progress import ProgressView

            self.view = ProgressView()
        self.view.render(status, final=final)


def _quiet(msg: str) -> None:
    pass


def _schedule_embedded(settings: Settings, image: str, window: int | None, index: str,
                       concurrency: int | None, as_json: bool, quiet: bool,
                       containerd: tuple[Path, str] | None = None) -> None:
    from prewarm.node.local import run_embedded

    progress = None if quiet else _Progress()
    run = run_embedded(settings, image, window=window, index=cast("IndexPolicy", index),
                       concurrency=concurrency, say=_quiet if quiet else _say, on_progress=progress)
    if run.status is None:
        _register_in_containerd(settings, image, run.resolved, containerd, quiet)
        if as_json:
            click.echo(json.dumps({"image": image, "state": "succeeded", "fetched_bytes": 0,
                                   "manifest_digest": run.resolved.manifest_digest}))
        else:
            click.echo(f"{image}: already pre-warmed on this node ({run.resolved.manifest_digest}); "
                       "nothing fetched")
        return
    if progress:
        progress(run.status, final=True)
    _finish(run.status, as_json)
    _register_in_containerd(settings, image, run.resolved, containerd, quiet)


def _register_in_containerd(settings: Settings, image: str, resolved: ResolvedImage,
                            containerd: tuple[Path, str] | None, quiet: bool) -> None:
    """--containerd: register the now complete image in this node's containerd (no layer fetched)."""
    if containerd is None:
        return
    from prewarm.node.local import register_in_containerd

    done = register_in_containerd(settings, image, resolved, containerd[0], containerd[1])
    if not quiet:
        _say(f"registered {done.name} in containerd {containerd[0]} (namespace {done.namespace})")


@click.command()
@click.argument("image")
@click.option("--platform", help="os/arch[/variant] to pre-warm (default: this host's).")
@click.option("--wait", is_flag=True, help="Show progress until the job ends; exit non-zero if a layer failed.")
@click.option("--node", "nodes", multiple=True, metavar="NAME", help="Node to pre-warm (repeatable).")
@click.option("--all-nodes", is_flag=True, help="Every node whose worker is up.")
@click.option("--selector", "selectors", multiple=True, metavar="KEY=VALUE",
              help="Nodes whose labels match (repeatable: all must match).")
@click.option("--keep", is_flag=True, help="Standing schedule: nodes that join later are warmed too.")
@click.option("--dry-run", is_flag=True, help="Print per node what is present, what would be fetched, "
              "registry egress, free disk afterwards and an estimated time; fetch nothing.")
@click.option("--window", type=click.IntRange(1, 10000), default=None,
              help="Tasks in flight per node (default 32).")
@click.option("--index", type=click.Choice(["auto", "build", "none"]), default="auto", show_default=True,
              help="auto: the registry's SOCI index; without one, a fleet builds the zTOCs once and pushes "
                   "them as a SOCI index, one machine fetches layers whole. build: always build missing "
                   "zTOCs. none: fetch every layer whole.")
@click.option("--concurrency", type=click.IntRange(1, 256), default=None,
              help="Embedded mode: local worker processes (default: cores + 2).")
@click.option("--broker-url", envvar="PREWARM_BROKER_URL", help="Redis of the fleet (PREWARM_BROKER_URL). "
              "Without it the whole job runs on this machine.")
@click.option("--json", "as_json", is_flag=True, help="Print the final job summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@click.option("--containerd", "containerd_socket", type=click.Path(path_type=Path), default=None, metavar="SOCKET",
              help="Embedded mode: also register the pre-warmed image in this containerd (its gRPC socket), "
                   "so CRI sees it present. Fleet: give it to `prewarm worker` instead.")
@click.option("--namespace", default="k8s.io", show_default=True, help="containerd namespace (CRI uses k8s.io).")
@click.option("--timeout", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
              help="With --wait: stop waiting after SECONDS, report each unfinished node and exit 11 "
                   "(the job goes on).")
@click.option("--node-down-timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
              metavar="SECONDS", help="With --wait on a fleet: fail the pending layers of a node whose "
                                      "heartbeat stopped this long ago, instead of waiting for it forever.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, envvar="PREWARM_METRICS_PORT",
              help="With --wait on a fleet: serve the job's progress as Prometheus metrics on this port "
                   "(PREWARM_METRICS_PORT; 0: off).")
@registry_options
@root_option
def schedule_cmd(image: str, platform: str | None, wait: bool, nodes: tuple[str, ...], all_nodes: bool,
                 selectors: tuple[str, ...], keep: bool, dry_run: bool, window: int | None,
                 index: str, concurrency: int | None, broker_url: str | None, as_json: bool, quiet: bool,
                 containerd_socket: Path | None, namespace: str, timeout: float | None, node_down_timeout: float,
                 metrics_port: int | None,
                 insecure_registries: tuple[str, ...], ca_bundle: str | None, root: Path | None) -> None:
    """Pre-warm IMAGE: resolve it, split its layers into span tasks, and have the nodes fetch them.

    With no broker (PREWARM_BROKER_URL) the whole job runs on this machine: a private Redis
    and local workers are started and stopped again.
    """
    from prewarm.errors import ConfigError

    settings = settings_from(insecure_registries=insecure_registries, ca_bundle=ca_bundle, root=root,
                             platform=platform, broker_url=broker_url)
    if sum(bool(x) for x in (nodes, all_nodes, selectors)) > 1:
        raise ConfigError("give one of --node, --all-nodes and --selector")
    if not settings.broker_url:
        if nodes or all_nodes or selectors or keep:
            raise ConfigError("--node, --all-nodes, --selector and --keep need a fleet: set PREWARM_BROKER_URL")
        from prewarm.store.layout import check_root

        check_root(settings.root, writable=not dry_run)  # this machine's store: checked before anything else
        if not dry_run:
            from prewarm.store.landing import backend

            backend()  # the span writer (PREWARM_LANDING=c: the C extension is built)
        if containerd_socket:  # registered after the download: checked before it
            from prewarm.config import unix_socket

            containerd_socket = unix_socket(str(containerd_socket), "--containerd")
        if dry_run:
            from prewarm.node import local

            _print_dry_run(*local.dry_run(settings, image), image, as_json)  # one node: no sharing
            return
        _schedule_embedded(settings, image, window, index, concurrency, as_json, quiet,
                           (containerd_socket, namespace) if containerd_socket else None)
        return
    if containerd_socket:
        raise ConfigError("--containerd registers on this machine: with a fleet give --containerd to each "
                          "`prewarm worker` (or PREWARM_CONTAINERD_ADDRESS)")
    # Imported past the embedded branch: an image already pre-warmed needs none of them.
    from prewarm.fleet import submit
    from prewarm.fleet.broker import redact

    choice = submit.NodeChoice(names=nodes, every=all_nodes, selectors=selectors)
    if dry_run:
        lines, egress = submit.dry_run(settings, image, choice)
        _print_dry_run(lines, egress, image, as_json, sharing=sum(1 for line in lines if line.shares))
        return
    progress = _Progress() if wait and not quiet else None
    on_progress: Callable[[JobStatus], None] | None = progress
    if wait and metrics_port:
        on_progress = _with_metrics(metrics_port, progress)
    job = submit.submit(settings, image, choice, index=cast("IndexPolicy", index), window=window, keep=keep,
                        say=_quiet if quiet else _say, wait=wait, on_progress=on_progress, timeout=timeout,
                        node_down_limit=node_down_timeout)
    if job.status is None:
        click.echo(job.job_id)
        _say(f"job {job.job_id}: {job.plan.task_count} task(s) for {len(job.nodes)} node(s) "
             f"via {redact(settings.broker_url)}")
        return
    if progress:
        progress(job.status, final=True)
    _finish(job.status, as_json)


def _with_metrics(port: int, progress: _Progress | None) -> Callable[[JobStatus], None]:
    """Serve the scheduler's metrics on ``port``; the returned callback sets the job gauges at each poll."""
    from prewarm.node.metrics import observe_job, serve

    serve(port, multiprocess=False)

    def on_progress(status: JobStatus) -> None:
        observe_job(status)
        if progress is not None:
            progress(status)

    return on_progress


def _print_dry_run(lines, egress: int, image: str, as_json: bool,  # type: ignore[no-untyped-def]
                   sharing: int = 0) -> None:
    from prewarm.fleet.progress import human_bytes, human_seconds

    if as_json:
        click.echo(json.dumps({"image": image, "registry_egress": egress, "nodes": [
            {"node": l.node, "present_bytes": l.present_bytes, "fetch_bytes": l.fetch_bytes,
             "free_after": l.free_after, "seconds": round(l.seconds, 1)} for l in lines]}, indent=2))
        return
    click.echo(f"{'NODE':<24} {'PRESENT':>10} {'TO FETCH':>10} {'FREE AFTER':>11} {'EST. TIME':>9}")
    for l in lines:
        free = "unknown" if l.free_after is None else human_bytes(l.free_after)
        click.echo(f"{l.node:<24} {human_bytes(l.present_bytes):>10} {human_bytes(l.fetch_bytes):>10} "
                   f"{free:>11} {human_seconds(l.seconds):>9}")
    click.echo(f"registry egress: {human_bytes(egress)} for {image}"
               + (f" ({sharing} node(s) share spans: each layer about once for them)" if sharing else ""))


@click.command()
@click.argument("job", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--broker-url", envvar="PREWARM_BROKER_URL")
@root_option
def status_cmd(job: str | None, as_json: bool, broker_url: str | None, root: Path | None) -> None:
    """Show a job (or list recent jobs): per node and layer state, bytes, and why a layer failed.

    With --json: JOB's summary as one object; the listing as one array ([] when empty).
    """
    from prewarm.fleet import jobs
    from prewarm.fleet.broker import redis_client
    from prewarm.fleet.progress import human_bytes

    if job is not None:
        nonempty(job, "job id")
    settings = settings_from(root=root, broker_url=broker_url)
    if not settings.broker_url:
        from prewarm.node.local import saved_summaries
        from prewarm.store.layout import check_root

        check_root(settings.root, writable=False)

        summaries = list(saved_summaries(settings.root, job))
        if as_json and not job:  # a listing: one JSON array, [] when empty
            click.echo(json.dumps([json.loads(text) for text in summaries], indent=2))
            return
        if not summaries:
            _say_empty(as_json, f"no job has run on this machine yet (store {settings.root})")
        for text in summaries:
            data = json.loads(text)
            click.echo(text if as_json else
                       f"{data['job']}  {data['state']:<10} {data['image']}  "
                       f"{human_bytes(data['bytes_done'])}/{human_bytes(data['bytes_total'])}")
        return
    r = redis_client(settings.broker_url)
    ids = [job] if job else jobs.list_jobs(r)
    if as_json and not job:  # a listing: one JSON array, [] when empty
        click.echo(json.dumps([json.loads(jobs.job_summary_json(jobs.job_status(r, i))) for i in ids], indent=2))
        return
    if not ids:
        _say_empty(as_json, "no job in the fleet (prewarm schedule IMAGE starts one)")
    for job_id in ids:
        status = jobs.job_status(r, job_id)
        if as_json:
            click.echo(jobs.job_summary_json(status))
            continue
        click.echo(f"{status.job_id}  {status.state:<10} {status.image}  "
                   f"{human_bytes(status.bytes_done)}/{human_bytes(status.bytes_total)}")
        if job:
            for name, ns in sorted(status.nodes.items()):
                ready = sum(1 for s in ns.layers.values() if s == jobs.LAYER_READY)
                click.echo(f"  {name:<20} {ns.state:<10} layers {ready}/{len(status.plan.layers)} "
                           f"{human_bytes(ns.bytes_done)}/{human_bytes(ns.bytes_total)}  "
                           f"from registry {human_bytes(ns.bytes_registry)}, from peers {human_bytes(ns.bytes_peers)}"
                           + (f", {ns.peer_bad} bad peer(s)" if ns.peer_bad else ""))
            for line in status.failures():
                click.echo(f"  failed: {line}")


def _say_empty(as_json: bool, what: str) -> None:
    """An empty listing still answers: ``[]`` for JSON, one line otherwise."""
    click.echo("[]" if as_json else what)


@click.command()
@click.argument("job")
@click.option("--broker-url", envvar="PREWARM_BROKER_URL", required=True)
def cancel_cmd(job: str, broker_url: str) -> None:
    """Stop handing out work for JOB; tasks in flight finish, stores stay consistent."""
    from prewarm.fleet import jobs
    from prewarm.fleet.broker import redis_client

    nonempty(job, "job id")
    remember_broker(broker_url)
    jobs.cancel_job(redis_client(broker_url), job)
    click.echo(f"job {job} cancelled")


def register(main: click.Group) -> None:
    main.add_command(schedule_cmd, "schedule")
    main.add_command(status_cmd, "status")
    main.add_command(cancel_cmd, "cancel")
