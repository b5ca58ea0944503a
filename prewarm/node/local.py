"""One machine's job from start to end: ``prewarm schedule`` without a broker.

    parse the reference (once)
    === start a private Redis and workers now if the store is empty (their ~2 s start-up
        overlaps with resolving), else only once something is to be fetched
    === resolve; every layer already ready: record the image, done, nothing fetched
    === check space, find zTOCs and plan (:func:`prewarm.fleet.submit.plan_job`)
    === prepare the span layers ahead in a thread while the workers start
    === launch on the private Redis, wait (reporting each status), record the image
    === save the job's summary in the store (``prewarm status`` reads it: :func:`saved_summaries`)

Why the imports below the shortcut are lazy: an image already pre-warmed must not pay for
Celery and Redis (0.55 s of a ~1 s second schedule).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prewarm.config import Settings
from prewarm.errors import CorruptContent, JobNotFound, StoreError
from prewarm.fleet.plan import plan_resolved
from prewarm.resolve.reference import parse_reference
from prewarm.runtime.images import find_record, record_prewarmed_image
from prewarm.store.layout import Layout

if TYPE_CHECKING:
    from prewarm.fleet.jobs import JobStatus
    from prewarm.fleet.schedule import DryRunLine
    from prewarm.fleet.submit import IndexPolicy
    from prewarm.node.embedded import EmbeddedCluster
    from prewarm.resolve.registry.client import RegistryClient, ResolvedImage
    from prewarm.runtime.containerd import Registration
    from prewarm.store.content import ContentStore


log = logging.getLogger(__name__)


def _silent(msg: str) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class LocalRun:
    """What :func:`run_embedded` did: the resolved image and the job's final status.

    ``status`` is None when every layer was already ready: nothing was fetched.
    """

    resolved: ResolvedImage
    status: JobStatus | None


def run_embedded(settings: Settings, image: str, *, window: int | None = None, index: IndexPolicy = "auto",
                 concurrency: int | None = None, say: Callable[[str], None] = _silent,
                 on_progress: Callable[[JobStatus], None] | None = None) -> LocalRun:
    """Pre-warm ``image`` into this machine's store with a private Redis and local workers.

    ``on_progress`` gets each status while the job runs; a failed job is returned, not
    raised.  The private processes are stopped outright when this returns or raises
    (unknown image, no space, ^C): every write of a task is safe against kill -9.

    Raises:
        InvalidReference: ``image`` is not an image reference.
        InsufficientSpace: the image cannot fit in the store (checked before fetching).
        ConfigError: redis-server is not installed.
        PrewarmError: the registry's errors as it reports them; the private Redis or a
            worker died.
    """
    ref = parse_reference(image)
    with contextlib.ExitStack() as stack:
        cluster = None
        if next(Layout(settings.root).layer_digests(), None) is None:
            # Nothing can be pre-warmed yet: start the private Redis and workers first, so
            # their start-up (~0.6 s) overlaps with resolving the image and getting its
            # zTOCs.  First of all: the registry client and the store are imported after.
            cluster = _start_cluster(stack, settings, concurrency)
        from prewarm.resolve.registry.client import RegistryClient
        from prewarm.store.content import ContentStore

        client = RegistryClient.from_settings(settings)
        store = ContentStore(settings.root)
        resolved = client.resolve(ref, settings.platform)
        if cluster is None:
            if all(store.is_ready(layer.digest) for layer in resolved.layers):
                record_prewarmed_image(Layout(settings.root), image, plan_resolved(resolved, {}))
                return LocalRun(resolved, None)
            cluster = _start_cluster(stack, settings, concurrency)
        status = _run_job(settings, image, client, store, resolved, cluster, window=window, index=index,
                          say=say, on_progress=on_progress)
    return LocalRun(resolved, status)


def _start_cluster(stack: contextlib.ExitStack, settings: Settings,
                   concurrency: int | None) -> EmbeddedCluster:
    """This node's private Redis and workers, killed when ``stack`` closes."""
    from prewarm.node.embedded import embedded_cluster

    cluster = stack.enter_context(embedded_cluster(settings, concurrency=concurrency))
    stack.callback(setattr, cluster, "job_over", True)
    return cluster


def _run_job(settings: Settings, image: str, client: RegistryClient, store: ContentStore,
             resolved: ResolvedImage, cluster: EmbeddedCluster, *, window: int | None, index: IndexPolicy,
             say: Callable[[str], None], on_progress: Callable[[JobStatus], None] | None) -> JobStatus:
    """The job on the private cluster: space check, zTOCs, plan, launch, wait; its final status."""
    from prewarm.fleet import schedule
    from prewarm.fleet.broker import redis_client
    from prewarm.fleet.submit import plan_job
    from prewarm.node.prepare import prepare_layers_ahead
    from prewarm.store.ztoc_cache import ZtocCache

    schedule.check_space_before_download(store, client, resolved)
    plan = plan_job(settings, client, resolved, index=index, fleet=False, say=say)
    present = {i for i, layer in enumerate(plan.layers) if store.is_ready(layer.digest)}
    before = StoreBefore(settings.root, image, frozenset(store.list_layers()),
                      Layout(settings.root).image(image).is_file())
    # The scheduler is idle while its workers start: it prepares the layers meanwhile.
    preparer = threading.Thread(target=prepare_layers_ahead, name="prepare-layers", daemon=True,
                                args=(store, plan.layers, ZtocCache(store.layout).get))
    preparer.start()
    cluster.wait_redis()
    r = redis_client(cluster.broker_url)
    job_id = schedule.launch(r, cluster.broker_url, plan, image, [settings.node_name], window=window,
                             present={settings.node_name: present}, signer=cluster.signer)
    status = schedule.wait_for_job(r, job_id, on_update=on_progress, alive=cluster.check_workers)
    preparer.join(timeout=30)
    try:
        if status.state == "succeeded":
            # A worker records it too, but may be killed before it has: the record is ours.
            record_prewarmed_image(Layout(settings.root), image, plan)
        _save_summary(settings.root, status)
    except (StoreError, OSError) as err:
        raise before.restore(job_id, err) from None
    return status


