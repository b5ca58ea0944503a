"""containerd's own snapshotter conformance suite against the shim (issue 5, deliverable 5).

``tests/go/src/prewarmconformance`` runs ``snapshots/testsuite.SnapshotterSuite`` from
Debian's containerd sources through containerd's proxy client, one fresh
``prewarm snapshotter`` process per test; this test builds and runs it offline and
fails on any failing subtest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GO_PACKAGE = HERE / "go" / "src" / "prewarmconformance"
GOCODE = Path("/usr/share/gocode")
SUITE = GOCODE / "src/github.com/containerd/containerd/snapshots/testsuite/testsuite.go"


def go_test_env() -> dict[str, str]:
    """The environment for an offline GOPATH build against Debian's Go sources."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    env.update({
        "GO111MODULE": "off",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOPATH": f"{HERE / 'go'}:{GOCODE}",
        "PATH": f"{bin_dir}:{env.get('PATH', '')}",
        "PREWARM_BIN": str(bin_dir / "prewarm"),
    })
    return env


def suite_test_names() -> set[str]:
    """The subtests SnapshotterSuite declares (t.Run("Name", ...)), read from its source."""
    return set(re.findall(r't\.Run\("([^"]+)", makeTest', SUITE.read_text()))


def test_containerd_snapshotter_suite_passes_against_the_shim() -> None:
    # Given containerd's conformance suite and the Go toolchain from Debian's packages
    go = shutil.which("go")
    assert go, "golang-go is not installed; scripts/bootstrap installs it"
    expected = suite_test_names()
    assert len(expected) >= 20

    # When it runs against a fresh prewarm shim per test
    proc = subprocess.run(
        [go, "test", "-count=1", "-v", "-parallel", "4", "-timeout", "10m", "."],
        check=False, cwd=GO_PACKAGE, env=go_test_env(), capture_output=True, text=True, timeout=900,
    )
    output = proc.stdout + proc.stderr

    # Then every subtest passes; only the suite's own unconditional skip (Rename,
    # "still fails on some kernels with overlay", issues.go) is allowed to skip
    assert proc.returncode == 0, output[-6000:]
    passed = set(re.findall(r"--- PASS: TestPrewarmSnapshotterConformance/(\S+)", output))
    skipped = set(re.findall(r"--- SKIP: TestPrewarmSnapshotterConformance/(\S+)", output))
    assert "--- FAIL" not in output, output[-6000:]
    assert skipped <= {"Rename"}, skipped
    assert passed | skipped == expected, (expected - passed - skipped, output[-3000:])
