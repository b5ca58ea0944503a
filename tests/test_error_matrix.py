"""Every command under every failure class: one line, the documented exit code, nothing left behind (issue 19 item 9).

One table drives it: each row is a command, a condition it meets, the exit code the
README's table promises and the words its one line must hold.  The conditions are real:

* broker: a port nothing listens on, TLS spoken to a plain Redis port, an ACL user with
  too few rights, a database number Redis does not have (a real ``redis-server``), and a
  server that is not Redis (the registry's HTTP port);
* store: a regular file as the root, a read-only bind mount (``mount --bind`` then
  ``mount -o remount,ro,bind``), a full tmpfs, corrupt image records and job summaries;
* settings: malformed ``PREWARM_*`` values and flags, checked before anything is fetched;
* not found and empty arguments, a registry whose manifest is not JSON (a loopback server
  of our own), an unreachable registry;
* empty listings (one line, ``[]`` for ``--json``);
* SIGTERM and SIGINT to an embedded ``prewarm schedule`` at several moments.

For each row it asserts the exit code; exactly one line (on stderr for a failure, on stdout
for an empty listing), naming the thing, and no traceback; an end within the row's time
bound; and nothing left behind: no process that inherited the row's marker in its
environment (embedded workers start sessions of their own, so they are found by that, not
by their parent), no embedded run folder, no half-written record (atomic_write's ``.name.*``
temp files), and, for a failure, the store's files as they were.

The rows run four at a time (~60 s on two cores).  To print the matrix (command x condition
-> exit code and the first words of the message), as the issue's closing note shows it::

    PATH=/work/main/.venv/bin:$PATH PYTHONPATH=. python -m tests.test_error_matrix --print
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.containerd import install_prewarmed, make_layer
from tests.images import odd_image
from tests.pipeline_helpers import REPO_ROOT, clean_env, push
from tests.services import RedisServer, Registry, run_redis, run_registry

#: The total wall time the matrix may take (the CI suite must stay well under 20 minutes).
MATRIX_SECONDS = 120.0
IMAGE = "reg.example/app:1"  # the image the store-condition rows name


@dataclasses.dataclass(frozen=True)
class Row:
    """One command under one condition, and what it must end in.

    ``words``: what the one line must contain (case-insensitive); ``{root}``, ``{redis}``,
    ``{registry}``, ``{image}`` (pushed there) and ``{notjson}`` are filled in (for a listing with content, the words
    must be somewhere in its output).  ``store``: which store the command
    gets (``fresh``: an empty folder of its own).  ``warns``: an exit-0 row that must also
    print exactly one warning on stderr holding these words.  ``stop``: a signal sent at
    a moment (``folder``: the embedded run folder exists, nothing started yet; ``cluster``:
    its Redis socket exists; ``fetching``: a layer has landed in the store).
    """

    command: str
    condition: str
    args: tuple[str, ...]
    code: int
    words: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    store: str = "fresh"
    warns: tuple[str, ...] = ()
    bound: float = 30.0
    stop: tuple[signal.Signals, str] | None = None
    #: Lines an exit-0 row prints on stdout (None: a listing with content, any number).
    lines: int | None = 1


def _broker_rows() -> list[Row]:
    commands = {
        "status": ("status",),
        "nodes": ("nodes",),
        "cancel": ("cancel", "abc123"),
        "budget": ("budget", "reg.example:5000", "--rate", "1MB"),
        "schedule --node": ("schedule", "reg.example:5000/app:1", "--node", "n1"),
        "worker": ("worker", "-c", "1"),
    }
    conditions = {
        "redis unreachable": ("redis://127.0.0.1:1/0", ("cannot reach", "127.0.0.1:1")),
        "redis TLS to plain port": ("rediss://127.0.0.1:{redis_port}/0", ("TLS",)),
        "redis ACL too few rights": ("redis://weak:weakpw@127.0.0.1:{redis_port}/0", ("ACL", "weak:***")),
        "redis wrong DB": ("redis://127.0.0.1:{redis_port}/999", ("database", "999")),
        "not Redis (an HTTP port)": ("redis://{registry}/0", ("{registry}",)),
    }
    rows = [Row(command, condition, args, 10, words, env=(("PREWARM_BROKER_URL", url),))
            for condition, (url, words) in conditions.items() for command, args in commands.items()]
    # given by flag rather than variable, the URL is still the one named, its password masked
    return rows + [Row("budget --broker-url", "redis unreachable", ("budget", "reg.example:5000", "--rate", "1MB",
                                                                    "--broker-url", "redis://u:pw1@127.0.0.1:1/0"),
                       10, ("redis://u:***@127.0.0.1:1/0",))]


def _store_rows() -> list[Row]:
    rows = []
    for command, args, writes in (("images", ("images",), False), ("mounts", ("mounts", IMAGE), False),
                                  ("status", ("status",), False), ("rm", ("rm", IMAGE), True),
                                  ("gc", ("gc",), True), ("schedule", ("schedule", "{image}"), True),
                                  ("worker", ("worker", "-c", "1"), True),
                                  ("snapshotter", ("snapshotter", "--address", "/run/prewarm-matrix-unused.sock"), True)):
        rows.append(Row(command, "root is a regular file", args, 7, ("{root}", "not a directory"), store="file",
                        env=(("PREWARM_BROKER_URL", "{redis}"),) if command == "worker" else ()))
        if writes:
            rows.append(Row(command, "root read-only (bind mount)", args, 7, ("{root}", "not writable"), store="ro",
                            env=(("PREWARM_BROKER_URL", "{redis}"),) if command == "worker" else ()))
    rows += [
        Row("images", "root read-only (bind mount)", ("images",), 0, ("no image is pre-warmed", "{root}"),
            store="ro"),
        Row("mounts", "root read-only (bind mount)", ("mounts", IMAGE), 1, (IMAGE, "not pre-warmed"), store="ro"),
        Row("schedule", "store full (tmpfs)", ("schedule", "{image}", "--insecure-registry",
                                               "{registry}"), 7, ("no space left", "{root}"), store="full"),
        Row("images", "store full (tmpfs)", ("images",), 0, ("no image is pre-warmed",), store="full"),
        Row("gc", "store full (tmpfs)", ("gc",), 0, ("nothing to remove",), store="full"),
        Row("images", "corrupt image record", ("images",), 0, ("reg.example/good:1",), store="corrupt",
            warns=("{root}/images/", "corrupt"), lines=None),
        Row("mounts", "corrupt image record", ("mounts", "reg.example/bad:1"), 6,
            ("{root}/images/", "corrupt"), store="corrupt"),
        Row("rm", "corrupt image record", ("rm", "reg.example/bad:1"), 6, ("{root}/images/", "corrupt"),
            store="corrupt"),
        Row("gc", "corrupt image record", ("gc",), 0, ("nothing to remove",), store="corrupt",
            warns=("{root}/images/", "corrupt")),
        Row("status", "corrupt job summary", ("status",), 0, ("good-job", "succeeded"), store="corrupt",
            warns=("{root}/jobs/bad-job.json", "corrupt")),
        Row("status JOB", "corrupt job summary", ("status", "bad-job"), 6, ("{root}/jobs/bad-job.json", "corrupt"),
            store="corrupt"),
    ]
    return rows


def _settings_rows() -> list[Row]:
    return [
        Row("images", "PREWARM_SPAN_SIZE=abc", ("images",), 2, ("PREWARM_SPAN_SIZE", "whole number"),
            env=(("PREWARM_SPAN_SIZE", "abc"),)),
        Row("schedule", "PREWARM_LANDING=bogus", ("schedule", "{image}"), 2,
            ("PREWARM_LANDING", "c, python"), env=(("PREWARM_LANDING", "bogus"),)),
        Row("schedule", "PREWARM_MAX_SPAN=1e30", ("schedule", "{image}"), 2,
            ("PREWARM_MAX_SPAN", "whole number"), env=(("PREWARM_MAX_SPAN", "1e30"),)),
        Row("schedule", "--containerd missing socket", ("schedule", "{image}", "--insecure-registry",
                                                        "{registry}", "--containerd", "/nonexistent/c.sock"), 2,
            ("--containerd", "/nonexistent/c.sock")),
        Row("inspect", "--insecure-registry malformed", ("inspect", "{image}", "--insecure-registry",
                                                         "not a host!!"), 2, ("--insecure-registry", "HOST[:PORT]")),
        Row("inspect", "PREWARM_CA_BUNDLE missing", ("inspect", "{image}"), 2,
            ("PREWARM_CA_BUNDLE", "no such file"), env=(("PREWARM_CA_BUNDLE", "/nonexistent/ca.pem"),)),
        Row("budget", "host malformed", ("budget", "not a host!!", "--rate", "1MB"), 2, ("not a host!!", "HOST[:PORT]"),
            env=(("PREWARM_BROKER_URL", "{redis}"),)),
        Row("budget", "--rate 1e30", ("budget", "reg.example:5000", "--rate", "1e30"), 2, ("--rate", "out of range"),
            env=(("PREWARM_BROKER_URL", "{redis}"),)),
        Row("budget", "--clear with --rate", ("budget", "reg.example:5000", "--clear", "--rate", "1MB"), 2,
            ("--clear", "--rate"), env=(("PREWARM_BROKER_URL", "{redis}"),)),
        Row("worker", "PREWARM_VISIBILITY_TIMEOUT=x", ("worker", "-c", "1"), 2, ("PREWARM_VISIBILITY_TIMEOUT",),
            env=(("PREWARM_BROKER_URL", "{redis}"), ("PREWARM_VISIBILITY_TIMEOUT", "x"))),
        Row("worker", "PREWARM_TRUSTED_CERTS matches nothing", ("worker", "-c", "1"), 2,
            ("PREWARM_TRUSTED_CERTS", "matches no certificate"),
            env=(("PREWARM_BROKER_URL", "{redis}"), ("PREWARM_TRUSTED_CERTS", "/nonexistent/*.crt"))),
        Row("worker", "option Celery does not take", ("worker", "-c", "1", "--no-such-option"), 2,
            ("--no-such-option",), env=(("PREWARM_BROKER_URL", "{redis}"),)),
    ]


def _lookup_rows() -> list[Row]:
    fleet = (("PREWARM_BROKER_URL", "{redis}"),)
    return [
        Row("status JOB", "unknown job (fleet)", ("status", "nosuchjob"), 1, ("nosuchjob", "does not exist"), env=fleet),
        Row("status JOB", "unknown job (this machine)", ("status", "nosuchjob"), 1, ("nosuchjob",)),
        Row("cancel", "unknown job", ("cancel", "nosuchjob"), 1, ("nosuchjob", "does not exist"), env=fleet),
        Row("cancel", "empty argument", ("cancel", ""), 2, ("job id is empty",), env=fleet),
        Row("status JOB", "empty argument", ("status", ""), 2, ("job id is empty",)),
        Row("rm", "empty argument", ("rm", ""), 2, ("image name is empty",)),
        Row("mounts", "empty argument", ("mounts", ""), 2, ("image name is empty",)),
        Row("inspect", "empty argument", ("inspect", ""), 2, ("empty image reference",)),
        Row("rm", "image not pre-warmed", ("rm", IMAGE), 1, (IMAGE, "not pre-warmed")),
        Row("inspect", "manifest not JSON", ("inspect", "{notjson}/bad/app:1", "--insecure-registry", "{notjson}"), 3,
            ("not valid JSON",)),
        Row("schedule (embedded)", "TMPDIR too long for a socket", ("schedule", "{image}", "--insecure-registry",
                                                                    "{registry}"), 2, ("TMPDIR", "shorter"),
            env=(("TMPDIR", "{longdir}"),)),
        Row("inspect", "image not in the registry", ("inspect", "{registry}/matrix/nope:1", "--insecure-registry",
                                                     "{registry}"), 1, ("not found", "matrix/nope")),
        Row("inspect", "registry unreachable", ("inspect", "127.0.0.1:1/app:1", "--insecure-registry",
                                                "127.0.0.1:1"), 5, ("127.0.0.1:1", "unreachable")),
    ]


def _empty_rows() -> list[Row]:
    fleet = (("PREWARM_BROKER_URL", "{redis_empty}"),)  # a database no other row writes to
    return [
        Row("status", "nothing to list (fleet)", ("status",), 0, ("no job in the fleet",), env=fleet),
        Row("status --json", "nothing to list (fleet)", ("status", "--json"), 0, ("[]",), env=fleet),
        Row("status", "nothing to list (this machine)", ("status",), 0, ("no job has run",)),
        Row("status --json", "nothing to list (this machine)", ("status", "--json"), 0, ("[]",)),
        Row("nodes", "nothing to list (fleet)", ("nodes",), 0, ("no node has registered",), env=fleet),
        Row("nodes --json", "nothing to list (fleet)", ("nodes", "--json"), 0, ("[]",), env=fleet),
        Row("images", "nothing to list (this machine)", ("images",), 0, ("no image is pre-warmed",)),
        Row("images --json", "nothing to list (this machine)", ("images", "--json"), 0, ("[]",)),
        Row("gc", "nothing to list (this machine)", ("gc",), 0, ("nothing to remove",)),
    ]


def _signal_rows() -> list[Row]:
    rows = []
    for sig, code, words in ((signal.SIGTERM, 143, ("stopped by SIGTERM",)), (signal.SIGINT, 130, ("interrupted",))):
        for moment, when in (("folder", "its run folder is made"), ("cluster", "its Redis listens"),
                             ("fetching", "a layer lands")):
            rows.append(Row("schedule (embedded)", f"{sig.name} once {when}",
                            ("schedule", "{image}", "--wait", "--quiet", "--insecure-registry",
                             "{registry}"), code, words, stop=(sig, moment), bound=60.0,
                            env=(("PREWARM_SPAN_SIZE", str(256 * 1024)), ("PREWARM_MIN_LAYER_SIZE", str(1 << 20)))))
    return rows


ROWS = _broker_rows() + _store_rows() + _settings_rows() + _lookup_rows() + _empty_rows() + _signal_rows()


# === the conditions =====================================================================


class _NotJsonRegistry(http.server.ThreadingHTTPServer):
    """A loopback "registry" whose every manifest is the bytes ``not json``."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                body = b"{}" if self.path == "/v2/" else b"not json"
                self.send_response(200)
                self.send_header("Content-Type", "application/json" if self.path == "/v2/"
                                 else "application/vnd.oci.image.manifest.v1+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


@dataclasses.dataclass
class Conditions:
    """The services and stores the rows run against, made once for the whole matrix."""

    base: Path
    redis: RedisServer
    registry: Registry
    notjson: _NotJsonRegistry
    stores: dict[str, Path]
    image: str
    #: Where the rows' folders go: short, since an embedded run's Redis socket lives in TMPDIR
    rows_dir: Path

    def fill(self, text: str, root: Path) -> str:
        return text.format(root=root, redis=self.redis.url, redis_port=self.redis.port, registry=self.registry.host,
                           notjson=self.notjson.host, image=self.image, longdir=self.base / ("d" * 100),
                           redis_empty=self.redis.url.rsplit("/", 1)[0] + "/5")


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _fill_up(root: Path) -> None:
    with open(root / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 16))
            f.flush()


