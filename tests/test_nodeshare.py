"""mpifed.nodeshare under real `mpirun -n 3`: arrays held once per node in an MPI shared window."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import MPIRUN

pytestmark = pytest.mark.mpi

BIG = 200 * 2**20  # bytes: the PSS check's array
BLANK_ROWS = 50_000  # rows of 4 KiB: a 200 MiB Blank, of which 30 rows are written

COMMON = """
import sys, time
import numpy as np
from mpi4py import MPI
from mpifed.nodeshare import Blank, NodeInputError, NodeShareError, share_on_node

world = MPI.COMM_WORLD
rank = world.rank


def small():
    # computed the same way on every rank: what the leader makes and the others check
    return {"f32": (np.arange(35, dtype=np.float32).reshape(5, 7) / 3),
            "i64": np.arange(-4, 9, dtype=np.int64) * 10**12,
            "u8": (np.arange(2 * 3 * 4 * 5) % 251).astype(np.uint8).reshape(2, 3, 4, 5),
            "empty": np.zeros((0, 3), dtype=np.float64)}


def mapping(view):
    # (path, device, inode, the file offset of the array's first byte, shared?) from /proc/self/maps
    addr = view.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return (parts[5] if len(parts) > 5 else "", parts[3], int(parts[4]),
                        int(parts[2], 16) + addr - lo, parts[1][3] == "s")
    raise AssertionError("no mapping holds the array")


def pss_kib():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
"""

MAIN = COMMON + """
# -- make: the leader makes, every rank checks values, read-only views, the same shared pages
want = small()
made_on = []
made = share_on_node(world, make=lambda: made_on.append(rank) or small())
assert made_on == ([0] if rank == 0 else []), made_on  # make() runs on the node's first rank alone
assert list(made.arrays) == list(want)
for name, expect in want.items():
    got = made[name]
    assert got.dtype == expect.dtype and got.shape == expect.shape and np.array_equal(got, expect), name
    assert not got.flags.writeable and got.__array_interface__["data"][0] % 64 == 0, name
    try:
        got.flags.writeable = True
        raise AssertionError("a view could be made writeable")
    except ValueError:
        pass
place = mapping(made["u8"])
places = world.allgather(place)
assert place[4] and all(p == places[0] for p in places), places
print(f"rank {rank} make ok, shared mapping {place[0]}", flush=True)
made.free()
made.free()  # idempotent

# -- fill: every rank writes its share of the rows, from per-row seeds; a caller's wait (Exchange.wait)
from mpifed.exchange import Exchange
calls = []
exchange = Exchange(world, polite=True, timeout=60)
def wait(requests):
    calls.append(len(requests))
    exchange.wait(requests)
rows = {}
def writer(name, view, start, stop):
    rows[name] = (start, stop)
    for i in range(start, stop):
        view[i] = np.random.default_rng(i).integers(0, 1000, view.shape[1:])
spec = {"x": ((11, 2, 3), np.float64), "y": ((7,), "int16"), "none": ((0, 4), np.uint8)}
filled = share_on_node(world, wait=wait, fill=(spec, writer))
for name, (shape, dtype) in spec.items():
    expect = np.stack([np.random.default_rng(i).integers(0, 1000, shape[1:]) for i in range(shape[0])]
                      ).astype(dtype) if shape[0] else np.zeros(shape, dtype)
    assert np.array_equal(filled[name], expect) and filled[name].dtype == np.dtype(dtype), name
assert calls and sorted(rows) == ["x", "y"], (calls, rows)
print(f"rank {rank} fill ok, rows {rows['x']}, waits {calls}", flush=True)
filled.free()

# -- made on demand: make() gives an about dict and a Blank (allocated, untouched: no memory); writable
# arrays take rows later, each rank writing its own, published by a flag after NodeArrays.sync()
world.Barrier()
before = pss_kib()
lazy = share_on_node(world, make=lambda: ({"rows": Blank((BLANK_ROWS, 4096), np.uint8),
                                           "flags": np.zeros(BLANK_ROWS, np.uint8)}, {"kind": "rows", "n": 7}),
                     writable=("rows", "flags"))
assert lazy.about == {"kind": "rows", "n": 7}, lazy.about
rows, flags = lazy["rows"], lazy["flags"]
assert rows.flags.writeable and flags.flags.writeable and not flags.any()
world.Barrier()
blank_growth = world.gather(pss_kib() - before, root=0)
mine = np.arange(rank, 30, world.size)
rows[mine] = (mine + 1)[:, None]
lazy.sync()  # the rows are in memory before their flags
flags[mine] = 1
world.Barrier()
lazy.sync()  # the flags seen before the rows are read
assert flags[:30].all() and not flags[30:].any() and (rows[:30, 0] == np.arange(1, 31)).all()
assert (rows[:30] == rows[:30, :1]).all()
if rank == 0:
    print(f"blank pages KiB per rank {blank_growth}", flush=True)
    assert sum(blank_growth) < 0.05 * BLANK_ROWS * 4, blank_growth
lazy.free()
print(f"rank {rank} on demand ok", flush=True)

# -- a single-rank node
alone = share_on_node(MPI.COMM_SELF, make=small)
assert all(np.array_equal(alone[k], v) for k, v in small().items())
alone.free()
print(f"rank {rank} single ok", flush=True)