@dataclasses.dataclass(frozen=True)
class StoreBefore:
    """What the store held before an embedded job: its layers and whether ``image`` had a record.

    Why: the job's records (the image record, its chains, the job summary) are written
    after its layers are ready.  If one of them cannot be written (a full disk after the
    space check passed, a read-only remount), :meth:`restore` takes back what the job
    added, so no ready layer is left without the record that names it.
    """

    root: Path
    image: str
    layers: frozenset[str]
    recorded: bool

    def restore(self, job_id: str, err: Exception) -> StoreError:
        """Remove this job's new layers (those no other record, pin or snapshot uses), its
        image record if it made it, and its summary; the StoreError to raise.
        """
        from prewarm.runtime import gc
        from prewarm.store.atomic import write_failed
        from prewarm.store.content import ContentStore

        layout = Layout(self.root)
        # each step on its own: the store that failed one write may fail these too
        made = [_summaries(self.root) / f"{job_id}.json", layout.pins_dir() / f"{job_id}.json"]
        if not self.recorded:
            made.append(layout.image(self.image))
        for path in made:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        gc.collect(layout, only=set(ContentStore(self.root).list_layers()) - self.layers)
        if isinstance(err, OSError):
            return write_failed(Path(err.filename or self.root), err, self.root)
        return err if isinstance(err, StoreError) else StoreError(str(err))


def _summaries(root: Path) -> Path:
    return root / "jobs"


def _save_summary(root: Path, status: JobStatus) -> None:
    from prewarm.fleet.jobs import job_summary_json
    from prewarm.store.atomic import atomic_write

    atomic_write(_summaries(root) / f"{status.job_id}.json", job_summary_json(status).encode())


def saved_summaries(root: Path, job: str | None = None, limit: int = 20) -> list[str]:
    """The JSON summaries embedded jobs left in the store at ``root``, newest first (``job``'s only).

    Why: the private Redis of an embedded job is gone once it ends, so ``prewarm status``
    without a broker reads these.

    A summary that is not a JSON object with the fields ``prewarm status`` shows is skipped
    with a warning naming its file, as corrupt image records are; asked for by its id, it is
    CorruptContent naming the file.

    Raises:
        JobNotFound: ``job`` was given and left no summary here.
        CorruptContent: ``job``'s own summary is corrupt.
    """
    folder = _summaries(root)
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) \
        if folder.is_dir() else []
    if job:
        files = [f for f in files if f.stem == job]
        if not files:
            raise JobNotFound(f"no job {job} in {folder} (and no PREWARM_BROKER_URL to ask a fleet)")
    out = []
    for path in files[:limit]:
        try:
            out.append(_read_summary(path))
        except CorruptContent as err:
            if job:
                raise
            log.warning("skipping it: %s", err)
    return out


_SUMMARY_FIELDS = {"job": str, "state": str, "image": str, "bytes_done": int, "bytes_total": int}


def _read_summary(path: Path) -> str:
    """A summary's text once it parses as one we wrote.

    Raises:
        CorruptContent: it does not (naming the file).
    """
    try:
        text = path.read_text()
        data = json.loads(text)
        bad = [k for k, kind in _SUMMARY_FIELDS.items() if not isinstance(data.get(k), kind)]
    except (OSError, ValueError, AttributeError) as err:
        raise CorruptContent(f"job summary {path} is corrupt ({type(err).__name__}); remove it") from None
    if bad:
        raise CorruptContent(f"job summary {path} is corrupt (no valid {', '.join(bad)}); remove it")
    return text


def register_in_containerd(settings: Settings, image: str, resolved: ResolvedImage, address: Path,
                           namespace: str) -> Registration:
    """Register the now complete ``image`` in this machine's containerd; no layer is fetched.

    Raises:
        StoreError: the store holds no record of ``image`` (it was not pre-warmed here).
        ContainerdError: containerd refused it (an unknown namespace, ...).
    """
    from prewarm.runtime.containerd import ContainerdClient, register_image

    layout = Layout(settings.root)
    record = find_record(layout, image)
    if record is None:
        raise StoreError(f"{image}: no image record in {settings.root} after the job; pre-warm it again")
    return register_image(ContainerdClient(address, namespace), layout, record, resolved.manifest_bytes,
                          resolved.config_bytes)


def dry_run(settings: Settings, image: str) -> tuple[list[DryRunLine], int]:
    """What :func:`run_embedded` would fetch here, and the free disk left after; fetching nothing."""
    from prewarm.fleet import schedule
    from prewarm.resolve.registry.client import RegistryClient
    from prewarm.store.content import ContentStore

    resolved = RegistryClient.from_settings(settings).resolve(parse_reference(image), settings.platform)
    plan = plan_resolved(resolved, {})
    store = ContentStore(settings.root)
    held = frozenset(l.digest for l in plan.layers if store.is_ready(l.digest))
    probe = settings.root if settings.root.exists() else settings.root.parent
    return schedule.dry_run(plan, [(settings.node_name, held, shutil.disk_usage(probe).free)])
