"""Shared test helpers: launching real `mpirun` jobs in a subprocess, with a timeout; dataset files."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpifed.bench.launch import find_tool

MPIRUN = find_tool("mpirun")

# A job that trains in seconds: small synthetic data, few rounds.
TINY = ["--set", "data.train_size=600", "--set", "data.test_size=200", "--set", "train.rounds=6",
        "--set", "train.eval_every=3", "--set", "run.timestamp=false", "--progress", "log"]


def mpi_run(n: int, args: list[str], cwd: Path, timeout: float = 240,
            wrapper: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`mpirun -n n <python> -m mpifed <args>`, started by `wrapper` if given (a command that ends in
    `exec "$@"`); a hang fails the test through the timeout."""
    if MPIRUN is None:
        pytest.skip("mpirun not found; install the MPICH wheel: pip install -e '.[mpich]'")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [*wrapper, MPIRUN, "-n", str(n), sys.executable, "-m", "mpifed", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def train(n: int, tmp: Path, name: str, *extra: str, timeout: float = 240,
          wrapper: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return mpi_run(n, ["train", *TINY, "--out", str(tmp), "--name", name, *extra], tmp, timeout, wrapper)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def rounds_logged(path: Path) -> int:
    """Rounds a (possibly still running) job has logged so far; 0 before its run.h5 exists."""
    try:
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            return f["iter/t_iter"].shape[0]
    except (OSError, KeyError):
        return 0


def write_mnist(root: Path, train: int, test: int) -> np.ndarray:
    """MNIST in its real on-disk format (idx files under root/MNIST/raw), random pixels and labels;
    returns the test images."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    gen = np.random.default_rng(0)
    for split, n in (("train", train), ("t10k", test)):
        images = gen.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = gen.integers(0, 10, size=n, dtype=np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return images


@pytest.fixture
def disk(tmp_path):
    """disk(size) mounts a tmpfs of that size ("64k") under tmp_path, unmounted afterwards: a disk a
    test can fill (root only; skipped otherwise)."""
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tiny tmpfs needs root")
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(point)], check=True)  # a process of the job still closing


def fill(folder: Path) -> Path:
    """Take every free byte of folder's disk; delete the returned file to give them back."""
    path = folder / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for block in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"x" * block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return path