def _corrupt_store(root: Path) -> None:
    """A store with a good image and a corrupt one (cut short), a good job summary and a corrupt one."""
    from prewarm.store.layout import Layout

    layer = make_layer({"etc/a": b"a\n"})
    install_prewarmed(root, [layer])
    good = {"name": "reg.example/good:1", "reference": "reg.example/good@sha256:" + "1" * 64,
            "manifest_digest": "sha256:" + "1" * 64, "config_digest": "sha256:" + "2" * 64, "platform": "",
            "layer_digests": [layer.digest], "diff_ids": [layer.diff_id], "sizes": [1], "created": 0.0}
    Layout(root).images_dir().mkdir(parents=True, exist_ok=True)
    Layout(root).image(good["name"]).write_text(json.dumps(good))
    # cut short, after the layer's digest: gc must keep the layer it still names
    Layout(root).image("reg.example/bad:1").write_text('{"name": "reg.example/bad:1", "layer_digests": ["'
                                                       + layer.digest + '"')
    jobs = root / "jobs"
    jobs.mkdir()
    (jobs / "good-job.json").write_text(json.dumps({"job": "good-job", "state": "succeeded", "image": "x",
                                                    "bytes_done": 1, "bytes_total": 1}))
    (jobs / "bad-job.json").write_text('{"job": "bad-job", "sta')


