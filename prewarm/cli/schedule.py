"""``prewarm schedule``, ``prewarm status`` and ``prewarm cancel``."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import click

from prewarm.cli._common import registry_options, root_option, settings_from


def _say(msg: str) -> None:
    click.echo(f"prewarm: {msg}", err=True)


def _finish(status, as_json: bool) -> None:  # type: ignore[no-untyped-def]
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


def _save_summary(root: Path, status) -> None:  # type: ignore[no-untyped-def]
    from prewarm.store.atomic import atomic_write
    from prewarm.fleet.jobs import job_summary_json

    atomic_write(root / "jobs" / f"{status.job_id}.json", job_summary_json(status).encode())


def _register_in_containerd(settings, image: str, resolved, containerd: tuple[Path, str] | None,
                            quiet: bool) -> None:  # type: ignore[no-untyped-def]
    """--containerd: register the now complete image in this node's containerd (no layer fetched)."""
    if containerd is None:
        return
    from prewarm.runtime.containerd import ContainerdClient, register_image
    from prewarm.errors import StoreError
    from prewarm.runtime.images import find_record
    from prewarm.store.layout import Layout

    layout = Layout(settings.root)
    record = find_record(layout, image)
    if record is None:
        raise StoreError(f"{image}: no image record in {settings.root} after the job; pre-warm it again")
    client = ContainerdClient(containerd[0], containerd[1])
    done = register_image(client, layout, record, resolved.manifest_bytes, resolved.config_bytes)
    if not quiet:
        _say(f"registered {done.name} in containerd {containerd[0]} (namespace {done.namespace})")


def _schedule_embedded(settings, image: str, window: int | None, index: str, concurrency: int | None,
                       as_json: bool, quiet: bool,
                       containerd: tuple[Path, str] | None = None) -> None:  # type: ignore[no-untyped-def]
    from prewarm.runtime.images import record_prewarmed_image
    from prewarm.store.layout import Layout
    from prewarm.fleet.plan import plan_resolved
    from prewarm.resolve.reference import parse_reference
    from prewarm.resolve.registry.client import RegistryClient
    from prewarm.store.content import ContentStore

    ref = parse_reference(image)
    client = RegistryClient.from_settings(settings)
    store = ContentStore(settings.root)
    with contextlib.ExitStack() as stack:
        cluster = None
        if not store.list_layers():
            # Nothing can be pre-warmed yet: start the private Redis and workers first, so
            # their start-up (~2 s) overlaps with resolving the image and getting its zTOCs.
            cluster = _start_cluster(stack, settings, concurrency)
        resolved = client.resolve(ref, settings.platform)
        if cluster is None:
            if all(store.is_ready(layer.digest) for layer in resolved.layers):
                record_prewarmed_image(Layout(settings.root), image, plan_resolved(resolved, {}))
                _register_in_containerd(settings, image, resolved, containerd, quiet)
                if as_json:
                    click.echo(json.dumps({"image": image, "state": "succeeded", "fetched_bytes": 0,
                                           "manifest_digest": resolved.manifest_digest}))
                else:
                    click.echo(f"{image}: already pre-warmed on this node ({resolved.manifest_digest}); "
                               "nothing fetched")
                return
            cluster = _start_cluster(stack, settings, concurrency)
        status = _run_embedded_job(settings, image, window, index, quiet, client, store, resolved, cluster)
    _finish(status, as_json)
    _register_in_containerd(settings, image, resolved, containerd, quiet)


def _start_cluster(stack: contextlib.ExitStack, settings, concurrency: int | None):  # type: ignore[no-untyped-def]
    """This node's private Redis and workers, stopped when ``stack`` closes.

    They are stopped outright, whether the job ended or failed (unknown image, no space,
    ^C): nothing of theirs needs to finish, every write of a task is safe against kill -9.
    """
    # Celery and Redis: imported only when something is to be fetched
    from prewarm.node.embedded import embedded_cluster

    cluster = stack.enter_context(embedded_cluster(settings, concurrency=concurrency))
    stack.callback(setattr, cluster, "job_over", True)
    return cluster


