"""The host's available memory: MemAvailable, memory cgroups (v1, v2, nested) and SLURM's allocation, read
from fake /proc and /sys trees; a client's budget shares it among the node's ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpifed.memory import budget as budget_module
from mpifed.memory.host import HostMemory, host_memory, memory_cgroups

GiB, MiB = 2**30, 2**20
V2_MOUNT = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw"
V1_MOUNT = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory"
HYBRID_V2 = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw"
V1_UNLIMITED = "9223372036854771712"


def tree(root: Path, files: dict[str, str], available_gib: float = 20) -> Path:
    """A fake machine under root: /proc/meminfo with `available_gib` free, and `files` (path -> text)."""
    files = {"proc/meminfo": f"MemTotal: 33554432 kB\nMemAvailable: {int(available_gib * 2**20)} kB\n", **files}
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def v2_group(path: str, limit: str, current: int, inactive: int = 0) -> dict[str, str]:
    return {f"{path}/memory.max": limit, f"{path}/memory.current": str(current),
            f"{path}/memory.stat": f"anon {current - inactive}\ninactive_file {inactive}\nactive_file 0\n"}


def v1_group(path: str, limit: str, usage: int, inactive: int = 0) -> dict[str, str]:
    return {f"{path}/memory.limit_in_bytes": limit, f"{path}/memory.usage_in_bytes": str(usage),
            f"{path}/memory.stat": f"inactive_file 0\ntotal_rss {usage - inactive}\ntotal_inactive_file {inactive}\n"}


def test_without_limits_meminfo_binds(tmp_path):
    root = tree(tmp_path, {"proc/self/cgroup": "0::/\n", "proc/self/mountinfo": V2_MOUNT,
                           **v2_group("sys/fs/cgroup/user.slice", "max", GiB)})
    found = host_memory(root, environ={})
    assert found == HostMemory(20 * GiB, "MemAvailable", "20.00 GiB in /proc/meminfo")


def test_v2_limit_less_its_working_set_binds_and_is_named(tmp_path):
    root = tree(tmp_path, {"proc/self/cgroup": "0::/job\n", "proc/self/mountinfo": V2_MOUNT,
                           **v2_group("sys/fs/cgroup/job", str(6 * GiB), current=2 * GiB, inactive=GiB // 2)})
    found = host_memory(root, environ={})
    assert found.bytes == 6 * GiB - (2 * GiB - GiB // 2)  # the inactive file cache is reclaimed before a kill
    assert found.source == "cgroup /sys/fs/cgroup/job memory.max"
    assert str(found) == "cgroup /sys/fs/cgroup/job memory.max (6.00 GiB, 1.50 GiB in use)"


def test_v2_a_parents_limit_binds_its_child(tmp_path):
    root = tree(tmp_path, {"proc/self/cgroup": "0::/outer/inner\n", "proc/self/mountinfo": V2_MOUNT,
                           **v2_group("sys/fs/cgroup/outer", str(4 * GiB), current=3 * GiB),
                           **v2_group("sys/fs/cgroup/outer/inner", "max", current=GiB)})
    assert [g.shown for g in memory_cgroups(root)] == ["/sys/fs/cgroup/outer/inner", "/sys/fs/cgroup/outer"]
    found = host_memory(root, environ={})
    assert (found.bytes, found.source) == (GiB, "cgroup /sys/fs/cgroup/outer memory.max")


def test_v2_the_tighter_of_child_and_parent_binds(tmp_path):
    root = tree(tmp_path, {"proc/self/cgroup": "0::/outer/inner\n", "proc/self/mountinfo": V2_MOUNT,
                           **v2_group("sys/fs/cgroup/outer", str(8 * GiB), current=GiB),
                           **v2_group("sys/fs/cgroup/outer/inner", str(2 * GiB), current=GiB)})
    found = host_memory(root, environ={})
    assert (found.bytes, found.source) == (GiB, "cgroup /sys/fs/cgroup/outer/inner memory.max")


def test_v1_limit_binds_and_unlimited_ancestors_do_not(tmp_path):
    # cgroup v1 for memory with cgroup v2 mounted beside it without the memory controller (a hybrid machine)
    root = tree(tmp_path, {"proc/self/cgroup": "4:memory:/slurm/job7\n0::/\n",
                           "proc/self/mountinfo": "\n".join([V1_MOUNT, HYBRID_V2]),
                           "sys/fs/cgroup/unified/cgroup.controllers": "hugetlb\n",
                           **v1_group("sys/fs/cgroup/memory", V1_UNLIMITED, usage=10 * GiB),
                           **v1_group("sys/fs/cgroup/memory/slurm", V1_UNLIMITED, usage=5 * GiB),
                           **v1_group("sys/fs/cgroup/memory/slurm/job7", str(3 * GiB), usage=GiB + 256 * MiB,
                                      inactive=256 * MiB)})
    assert [g.version for g in memory_cgroups(root)] == [1, 1, 1]
    found = host_memory(root, environ={})
    assert found.bytes == 2 * GiB
    assert str(found) == ("cgroup /sys/fs/cgroup/memory/slurm/job7 memory.limit_in_bytes (3.00 GiB, 1.00 GiB in "
                          "use)")


def test_a_container_sees_its_own_cgroup_at_the_mount_point(tmp_path):
    # no cgroup namespace: /proc/self/cgroup names the host's path, which the container mounts as its top
    mount = "30 25 0:26 /docker/abc /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw"
    root = tree(tmp_path, {"proc/self/cgroup": "0::/docker/abc\n", "proc/self/mountinfo": mount,
                           **v2_group("sys/fs/cgroup", str(GiB), current=GiB // 4)})
    found = host_memory(root, environ={})
    assert (found.bytes, found.source) == (GiB - GiB // 4, "cgroup /sys/fs/cgroup memory.max")


def test_a_limit_already_exceeded_leaves_nothing(tmp_path):
    root = tree(tmp_path, {"proc/self/cgroup": "0::/job\n", "proc/self/mountinfo": V2_MOUNT,
                           **v2_group("sys/fs/cgroup/job", str(GiB), current=GiB + MiB)})
    assert host_memory(root, environ={}).bytes == 0


@pytest.mark.parametrize("environ, expected, source", [
    ({"SLURM_MEM_PER_NODE": "4096"}, 4 * GiB, "SLURM_MEM_PER_NODE (4096 MiB)"),
    ({"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_ON_NODE": "3"}, 3 * GiB,
     "SLURM_MEM_PER_CPU x SLURM_CPUS_ON_NODE (1024 MiB x 3)"),
    ({"SLURM_MEM_PER_NODE": "0"}, 20 * GiB, "MemAvailable (20.00 GiB in /proc/meminfo)"),   # 0: the whole node
    ({"SLURM_MEM_PER_CPU": "1024"}, 20 * GiB, "MemAvailable (20.00 GiB in /proc/meminfo)"),  # no CPU count
    ({"SLURM_MEM_PER_NODE": "999999"}, 20 * GiB, "MemAvailable (20.00 GiB in /proc/meminfo)"),  # above the machine
])
def test_slurm_allocation(tmp_path, environ, expected, source):
    found = host_memory(tree(tmp_path, {}), environ=environ)
    assert (found.bytes, str(found)) == (expected, source)


def test_the_smallest_of_meminfo_cgroup_and_slurm_binds(tmp_path):
    root = tree(tmp_path, {"proc/self/cgroup": "0::/job\n", "proc/self/mountinfo": V2_MOUNT,
                           **v2_group("sys/fs/cgroup/job", str(6 * GiB), current=GiB)}, available_gib=4)
    assert host_memory(root, environ={}).source == "MemAvailable"
    assert host_memory(root, environ={"SLURM_MEM_PER_NODE": "2048"}).source == "SLURM_MEM_PER_NODE"


def test_nothing_readable_is_an_error_that_says_what_to_set(tmp_path):
    with pytest.raises(ValueError, match="profile memory budget"):
        host_memory(tmp_path, environ={})


def test_a_cpu_clients_budget_is_the_hosts_shared_by_the_nodes_ranks(monkeypatch):
    host = HostMemory(6 * GiB, "cgroup /sys/fs/cgroup/x memory.max", "6.00 GiB, 0 B in use")
    monkeypatch.setattr(budget_module, "host_memory", lambda: host)
    shared = budget_module.client_budget("cpu", 0, ranks_on_node=3)
    assert (shared.bytes, shared.source) == (2 * GiB, host.source)
    assert shared.bound == "cgroup /sys/fs/cgroup/x memory.max (6.00 GiB, 0 B in use), shared by 3 ranks"
    assert budget_module.device_budget("cpu") == 6 * GiB
    own = budget_module.client_budget("cpu", 512 * MiB, ranks_on_node=3)  # a profile's budget is its own
    assert (own.bytes, own.source) == (512 * MiB, "profile memory")


def test_mpifed_memory_sizes_against_the_hosts_memory_and_says_what_bound_it(monkeypatch):
    from click.testing import CliRunner

    from mpifed.commands.memory import memory

    host = HostMemory(64 * MiB, "cgroup /sys/fs/cgroup/x memory.max", "96.00 MiB, 32.00 MiB in use")
    monkeypatch.setattr(budget_module, "host_memory", lambda: host)
    result = CliRunner().invoke(memory, ["--model", "cnn", "--dataset", "synthetic", "--device", "cpu",
                                         "--batches", "1"])
    assert result.exit_code == 0, result.output
    assert "max batch for budget 64.00 MiB" in result.output
    assert "budget: cgroup /sys/fs/cgroup/x memory.max (96.00 MiB, 32.00 MiB in use)\n" in result.output
