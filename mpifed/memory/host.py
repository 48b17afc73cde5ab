"""The memory this process may still use on its host: the smallest of what the machine, its memory
cgroup and SLURM allow.

MemAvailable alone overstates it wherever a limit sits below the machine: SLURM's --mem, a container,
any memory cgroup. Past such a limit the kernel's OOM killer ends a rank with signal 9 and no word, so
a budget taken from MemAvailable under a 6 GiB cgroup on a 24 GiB machine sizes batches that cannot run.

    host_memory()                        # this process, on this machine
    host_memory(root=tmp_path, environ={})   # a fake tree (tests): <root>/proc/..., <root>/sys/fs/cgroup/...

Every candidate is a number of bytes and the words that say where it comes from; the smallest binds:
- MemAvailable of /proc/meminfo (the kernel's estimate, page cache it can drop included);
- every memory cgroup from this process's own up to the top of its hierarchy (a parent's limit binds
  its children too), cgroup v2 (memory.max, memory.current) and v1 (memory.limit_in_bytes,
  memory.usage_in_bytes): the limit less what the group uses, its inactive file cache excepted, which
  the kernel reclaims before it kills (the working set, as the kubelet counts it);
- SLURM's allocation of the node: SLURM_MEM_PER_NODE, or SLURM_MEM_PER_CPU x SLURM_CPUS_ON_NODE (MiB).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from mpifed.units import format_bytes

UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as the largest page-aligned 64-bit number


@dataclass(frozen=True)
class HostMemory:
    """Bytes this process may still use on its host, and what bound them."""

    bytes: int
    source: str   # e.g. "cgroup /sys/fs/cgroup/job memory.max", "MemAvailable", "SLURM_MEM_PER_NODE"
    detail: str   # the numbers behind it, e.g. "6.00 GiB, 1.20 GiB in use"

    def __str__(self) -> str:
        return f"{self.source} ({self.detail})" if self.detail else self.source


@dataclass(frozen=True)
class MemoryCgroup:
    """One memory cgroup directory and its interface (v1 and v2 name the same files differently)."""

    path: Path
    version: int
    shown: str  # its path as the process sees it (a test's fake tree shows its own paths)

    @property
    def limit_file(self) -> str:
        return "memory.max" if self.version == 2 else "memory.limit_in_bytes"

    @property
    def usage_file(self) -> str:
        return "memory.current" if self.version == 2 else "memory.usage_in_bytes"

    @property
    def inactive_key(self) -> str:  # v1's own inactive_file leaves out the children that usage counts
        return "inactive_file" if self.version == 2 else "total_inactive_file"


def host_memory(root: str | Path = "/", environ: Mapping[str, str] | None = None) -> HostMemory:
    """The smallest of MemAvailable, this process's memory cgroups' room and SLURM's allocation.
    Raises ValueError when none of them can be read."""
    root = Path(root)
    environ = os.environ if environ is None else environ
    found = [c for c in (_mem_available(root), *map(_cgroup_room, memory_cgroups(root)), _slurm_allocation(environ))
             if c is not None]
    if not found:
        raise ValueError("cannot read the free host memory (/proc/meminfo); give this client a profile "
                         "memory budget, e.g. memory = '4GiB'")
    return min(found, key=lambda c: c.bytes)


def memory_cgroups(root: str | Path = "/") -> list[MemoryCgroup]:
    """This process's memory cgroups, its own first, then each parent up to the top of the hierarchy
    as mounted (/proc/self/cgroup names them, /proc/self/mountinfo says where they are mounted)."""
    root = Path(root)
    mounts = cgroup_mounts(root)
    groups: list[MemoryCgroup] = []
    for line in _lines(root / "proc/self/cgroup"):
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        version = 2 if hierarchy == "0" and controllers == "" else 1
        if version == 1 and "memory" not in controllers.split(","):
            continue
        for mount_root, mount_point in mounts.get(version, ()):
            relative = path
            if mount_root != "/" and (path + "/").startswith(mount_root.rstrip("/") + "/"):
                relative = path[len(mount_root.rstrip("/")):]
            top = root / mount_point.lstrip("/")
            here = top / relative.lstrip("/")
            while True:
                group = MemoryCgroup(here, version, "/" + str(here.relative_to(root)))
                if (here / group.limit_file).is_file():
                    groups.append(group)
                if here == top or top not in here.parents:
                    break
                here = here.parent
    return groups


def cgroup_mounts(root: Path) -> dict[int, list[tuple[str, str]]]:
    """(root within the hierarchy, mount point) of the cgroup2 mounts (key 2) and of the v1 mounts that
    carry the memory controller (key 1); without a mountinfo, the usual places."""
    lines = _lines(root / "proc/self/mountinfo")
    if not lines:
        return {2: [("/", "/sys/fs/cgroup")], 1: [("/", "/sys/fs/cgroup/memory")]}
    mounts: dict[int, list[tuple[str, str]]] = {1: [], 2: []}
    for line in lines:
        fields, _, tail = line.partition(" - ")
        fields, tail = fields.split(), tail.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        kind, options = tail[0], tail[2].split(",")
        if kind == "cgroup2":
            mounts[2].append((fields[3], fields[4]))
        elif kind == "cgroup" and "memory" in options:
            mounts[1].append((fields[3], fields[4]))
    return mounts


def _cgroup_room(group: MemoryCgroup) -> HostMemory | None:
    """The group's limit less its working set; None where it sets no limit or cannot be read."""
    limit = _read_int(group.path / group.limit_file)
    if limit is None or limit >= UNLIMITED:
        return None
    usage = _read_int(group.path / group.usage_file) or 0
    inactive = _stat(group.path / "memory.stat").get(group.inactive_key, 0)
    used = max(0, usage - inactive)
    return HostMemory(max(0, limit - used), f"cgroup {group.shown} {group.limit_file}",
                      f"{format_bytes(limit)}, {format_bytes(used)} in use")


def _mem_available(root: Path) -> HostMemory | None:
    for line in _lines(root / "proc/meminfo"):
        if line.startswith("MemAvailable:"):
            kib = int(line.split()[1])
            return HostMemory(kib * 1024, "MemAvailable", f"{format_bytes(kib * 1024)} in /proc/meminfo")
    return None


def _slurm_allocation(environ: Mapping[str, str]) -> HostMemory | None:
    """SLURM's memory for this job on this node (--mem, or --mem-per-cpu times the node's CPUs); 0
    ("all the node's memory") and unset are no limit."""
    per_node = _env_int(environ, "SLURM_MEM_PER_NODE")
    if per_node:
        return HostMemory(per_node << 20, "SLURM_MEM_PER_NODE", f"{per_node} MiB")
    per_cpu, cpus = _env_int(environ, "SLURM_MEM_PER_CPU"), _env_int(environ, "SLURM_CPUS_ON_NODE")
    if per_cpu and cpus:
        return HostMemory((per_cpu * cpus) << 20, "SLURM_MEM_PER_CPU x SLURM_CPUS_ON_NODE",
                          f"{per_cpu} MiB x {cpus}")
    return None


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    try:
        return int(environ.get(name, ""))
    except ValueError:
        return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path) -> dict[str, int]:
    out = {}
    for line in _lines(path):
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []
