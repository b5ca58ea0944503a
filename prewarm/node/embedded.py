"""The embedded default: the whole job on this machine, with no other set-up.

With no broker configured, ``prewarm schedule`` starts a private ``redis-server`` on a
unix socket in a private folder and local ``prewarm worker`` processes, runs the very same
tasks as a fleet would, and stops them afterwards (by PID).  Processes are started
first and waited for last, so their start-up overlaps with resolving the image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prewarm.config import Settings
from prewarm.errors import ConfigError, PrewarmError
from prewarm.fleet.signing import CERT_WAIT_ENV, TaskSigner, ensure_keypair, keypair_paths
from prewarm.node.restart import set_death_signal


@dataclasses.dataclass
class EmbeddedCluster:
    """A private Redis and local workers; ``broker_url`` reaches the Redis."""

    dir: Path
    redis: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]
    broker_url: str
    #: The key and certificate the job's tasks are signed with (the workers trust only it).
    signing: tuple[Path, Path] | None = None
    #: Set when the job has ended: the workers are then killed outright instead of shut
    #: down gracefully (see :func:`embedded_cluster`).
    job_over: bool = False
    _signer: TaskSigner | None = dataclasses.field(default=None, repr=False)

    @property
    def signer(self) -> TaskSigner:
        """The signer of the job's tasks, loaded on first use.

        Why not when the cluster starts: loading it imports Celery's security modules (~0.2 s),
        which on an empty store sat between starting the workers and resolving the image, so
        on the path to the first span.  The job needs it only at launch, by when the layers'
        preparing thread runs beside it.
        """
        if self._signer is None:
            if self.signing is None:
                raise PrewarmError("the embedded cluster has no task-signing key")
            self._signer = TaskSigner.from_files(*self.signing)
        return self._signer

    @property
    def socket(self) -> Path:
        return self.dir / "redis.sock"

    def wait_redis(self, timeout: float = 10.0) -> None:
        """Block until the private Redis answers; fail at once if it exited at start-up."""
        import redis

        from prewarm.fleet.broker import wait_until_answers

        wait_until_answers(redis.Redis(unix_socket_path=str(self.socket)),
                           what=f"the private redis-server on {self.socket}", timeout=timeout,
                           alive=self._check_redis)

    def _check_redis(self) -> None:
        if self.redis.poll() is not None:
            lines = (self.dir / "redis.log").read_text(errors="replace").strip().splitlines() or ["(no log)"]
            # redis logs its reason last, as "pid:M date # reason": that line alone, so the error stays one line
            reason = lines[-1].split(" # ", 1)[-1].strip()
            raise PrewarmError(f"the private redis-server exited at start-up: {reason} "
                               f"(its log: {self.dir / 'redis.log'})")

    def check_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is not None:
                log = (self.dir / "worker.log").read_text(errors="replace")[-2000:]
                raise PrewarmError(f"a local worker exited with status {proc.returncode}:\n{log}")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a process we started, by its PID: SIGTERM, and SIGKILL if it outlives ``timeout``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def default_concurrency() -> int:
    """Worker processes: two more than cores, so the processes waiting on a download or a
    direct write to disk leave every core inflating (measured: 3 -> 4 processes on 2 cores,
    bench.bench_pipeline's (h) ~5% faster; 5 and 6 no faster)."""
    return (os.cpu_count() or 1) + 2


#: How long a worker started before the key pair waits for its certificate: far longer
#: than making one takes; a scheduler that failed to make it stops its workers anyway.
CERT_WAIT_SECONDS = 30.0

#: The private cluster's run folders under the temp directory, one per embedded run.
RUN_DIR_PREFIX = "prewarm-embedded-"


def _die_with_parent() -> None:
    """In a child of the embedded cluster: be sent SIGTERM when the command that started it dies.

    Why: a command killed outright (SIGKILL, the OOM killer) runs no cleanup; without this
    its private redis-server and workers would run on, orphaned.
    """
    with contextlib.suppress(OSError):  # as before: a child the kernel refuses it still runs
        set_death_signal(signal.SIGTERM)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while the cleanup runs; the first one comes after it.

    The handlers are swapped for one that only remembers (a blocked mask would not do:
    CPython runs a handler in the main thread whichever thread the kernel picked).  Outside
    the main thread, where handlers cannot be set, nothing is held.
    """
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    pending: list[int] = []
    try:
        old = {sig: signal.signal(sig, lambda signum, _frame: pending.append(signum)) for sig in held}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if pending:
            os.kill(os.getpid(), pending[0])  # now to the handler the command had


def _remove_orphaned_run_dirs() -> None:
    """Remove run folders of embedded runs whose command is gone (killed before its cleanup ran)."""
    for folder in Path(tempfile.gettempdir()).glob(RUN_DIR_PREFIX + "*"):
        try:
            pid = int((folder / "pid").read_text())
        except (OSError, ValueError):
            continue  # another version's folder, or one being made: not ours to judge
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            continue


#: sun_path's size on Linux (the terminating NUL included).
MAX_SOCKET_PATH = 108


@contextlib.contextmanager
def embedded_cluster(settings: Settings, *, concurrency: int | None = None,
                     workers: int = 1) -> Iterator[EmbeddedCluster]:
    """Start a private Redis and ``workers`` worker processes consuming this node's queue.

    Raises:
        ConfigError: redis-server is not installed.
    """
    redis_server = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(redis_server):
        raise ConfigError(
            "the embedded mode needs redis-server (Debian package redis-server); install it, "
            "or set PREWARM_BROKER_URL to use a fleet's Redis"
        )
    settings.root.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_run_dirs()
    sock_path = Path(tempfile.gettempdir()) / f"{RUN_DIR_PREFIX}xxxxxxxx" / "redis.sock"
    if len(os.fsencode(sock_path)) >= MAX_SOCKET_PATH:
        raise ConfigError(f"the private Redis's socket {sock_path} would be longer than a unix socket path may "
                          f"be ({MAX_SOCKET_PATH - 1} bytes): set TMPDIR to a shorter folder")
    run_dir: Path | None = None
    redis_proc: subprocess.Popen[bytes] | None = None
    procs: list[subprocess.Popen[bytes]] = []
    cluster: EmbeddedCluster | None = None
    try:
        with _signals_held():  # a signal right after mkdtemp still finds the folder to remove
            run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
        sock = run_dir / "redis.sock"
        broker_url = f"unix://{sock}"
        (run_dir / "pid").write_text(str(os.getpid()))
        # Held while forking: a signal taken inside CPython's at-fork handlers is printed and
        # then ignored (the run would go on), and one between the fork and the assignment would
        # leave a child the cleanup does not know.  It is taken right after instead.
        with _signals_held():
            redis_proc = subprocess.Popen(
                [redis_server, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                 "--save", "", "--appendonly", "no", "--dir", str(run_dir), "--daemonize", "no",
                 "--logfile", str(run_dir / "redis.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl; no thread of ours runs yet
            )
        # The private cluster signs its tasks too: its Redis socket is root's alone, but a
        # worker that runs only signed tasks is the same code path everywhere.  On an empty
        # store the pair is made after the workers start, while they import; they wait for
        # the certificate (CERT_WAIT_ENV) before their check of it.
        _, cert = keypair_paths(settings.root / "keys")
        env = {**os.environ,
               **dataclasses.replace(settings, broker_url=broker_url, trusted_certs=str(cert)).to_env()}
        env.setdefault("PREWARM_VISIBILITY_TIMEOUT", "300")
        if not cert.is_file():
            env[CERT_WAIT_ENV] = str(CERT_WAIT_SECONDS)
        # the workers' own temp files (their pools' pymp-* folders) go in the run folder, which
        # the cleanup removes: a worker stopped outright cannot remove them itself
        env["TMPDIR"] = str(run_dir)
        cluster = EmbeddedCluster(run_dir, redis_proc, procs, broker_url)
        with open(run_dir / "worker.log", "ab") as log:
            for i in range(workers):
                with _signals_held():  # as for redis-server above
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "prewarm", "worker",
                         "--concurrency", str(concurrency or default_concurrency()),
                         "--hostname", f"embedded{i}-{os.getpid()}@{settings.node_name}", "--quiet",
                         # a private broker has no other workers to sync with or gossip to, and
                         # no Flower to send task events to (~6% of a cold run's profile samples)
                         "--no-task-events", "--without-mingle", "--without-gossip"],
                        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl; no thread of ours runs yet
                    ))
        # after the workers are started: making the pair takes 0.02-0.15 s that their start-up
        # overlaps (the signer is loaded when the job launches: EmbeddedCluster.signer)
        cluster.signing = ensure_keypair(settings.root / "keys")
        yield cluster
    finally:
        # Whatever ends the run (success, an error, Ctrl-C, SIGTERM), and a second signal
        # while this runs: the cleanup finishes first, the signal is taken after it.
        with _signals_held():
            over = cluster is not None and cluster.job_over
            for proc in procs:
                if proc.poll() is None:
                    if over:
                        # Why: Celery's shutdown takes ~2 s of a ~14 s cold pre-warm.  Once the
                        # job is over nothing is left to finish: every task's writes are safe
                        # against kill -9 (the store's contract) and the private broker is
                        # thrown away with its messages.
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.send_signal(signal.SIGTERM)
            for proc in procs:
                stop_process(proc, 10)
            if redis_proc is not None:
                if over and redis_proc.poll() is None:
                    # it keeps nothing (no save, no append-only file), and SIGTERM is taken
                    # only at its next tick: up to 0.1 s of every embedded run
                    redis_proc.kill()
                stop_process(redis_proc, 5)
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
            if procs:  # a worker stopped mid-write leaves its temp file beside a whole record
                from prewarm.store.atomic import remove_orphaned_temps
                from prewarm.store.layout import Layout

                for proc in procs:  # the pool processes of each worker's session, whatever is left of them
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                remove_orphaned_temps(Layout(settings.root).record_folders(), wait=2.0)
