"""The scaling policy inside real MPI training: step scale exactly outside critical phases, the
per-coordinate teacher equal to a one-process reference, and the batch controller growing the global
batch towards the noise scale within the memory caps."""

import math

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ok, train
from mpifed.compress import ErrorFeedback, RoundContext, make_codec
from mpifed.scaling import CriticalPhaseDetector, estimate_from_gradients
from mpifed.scaling.step import step_scale
from mpifed.scaling.teacher import teacher_coefficient, teacher_generator, teacher_noise
from test_mpi_train import HETERO, Reference

pytestmark = pytest.mark.mpi


def _server_step(model, opt, step, lr):
    """What the server does with the round's flat step: it becomes the gradient of its optimizer."""
    offset = 0
    for p in model.parameters():
        p.grad = step[offset: offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()


def test_step_scaling_is_applied_exactly_outside_critical_phases(tmp_path):
    """The logged flag and scale, and the step the server applied: the model after 24 rounds equals a
    one-process reference that scales the aggregate by 1.5 exactly where its own detector, fed the
    reference's gradient norms, finds no critical phase. The job leaves scaling.window and warmup to
    follow train.rounds (1 and 5 rounds here), so the step acts in a short run too."""
    ok(train(3, tmp_path, "step", *HETERO, "--set", "train.rounds=24", "--set", 'scaling.method="step"',
             "--set", "scaling.scale=1.5"))
    with h5py.File(tmp_path / "step" / "run.h5") as f:
        critical, scale = f["server/critical"][:], f["server/scale"][:]
        norms = f["server/grad_norm"][:]
        assert (critical[:5] == 1).all()                      # warmup rounds are critical
        assert np.array_equal(scale, np.where(critical == 1, 1.0, 1.5))
        assert (critical == 0).any()                          # so both branches are compared below
        # the statistics are estimated every round (in this skewed two-client job the EMA of |G|^2 can
        # stay below zero, which makes the noise scale inf: no signal yet)
        assert np.isfinite(f["server/sigma_trace"][:]).all() and not np.isnan(f["server/noise_scale"][:]).any()
    ref = Reference(tmp_path / "step", [24, 8])
    o, model = ref.job.optim, ref.model
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    assert (ref.job.scaling.window, ref.job.scaling.warmup) == (1, 5)  # the numbers the run stored
    detector = CriticalPhaseDetector(1, ref.job.scaling.threshold, 5)
    for rnd in range(ref.job.train.rounds):
        total = 0
        for k, w in enumerate([24 / 32, 8 / 32]):
            x, y = ref.draw(k)
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            total = total + torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * w
        norm = float(total.double().norm())
        assert norm == pytest.approx(norms[rnd], rel=1e-4), rnd
        assert detector.update(norm) == bool(critical[rnd]), rnd
        step = total * step_scale(bool(critical[rnd]), 1.5)
        _server_step(model, opt, step, ref.lr(rnd))
    ref.assert_matches(model)


def test_the_global_batch_grows_with_the_noise_scale_within_memory_and_data(tmp_path):
    """The batches grow (never shrink) within each client's memory and data, and the model is SGD on the
    union of the grown batches (the logged ones), as a one-process reference trains it."""
    ok(train(3, tmp_path, "grow", *HETERO, "--set", "train.rounds=30", "--set", "scaling.grow_batch=true",
             "--set", "scaling.batch_rate=0.5", "--set", "scaling.noise_ema=0.5"))
    with h5py.File(tmp_path / "grow" / "run.h5") as f:
        batches = f["iter/batch"][:, 1:].astype(int)
        total = f["server/global_batch"][:]
        caps = np.minimum(f["ranks/max_batch"][1:], f["ranks/data_size"][1:])
        assert total[0] == 32 and total[-1] > 32              # it grew
        assert (np.diff(total) >= 0).all()                     # and never shrank
        assert np.array_equal(batches.sum(axis=1), total)      # every client trained its share
        assert (batches <= caps).all() and (batches >= 1).all()
        assert np.array_equal(f["iter/batch"][:, 0], total)
        assert np.isfinite(f["eval/test_loss"][:]).all()
    ref = Reference(tmp_path / "grow", [24, 8])
    o = ref.job.optim
    opt = torch.optim.SGD(ref.model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    for rnd, grown in enumerate(batches):
        ref.batches = grown.tolist()
        ref.sgd_round(opt, rnd)
    ref.assert_matches(ref.model)  # a server that wrote anything but the step into the model fails here


@pytest.mark.parametrize("codec", ["none", "topk"])
def test_per_coordinate_teacher_over_mpi_equals_the_one_process_reference(tmp_path, codec):
    """per_layer = false: codec none reaches the server's diagonal through the clients' reduced squares,
    top-k (a gather codec) through the server's own decodes; both must equal the teacher applied to
    the diagonal estimated from every client's decoded gradient."""
    options = "{density = 0.05, error_feedback = true}" if codec == "topk" else "{}"
    ok(train(3, tmp_path, codec, *HETERO, "--set", f'compress.codec="{codec}"', "--set", f"compress.options={options}",
             "--set", 'scaling.method="teacher"', "--set", "scaling.small_batch=4",
             "--set", "scaling.per_layer=false", "--set", "scaling.only_outside_critical=false",
             "--set", 'plan.mode="predict"'))  # the start-up probes run the same path, and change nothing
    ref = Reference(tmp_path / codec, [24, 8])
    o, model, seed = ref.job.optim, ref.model, ref.job.run.seed
    n = sum(p.numel() for p in model.parameters())
    encoder = make_codec(codec, layers=[(k, tuple(p.shape)) for k, p in model.named_parameters()],
                         **({"density": 0.05, "error_feedback": True} if codec == "topk" else {}))
    memories = [ErrorFeedback(n), ErrorFeedback(n)]
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    stds = []
    for rnd in range(ref.job.train.rounds):
        decoded = []
        for k, w in enumerate([24 / 32, 8 / 32]):
            x, y = ref.draw(k)
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy() * np.float32(w)
            if codec == "topk":
                ctx = RoundContext(seed, rnd, k)
                g = memories[k].compensate(g)
                sent = encoder.decode(encoder.encode(g, ctx), n, ctx)
                memories[k].update(g, sent)
                g = sent
            decoded.append(torch.from_numpy(g))
        total = decoded[0] + decoded[1]
        grads = [decoded[0] / (24 / 32), decoded[1] / (8 / 32)]
        diag = estimate_from_gradients(grads, [24, 8], total).sigma_diag
        coef = teacher_coefficient(4, 32)
        stds.append(math.sqrt(coef * float(diag.clamp_min(0).double().mean())))
        step = total + teacher_noise(diag, coef, teacher_generator(seed, rnd, torch.device("cpu")))
        _server_step(model, opt, step, ref.lr(rnd))
    with h5py.File(tmp_path / codec / "run.h5") as f:
        assert np.allclose(f["server/teacher_std"][:], stds, rtol=1e-3)
    ref.assert_matches(model)
