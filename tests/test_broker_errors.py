"""Every broker failure ends in one clear line and exit 10 (issue 19 items 1 and 9, the broker part).

Each fleet command against a real Redis in each failure class: unreachable, TLS spoken to
a plain port, a server that is not Redis (the registry's HTTP port), a database number
Redis does not have, and an ACL user without the rights the command needs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.pipeline_helpers import REPO_ROOT, clean_env
from tests.services import RedisServer, Registry

COMMANDS = {
    "status": ["status"],
    "nodes": ["nodes"],
    "cancel": ["cancel", "abc123"],
    "budget": ["budget", "reg.example:5000", "--rate", "1MB"],
    "schedule": ["schedule", "reg.example:5000/app:1", "--node", "n1"],
}


@pytest.fixture()
def urls(redis_server: RedisServer, registry: Registry, redis_url: str) -> dict[str, tuple[str, str]]:
    """Failure class -> (broker URL, words the message must hold)."""
    r = redis.Redis.from_url(redis_url)
    r.acl_setuser("weak", enabled=True, passwords=["+weakpw"], commands=["+ping", "+hello", "+auth"], keys=["*"])
    port = redis_server.port
    return {
        "unreachable": ("redis://127.0.0.1:1/0", "cannot reach"),
        "tls against plain": (f"rediss://127.0.0.1:{port}/0", "TLS"),
        "not redis": (f"redis://{registry.host}/0", "redis"),
        "wrong db": (f"redis://127.0.0.1:{port}/999", "database"),
        "acl without rights": (f"redis://weak:weakpw@127.0.0.1:{port}/0", "ACL"),
    }


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_under_each_broker_failure(tmp_path: Path, urls: dict[str, tuple[str, str]],
                                                command: str) -> None:
    rows = []
    for condition, (url, words) in urls.items():
        env = clean_env(tmp_path / "store", PREWARM_BROKER_URL=url)
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "prewarm", *COMMANDS[command]], env=env, capture_output=True,
                              text=True, timeout=120, cwd=REPO_ROOT, check=False)
        took = time.monotonic() - start
        lines = proc.stderr.strip().splitlines()
        rows.append((condition, proc.returncode, lines, took))
        # Then: exit 10, one line naming the (masked) broker and what to do, no traceback, no hang
        assert proc.returncode == 10, (condition, proc.returncode, proc.stderr)
        assert len(lines) == 1 and "Traceback" not in proc.stderr, (condition, proc.stderr)
        assert words.lower() in lines[0].lower(), (condition, lines[0])
        assert "weakpw" not in proc.stderr, "the password must be masked"
        assert took < 60, (condition, took)
