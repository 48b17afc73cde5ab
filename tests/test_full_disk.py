"""A full disk ends a run with one line that says so and how to go on, and never costs what was
written before: no partial checkpoint is left, and a failed resume leaves the log as it was.

Each test mounts a tiny tmpfs (conftest's disk: root only; skipped otherwise) and fills it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY, fill, mpi_run, train
from mpifed import checkpoint
from mpifed.errors import InputError
from mpifed.runlog import ITER_FIELDS, RANK_COLUMNS, RunWriter, open_run, recover

RANKS = {key: ["server", "client"] if key in ("role", "host", "device", "profile") else [0, 1] for key in RANK_COLUMNS}


def log(path: Path, rounds: int, evals: list[int]) -> None:
    writer = RunWriter(path, dict(job="x"), RANKS)
    for r in range(rounds):
        writer.append_round(np.full((2, len(ITER_FIELDS)), float(r)), dict(lr=0.1))
        if r + 1 in evals:
            writer.append_eval(dict(round=r + 1, test_loss=1.0, test_acc=0.5, wall=float(r)))
    writer.close()


def assert_says_disk_full(err: BaseException, folder: Path) -> None:
    message = str(err)
    assert isinstance(err, InputError), f"{type(err).__name__}: {message}"  # one line, no traceback
    assert f"the disk holding {folder} is full (" in message and " free" in message, message


def test_a_checkpoint_on_a_full_disk_says_so_and_leaves_no_partial_file(disk):
    run = disk("256k")
    payload = dict(identity={}, model=dict(w=torch.zeros(20000)))
    first = checkpoint.save(run, dict(payload, round=1), keep=2, ranks=5)
    fill(run)
    with pytest.raises(Exception) as failed:
        checkpoint.save(run, dict(payload, round=2), keep=2, ranks=5)
    assert_says_disk_full(failed.value, run / "checkpoints")
    assert "checkpoint round-00000002.pt could not be written" in str(failed.value)
    assert f"needs about {first.stat().st_size / 1024:.2f} KiB" in str(failed.value)
    said = f"continue from round-00000001.pt with: mpirun -n 5 mpifed train --resume {run} (new runs: "
    assert said in str(failed.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-00000001.pt"]  # no .tmp
    assert checkpoint.choose(run, {})[1]["round"] == 1


def test_a_file_replaced_whole_has_its_rename_synced_too(tmp_path, monkeypatch):
    """write_whole fsyncs the file, renames it, then fsyncs its folder (as the log's own rewrite does):
    without the last, a crash may bring back the old file although the new one was reported written."""
    from mpifed.diskfull import write_whole

    target = tmp_path / "job.toml"
    target.write_bytes(b"old")
    synced, fsync = [], os.fsync

    def record(fd):
        folder = os.path.samestat(os.fstat(fd), os.stat(tmp_path))
        synced.append(("folder" if folder else "file", target.read_bytes()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    write_whole(target, lambda fh: fh.write(b"new"), "job.toml", lambda: "")
    assert synced == [("file", b"old"), ("folder", b"new")], synced  # the file before, the folder after the rename


def test_a_run_directory_on_a_full_disk_is_refused_in_one_line(disk):
    """run.lock is the first file a run writes: before, its write raised a bare OSError and rank 0
    printed a traceback."""
    from mpifed import runlock

    root = disk("64k")
    run = root / "new-run"
    run.mkdir()
    fill(root)
    with pytest.raises(Exception) as failed:
        runlock.hold(run)
    assert_says_disk_full(failed.value, run)
    assert "run.lock could not be written" in str(failed.value)
    runlock.release(run)  # the launch ends: the note the disk refused is not tried again when the file closes
    assert not (run / runlock.LOCK_NAME).exists()


def test_a_resume_on_a_full_disk_leaves_the_log_as_it_was(disk):
    run = disk("128k")
    path = run / "run.h5"
    log(path, 10, evals=[5, 10])
    before = path.read_bytes()
    filler = fill(run)
    with pytest.raises(Exception) as failed:
        RunWriter.reopen(path, 8, "resumed at round 8", "job = 2")
    assert_says_disk_full(failed.value, run)
    assert "run.h5 and the checkpoints are unchanged" in str(failed.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["filler", "run.h5"]  # the partial copy is gone
    with h5py.File(path, "r") as f:  # still closed and readable
        assert f["iter/t_iter"].shape == (10, 2) and "resumes" not in f.attrs

    filler.unlink()  # with room, the resume keeps the rounds before the checkpoint and appends after
    writer = RunWriter.reopen(path, 8, "resumed at round 8", "job = 2")
    writer.append_round(np.full((2, len(ITER_FIELDS)), 80.0), dict(lr=0.2))
    with open_run(path) as f:  # readers may follow it as before
        assert f["iter/t_iter"].shape == (9, 2)
    writer.close()
    with h5py.File(path, "r") as f:
        assert f["iter/loss"][:, 0].tolist() == [*map(float, range(8)), 80.0]
        assert f["server/lr"][:].tolist() == [0.1] * 8 + [0.2] and f["eval/round"][:].tolist() == [5.0]
        assert list(f.attrs["resumes"]) == ["resumed at round 8"] and f.attrs["job"] == "job = 2"
        assert f["ranks/role"].asstr()[:].tolist() == RANKS["role"]
    assert sorted(p.name for p in run.iterdir()) == ["run.h5"]


def test_recovering_a_log_on_a_full_disk_leaves_it_as_it_was(disk):
    """A log left open by a writer that died is copied to be appended to; on a full disk, not."""
    run = disk("128k")
    path = run / "run.h5"
    script = (f"import os, numpy as np; from mpifed.runlog import RunWriter, ITER_FIELDS\n"
              f"w = RunWriter({str(path)!r}, dict(job='x'), {RANKS!r})\n"
              f"for r in range(5): w.append_round(np.zeros((2, len(ITER_FIELDS))), {{}})\n"
              f"os._exit(0)  # dies without closing\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    before = path.read_bytes()
    filler = fill(run)
    with pytest.raises(Exception) as failed:
        recover(path)
    assert_says_disk_full(failed.value, run)
    assert path.read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["filler", "run.h5"]
    filler.unlink()
    assert recover(path)
    with h5py.File(path, "r") as f:
        assert f["iter/t_iter"].shape == (5, 2)


WRITE_UNTIL_FULL = """
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, {tests!r})
from conftest import fill
from test_full_disk import RANKS
from mpifed.runlog import CLIENT_FIELDS, ITER_FIELDS, RunWriter
run = Path({run!r})
writer = RunWriter(run / "run.h5", dict(job="x"), RANKS, clients_per_round=3)
(run / "checkpoints").mkdir()
(run / "checkpoints" / "round-00000001.pt").touch()  # named in the advice, not read