def _run_embedded_job(settings, image: str, window: int | None, index: str, quiet: bool, client, store,  # type: ignore[no-untyped-def]
                      resolved, cluster):
    """The job on this node's private cluster: space check, zTOCs, plan, launch, wait; its final status."""
    from prewarm.fleet import schedule
    from prewarm.fleet.broker import redis_client
    from prewarm.runtime.images import record_prewarmed_image
    from prewarm.store.layout import Layout
    from prewarm.fleet.plan import plan_resolved
    from prewarm.fleet.progress import ProgressView

    schedule.check_space_before_download(store, client, resolved)
    # One node: building zTOCs here would download every layer twice, so without a
    # SOCI index in the registry the layers go whole unless --index build says otherwise.
    span_layers = {} if index == "none" else schedule.find_ztocs(
        settings, client, resolved, build=index == "build", push=False,
        say=_say if not quiet else lambda m: None)[0]
    plan = plan_resolved(resolved, span_layers, spans_per_task=settings.spans_per_task)
    present = {i for i, layer in enumerate(plan.layers) if store.is_ready(layer.digest)}
    preparer = threading.Thread(target=schedule.prepare_layers, args=(store, plan), daemon=True,
                                name="prepare-layers")
    preparer.start()
    cluster.wait_redis()
    r = redis_client(cluster.broker_url)
    job_id = schedule.launch(r, cluster.broker_url, plan, image, [settings.node_name], window=window,
                             present={settings.node_name: present})
    view = ProgressView() if not quiet else None
    status = schedule.wait_for_job(r, job_id, on_update=view.render if view else None,
                                   alive=cluster.check_workers)
    if status.state == "succeeded":
        # A worker records it too, but may be killed before it has: the record is ours.
        record_prewarmed_image(Layout(settings.root), image, plan)
    preparer.join(timeout=30)
    if view:
        view.render(status, final=True)
    _save_summary(settings.root, status)
    return status


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
@registry_options
@root_option
def schedule_cmd(image: str, platform: str | None, wait: bool, nodes: tuple[str, ...], all_nodes: bool,
                 selectors: tuple[str, ...], keep: bool, dry_run: bool, window: int | None,
                 index: str, concurrency: int | None, broker_url: str | None, as_json: bool, quiet: bool,
                 containerd_socket: Path | None, namespace: str, insecure_registries: tuple[str, ...], ca_bundle: str | None, root: Path | None) -> None:
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
        if dry_run:
            _dry_run_local(settings, image, as_json)
            return
        _schedule_embedded(settings, image, window, index, concurrency, as_json, quiet,
                           (containerd_socket, namespace) if containerd_socket else None)
        return
    # Imported past the embedded branch: an image already pre-warmed needs none of them.
    from prewarm.fleet import schedule
    from prewarm.fleet.broker import redact, redis_client
    from prewarm.fleet.nodes import list_nodes, parse_labels, select_nodes
    from prewarm.fleet.plan import plan_resolved
    from prewarm.fleet.progress import ProgressView
    from prewarm.resolve.reference import parse_reference
    from prewarm.resolve.registry.client import RegistryClient

    if containerd_socket:
        raise ConfigError("--containerd registers on this machine: with a fleet give --containerd to each "
                          "`prewarm worker` (or PREWARM_CONTAINERD_ADDRESS)")
    ref = parse_reference(image)
    client = RegistryClient.from_settings(settings)
    resolved = client.resolve(ref, settings.platform)
    r = redis_client(settings.broker_url)
    fleet = list_nodes(r)
    if selectors or all_nodes:
        chosen = select_nodes(fleet, parse_labels(list(selectors)))
        if not chosen:
            raise ConfigError(f"no node that is up matches {' '.join(selectors) or '--all-nodes'} "
                              "(prewarm nodes lists them)")
        targets = [n.name for n in chosen]
    else:
        targets = schedule.require_nodes(r, nodes)
    if dry_run:
        plan = plan_resolved(resolved, {})
        info = {n.name: n for n in fleet}
        rows = [(t, info[t].layers if t in info else frozenset(), info[t].free_bytes if t in info else None)
                for t in targets]
        from prewarm.fleet.peers import sharing_nodes

        _print_dry_run(plan, image, rows, as_json, sharing_nodes(r, targets))
        return
    if index == "none":
        span_layers: dict = {}
    else:
        span_layers, _ = schedule.find_ztocs(settings, client, resolved, build=True, push=True,
                                             say=_say if not quiet else lambda m: None)
    plan = plan_resolved(resolved, span_layers, spans_per_task=settings.spans_per_task)
    job_id = schedule.launch(r, settings.broker_url, plan, image, targets, window=window,
                             keep=dict(parse_labels(list(selectors))) if keep else None)
    if not wait:
        click.echo(job_id)
        _say(f"job {job_id}: {plan.task_count} task(s) for {len(targets)} node(s) via {redact(settings.broker_url)}")
        return
    view = ProgressView() if not quiet else None
    status = schedule.wait_for_job(r, job_id, on_update=view.render if view else None)
    if view:
        view.render(status, final=True)
    _finish(status, as_json)