@contextlib.contextmanager
def conditions(base: Path) -> Iterator[Conditions]:
    """Start Redis (with a weak ACL user), a registry holding the test image, the not-JSON
    registry, and make the stores: a regular file, a read-only bind mount, a full tmpfs, a
    corrupt store."""
    import redis as redis_lib

    mounted: list[Path] = []
    rows_dir = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))
    with run_redis(base / "redis") as server, run_registry(base / "registry") as registry:
        r = redis_lib.Redis.from_url(server.url)
        r.acl_setuser("weak", enabled=True, passwords=["+weakpw"], commands=["+ping", "+hello", "+auth"], keys=["*"])
        r.close()
        image = push(odd_image(base / "odd-oci"), registry, "matrix/odd")
        notjson = _NotJsonRegistry()
        stores = {"file": base / "root-file", "ro": base / "root-ro", "full": base / "root-full",
                  "corrupt": base / "root-corrupt"}
        stores["file"].write_text("not a folder\n")
        try:
            stores["ro"].mkdir()
            _mount("--bind", str(stores["ro"]), str(stores["ro"]))
            mounted.append(stores["ro"])
            _mount("-o", "remount,ro,bind", str(stores["ro"]))
            stores["full"].mkdir()
            _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(stores["full"]))
            mounted.append(stores["full"])
            _fill_up(stores["full"])
            stores["corrupt"].mkdir()
            _corrupt_store(stores["corrupt"])
            (base / ("d" * 100)).mkdir()
            yield Conditions(base, server, registry, notjson, stores, image, rows_dir)
        finally:
            shutil.rmtree(rows_dir, ignore_errors=True)
            notjson.shutdown()
            for path in reversed(mounted):
                subprocess.run(["umount", "-l", str(path)], check=False)


