"""Compressed updates over real MPI: the aggregate matches a one-process reference, and a client's
malformed payload is rejected by name while the job goes on."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import MPIRUN, ok, train
from mpifed.compress import ErrorFeedback, RoundContext, make_codec
from test_mpi_train import HETERO, Reference

pytestmark = pytest.mark.mpi


def test_topk_with_error_feedback_over_mpi_equals_the_one_process_reference(tmp_path):
    ok(train(3, tmp_path, "topk", *HETERO, "--set", 'compress.codec="topk"',
             "--set", "compress.options={density = 0.05, error_feedback = true}"))
    ref = Reference(tmp_path / "topk", [24, 8])
    o = ref.job.optim
    model = ref.model
    layers = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    codec = make_codec("topk", layers=layers, density=0.05, error_feedback=True)
    n = sum(p.numel() for p in model.parameters())
    memories = [ErrorFeedback(n), ErrorFeedback(n)]
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    for rnd in range(ref.job.train.rounds):
        total = np.zeros(n, np.float32)
        for k, w in enumerate([24 / 32, 8 / 32]):
            x, y = ref.draw(k)
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy() * np.float32(w)
            ctx = RoundContext(ref.job.run.seed, rnd, k)
            compensated = memories[k].compensate(g)
            sent = codec.decode(codec.encode(compensated, ctx), n, ctx)
            memories[k].update(compensated, sent)
            total += sent
        offset = 0
        for p in model.parameters():
            p.grad = torch.from_numpy(total[offset: offset + p.numel()].copy()).view_as(p)
            offset += p.numel()
        for group in opt.param_groups:
            group["lr"] = ref.lr(rnd)
        opt.step()
    ref.assert_matches(model)


@pytest.mark.parametrize("kind", ["garbage", "truncate"])
def test_a_malformed_payload_is_rejected_by_client_and_round_and_the_job_goes_on(tmp_path, kind):
    proc = ok(train(4, tmp_path, kind, "--set", 'compress.codec="topk"', "--set", "debug.corrupt_rank=2",
                    "--set", "debug.corrupt_round=2", "--set", f'debug.corrupt="{kind}"'))
    assert "round 3: rejected the update of client 1" in proc.stderr  # debug.corrupt_round counts from 0
    with h5py.File(tmp_path / kind / "run.h5") as f:
        rejected = f["iter/rejected"][:]
        assert rejected[2, 2] == 1 and rejected[:, 1:].sum() == 1 and rejected[2, 0] == 1
        assert not f["server/skipped"][:].any()  # the other client's update made the step
        assert np.isfinite(f["server/grad_norm"][:]).all()
        assert np.isfinite(f["eval/test_loss"][:]).all()


@pytest.mark.parametrize("codec, options", [("fp16", "{}"), ("powersgd", "{error_feedback = true}")])
def test_a_nan_in_a_summed_update_skips_that_step_only(tmp_path, codec, options):
    """With error feedback, the diverged round's residual is dropped, not carried into later rounds."""
    proc = ok(train(3, tmp_path, "nan", "--set", f'compress.codec="{codec}"', "--set", f"compress.options={options}",
                    "--set", "debug.corrupt_rank=1", "--set", "debug.corrupt_round=1", "--set", 'debug.corrupt="nan"'))
    assert "round 2: the summed update is not usable" in proc.stderr and "step skipped" in proc.stderr
    with h5py.File(tmp_path / "nan" / "run.h5") as f:
        norms = f["server/grad_norm"][:]
        assert np.isnan(norms[1]) and np.isfinite(np.delete(norms, 1)).all()
        assert np.isfinite(f["eval/test_loss"][:]).all()
        assert f["server/skipped"][:].tolist() == [0, 1, 0, 0, 0, 0]  # logged per round; one alone ends nothing


@pytest.mark.parametrize("codec", ["topk", "qsgd"])
def test_a_diverged_client_is_rejected_once_and_the_job_goes_on(tmp_path, codec):
    """A NaN update: the server rejects the payload by client, keeps its BatchNorm statistics (the dense
    tail it cannot trace), and the client's error feedback does not carry the NaN into later rounds."""
    proc = ok(train(3, tmp_path, "nan", "--set", f'compress.codec="{codec}"',
                    "--set", "compress.options={error_feedback = true}", "--set", "debug.corrupt_rank=1",
                    "--set", "debug.corrupt_round=1", "--set", 'debug.corrupt="nan"'))
    assert "round 2: rejected the update of client 0" in proc.stderr
    assert "round 2: the clients' BatchNorm statistics or update norms hold a non-finite value" in proc.stderr
    with h5py.File(tmp_path / "nan" / "run.h5") as f:
        rejected = f["iter/rejected"][:]
        assert rejected[1, 1] == 1 and rejected[:, 1:].sum() == 1
        assert np.isfinite(f["server/grad_norm"][:]).all() and np.isfinite(f["eval/test_loss"][:]).all()


REDUCE_HALF = """
import sys
import numpy as np
from mpi4py import MPI
from mpifed.compress import make_codec
from mpifed.exchange import Exchange
from mpifed.updates import _mpi_op

comm, fmt = MPI.COMM_WORLD, sys.argv[1]
codec = make_codec(fmt)
n = 100_003
gen = np.random.default_rng(comm.rank)
# small integers: every partial sum is exact in fp16 and bf16, whatever the reduction tree's order
whole = gen.integers(-60, 61, n).astype(np.float32)
noisy = (gen.standard_normal(n) * 1e-2).astype(np.float32)
sums = {}
for name, x in (("whole", whole), ("noisy", noisy)):
    for chunk in (256 * 2**20, 4096):  # one piece, and many pieces (an op call for each)
        buf = codec.encode(x, None)
        Exchange(comm, polite=False, chunk_bytes=chunk).reduce_sum(buf, op=_mpi_op(codec))
        sums[name, chunk] = codec.decode(buf, n, None) if comm.rank == 0 else None
everything = comm.gather((whole, noisy), root=0)
if comm.rank == 0:
    for chunk in (256 * 2**20, 4096):
        assert np.array_equal(sums["whole", chunk], sum(w for w, _ in everything)), chunk
        exact = sum(x.astype(np.float64) for _, x in everything)
        # each of the log2(4) + 1 roundings costs at most half an ulp of the partial sum
        ulp = 2.0**-10 if fmt == "fp16" else 2.0**-7
        bound = 3 * ulp * sum(np.abs(x.astype(np.float64)) for _, x in everything)
        assert (np.abs(sums["noisy", chunk] - exact) <= bound).all(), chunk
    print("SUMS OK")
"""


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_half_precision_reduce_over_mpi_is_the_16_bit_sum(tmp_path, fmt):
    if MPIRUN is None:
        pytest.skip("mpirun not found; install the MPICH wheel: pip install -e '.[mpich]'")
    script = tmp_path / "reduce_half.py"
    script.write_text(REDUCE_HALF)
    proc = subprocess.run([MPIRUN, "-n", "4", sys.executable, str(script), fmt], capture_output=True,
                          text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0 and "SUMS OK" in proc.stdout, proc.stderr[-3000:]
