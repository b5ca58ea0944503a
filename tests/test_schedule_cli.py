"""``prewarm schedule`` and ``prewarm status`` without a broker, as a user runs them.

What the CLI keeps from the library it calls: a schedule of an image already pre-warmed
imports neither Celery nor Redis, and ``prewarm status`` shows the summaries embedded
jobs left in the store.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.images import simple_image
from tests.pipeline_helpers import clean_env, prewarm, push
from tests.services import Registry


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level package names from ``python -X importtime``'s report."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in importtime_stderr.splitlines() if line.startswith("import time:") and "|" in line}


def test_schedule_then_status_without_a_broker(tmp_path: Path, registry: Registry) -> None:
    # Given an image pre-warmed by an embedded job
    ref = push(simple_image(tmp_path / "oci"), registry, "cli/status")
    env = clean_env(tmp_path / "store")
    first = prewarm("schedule", ref, "--wait", "--quiet", "--json", "--insecure-registry", registry.host,
                    env=env, check=True)
    job = json.loads(first.stdout)["job"]

    # When it is scheduled again, with Python reporting every import
    again = prewarm("schedule", ref, "--wait", "--insecure-registry", registry.host,
                    env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, check=True)
    # Then nothing is fetched, and neither Celery nor Redis was imported for it
    assert "already pre-warmed on this node" in again.stdout and "nothing fetched" in again.stdout
    imported = _imported(again.stderr)
    assert "prewarm" in imported and "click" in imported
    assert not imported & {"celery", "kombu", "redis"}, sorted(imported & {"celery", "kombu", "redis"})

    # When `prewarm status` lists the jobs, and shows the first one as JSON
    listed = prewarm("status", env=env, check=True).stdout
    shown = prewarm("status", job, "--json", env=env, check=True).stdout
    # Then the embedded job's saved summary is what it shows
    assert listed.startswith(f"{job}  succeeded  {ref}  ")
    assert json.loads(shown) == json.loads(first.stdout)
    # And the listing as JSON is one array of those summaries
    assert json.loads(prewarm("status", "--json", env=env, check=True).stdout) == [json.loads(first.stdout)]
    # And an unknown job is a clear error with the not-found exit code (1)
    missing = prewarm("status", "no-such-job", env=env)
    assert missing.returncode == 1 and "no job no-such-job in" in missing.stderr
