import math

import numpy as np
import pytest
import torch

from mpifed.config import load_job
from mpifed.flat import FlatModel
from mpifed.models import MODELS, TOKEN_MODELS, build_model
from mpifed.schedule import learning_rate
from mpifed.server import straggler_wait


@pytest.mark.parametrize("name", sorted(set(MODELS) - set(TOKEN_MODELS)))
@pytest.mark.parametrize("channels", [1, 3])
def test_image_models_take_32x32_inputs_and_any_class_count(name, channels):
    model = build_model(name, num_classes=7, in_channels=channels).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, 32, 32)).shape == (2, 7)


def test_flat_model_parameters_are_views_of_one_buffer():
    model = build_model("resnet18", 10)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    flat = FlatModel(model)
    assert torch.equal(flat.flat[: flat.n_params], before)
    assert flat.n_buffers > 0  # BatchNorm running statistics travel too
    flat.flat.zero_()
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())
    assert float(model.bn1.running_var.abs().sum()) == 0


def test_grads_into_and_attach_grads():
    flat = FlatModel(build_model("cnn", 10))
    out = flat.flat.new_zeros(flat.size)
    flat.module(torch.randn(4, 3, 32, 32)).sum().backward()
    flat.grads_into(out)
    assert torch.equal(out[: flat.n_params], torch.cat([p.grad.reshape(-1) for p in flat.params]))
    vec = torch.arange(flat.n_params, dtype=torch.float32)
    flat.attach_grads(vec)
    vec.mul_(2)  # the optimizer sees the change: grads are views
    assert float(flat.params[0].grad.reshape(-1)[1]) == 2.0


def test_learning_rate_schedules():
    o = load_job(overrides=["optim.lr=0.1", "optim.warmup_rounds=10", 'optim.schedule="cosine"']).optim
    assert learning_rate(o, 0, 110, 96) == pytest.approx(0.01)
    assert learning_rate(o, 10, 110, 96) == pytest.approx(0.1)
    assert learning_rate(o, 60, 110, 96) == pytest.approx(0.05)
    step = load_job(overrides=['optim.schedule="step"', "optim.milestones=[5, 8]", "optim.lr=1.0"]).optim
    assert [learning_rate(step, r, 10, 1) for r in (4, 5, 8)] == pytest.approx([1.0, 0.1, 0.01])
    scaled = load_job(overrides=["optim.scale_lr=true", "optim.base_batch=100", 'optim.schedule="constant"']).optim
    assert learning_rate(scaled, 3, 10, 400) == pytest.approx(4 * scaled.lr)


def test_straggler_wait_is_time_beyond_the_quickest_collective():
    assert np.allclose(straggler_wait(np.array([0.5, 0.1, 0.3])), [0.4, 0.0, 0.2])
    assert math.isclose(straggler_wait(np.array([0.2]))[0], 0.0)


def test_a_checkpoint_written_for_another_job_is_refused(tmp_path):
    from mpifed import checkpoint

    ours = dict(model="cnn", dataset="synthetic", clients=3, codec="none", seed=0, local_steps=1)
    checkpoint.save(tmp_path, dict(round=4, identity=ours), keep=2, ranks=3)
    assert checkpoint.choose(tmp_path, ours)[1]["round"] == 4
    with pytest.raises(checkpoint.CheckpointError, match="belongs to a different job \\(codec: checkpoint 'none', "
                                                         "job 'fp16'\\)"):
        checkpoint.choose(tmp_path, dict(ours, codec="fp16"))
    # another rank count is the launch's doing, not the job's: say which launch resumes it
    with pytest.raises(checkpoint.CheckpointError, match=r"clients: checkpoint 3, job 2\); launch the resume with "
                                                         r"4 ranks \(mpirun -n 4\)"):
        checkpoint.choose(tmp_path, dict(ours, clients=2))


def test_a_checkpoint_from_before_the_random_streams_changed_is_refused_and_kept(tmp_path):
    import torch

    from mpifed import checkpoint
    from mpifed.diskfull import checkpoint_dir

    ours = dict(model="cnn", dataset="synthetic", clients=3, codec="none", seed=0, local_steps=1)
    old = checkpoint_dir(tmp_path) / "round-00000004.pt"
    old.parent.mkdir()
    torch.save(dict(round=4, identity=ours, format=1), old)  # what the version before wrote
    with pytest.raises(checkpoint.OlderCheckpointError, match=r"format 1, .*random streams .* differ .*start a new "
                                                              r"run"):
        checkpoint.choose(tmp_path, ours)
    assert old.exists() and not list(checkpoint_dir(tmp_path).glob("*.corrupt"))  # not taken for a corrupt file