# -- polite: while the leader sleeps 2 s in make(), a waiting rank uses little CPU (default wait and Exchange's)
for how, wait in (("poll", None), ("exchange", exchange.wait)):
    world.Barrier()
    cpu, start = time.process_time(), time.monotonic()
    slow = share_on_node(world, make=lambda: (time.sleep(2), small())[1], wait=wait)
    cpu, took = time.process_time() - cpu, time.monotonic() - start
    slow.free()
    print(f"rank {rank} polite {how}: cpu {cpu:.3f} s over {took:.2f} s", flush=True)
    if rank:
        assert took > 1.5 and cpu < 0.5, (how, cpu, took)

# -- PSS: a big array held once: each rank's Pss grows by about a third of it
world.Barrier()
before = pss_kib()
big = share_on_node(world, make=lambda: {"big": np.full(BIG, 7, dtype=np.uint8)})
assert big["big"][::4096].sum() == 7 * len(range(0, BIG, 4096))  # every rank touches every page
world.Barrier()
grown = pss_kib() - before
growth = world.gather(grown, root=0)
if rank == 0:
    print(f"pss growth KiB per rank {growth} sum {sum(growth)} array {BIG // 1024}", flush=True)
    assert sum(growth) < 1.5 * BIG / 1024, growth
big.free()
print(f"rank {rank} done", flush=True)
""".replace("BIG", str(BIG)).replace("BLANK_ROWS", str(BLANK_ROWS))

FAIL = COMMON + """
# -- a writer raises on rank 2 alone: every rank raises
def writer(name, view, start, stop):
    if rank == 2:
        raise KeyError("sample 9 unreadable")
    view[start:stop] = 1
try:
    share_on_node(world, fill=({"x": ((9,), np.float32)}, writer))
except (NodeShareError, KeyError) as err:
    print(f"rank {rank} writer raised {type(err).__name__}: {err}", flush=True)

# -- two (pretend) nodes {0, 2} and {1}: only node {0, 2}'s leader fails; rank 1 on the other node raises too
pretend = world.Split(rank % 2, rank)
def make():
    if rank == 0:
        raise OSError("dataset half-node missing")
    return small()
try:
    share_on_node(world, make=make, node=pretend)
except (NodeShareError, OSError) as err:
    print(f"rank {rank} other node raised {type(err).__name__}: {err}", flush=True)
pretend.Free()

# -- the leader's failure is the user's input (mpifed.errors.InputError): the others raise NodeInputError,
# an InputError too, so the job ends with the leader's line and no rank prints a traceback
from mpifed.errors import InputError
class BadData(InputError, ValueError):
    pass
def refused():
    raise BadData("data.options = {sites = 0}: give at least one site")
try:
    share_on_node(world, make=refused)
except (BadData, NodeInputError) as err:
    print(f"rank {rank} input raised {type(err).__name__} {isinstance(err, InputError)}: {err}", flush=True)

# -- the leader's make() raises, uncaught: every rank raises, and the job ends
def broken():
    time.sleep(0.5)
    raise ValueError("no such file: train.h5")
try:
    share_on_node(world, make=broken)
    print(f"rank {rank} not raised", flush=True)
except Exception as err:  # said in one line each (the ranks' tracebacks interleave on stderr), then raised
    print(f"rank {rank} broken raised {type(err).__module__}.{type(err).__name__}: {err}", flush=True)
    raise
"""


def _mpirun(tmp_path, script: str, timeout: float) -> subprocess.CompletedProcess:
    if MPIRUN is None:
        pytest.skip("mpirun not found; install the MPICH wheel: pip install -e '.[mpich]'")
    path = tmp_path / "script.py"
    path.write_text(script)
    return subprocess.run([MPIRUN, "-n", "3", sys.executable, str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_arrays_are_held_once_per_node_read_only_shared_and_waited_for_politely(tmp_path):
    proc = _mpirun(tmp_path, MAIN, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr[-4000:]}"
    for rank in range(3):
        for said in ("make ok", "fill ok", "on demand ok", "single ok", "polite poll", "polite exchange", "done"):
            assert f"rank {rank} {said}" in out, out
    assert "pss growth" in out, out
    growth = eval(out.split("pss growth KiB per rank ")[1].split(" sum")[0])
    third = BIG / 1024 / 3
    assert all(0.5 * third < g < 1.5 * third for g in growth), out  # each about a third, not the whole


def test_a_failure_on_one_rank_is_raised_on_every_rank_without_a_hang(tmp_path):
    start = time.monotonic()
    proc = _mpirun(tmp_path, FAIL, timeout=120)
    took = time.monotonic() - start
    out, err = proc.stdout, proc.stderr
    assert proc.returncode != 0 and took < 30, (took, out, err)
    assert "rank 2 writer raised KeyError: 'sample 9 unreadable'" in out, out
    for rank in (0, 1):
        assert f"rank {rank} writer raised NodeShareError: rank 2: KeyError: 'sample 9 unreadable'" in out, out
    assert "rank 0 other node raised OSError: dataset half-node missing" in out, out
    for rank in (1, 2):
        assert (f"rank {rank} other node raised NodeShareError: rank 0: OSError: dataset half-node missing"
                in out), out
    assert "rank 0 input raised BadData True: data.options = {sites = 0}: give at least one site" in out, out
    for rank in (1, 2):
        assert (f"rank {rank} input raised NodeInputError True: rank 0: BadData: data.options = {{sites = 0}}: give "
                f"at least one site") in out, out
    assert "not raised" not in out, out
    assert "rank 0 broken raised builtins.ValueError: no such file: train.h5" in out, out
    for rank in (1, 2):
        assert (f"rank {rank} broken raised mpifed.nodeshare.NodeShareError: rank 0: ValueError: no such file: "
                f"train.h5") in out, out
    assert err.count("Traceback (most recent call last)") >= 1, err  # raised uncaught: the job ends
