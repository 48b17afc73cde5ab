"""The run log across versions: a log written before a series was added resumes with that series NaN for
the rounds it holds, shaped as its group's others (per rank, per client, or one value)."""

import h5py
import numpy as np

from mpifed.runlog import CLIENT_FIELDS, ITER_FIELDS, RANK_COLUMNS, RunWriter, column, open_run

RANKS = {key: ["server", "worker"] if key in ("role", "host", "device", "profile", "budget_bound") else [0, 0]
         for key in RANK_COLUMNS}
ADDED = ("iter/acc", "clients/acc", "server/train_acc")  # what a log of train losses only lacks


def test_a_log_without_train_accuracy_resumes_with_it_nan_before_and_logged_after(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, dict(job="x"), RANKS, clients_per_round=3)
    for r in range(4):
        writer.append_round(np.full((2, len(ITER_FIELDS)), float(r)), dict(lr=0.1, train_loss=r),
                            np.full((3, len(CLIENT_FIELDS)), float(r)))
    writer.close()
    with h5py.File(path, "r+") as f:
        for name in ADDED:
            del f[name]

    writer = RunWriter.reopen(path, 3, "resumed at round 3", "x")  # the round logged after the checkpoint goes
    writer.append_round(np.full((2, len(ITER_FIELDS)), 0.5), dict(lr=0.1, train_loss=0.5, train_acc=0.25),
                        np.full((3, len(CLIENT_FIELDS)), 0.75))
    writer.close()
    with open_run(path) as f:
        assert [f[name].shape for name in ADDED] == [(4, 2), (4, 3), (4,)]
        assert np.isnan(f["iter/acc"][:3]).all() and f["iter/acc"][3].tolist() == [0.5, 0.5]
        assert np.isnan(f["clients/acc"][:3]).all() and f["clients/acc"][3].tolist() == [0.75] * 3
        assert np.isnan(f["server/train_acc"][:3]).all() and f["server/train_acc"][3] == 0.25
        assert f["iter/loss"][:, 0].tolist() == [0, 1, 2, 0.5] and f["server/train_loss"][:].tolist() == [0, 1, 2, 0.5]
        assert column("acc") == len(ITER_FIELDS) - 1 and CLIENT_FIELDS[-1] == "acc"  # no older column moved