# === running a row ======================================================================


@dataclasses.dataclass(frozen=True)
class Outcome:
    row: Row
    code: int
    stdout: str
    stderr: str
    seconds: float
    problems: tuple[str, ...]

    @property
    def line(self) -> str:
        text = self.stderr if self.row.code else self.stdout
        lines = text.strip().splitlines()
        return lines[0] if lines else ""


def _mentioning(marker: str) -> list[int]:
    """PIDs whose command line or environment holds ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            raw = (proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in raw:
            pids.append(int(proc.name))
    return pids


def _files(root: Path) -> dict[str, int]:
    if not root.is_dir():
        return {}
    out = {}
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            out[str(path.relative_to(root))] = path.lstat().st_size if path.is_file() else -1
    return out


def _default_signals() -> None:
    """SIGINT and SIGTERM as a terminal gives them, whatever this test inherited.

    Why: a suite started in the background of a non-interactive shell (``cmd &``) runs with
    SIGINT ignored, children inherit that, and Python then leaves it ignored: the SIGINT
    rows would test the shell, not prewarm.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _wait_moment(proc: subprocess.Popen[str], moment: str, tmpdir: Path, root: Path, deadline: float) -> None:
    def reached() -> bool:
        if moment == "folder":
            return any(tmpdir.glob("prewarm-embedded-*"))
        if moment == "cluster":
            return any(tmpdir.glob("prewarm-embedded-*/redis.sock"))
        return any(root.glob("layers/*/*/fs"))

    while not reached():
        if proc.poll() is not None or time.monotonic() > deadline:
            return  # judged below: the row then fails on its exit code
        time.sleep(0.02)