def round(r):
    writer.append_round(np.zeros((2, len(ITER_FIELDS))), dict(lr=0.1), np.zeros((3, len(CLIENT_FIELDS))))
    if r % 5 == 0:
        writer.append_eval(dict(round=r, test_loss=1.0, test_acc=0.5, wall=1.0))


try:
    try:  # as mpifed.train runs the rounds
        for r in range(3):
            round(r)
        fill(run)
        for r in range(3, 1000):
            round(r)
    finally:
        writer.close()
except Exception as err:
    print(f"{{type(err).__name__}}: {{err}}")
"""


def test_a_log_write_on_a_full_disk_is_the_error_reported_and_leaves_whole_rounds(disk):
    """Not the error HDF5 raises when the writer is closed after it; in a subprocess, because HDF5
    used to crash at exit after such a failure. The round that failed is in no dataset: it once
    left the /iter/t_* written before the failing one a row longer than /iter/loss and /server/*."""
    run = disk("192k")
    script = WRITE_UNTIL_FULL.format(tests=str(Path(__file__).parent), run=str(run))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("DiskFullError: run log"), proc.stdout
    assert f"the disk holding {run} is full (" in proc.stdout and "rounds logged before stay in it" in proc.stdout
    assert "decrement" not in proc.stdout and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert f"continue from round-00000001.pt with: mpirun -n 2 mpifed train --resume {run} (" in proc.stdout
    (run / "filler").unlink()
    recover(path := run / "run.h5")  # left open in SWMR mode at worst
    kept = int(re.search(r"the (\d+) rounds logged before stay in it", proc.stdout).group(1))
    with h5py.File(path, "r") as f:
        rows = {name: f[name].shape[0] for group in ("iter", "server", "clients") for name in
                (f"{group}/{field}" for field in f[group])}
        evals = {name: f[f"eval/{name}"].shape[0] for name in f["eval"]}
    assert kept >= 3 and set(rows.values()) == {kept}, rows
    assert set(evals.values()) == {len(range(0, kept, 5))}, evals


@pytest.mark.mpi
def test_a_job_on_a_full_disk_ends_with_one_line_and_resumes_without_harm(disk, tmp_path):
    """Room for the log and two checkpoints, not a third: the job ends with the reason and what to do,
    no traceback; resuming on the still full disk refuses without touching the log."""
    out = disk("480k")
    failed = train(3, out, "full", "--set", "checkpoint.every=2", timeout=120)
    assert failed.returncode != 0
    said = [line for line in failed.stderr.splitlines() if "failed:" in line]
    assert len(said) == 1 and re.search(r"rank 0 \(server\) on .* failed: DiskFullError: checkpoint "
                                        r"round-\d{8}\.pt could not be written: the disk holding", said[0]), said
    assert "Traceback" not in failed.stderr and "unexpected pos" not in failed.stderr, failed.stderr[-3000:]
    assert f"with: mpirun -n 3 mpifed train --resume {out / 'full'} (new runs" in said[0]  # the run's own ranks
    assert not [p for p in (out / "full").rglob("*") if p.name.endswith(".tmp")]

    log_path = out / "full" / "run.h5"
    before = log_path.read_bytes()
    fill(out)
    resumed = mpi_run(3, ["train", "--resume", str(out / "full"), *TINY[-2:]], tmp_path, timeout=120)
    assert resumed.returncode != 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert "DiskFullError: the resumed log (a copy of run.h5" in resumed.stderr, resumed.stderr[-3000:]
    assert log_path.read_bytes() == before
    with h5py.File(log_path, "r") as f:
        assert f["iter/t_iter"].shape == (6, 3)
