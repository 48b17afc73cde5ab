"""Under a real memory cgroup smaller than the machine's free memory, clients size their batch against the
cgroup's limit, not MemAvailable, and the job finishes instead of being OOM-killed.

The test makes the cgroup itself (as root): cgroup v2 where the root cgroup offers the memory controller,
else cgroup v1's memory hierarchy (nested under this process's own memory cgroup, so its limits still
bind); it is skipped, with the reason, where neither can be made.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import h5py
import pytest

from conftest import ok, train
from mpifed.memory.host import cgroup_mounts, memory_cgroups

pytestmark = pytest.mark.mpi

GiB = 2**30
LIMIT = 3 * GiB  # a third of what a MemAvailable budget sized the same job for on a 24 GiB machine


def _v2_parent() -> tuple[Path | None, str]:
    """The cgroup v2 root, with memory delegated to its children, or None and why not."""
    mounts = cgroup_mounts(Path("/")).get(2, [])
    if not mounts:
        return None, "no cgroup v2 hierarchy is mounted"
    top = Path(mounts[0][1])
    controllers = (top / "cgroup.controllers").read_text().split() if (top / "cgroup.controllers").exists() else []
    if "memory" not in controllers:
        return None, (f"the cgroup v2 root {top} offers the controllers {controllers or 'none'} but not memory (the "
                      f"kernel has it bound to a cgroup v1 hierarchy, or this container was not delegated it)")
    if "memory" not in (top / "cgroup.subtree_control").read_text().split():
        try:
            (top / "cgroup.subtree_control").write_text("+memory")
        except OSError as err:
            return None, f"cannot delegate memory in {top}/cgroup.subtree_control: {err}"
    return top, ""


def _v1_parent() -> tuple[Path | None, str]:
    """This process's own cgroup v1 memory group, or None and why not."""
    own = [g for g in memory_cgroups() if g.version == 1]
    if not own:
        return None, "no cgroup v1 memory hierarchy is mounted"
    return own[0].path, ""


@pytest.fixture
def memory_cgroup():
    """A fresh memory cgroup with a LIMIT byte limit: (its directory, its limit file, its processes file)."""
    if os.geteuid() != 0:
        pytest.skip("making a memory cgroup needs root")
    (parent, why_not_v2), limit_file = _v2_parent(), "memory.max"
    if parent is None:
        (parent, why_not_v1), limit_file = _v1_parent(), "memory.limit_in_bytes"
        if parent is None:
            pytest.skip(f"cannot make a memory cgroup: {why_not_v2}; {why_not_v1}")
    group = parent / f"mpifed-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(LIMIT))
    except OSError as err:
        if group.exists():
            group.rmdir()
        pytest.skip(f"cannot make a memory cgroup under {parent}: {err}")
    try:
        yield group, limit_file
    finally:
        for pid in (group / "cgroup.procs").read_text().split():  # the job's own processes, left by a timeout
            os.kill(int(pid), signal.SIGKILL)
        for _ in range(100):  # a killed process leaves its group when it has exited
            if not (group / "cgroup.procs").read_text().split():
                break
            time.sleep(0.1)
        group.rmdir()


def _oom_kills(group: Path) -> int:
    """OOM kills inside the group (v2: memory.events; v1: memory.oom_control)."""
    for name in ("memory.events", "memory.oom_control"):
        for line in (group / name).read_text().splitlines() if (group / name).exists() else ():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return 0


def test_clients_are_sized_under_the_cgroup_limit_and_the_job_finishes(tmp_path, memory_cgroup):
    group, limit_file = memory_cgroup
    into_group = ("sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh")
    proc = ok(train(3, tmp_path, "capped", "--set", "train.batch=100000000", "--set", "train.rounds=1",
                    "--set", "train.eval_every=1", timeout=400, wrapper=into_group))
    bound = f"bound by cgroup {group} {limit_file} (3.00 GiB, "
    assert bound in proc.stdout, proc.stdout
    assert _oom_kills(group) == 0
    with h5py.File(tmp_path / "capped" / "run.h5") as f:
        budgets = f["ranks/sized_budget"][1:]
        largest, batch = f["ranks/max_batch"][1:], f["ranks/batch"][1:]
        assert all(text.startswith(f"cgroup {group} {limit_file}") and text.endswith("shared by 3 ranks")
                   for text in f["ranks/budget_bound"].asstr()[1:])
        assert 0 < budgets.max() and budgets.sum() < LIMIT  # the ranks' shares of what the cgroup had left
        assert (1 <= largest).all() and (largest < 100_000_000).all() and (batch == largest).all()
        for k, (budget, b) in enumerate(zip(budgets, batch)):  # the memory model's peak fits each share
            static, per_sample = (f["models"].attrs[f"memory.client{k}.{key}"] for key in ("static_bytes",
                                                                                           "per_sample_bytes"))
            assert static + b * per_sample <= budget
        assert f["iter/t_iter"].shape[0] == 1