def run_row(cond: Conditions, index: int, row: Row) -> Outcome:
    """Run one row in a folder of its own; the outcome with every broken promise listed."""
    work = Path(tempfile.mkdtemp(prefix=f"r{index}-", dir=cond.rows_dir))
    tmpdir = work / "tmp"
    tmpdir.mkdir()
    root = cond.stores.get(row.store, work / "store")
    marker = f"PREWARM_MATRIX_ROW={work.name}"
    env = clean_env(root, **{"TMPDIR": str(tmpdir), "PREWARM_MATRIX_ROW": work.name,
                             "PREWARM_NODE_NAME": f"matrix{index}", **{k: cond.fill(v, root) for k, v in row.env}})
    args = [cond.fill(a, root) for a in row.args]
    before = _files(root)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "prewarm", *args], env=env, cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            preexec_fn=_default_signals)  # noqa: PLW1509 - resets dispositions only
    if row.stop is not None:
        _wait_moment(proc, row.stop[1], tmpdir, root, started + row.bound)
        if proc.poll() is None:
            proc.send_signal(row.stop[0])
    try:
        out, err = proc.communicate(timeout=row.bound)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    seconds = time.monotonic() - started
    problems = []
    if proc.returncode != row.code:
        problems.append(f"exit {proc.returncode}, expected {row.code}")
    if seconds > row.bound:
        problems.append(f"took {seconds:.1f} s, more than {row.bound:.0f} s")
    if "Traceback" in err:
        problems.append("a traceback")
    one, other = (err, out) if row.code else (out, err)
    lines = one.strip().splitlines()
    if row.code or row.lines is not None:
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines where one was due")
    else:
        lines = [one]
    for word in row.words:
        if not lines or cond.fill(word, root).lower() not in lines[0].lower():
            problems.append(f"the line does not say {cond.fill(word, root)!r}")
    if row.code == 0:
        warnings = other.strip().splitlines()
        if len(warnings) != (1 if row.warns else 0):
            problems.append(f"{len(warnings)} warning line(s) on stderr, expected {1 if row.warns else 0}")
        for word in row.warns:
            if not warnings or cond.fill(word, root) not in warnings[0]:
                problems.append(f"the warning does not name {cond.fill(word, root)!r}")
    # Nothing left behind: processes (they inherit the marker), run folders, half-written records
    deadline = time.monotonic() + 20
    while _mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _mentioning(marker):
        problems.append(f"processes left: {_mentioning(marker)}")
    if list(tmpdir.iterdir()):
        problems.append(f"left in TMPDIR: {[p.name for p in tmpdir.iterdir()]}")
    after = _files(root)
    temp = [name for name in after if Path(name).name.startswith(".") and ".json." in Path(name).name]
    if temp:
        problems.append(f"half-written records: {temp}")
    if row.code not in (0, 130, 143) and after != before:
        changed = sorted(set(after.items()) ^ set(before.items()))
        problems.append(f"the store changed: {changed[:5]}")
    if row.stop is not None:
        problems += _store_consistent(root)
    return Outcome(row, proc.returncode, out, err, seconds, tuple(problems))


