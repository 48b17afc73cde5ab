"""Real `mpirun` jobs: what only MPI can show."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import MPIRUN, TINY, ok, rounds_logged, train, write_mnist
from mpifed.config import load_job
from mpifed.data import ClientSampler, load_dataset, partition
from mpifed.models import build_model
from mpifed.runlog import ATTRS, EVAL_FIELDS, ITER_FIELDS, MODELS_DOCS, RANK_COLUMNS, SERVER_FIELDS, open_run
from mpifed.schedule import learning_rate
from mpifed.seeding import Purpose, forked_torch_rng

pytestmark = pytest.mark.mpi

HETERO = ["--set", 'clients.groups=[{count = 1, profile = "big"}]', "--set", "profiles.big.batch=24",
          "--set", "profiles.big.data=2.0", "--set", 'data.partition="dirichlet"', "--set", "train.batch=8"]


def _state(path):
    return torch.load(path, weights_only=True)


class Reference:
    """The job's clients, rebuilt in one process from the same seeds: partitions, samplers, init."""

    def __init__(self, run_dir, batches):
        self.job = job = load_job(run_dir / "job.toml")
        data = load_dataset("synthetic", True, size=job.data.train_size, noise=job.data.noise)
        parts = partition(data.targets, np.array([2.0, 1.0]), "dirichlet", job.run.seed, job.data.alpha)
        self.samplers = [ClientSampler(p, job.run.seed, k) for k, p in enumerate(parts)]
        self.tensors = [data.tensors(p) for p in parts]
        self.batches = batches
        with forked_torch_rng(job.run.seed, Purpose.INIT):
            self.model = build_model("cnn", 10)
        self.got = _state(run_dir / "model.pt")

    def draw(self, client):
        x, y = self.tensors[client]
        pos = torch.from_numpy(self.samplers[client].next(self.batches[client]))
        return x[pos], y[pos]

    def lr(self, rnd):
        return learning_rate(self.job.optim, rnd, self.job.train.rounds, sum(self.batches))

    def sgd_round(self, opt, rnd):
        """Round `rnd` of plain SGD on the union of the clients' batches (self.batches)."""
        xs, ys = zip(*[self.draw(k) for k in range(len(self.batches))])
        for group in opt.param_groups:
            group["lr"] = self.lr(rnd)
        opt.zero_grad()
        F.cross_entropy(self.model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()

    def assert_matches(self, model):
        for name, want in model.state_dict().items():
            assert torch.allclose(self.got[name], want, atol=2e-5, rtol=1e-4), name


def test_fedsgd_equals_single_process_sgd_on_the_union_of_client_batches(tmp_path):
    """E=1, unequal client batches (24 and 8) and label-skewed partitions: the server's model after
    R rounds equals plain SGD (momentum, weight decay, cosine lr) on the union of the client batches."""
    ok(train(3, tmp_path, "eq", *HETERO, "--set", "optim.nesterov=true"))
    ref = Reference(tmp_path / "eq", [24, 8])
    o = ref.job.optim
    opt = torch.optim.SGD(ref.model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=True,
                          weight_decay=o.weight_decay)
    for rnd in range(ref.job.train.rounds):
        ref.sgd_round(opt, rnd)
    ref.assert_matches(ref.model)


def test_fedavg_equals_batch_weighted_average_of_local_sgd_models(tmp_path):
    """E=3 local SGD steps per round, server_lr 1, no server momentum: w <- sum_k (b_k/B) w_k."""
    ok(train(3, tmp_path, "avg", *HETERO, "--set", "train.local_steps=3"))
    ref = Reference(tmp_path / "avg", [24, 8])
    o = ref.job.optim
    global_state = {k: v.clone() for k, v in ref.model.state_dict().items()}
    for rnd in range(ref.job.train.rounds):
        locals_ = []
        for k in range(2):
            ref.model.load_state_dict(global_state)
            opt = torch.optim.SGD(ref.model.parameters(), lr=ref.lr(rnd), weight_decay=o.weight_decay)
            for _ in range(3):
                x, y = ref.draw(k)
                opt.zero_grad()
                F.cross_entropy(ref.model(x), y).backward()
                opt.step()
            locals_.append({n: v.clone() for n, v in ref.model.state_dict().items()})
        global_state = {n: (24 * locals_[0][n] + 8 * locals_[1][n]) / 32 for n in global_state}
    ref.model.load_state_dict(global_state)
    ref.assert_matches(ref.model)


def test_same_seed_same_run_chunked_or_not_and_another_seed_differs(tmp_path):
    """Partitions, sampling and init come from the seed alone; moving the model in 1 KiB pieces
    (the >2 GiB path) changes nothing."""
    ok(train(3, tmp_path, "a", *HETERO))
    ok(train(3, tmp_path, "b", *HETERO, "--set", "comm.chunk_mib=0.001", "--set", 'comm.wait="poll"'))
    ok(train(3, tmp_path, "c", *HETERO, "--set", "run.seed=1"))
    a, b, c = (_state(tmp_path / n / "model.pt") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    sizes = {n: h5py.File(tmp_path / n / "run.h5")["ranks/data_size"][1:].tolist() for n in "abc"}
    assert sizes["a"] == sizes["b"] != sizes["c"]


def test_run_log_layout(tmp_path):
    proc = ok(train(4, tmp_path, "log", "--set", "profiles.slow.speed=0.5", "--set", 'profiles.slow.latency="2ms"',
                    "--set", 'clients.groups=[{count = 1, profile = "slow"}]', "--set", "data.augment=true"))
    assert "test accuracy" in proc.stdout
    assert not (tmp_path / "log" / "run.lock").exists()  # a clean finish lets go of the run directory
    with open_run(tmp_path / "log" / "run.h5") as f:
        assert f.attrs["schema"] == 1 and f.attrs["world_size"] == 4
        assert load_job(text=f.attrs["job"]).train.rounds == 6
        assert "MPICH" in f.attrs["mpi_library"] or "Open MPI" in f.attrs["mpi_library"]
        assert set(f["ranks"]) == set(RANK_COLUMNS)
        assert set(f.attrs) == set(ATTRS) - {"resumes"}, "an attribute without its meaning in runlog.ATTRS"
        documented = [re.compile(re.sub(r"<\w+>", r"\\w+", re.escape(name)) + r"\.\w+") for name in MODELS_DOCS]
        assert f["models"].attrs and all(any(d.fullmatch(key) for d in documented) for key in f["models"].attrs), \
            list(f["models"].attrs)
        assert [r.decode() for r in f["ranks/role"][:]] == ["server", "client 0", "client 1", "client 2"]
        assert [p.decode() for p in f["ranks/profile"][:]] == ["-", "slow", "native", "native"]
        assert f["ranks/emulated"][:].tolist() == [False, True, False, False]
        for name in ITER_FIELDS:
            assert f[f"iter/{name}"].shape == (6, 4), name
        t_iter = f["iter/t_iter"][:]
        assert np.isfinite(t_iter).all() and (t_iter > 0).all()
        emul = f["iter/t_emul"][:]
        assert (emul[:, 1] >= 0.004).all() and (emul[:, 2:] == 0).all()  # 2 ms each way, and slowed compute
        assert np.isnan(f["iter/t_compute"][:, 0]).all() and (f["iter/t_compute"][:, 1:] > 0).all()
        assert (f["iter/batch"][:, 1:] == 32).all() and (f["iter/batch"][:, 0] == 96).all()
        assert np.isfinite(f["iter/loss"][:]).all()
        # train accuracy: each client's on its batch, the server's the batch-weighted mean of theirs
        acc, batch, train_acc = f["iter/acc"][:], f["iter/batch"][:], f["server/train_acc"][:]
        assert ((acc >= 0) & (acc <= 1)).all() and (acc[:, 1:] * 32 == np.round(acc[:, 1:] * 32)).all()
        assert train_acc == pytest.approx((acc[:, 1:] * batch[:, 1:]).sum(axis=1) / batch[:, 1:].sum(axis=1))
        assert acc[:, 0].tolist() == train_acc.tolist()
        wait = f["iter/t_wait"][:, 1:]
        assert (wait >= 0).all() and (wait.min(axis=1) == 0).all()
        for name in SERVER_FIELDS:
            assert f[f"server/{name}"].shape == (6,), name
        assert f["eval/round"][:].tolist() == [0, 3, 6]  # the initial model, then every 3 rounds
        assert set(f["eval"]) == set(EVAL_FIELDS)
        assert ((f["eval/test_acc"][:] >= 0) & (f["eval/test_acc"][:] <= 1)).all()


def test_bad_job_fails_on_every_rank_with_the_field_named(tmp_path):
    proc = train(3, tmp_path, "bad", "--set", "train.batch=0", "--set", "model.name=resnet7", timeout=120)
    assert proc.returncode == 2
    assert "train.batch = 0: must be >= 1" in proc.stderr and "model.name = 'resnet7'" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_an_unwritable_output_ends_every_rank_with_the_path(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    proc = train(3, tmp_path, "x", "--out", str(tmp_path / "file" / "runs"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot create the run directory {tmp_path}/file/runs/x" in proc.stderr and "writable" in proc.stderr
    assert (tmp_path / "file").read_text() == "not a directory"


def test_rank_count_that_does_not_fit_the_job_fails_at_once(tmp_path):
    proc = train(3, tmp_path, "count", "--set", "clients.count=1", timeout=120)
    assert proc.returncode == 2
    assert "clients.count = 1 but 3 ranks" in proc.stderr and "would never train" in proc.stderr
    assert "mpirun -n 2" in proc.stderr


def test_missing_dataset_ends_the_job_with_where_the_files_go(tmp_path):
    """Rank 0 loads the data before it makes the run directory: one line, from rank 0 alone, and nothing
    written."""
    proc = train(3, tmp_path, "nodata", "--set", 'data.dataset="cifar10"', "--set", f'data.root="{tmp_path}/none"',
                 timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mpifed: error")]
    assert len(errors) == 1 and "cifar-10-batches-py" in errors[0] and "--set data.root=DIR" in errors[0]
    assert "Traceback" not in proc.stderr  # the user's input: the message alone says what to do
    assert not (tmp_path / "nodata").exists()
    ok(train(3, tmp_path, "nodata", "--set", "train.rounds=1"))


def test_a_truncated_dataset_file_ends_the_job_naming_it(tmp_path):
    """data.download = true finds the file there and leaves it in place (as torchvision does): rank 0's
    one line names the file and says to delete it first; nothing is written."""
    write_mnist(tmp_path / "data", train=600, test=200)
    cut = tmp_path / "data" / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    cut.write_bytes(cut.read_bytes()[:-1000])
    proc = train(3, tmp_path, "cut", "--set", 'data.dataset="mnist"', "--set", "data.download=true",
                 "--set", f'data.root="{tmp_path / "data"}"', timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mpifed: error")]
    assert len(errors) == 1 and f"(test split): {cut} is truncated or corrupt" in errors[0], proc.stderr[-3000:]
    assert "delete it, then download it again" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "cut").exists()


def test_download_on_with_the_files_present_trains_after_the_servers_check(tmp_path):
    """data.download = true: rank 0 alone fetches (here: finds the files, as torchvision does) while the
    clients wait for it at a polite, timed arrival point, then everyone reads the same files."""
    write_mnist(tmp_path / "data", train=600, test=200)
    ok(train(3, tmp_path, "fetch", "--set", 'data.dataset="mnist"', "--set", "data.download=true",
             "--set", f'data.root="{tmp_path / "data"}"', "--set", "train.rounds=2", timeout=180))
    assert rounds_logged(tmp_path / "fetch" / "run.h5") == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_asked_for_where_there_is_none_says_so_without_a_traceback(tmp_path):
    proc = train(3, tmp_path, "nogpu", "--set", 'run.device="cuda"', timeout=120)
    assert proc.returncode != 0
    assert "run.device = 'cuda' but rank 0" in proc.stderr and "use run.device = 'auto' or 'cpu'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_job_that_dies_in_its_first_round_leaves_a_readable_log(tmp_path):
    """The log enters SWMR mode when set-up has written it, not at the first row: before, a job that
    died in round 0 left a file marked open by a plain writer, which nothing could read."""
    proc = train(3, tmp_path, "f0", "--set", "debug.fail_rank=1", "--set", "debug.fail_round=0", timeout=120)
    assert proc.returncode != 0 and "InjectedFault" in proc.stderr
    with open_run(tmp_path / "f0" / "run.h5") as f:
        assert f["iter/t_iter"].shape == (0, 3)
        assert [r.decode() for r in f["ranks/role"][:]] == ["server", "client 0", "client 1"]
        assert f["models"].attrs["memory.client1.per_sample_bytes"] > 0


def test_a_stopped_client_ends_the_job_after_comm_timeout(tmp_path):
    """A rank that stops answering (SIGSTOP here; a deadlock or a lost node alike) raises no error
    anywhere: without comm.timeout every other rank waited in its collective forever."""
    cmd = [MPIRUN, "-n", "3", sys.executable, "-m", "mpifed", "train", *TINY, "--out", str(tmp_path),
           "--name", "frozen", "--set", "train.rounds=100000", "--set", "comm.timeout=3", "--set", "checkpoint.every=1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while rounds_logged(tmp_path / "frozen" / "run.h5") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        client = _rank_pid(2, "frozen")
        os.kill(client, signal.SIGSTOP)
        stopped = time.monotonic()
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - stopped < 40
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    assert "waited 3 s (comm.timeout) in collective" in err
    assert "Roll call: rank 2 (client 1) did not answer within 3 s: busy outside MPI" in err, err
    run = tmp_path / "frozen"  # rank 0's last line: the command that continues the run
    last = [line for line in err.splitlines() if line.startswith("mpifed:")][-1]
    assert last.startswith(f"mpifed: the rounds logged stay in {run / 'run.h5'}; continue the run from round-"), err
    assert last.endswith(f".pt with: mpirun -n 3 mpifed train --resume {run}"), last


def test_a_killed_client_ends_the_job_with_the_resume_that_continues_it(tmp_path):
    """kill -9 of a worker that the launcher does not see die (each rank runs under a shell that holds
    its launcher connection, and MPICH's -disable-auto-cleanup: as srun without --kill-on-bad-exit or a
    lost node leave the others running): rank 0 finds it at comm.timeout and its last line says how to continue, with the real
    command. (MPICH's mpirun, seeing a rank die, ends every rank at once: then only the README says it.)"""
    if "HYDRA" not in subprocess.run([MPIRUN, "--version"], capture_output=True, text=True).stdout:
        pytest.skip("needs MPICH's mpirun (hydra) for -disable-auto-cleanup")
    job = [sys.executable, "-m", "mpifed", "train", *TINY, "--out", str(tmp_path), "--name", "killed",
           "--set", "train.rounds=100000", "--set", "comm.timeout=3", "--set", "checkpoint.every=2"]
    cmd = [MPIRUN, "-disable-auto-cleanup", "-n", "3", "sh", "-c", f"{shlex.join(job)}; exit $?"]  # not exec
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "killed"
    try:
        deadline = time.monotonic() + 120
        while rounds_logged(run / "run.h5") < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(_rank_pid(2, "killed"), signal.SIGKILL)
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0 and re.search(r"Roll call: ranks? (1, )?2 \(clients? (0, )?1\) did not answer",
                                              err), out[-3000:] + err[-3000:]  # rank 1 may wait on rank 2's part
    newest = sorted((run / "checkpoints").iterdir())[-1].name
    said = [line for line in err.splitlines() if line.startswith("mpifed:")]
    assert said[-1] == (f"mpifed: the rounds logged stay in {run / 'run.h5'}; continue the run from {newest} with: "
                        f"mpirun -n 3 mpifed train --resume {run}"), said
    assert "Traceback" not in err


def _rank_pid(rank: int, name: str) -> int:
    """The pid of MPI rank `rank` of the job whose --name is `name` (from the process environment)."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if name.encode() in argv and f"PMI_RANK={rank}".encode() in env:
            return int(entry.name)
    raise AssertionError(f"no process of rank {rank} running job {name}")


def test_a_client_that_raises_mid_run_ends_the_whole_job(tmp_path):
    """Without the abort this job would run 100000 rounds and hit the timeout."""
    began = time.monotonic()
    proc = train(4, tmp_path, "fault", "--set", "train.rounds=100000", "--set", "debug.fail_rank=2",
                 "--set", "debug.fail_round=3", timeout=120)
    assert proc.returncode != 0
    assert "rank 2 (client 1)" in proc.stderr and "InjectedFault" in proc.stderr and "debug.fail_round = 3 (round 4)" in proc.stderr
    assert time.monotonic() - began < 110
    with open_run(tmp_path / "fault" / "run.h5") as f:  # flushed rounds survive the crash
        assert f["iter/t_iter"].shape[0] == 3
