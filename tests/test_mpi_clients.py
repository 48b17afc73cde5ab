"""Many clients per rank under real MPI: K of N clients sampled each round and placed on W < K worker
ranks train exactly what one process would train on the same sampled clients."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from click.testing import CliRunner

from conftest import mpi_run, ok, train
from mpifed.analysis import load_run
from mpifed.analysis.clients import client_grid
from mpifed.commands.analyze import analyze
from mpifed.config import load_job
from mpifed.data import ClientSampler, load_dataset, partition
from mpifed.memory import device_budget
from mpifed.models import build_model
from mpifed.runlog import CLIENT_FIELDS
from mpifed.perf import ComputeCurve
from mpifed.sampling import place_clients, sample_clients
from mpifed.schedule import learning_rate
from mpifed.seeding import Purpose, forked_torch_rng
from mpifed.worker import RESIDUAL_SHARE

pytestmark = pytest.mark.mpi

N, K = 6, 4  # six clients, four a round, on the two worker ranks of `mpirun -n 3`
# clients 0 and 1 hold twice the data and train with batch 24, the others with 8: unequal weights
POOLED = ["--set", f"clients.count={N}", "--set", f"clients.per_round={K}", "--set", "train.batch=8",
          "--set", 'clients.groups=[{count = 2, profile = "big"}]', "--set", "profiles.big.batch=24",
          "--set", "profiles.big.data=2.0", "--set", 'data.partition="dirichlet"', "--set", "checkpoint.every=2"]


def _state(path):
    return torch.load(path, weights_only=True)


class PooledReference:
    """The job's N clients in one process, from the same seeds: partitions, samplers, the sampled ids."""

    def __init__(self, run_dir):
        self.job = job = load_job(run_dir / "job.toml")
        data = load_dataset("synthetic", True, size=job.data.train_size, noise=job.data.noise)
        parts = partition(data.targets, np.array([2.0, 2.0] + [1.0] * (N - 2)), "dirichlet", job.run.seed,
                          job.data.alpha)
        self.samplers = [ClientSampler(p, job.run.seed, k) for k, p in enumerate(parts)]
        self.tensors = [data.tensors(p) for p in parts]
        self.batches = [24, 24] + [8] * (N - 2)
        with forked_torch_rng(job.run.seed, Purpose.INIT):
            self.model = build_model("cnn", 10)
        self.got = _state(run_dir / "model.pt")

    def sampled(self, rnd):
        return sample_clients(self.job.run.seed, rnd, N, K).tolist()

    def draw(self, client):
        x, y = self.tensors[client]
        pos = torch.from_numpy(self.samplers[client].next(self.batches[client]))
        return x[pos], y[pos]

    def lr(self, rnd, ids):
        return learning_rate(self.job.optim, rnd, self.job.train.rounds, sum(self.batches[k] for k in ids))

    def assert_matches(self, model):
        for name, want in model.state_dict().items():
            assert torch.allclose(self.got[name], want, atol=2e-5, rtol=1e-4), name


def _died_and_resumed_as(tmp_path, full: str, args: list[str], fail_rank: int, fail_round: int):
    """Run `args` again, failing on `fail_rank` in `fail_round`, and resume it: it must end with run `full`'s
    model, bit for bit. Returns the resumed run's log."""
    died = train(3, tmp_path, "died", *args, "--set", f"debug.fail_rank={fail_rank}", "--set",
                 f"debug.fail_round={fail_round}", timeout=120)
    assert died.returncode != 0 and f"failing on purpose at debug.fail_round = {fail_round}" in died.stderr
    ok(mpi_run(3, ["train", "--resume", str(tmp_path / "died"), "--progress", "log"], tmp_path))
    want, resumed = _state(tmp_path / full / "model.pt"), _state(tmp_path / "died" / "model.pt")
    assert all(torch.equal(want[k], resumed[k]) for k in want)
    return tmp_path / "died" / "run.h5"