def _store_consistent(root: Path) -> list[str]:
    """After a stop: every image record names only ready layers."""
    from prewarm.runtime.images import list_records
    from prewarm.store.content import ContentStore
    from prewarm.store.layout import Layout

    if not root.is_dir():
        return []
    store = ContentStore(root)
    return [f"image {r.name} recorded with layer {d} not ready" for r in list_records(Layout(root))
            for d in r.layer_digests if not store.is_ready(d)]


def run_matrix(cond: Conditions, rows: list[Row] = ROWS, on_row: Callable[[Outcome], None] | None = None,
               parallel: int = 4) -> list[Outcome]:
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(run_row, cond, i, row) for i, row in enumerate(rows)]
        outcomes = []
        for future in futures:
            outcomes.append(future.result())
            if on_row:
                on_row(outcomes[-1])
    return outcomes


def table(outcomes: list[Outcome], words: int = 9) -> str:
    """The matrix as Markdown: command, condition, exit code, the first words of the one line."""
    lines = ["| command | condition | exit | message (first words) |", "|---|---|---|---|"]
    for o in outcomes:
        text = o.line.removeprefix("prewarm: error: ").removeprefix("prewarm: ")
        if " WARNING " in text:
            text = text.split(": ", 1)[-1]
        first = " ".join(text.split()[:words]).replace("|", "\\|")
        lines.append(f"| {o.row.command} | {o.row.condition} | {o.code} | {first} |")
    return "\n".join(lines)


# === the test ===========================================================================