def _print_dry_run(plan, image: str, rows, as_json: bool,  # type: ignore[no-untyped-def]
                   sharing: frozenset[str] = frozenset()) -> None:
    from prewarm.fleet import schedule
    from prewarm.fleet.progress import human_bytes, human_seconds

    lines, egress = schedule.dry_run(plan, rows, sharing=sharing)
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
               + (f" ({len(sharing)} node(s) share spans: each layer about once for them)" if sharing else ""))


def _dry_run_local(settings, image: str, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from prewarm.fleet.plan import plan_resolved
    from prewarm.resolve.reference import parse_reference
    from prewarm.resolve.registry.client import RegistryClient
    from prewarm.store.content import ContentStore

    resolved = RegistryClient.from_settings(settings).resolve(parse_reference(image), settings.platform)
    plan = plan_resolved(resolved, {})
    store = ContentStore(settings.root)
    held = frozenset(l.digest for l in plan.layers if store.is_ready(l.digest))
    probe = settings.root if settings.root.exists() else settings.root.parent
    _print_dry_run(plan, image, [(settings.node_name, held, shutil.disk_usage(probe).free)], as_json)


@click.command()
@click.argument("job", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--broker-url", envvar="PREWARM_BROKER_URL")
@root_option
def status_cmd(job: str | None, as_json: bool, broker_url: str | None, root: Path | None) -> None:
    """Show a job (or list recent jobs): per node and layer state, bytes, and why a layer failed."""
    from prewarm.fleet import jobs
    from prewarm.fleet.broker import redis_client
    from prewarm.fleet.progress import human_bytes

    settings = settings_from(root=root, broker_url=broker_url)
    if not settings.broker_url:
        # Embedded jobs leave their final summary in the store.
        folder = settings.root / "jobs"
        files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
        if job:
            files = [f for f in files if f.stem == job]
            if not files:
                from prewarm.errors import JobError

                raise JobError(f"no job {job} in {folder} (and no PREWARM_BROKER_URL to ask a fleet)")
        for f in files[:20]:
            data = json.loads(f.read_text())
            click.echo(f.read_text() if as_json else
                       f"{data['job']}  {data['state']:<10} {data['image']}  "
                       f"{human_bytes(data['bytes_done'])}/{human_bytes(data['bytes_total'])}")
        return
    r = redis_client(settings.broker_url)
    ids = [job] if job else jobs.list_jobs(r)
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


@click.command()
@click.argument("job")
@click.option("--broker-url", envvar="PREWARM_BROKER_URL", required=True)
def cancel_cmd(job: str, broker_url: str) -> None:
    """Stop handing out work for JOB; tasks in flight finish, stores stay consistent."""
    from prewarm.fleet import jobs
    from prewarm.fleet.broker import redis_client

    jobs.cancel_job(redis_client(broker_url), job)
    click.echo(f"job {job} cancelled")


def register(main: click.Group) -> None:
    main.add_command(schedule_cmd, "schedule")
    main.add_command(status_cmd, "status")
    main.add_command(cancel_cmd, "cancel")