def test_sampled_fedsgd_is_sgd_on_the_union_and_resumes_bit_for_bit(tmp_path):
    """E=1: K=4 sampled clients of 6 on 2 worker ranks equal one process's SGD on the union of the sampled
    clients' batches; /clients logs who trained where; a run that died and resumed ends bit for bit where
    the uninterrupted run ends (the sampled ids and every client's sampler cursor come back)."""
    ok(train(3, tmp_path, "sgd", *POOLED, "--set", "optim.nesterov=true"))
    ref = PooledReference(tmp_path / "sgd")
    o = ref.job.optim
    opt = torch.optim.SGD(ref.model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=True,
                          weight_decay=o.weight_decay)
    rounds = ref.job.train.rounds
    accs = []  # each sampled client's accuracy on its batch, before the round's step
    for rnd in range(rounds):
        ids = ref.sampled(rnd)
        xs, ys = zip(*[ref.draw(k) for k in ids])
        with torch.no_grad():
            accs.append([float((ref.model(x).argmax(-1) == y).double().mean()) for x, y in zip(xs, ys)])
        for group in opt.param_groups:
            group["lr"] = ref.lr(rnd, ids)
        opt.zero_grad()
        F.cross_entropy(ref.model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
    ref.assert_matches(ref.model)

    with h5py.File(tmp_path / "sgd" / "run.h5") as f:
        log = {name: f[f"clients/{name}"][:] for name in CLIENT_FIELDS}
        assert f["iter/t_iter"].shape == (rounds, 3)
        assert [r.decode() for r in f["ranks/role"][:]] == ["server", "worker", "worker"]
        assert f["iter/batch"][:, 1:].sum(axis=1).tolist() == f["server/global_batch"][:].tolist()
        train_acc, rank_acc, rank_batch = f["server/train_acc"][:], f["iter/acc"][:], f["iter/batch"][:]
    for name in CLIENT_FIELDS:
        assert log[name].shape == (rounds, K), name
    assert log["id"].tolist() == [ref.sampled(rnd) for rnd in range(rounds)]
    assert set(np.unique(log["rank"])) <= {1, 2} and (log["rank"] == 1).any() and (log["rank"] == 2).any()
    assert log["batch"].tolist() == [[ref.batches[k] for k in ref.sampled(rnd)] for rnd in range(rounds)]
    assert np.isfinite(log["loss"]).all() and (log["t_compute"] > 0).all() and (log["grad_norm"] > 0).all()
    # train accuracy: each client's on its own batch (a model a rounding apart may flip one sample), the
    # workers' and the server's the batch-weighted means of their clients'
    assert (np.abs(log["acc"] - np.array(accs)) * log["batch"]).sum() <= 1 + 1e-9, (log["acc"], accs)
    assert train_acc == pytest.approx((log["acc"] * log["batch"]).sum(axis=1) / log["batch"].sum(axis=1))
    assert ((train_acc >= 0) & (train_acc <= 1)).all() and rank_acc[:, 0] == pytest.approx(train_acc)
    for worker in (1, 2):
        mine = log["rank"] == worker
        assert rank_acc[:, worker] == pytest.approx((log["acc"] * log["batch"] * mine).sum(axis=1)
                                                    / rank_batch[:, worker], nan_ok=True)
    result = CliRunner().invoke(analyze, ["--json", "--no-plots", str(tmp_path / "sgd")])
    assert result.exit_code == 0, result.output
    counts = np.bincount(np.concatenate([ref.sampled(rnd) for rnd in range(rounds)]), minlength=N)
    summary = json.loads(result.output)
    seen = summary["participation"]
    assert seen["clients"] == N and seen["trained"] == (counts > 0).sum()
    assert (seen["rounds_min"], seen["rounds_max"]) == (counts.min(), counts.max())
    assert (summary["world_size"], summary["client_ranks"], summary["clients"], summary["clients_per_round"]) \
        == (3, 2, N, K)
    # what clients.png and batches.png draw: each client's rounds and values, read back from /clients
    grid = client_grid(load_run(tmp_path / "sgd"))
    assert grid.participation.tolist() == counts.tolist()
    for rnd in range(rounds):
        ids = ref.sampled(rnd)
        assert np.flatnonzero(grid.trained[:, rnd]).tolist() == sorted(ids)
        assert grid.values["loss"][sorted(ids), rnd].tolist() == log["loss"][rnd].tolist()
        assert grid.values["batch"][sorted(ids), rnd].tolist() == [ref.batches[k] for k in sorted(ids)]

    with h5py.File(_died_and_resumed_as(tmp_path, "sgd", [*POOLED, "--set", "optim.nesterov=true"], 2, 3)) as f:
        assert "resumed at round 2" in f.attrs["resumes"][0]
        for name in ("id", "rank", "batch", "loss", "grad_norm", "acc"):
            assert np.array_equal(f[f"clients/{name}"][:], log[name]), name


def test_sampled_fedavg_is_the_weighted_average_of_the_sampled_clients_local_models(tmp_path):
    """E=3: each round's K sampled clients train from the same global model, one after another on
    their worker; the server's model is sum_k (b_k/B) w_k over those K."""
    ok(train(3, tmp_path, "avg", *POOLED, "--set", "train.local_steps=3"))
    ref = PooledReference(tmp_path / "avg")
    global_state = {k: v.clone() for k, v in ref.model.state_dict().items()}
    for rnd in range(ref.job.train.rounds):
        ids = ref.sampled(rnd)
        total = sum(ref.batches[k] for k in ids)
        average = {n: torch.zeros_like(v) for n, v in global_state.items()}
        for k in ids:
            ref.model.load_state_dict(global_state)
            opt = torch.optim.SGD(ref.model.parameters(), lr=ref.lr(rnd, ids), weight_decay=ref.job.optim.weight_decay)
            for _ in range(3):
                x, y = ref.draw(k)
                opt.zero_grad()
                F.cross_entropy(ref.model(x), y).backward()
                opt.step()
            for n, v in ref.model.state_dict().items():
                average[n] += ref.batches[k] / total * v
        global_state = average
    ref.model.load_state_dict(global_state)
    ref.assert_matches(ref.model)


def test_gathered_payloads_travel_per_client_and_a_corrupt_one_is_rejected_alone(tmp_path):
    """QSGD (a gathered codec): each sampled client's payload reaches the server on its own, keyed by its
    id, so a corrupt payload from one client is rejected alone, the others of its rank accepted."""
    proc = ok(train(3, tmp_path, "corrupt", *POOLED, "--set", 'compress.codec="qsgd"', "--set", "debug.corrupt_rank=2",
                    "--set", "debug.corrupt_round=2"))
    with h5py.File(tmp_path / "corrupt" / "run.h5") as f:
        rejected, ranks, ids = (f[f"clients/{name}"][:] for name in ("rejected", "rank", "id"))
        assert f["iter/rejected"][2].tolist() == [1, 0, 1] and f["iter/rejected"][[0, 1, 3, 4, 5]].sum() == 0
        assert (f["clients/bytes_up"][:] > 0).all()
    first_on_2 = int(np.flatnonzero(ranks[2] == 2)[0])  # debug.corrupt_rank malforms its first client's payload
    assert (ranks[2] == 2).sum() > 1  # ... and rank 2 trained others that round, which were accepted
    assert np.flatnonzero(rejected.ravel()).tolist() == [2 * K + first_on_2]
    assert f"client {int(ids[2, first_on_2])}" in proc.stdout + proc.stderr


def test_error_feedback_residuals_follow_their_clients_and_resume_bit_for_bit(tmp_path):
    """Top-k with error feedback: a client's residual moves to whichever rank trains it next, so 2 or 3
    worker ranks (other placements, other moves) train the same model; a run that died resumes, with the
    residuals its checkpoint gathered, to the uninterrupted run's model bit for bit."""
    topk = ["--set", 'compress.codec="topk"', "--set", "compress.options={density = 0.05, error_feedback = true}"]
    ok(train(3, tmp_path, "two", *POOLED, *topk))
    ok(train(4, tmp_path, "three", *POOLED, *topk))
    two, three = _state(tmp_path / "two" / "model.pt"), _state(tmp_path / "three" / "model.pt")
    assert all(torch.allclose(two[k].float(), three[k].float(), atol=1e-6) for k in two)
    with h5py.File(tmp_path / "two" / "run.h5") as f, h5py.File(tmp_path / "three" / "run.h5") as g:
        ranks = f["clients/rank"][:]
        assert not np.array_equal(ranks, g["clients/rank"][:])  # placed differently
        assert np.allclose(f["clients/loss"][:], g["clients/loss"][:], atol=1e-6)
        moved = {k: set(ranks[f["clients/id"][:] == k].tolist()) for k in range(N)}
        assert any(len(r) > 1 for r in moved.values())  # some client trained on both ranks: its residual moved
    ok(train(3, tmp_path, "plain", *POOLED, "--set", 'compress.codec="topk"', "--set",
                           "compress.options={density = 0.05, error_feedback = false}"))
    plain = _state(tmp_path / "plain" / "model.pt")
    assert not all(torch.allclose(two[k].float(), plain[k].float(), atol=1e-6) for k in two)

    died = train(3, tmp_path, "died", *POOLED, *topk, "--set", "debug.fail_rank=1", "--set", "debug.fail_round=3",
                 timeout=120)
    assert died.returncode != 0 and "failing on purpose at debug.fail_round = 3" in died.stderr
    state = _state(tmp_path / "died" / "checkpoints" / "round-00000002.pt")
    n_params = sum(p.numel() for p in build_model("cnn", 10).parameters())
    assert state["residuals"].shape == (len(state["residual_clients"]), n_params)
    assert len(state["residual_clients"]) > 0 and state["residuals"].abs().sum(dim=1).gt(0).all()
    ok(mpi_run(3, ["train", "--resume", str(tmp_path / "died"), "--progress", "log"], tmp_path))
    resumed = _state(tmp_path / "died" / "model.pt")
    assert all(torch.equal(two[k], resumed[k]) for k in two)


def test_a_planned_pooled_run_predicts_each_round_from_its_placement_and_resumes_its_placement(tmp_path):
    """plan.mode = "predict" with pooled clients: one curve per profile (clients 0 and 1, batch 24 at a
    quarter speed, take far longer than the others at batch 8), every round predicted before it from its
    placement, and the balanced placement by the curves' times, which the checkpoint keeps: a run that
    died and resumed (whose second start-up timed its own curves) places every round by the first's."""
    planned = ["--set", "profiles.big.speed=0.25", "--set", 'plan.mode="predict"', "--set", "plan.points=2",
               "--set", "plan.repeats=2"]
    died = train(3, tmp_path, "planned", *POOLED, *planned, "--set", "debug.fail_rank=1", "--set",
                 "debug.fail_round=3", timeout=120)
    assert died.returncode != 0 and "failing on purpose at debug.fail_round = 3" in died.stderr
    assert "profile big: t(b)" in died.stdout and "the busiest worker's clients" in died.stdout
    resumed = ok(mpi_run(3, ["train", "--resume", str(tmp_path / "planned"), "--progress", "log"], tmp_path))
    assert "profile big: t(b)" in resumed.stdout
    with h5py.File(tmp_path / "planned" / "run.h5") as f:
        models = dict(f["models"].attrs)
        predicted, measured = f["iter/t_iter_pred"][:, 0], f["iter/t_iter"][:, 0]
        ids, ranks = f["clients/id"][:].astype(int), f["clients/rank"][:].astype(int)
    curves = {name: ComputeCurve.from_dict({k: models[f"perf.profile.{name}.{k}"] for k in ("a", "c", "t_floor")})
              for name in ("big", "native")}
    assert models["perf.profile.big.batch"] == 24 and models["perf.profile.native.clients"] == N - 2
    seconds = np.array([curves["big"].predict(24)] * 2 + [curves["native"].predict(8)] * (N - 2))
    # 3x the samples at a quarter of the speed: 12x on a quiet machine, 3.3x seen with other jobs sharing its cores
    assert seconds[0] > 2 * seconds[2]
    assert np.isfinite(predicted).all() and (predicted > 0).all() and np.isfinite(measured).all()
    state = _state(sorted((tmp_path / "planned" / "checkpoints").glob("round-*.pt"))[-1])
    assert np.allclose(state["client_seconds"].numpy(), seconds)  # the first start-up's times, kept
    for rnd in range(len(ids)):
        assert ranks[rnd].tolist() == (place_clients(seconds[ids[rnd]], 2) + 1).tolist(), rnd
    result = CliRunner().invoke(analyze, ["--json", "--no-plots", str(tmp_path / "planned")])
    assert result.exit_code == 0, result.output


def test_pooled_batches_grow_with_the_noise_scale_within_each_clients_data_and_resume_bit_for_bit(tmp_path):
    """scaling.grow_batch with pooled clients: every client's batch grows (never shrinks), capped by its own
    data, the sampled clients' batches make the round's batch, and a run that died and resumed grows as
    the uninterrupted run (the controller's state and every client's batch come back)."""
    grow = [*POOLED, "--set", "train.rounds=24", "--set", "train.eval_every=12", "--set", "scaling.grow_batch=true",
            "--set", "scaling.batch_rate=0.5", "--set", "scaling.noise_ema=0.5"]
    ok(train(3, tmp_path, "grow", *grow))
    ref = PooledReference(tmp_path / "grow")
    data = np.array([len(y) for _, y in ref.tensors])
    with h5py.File(tmp_path / "grow" / "run.h5") as f:
        ids, batch = f["clients/id"][:].astype(int), f["clients/batch"][:].astype(int)
        total = f["server/global_batch"][:]
        log = {name: f[f"clients/{name}"][:] for name in ("id", "rank", "batch", "loss", "grad_norm")}
    assert ids.tolist() == [ref.sampled(rnd) for rnd in range(24)]
    assert batch[0].tolist() == [ref.batches[k] for k in ids[0]]  # the profiles' batches first
    assert np.array_equal(batch.sum(axis=1), total)                 # the sampled clients make the round
    assert total[-1] > 2 * total[0]                                 # it grew
    assert (batch <= np.maximum(data, ref.batches)[ids]).all() and (batch >= 1).all()
    for client in range(N):  # a client's batch never shrinks, whichever rounds it trained in
        assert (np.diff(batch[ids == client]) >= 0).all(), client
    o = ref.job.optim  # the model: SGD on the union of the round's grown batches
    opt = torch.optim.SGD(ref.model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    for rnd in range(24):
        ref.batches = dict(zip(ids[rnd].tolist(), batch[rnd].tolist()))
        xs, ys = zip(*[ref.draw(k) for k in ids[rnd]])
        for group in opt.param_groups:
            group["lr"] = learning_rate(o, rnd, 24, int(total[rnd]))
        opt.zero_grad()
        F.cross_entropy(ref.model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
    ref.assert_matches(ref.model)

    with h5py.File(_died_and_resumed_as(tmp_path, "grow", grow, 1, 13)) as f:
        assert "resumed at round 12" in f.attrs["resumes"][0]
        assert np.array_equal(f["server/global_batch"][:], total)
        for name, want in log.items():
            assert np.array_equal(f[f"clients/{name}"][:], want), name


def test_residuals_that_would_not_fit_are_refused_before_training(tmp_path):
    """Twice as many clients as this node has memory for their error-feedback residuals (resnet18's: 44.7 MB
    each), counted from the host's available memory as the check counts it, so that the job is too large
    on any node: refused in one line that names the sizes and the largest count that fits, before the run
    directory is made."""
    n_params = sum(p.numel() for p in build_model("resnet18", 10).parameters())
    available = device_budget("cpu")
    fits = int(RESIDUAL_SHARE * available // (4 * n_params))
    count = 2 * fits + 20
    proc = train(3, tmp_path, "huge", "--set", f"clients.count={count}", "--set", "clients.per_round=10",
                 "--set", f"data.train_size={count}", "--set", 'model.name="resnet18"', "--set",
                 'compress.codec="topk"', timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"keeps a residual of {n_params:,} float32 per client: {count:,} clients" in proc.stderr, proc.stderr
    at_most = re.search(r"lower clients.count to at most ([\d,]+),", proc.stderr)
    assert at_most and int(at_most[1].replace(",", "")) < count, proc.stderr
    assert 4 * n_params * int(at_most[1].replace(",", "")) <= RESIDUAL_SHARE * 1.5 * available  # what the node has
    assert "error_feedback = false" in proc.stderr
    assert not (tmp_path / "huge").exists()  # refused before the run directory was made