def test_every_command_under_every_failure_ends_in_one_line_and_its_exit_code(tmp_path: Path) -> None:
    # Given real services and stores in each failure class
    with conditions(tmp_path) as cond:
        started = time.monotonic()
        # When each command runs under each condition
        outcomes = run_matrix(cond)
        took = time.monotonic() - started
    # Then each ends as its row says, and leaves nothing behind
    failed = [f"{o.row.command} / {o.row.condition}: {'; '.join(o.problems)}\n    stderr: {o.stderr.strip()[-600:]}"
              for o in outcomes if o.problems]
    assert not failed, "\n".join(failed)
    assert took < MATRIX_SECONDS, f"the matrix took {took:.0f} s"


@pytest.mark.parametrize("variable,flag,args,value", [
    ("PREWARM_CA_BUNDLE", "--ca-bundle", ["inspect", "127.0.0.1:1/a:1"], "/nonexistent/ca.pem"),
    ("PREWARM_INSECURE_REGISTRIES", "--insecure-registry", ["inspect", "127.0.0.1:1/a:1"], "not a host!!"),
    ("PREWARM_SPAN_SIZE", "--span-size", ["index", "127.0.0.1:1/a:1"], "12abc"),
    ("PREWARM_MIN_LAYER_SIZE", "--min-layer-size", ["index", "127.0.0.1:1/a:1"], "1e30"),
])
def test_a_variable_and_its_flag_fail_with_the_same_one_line_message(tmp_path: Path, variable: str, flag: str,
                                                                     args: list[str], value: str) -> None:
    from click.testing import CliRunner

    from prewarm.cli import main

    env = {k: "" for k in os.environ if k.startswith("PREWARM_")} | {"PREWARM_ROOT": str(tmp_path)}
    # Given the same malformed value once as the variable and once as the flag
    by_env = CliRunner().invoke(main, args, env={**env, variable: value})
    by_flag = CliRunner().invoke(main, [*args, flag, value], env=env)
    # Then both are exit 2 before anything is fetched, in one line that names what was given
    for result, name in ((by_env, variable), (by_flag, flag)):
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and f"{name}={value!r}" in lines[0], result.output
    # And the message is the same but for the name
    assert by_env.output.replace(variable, "NAME") == by_flag.output.replace(flag, "NAME")


@pytest.mark.parametrize("condition,args,env", [
    ("root is a regular file", ["status"], {}),
    ("redis unreachable", ["status"], {"PREWARM_BROKER_URL": "redis://127.0.0.1:1/0"}),
])
def test_debug_still_shows_the_traceback(tmp_path: Path, condition: str, args: list[str],
                                         env: dict[str, str]) -> None:
    root = tmp_path / "root"
    if condition == "root is a regular file":
        root.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "prewarm", "--debug", *args], env=clean_env(root, **env), check=False,
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr, proc.stderr


def test_the_readme_table_lists_every_exit_code_the_matrix_asserts() -> None:
    from prewarm import errors

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("| Exit code |"):]
    section = section[:section.index("\n\n")]
    documented = {int(code) for line in section.splitlines()[2:] for code in line.split("|")[1].split(",")}
    asserted = {row.code for row in ROWS} | {128 + signal.SIGHUP} | {cls.exit_code for cls in vars(errors).values()
                                              if isinstance(cls, type) and issubclass(cls, errors.PrewarmError)}
    assert asserted <= documented, sorted(asserted - documented)


if __name__ == "__main__":
    if "--print" not in sys.argv:
        raise SystemExit("usage: python -m tests.test_error_matrix --print")
    with tempfile.TemporaryDirectory(prefix="prewarm-matrix-") as folder, conditions(Path(folder)) as cond:
        t0 = time.monotonic()
        results = run_matrix(cond, on_row=lambda o: print(("FAIL " if o.problems else "ok   ") + o.row.command
                                                          + " / " + o.row.condition, file=sys.stderr))
        print(table(results))
        print(f"\n{len(results)} rows in {time.monotonic() - t0:.0f} s; "
              f"{sum(1 for o in results if o.problems)} broke a promise", file=sys.stderr)
        for o in results:
            if o.problems:
                print(f"{o.row.command} / {o.row.condition}: {'; '.join(o.problems)}", file=sys.stderr)
