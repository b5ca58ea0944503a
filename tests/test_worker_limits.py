"""The worker pool fits the container's cgroup v2 limits (issue 15 item 2, bounded concurrency).

Pure logic over files: a temp folder stands in for /sys/fs/cgroup and /proc/self/cgroup, laid
out the way the kubelet and containerd make them (the pod's cgroup above the container's).
"""

from __future__ import annotations

from pathlib import Path

from prewarm.node.limits import (
    FLOOR_CHILD_MEMORY,
    MAX_CHILD_MEMORY,
    PARENT_RESERVE,
    Limits,
    pool_size,
    read_limits,
)

GiB = 1 << 30
POD = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice"
CONTAINER = f"{POD}/cri-containerd-abc.scope"


def cgroups(tmp: Path, files: dict[str, dict[str, str]]) -> tuple[Path, Path]:
    root = tmp / "cgroup"
    for folder, contents in files.items():
        path = root / folder
        path.mkdir(parents=True, exist_ok=True)
        for name, text in contents.items():
            (path / name).write_text(text + "\n")
    proc = tmp / "proc-self-cgroup"
    proc.write_text(f"0::/{CONTAINER}\n")
    return root, proc


def test_a_2_cpu_2_gib_container_on_a_64_core_node_gets_4_processes_that_fit(tmp_path: Path) -> None:
    # Given a container limited to 2 CPUs and 2 GiB, on a 64-core node (the root says max)
    root, proc = cgroups(tmp_path, {
        "": {"cpu.max": "max 100000"},
        POD: {"cpu.max": "max 100000", "memory.max": str(2 * GiB)},
        CONTAINER: {"cpu.max": "200000 100000", "memory.max": str(2 * GiB)},
    })
    # When the pool is sized
    limits = read_limits(root, proc)
    pool = pool_size(limits, cpu_count=64)
    # Then it is CPUs + 2 processes, not cores + 2, and all of them at their ceiling fit
    assert limits == Limits(cpus=2.0, memory=2 * GiB)
    assert pool.concurrency == 4
    assert pool.concurrency * (pool.max_memory_per_child_kib << 10) + PARENT_RESERVE <= 2 * GiB


def test_the_smallest_limit_on_the_way_up_wins(tmp_path: Path) -> None:
    # Given the pod's cgroup limited more tightly than the container's (pod-level limits)
    root, proc = cgroups(tmp_path, {
        POD: {"cpu.max": "150000 100000", "memory.max": str(1 * GiB)},
        CONTAINER: {"cpu.max": "max 100000", "memory.max": "max"},
    })
    # Then the pod's limits are the container's; a fractional CPU rounds up
    limits = read_limits(root, proc)
    assert limits == Limits(cpus=1.5, memory=1 * GiB)
    pool = pool_size(limits, cpu_count=64)
    assert pool.concurrency == 4
    assert pool.concurrency * (pool.max_memory_per_child_kib << 10) + PARENT_RESERVE <= 1 * GiB


def test_memory_caps_the_process_count_below_cpus_plus_two(tmp_path: Path) -> None:
    # Given 16 CPUs but only 768 MiB
    root, proc = cgroups(tmp_path, {CONTAINER: {"cpu.max": "1600000 100000", "memory.max": str(768 << 20)}})
    pool = pool_size(read_limits(root, proc), cpu_count=64)
    # Then fewer processes than 18, each with a share that fits
    assert 1 <= pool.concurrency < 18
    assert pool.concurrency * (pool.max_memory_per_child_kib << 10) + PARENT_RESERVE <= 768 << 20


def test_a_cgroup_namespace_shows_the_containers_limits_at_the_root(tmp_path: Path) -> None:
    # Given a cgroup namespace: /proc/self/cgroup says 0::/ and the files sit at the mount point
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cpu.max").write_text("300000 100000\n")
    (root / "memory.max").write_text(f"{4 * GiB}\n")
    proc = tmp_path / "cgroup-file"
    proc.write_text("0::/\n")
    # Then those are the limits
    assert read_limits(root, proc) == Limits(cpus=3.0, memory=4 * GiB)
    assert pool_size(read_limits(root, proc), cpu_count=64).concurrency == 5


def test_no_cgroup_v2_means_the_old_default(tmp_path: Path) -> None:
    # Given no cgroup files at all (cgroup v1, a laptop) and no /proc/self/cgroup
    limits = read_limits(tmp_path / "absent", tmp_path / "absent-proc")
    # Then nothing is limited: cores + 2, Celery's usual per-child ceiling
    assert limits == Limits(cpus=None, memory=None)
    pool = pool_size(limits, cpu_count=8)
    assert pool.concurrency == 10
    assert pool.max_memory_per_child_kib == MAX_CHILD_MEMORY >> 10


def test_garbage_in_the_files_counts_as_unlimited(tmp_path: Path) -> None:
    root, proc = cgroups(tmp_path, {CONTAINER: {"cpu.max": "lots", "memory.max": "-5"}})
    assert read_limits(root, proc) == Limits(cpus=None, memory=None)


def test_a_chosen_concurrency_is_kept_and_shares_the_memory() -> None:
    # Given --concurrency 16 in a 2 GiB container
    pool = pool_size(Limits(cpus=2, memory=2 * GiB), cpu_count=64, concurrency=16)
    # Then 16 processes, each with a sixteenth of what is left after the main process
    assert pool.concurrency == 16
    assert 16 * (pool.max_memory_per_child_kib << 10) + PARENT_RESERVE <= 2 * GiB


def test_a_limit_too_small_still_leaves_one_process_with_its_check_on() -> None:
    pool = pool_size(Limits(cpus=4, memory=200 << 20), cpu_count=4)
    assert pool.concurrency == 1
    assert pool.max_memory_per_child_kib == FLOOR_CHILD_MEMORY >> 10


def test_the_celery_app_takes_the_ceiling_prewarm_worker_computed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Given prewarm worker's computed ceiling in the environment, the app built after it uses it
    from workers.app import make_app, max_memory_per_child

    monkeypatch.setenv("PREWARM_MAX_MEMORY_PER_CHILD", "123456")
    assert max_memory_per_child() == 123456
    assert make_app().conf.worker_max_memory_per_child == 123456
    # And without it (celery -A workers.app run by hand), Celery's usual ceiling
    monkeypatch.delenv("PREWARM_MAX_MEMORY_PER_CHILD")
    assert make_app().conf.worker_max_memory_per_child == MAX_CHILD_MEMORY >> 10
