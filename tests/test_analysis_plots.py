"""The data each figure of `mpifed analyze` draws, on small logs written by the run log's own writer (no
MPI): learning curves at the models they measure, per-client views of pooled and one-a-rank runs, the
scaling panel's single legend, breakdown bars that fit, and the settings that differ between runs."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tomli_w
from click.testing import CliRunner

from mpifed.analysis import load_run, summarize
from mpifed.analysis.clients import client_grid
from mpifed.analysis.figure import plt
from mpifed.analysis.curves import learning_curves
from mpifed.analysis.plot_clients import client_panel, plot_batches, plot_clients
from mpifed.analysis.plot_learning import plot_curves
from mpifed.analysis.plots import FIGURES, plot_breakdown, plot_server, server_series, write_plots
from mpifed.analysis.settings import differing_settings
from mpifed.commands.analyze import analyze
from mpifed.runlog import CLIENT_FIELDS, ITER_FIELDS, RANK_COLUMNS, RunWriter, column


# Seconds of each phase (server, client) in a round of 0.1 s; t_compute is the client's 0.01 * rank.
PHASE_SECONDS = {"t_down": (0.01, 0.01), "t_encode": (np.nan, 0.005), "t_up": (0.05, 0.03), "t_wait": (0.05, 0.01),
                 "t_decode": (0.01, np.nan), "t_eval": (0.01, np.nan)}


def _job(name: str, **sections) -> dict:
    job = {"run": {"name": name, "out": "runs", "seed": 0}, "train": {"rounds": 5, "batch": 32},
           "optim": {"lr": 0.1}, "clients": {"count": 0, "per_round": 0, "groups": []}}
    for section, fields in sections.items():
        job.setdefault(section, {}).update(fields)
    return job


def write_log(path: Path, job: dict, *, ranks: int = 3, rounds: int = 5, t_iter: float = 0.1,
              pooled: tuple[int, list[list[int]]] | None = None, evals: tuple[int, ...] = (0, 3, 5),
              server: dict | None = None) -> Path:
    """A log as `mpifed train` writes it: per round, client rank r trains 16 * r samples, sends 100 * r bytes
    and has loss 2 - 0.1 * round; the server's wall clock is 1 s a round. pooled = (N, the ids sampled
    each round): /clients rows, client k's loss 3 + k + round / 10 and batch 8 + k."""
    path.parent.mkdir(parents=True, exist_ok=True)
    roles = ["server"] + (["worker"] * (ranks - 1) if pooled else [f"client {r - 1}" for r in range(1, ranks)])
    columns = {key: (roles if key == "role" else ["x"] * ranks) if key in ("role", "host", "device", "profile",
                                                                               "budget_bound") else [0] * ranks
               for key in RANK_COLUMNS}
    per_round = len(pooled[1][0]) if pooled else 0
    writer = RunWriter(path, dict(job=tomli_w.dumps(job)), columns, clients_per_round=per_round)
    for t in range(rounds):
        table = np.full((ranks, len(ITER_FIELDS)), np.nan)
        table[:, column("t_iter")] = t_iter
        for r in range(1, ranks):
            table[r, [column("batch"), column("bytes_up"), column("loss")]] = 16 * r, 100 * r, 2 - 0.1 * t
            table[r, [column("grad_norm"), column("t_compute")]] = r, 0.01 * r
        for name, (on_server, on_client) in PHASE_SECONDS.items():  # every phase of a round
            table[:, column(name)] = [on_server] + [on_client] * (ranks - 1)
        table[:, [column(n) for n in (*PHASE_SECONDS, "t_compute")]] *= t_iter / 0.1
        rows = None
        if pooled:
            rows = np.zeros((per_round, len(CLIENT_FIELDS)))
            ids = np.array(pooled[1][t])
            for name, values in (("id", ids), ("rank", 1 + np.arange(per_round) % (ranks - 1)),
                                 ("batch", 8 + ids), ("loss", 3 + ids + t / 10), ("t_compute", 0.01 * (1 + ids)),
                                 ("grad_norm", 1 + ids)):
                rows[:, CLIENT_FIELDS.index(name)] = values
        series = {**dict(lr=0.1, train_loss=2.3 - 0.1 * t, train_acc=0.15 + 0.1 * t, wall=t + 1.0,
                         global_batch=48.0, scale=1.0, critical=1.0, teacher_std=0.0), **(server or {})}
        writer.append_round(table, {k: v[t] if isinstance(v, list) else v for k, v in series.items()}, rows)
        if t + 1 in evals:
            writer.append_eval(dict(round=t + 1, test_loss=2.5 - 0.2 * t, test_acc=0.1 * t, wall=t + 1.5))
    writer.close()
    if 0 in evals:  # the initial model's evaluation, where a log has one, comes first
        with h5py.File(path, "r+") as f:
            for name, value in (("round", 0.0), ("test_loss", 2.6), ("test_acc", 0.05), ("wall", 0.2)):
                old = f[f"eval/{name}"][()]
                f[f"eval/{name}"].resize(len(old) + 1, axis=0)
                f[f"eval/{name}"][()] = np.concatenate(([value], old))
    return path


@pytest.fixture(autouse=True)
def _close_figures():
    """The figure functions return open figures for the tests to inspect: close them after each test."""
    yield
    plt.close("all")


@pytest.fixture
def one_a_rank(tmp_path):
    return load_run(write_log(tmp_path / "a" / "run.h5", _job("a")))


def _lines(ax) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)) for line in ax.lines]


def _inside(inner, outer) -> bool:
    return (inner.x0 >= outer.x0 - 1 and inner.y0 >= outer.y0 - 1 and inner.x1 <= outer.x1 + 1
            and inner.y1 <= outer.y1 + 1)


def test_learning_curves_sit_at_the_models_they_measure(one_a_rank):
    c = learning_curves(one_a_rank)
    # round r's train loss is the clients' loss before its update: the model after r - 1 updates
    assert c.train_loss.x["round"].tolist() == [0, 1, 2, 3, 4]
    assert c.train_loss.y == pytest.approx([2.3, 2.2, 2.1, 2.0, 1.9])
    assert c.train_loss.x["samples"].tolist() == [0, 48, 96, 144, 192]  # 16 + 32 a round, before it
    assert c.train_loss.x["bytes"].tolist() == [0, 300, 600, 900, 1200]  # the clients' bytes up
    assert c.train_loss.x["wall"].tolist() == [0, 1, 2, 3, 4]  # the round began when the last one ended
    # the train accuracy too: scored on the same batches, before the same update
    assert {k: v.tolist() for k, v in c.train_acc.x.items()} == {k: v.tolist() for k, v in c.train_loss.x.items()}
    assert c.train_acc.y == pytest.approx([0.15, 0.25, 0.35, 0.45, 0.55])
    # evaluations after 0 (the initial model), 3 and 5 updates; wall time as the evaluation logged it
    assert c.test_acc.x["round"].tolist() == [0, 3, 5] and c.test_acc.y == pytest.approx([0.05, 0.2, 0.4])
    assert c.test_loss.x["samples"].tolist() == [0, 144, 240] and c.test_loss.y == pytest.approx([2.6, 2.1, 1.7])
    assert c.test_loss.x["bytes"].tolist() == [0, 900, 1500]
    assert c.test_loss.x["wall"] == pytest.approx([0.2, 3.5, 5.5])


def test_loss_and_accuracy_figures_draw_those_curves_per_axis_with_the_legend_inside(one_a_rank, tmp_path):
    other = load_run(write_log(tmp_path / "b" / "run.h5", _job("b"), evals=(5,)))
    fig = plot_curves([one_a_rank, other], "loss")
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == ["round (server updates)", "samples seen",
                                                "bytes sent up by the clients", "wall time (s)"]
    want = learning_curves(one_a_rank)
    for ax, axis in zip(axes, ("round", "samples", "bytes", "wall")):
        (train_x, train_y), (test_x, test_y), *others = _lines(ax)
        assert train_x.tolist() == want.train_loss.x[axis].tolist() and train_y.tolist() == want.train_loss.y.tolist()
        assert test_x.tolist() == want.test_loss.x[axis].tolist() and test_y.tolist() == want.test_loss.y.tolist()
        assert [x.tolist() for x, _ in others][1] == [learning_curves(other).test_loss.x[axis][0]]
        assert ax.get_xlim()[0] == 0  # the initial model is on the axis
    fig.canvas.draw()
    legend = axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b", "train (clients' batches)", "test"]
    assert _inside(legend.get_window_extent(), axes[0].get_window_extent())
    accuracy = plot_curves([one_a_rank, other], "accuracy")
    for ax, axis in zip(accuracy.axes, ("round", "samples", "bytes", "wall")):
        (train_x, train_y), (test_x, test_y), *_ = _lines(ax)  # as loss.png: train, then test, per run
        assert train_x.tolist() == want.train_acc.x[axis].tolist() and train_y.tolist() == want.train_acc.y.tolist()
        assert test_x.tolist() == want.test_acc.x[axis].tolist() and test_y.tolist() == want.test_acc.y.tolist()
    assert [t.get_text() for t in accuracy.axes[0].get_legend().get_texts()] == ["a", "b", "train (clients' batches)",
                                                                                 "test"]


def test_bytes_go_on_a_log_axis_when_a_run_sends_far_fewer(tmp_path, one_a_rank):
    job = _job("small")
    small = write_log(tmp_path / "small" / "run.h5", job)
    with h5py.File(small, "r+") as f:
        f["iter/bytes_up"][...] = f["iter/bytes_up"][()] / 100  # a compressed run: 100x fewer bytes up
    fig = plot_curves([one_a_rank, load_run(small)], "loss")
    assert fig.axes[2].get_xscale() == "log" and "log scale" in fig.axes[2].get_xlabel()
    assert plot_curves([one_a_rank], "loss").axes[2].get_xscale() == "linear"


def test_pooled_clients_read_as_one_grid_of_clients_by_round(tmp_path):
    sampled = [[0, 2, 5], [1, 2, 6], [0, 2, 3], [2, 4, 5], [0, 1, 2]]
    job = _job("pooled", clients={"count": 7, "per_round": 3})
    run = load_run(write_log(tmp_path / "p" / "run.h5", job, pooled=(7, sampled)))
    grid = client_grid(run)
    counts = np.bincount(np.concatenate(sampled), minlength=7)
    assert grid.clients == 7 and grid.participation.tolist() == counts.tolist()
    for k in range(7):
        rounds = [t for t, ids in enumerate(sampled) if k in ids]
        assert grid.trained[k].tolist() == [t in rounds for t in range(5)]
        assert np.isnan(grid.values["batch"][k, [t for t in range(5) if t not in rounds]]).all()
        assert grid.values["batch"][k, rounds].tolist() == [8 + k] * len(rounds)
        assert grid.per_client("loss")[k] == pytest.approx(3 + k + np.mean(rounds) / 10)
        assert grid.per_client("loss", "max")[k] == pytest.approx(3 + k + max(rounds) / 10)
    value, low, high = client_panel(grid, "t_compute", "median")
    assert value == pytest.approx(0.01 * (1 + np.arange(7))) and (low <= value).all() and (value <= high).all()

    # the figures draw that grid: bars of participation, one point per client, and a map of batches
    fig = plot_clients([run])
    assert [p.get_height() for p in fig.axes[0].patches] == counts.tolist()
    loss_points = fig.axes[1].lines[0]
    assert np.asarray(loss_points.get_ydata()) == pytest.approx(grid.per_client("loss"))
    image = plot_batches([run]).axes[0].images[0].get_array()
    assert image.shape == (7, 5) and image.mask.tolist() == (~grid.trained).tolist()

    s = summarize(run)
    assert (s.world_size, s.client_ranks, s.clients, s.clients_per_round) == (3, 2, 7, 3)
    result = CliRunner().invoke(analyze, [str(run.path), "--no-plots"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
            if line.count("│") == 3}
    assert rows["ranks"] == "3 (1 server, 2 workers)" and rows["clients"] == "7 (3 sampled a round)"


def test_one_client_a_rank_reads_from_the_rank_columns(one_a_rank):
    grid = client_grid(one_a_rank)
    assert grid.clients == 2 and grid.participation.tolist() == [5, 5]
    assert grid.values["batch"][:, 0].tolist() == [16, 32] and grid.per_client("grad_norm").tolist() == [1, 2]
    s = summarize(one_a_rank)
    assert (s.client_ranks, s.clients, s.clients_per_round) == (2, 2, 2)


def test_the_scaling_panel_has_one_legend_of_the_runs_inside_the_figure(one_a_rank, tmp_path):
    scaled = load_run(write_log(tmp_path / "s" / "run.h5", _job("s", scaling={"method": "step"}),
                                server=dict(scale=[1.0, 1.0, 2.0, 2.0, 1.0], critical=[1.0, 1.0, 0.0, 0.0, 1.0])))
    series = server_series(scaled)
    assert "teacher_std" not in series  # all 0: no teacher ran
    assert series["scale"][1].tolist() == [1, 1, 2, 2, 1] and series["scale"][0].tolist() == [1, 2, 3, 4, 5]
    fig = plot_server([one_a_rank, scaled])
    fig.canvas.draw()
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "s"]
    assert _inside(fig.legends[0].get_window_extent(), fig.bbox)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    scale = next(ax for ax in panels if ax.get_title() == "scale")
    assert _lines(scale)[1][1].tolist() == [1, 1, 2, 2, 1]
    assert all(not _inside(fig.legends[0].get_window_extent(), ax.get_window_extent()) for ax in panels)


def test_breakdown_fits_the_tallest_bar_of_every_run_and_keeps_its_legend_inside(one_a_rank, tmp_path):
    slow = load_run(write_log(tmp_path / "slow" / "run.h5", _job("slow"), t_iter=0.4))
    fig = plot_breakdown([one_a_rank, slow])
    fig.canvas.draw()
    for ax in fig.axes:
        tops = [p.get_y() + p.get_height() for p in ax.patches]
        assert max(tops) <= ax.get_ylim()[1]
    assert max(p.get_y() + p.get_height() for p in fig.axes[1].patches) == pytest.approx(0.4)
    assert len(fig.legends) == 1 and _inside(fig.legends[0].get_window_extent(), fig.bbox)
    narrow = plot_breakdown([one_a_rank])  # one run: a narrow figure, the legend in two rows
    narrow.canvas.draw()
    assert _inside(narrow.legends[0].get_window_extent(), narrow.bbox)


def test_comparison_starts_with_the_settings_that_differ(tmp_path):
    a = write_log(tmp_path / "a" / "run.h5", _job("a"))
    b_job = _job("b", optim={"lr": 0.05}, clients={"groups": [{"count": 1, "profile": "slow"}]})
    b_job["run"]["out"] = "elsewhere"
    del b_job["train"]["batch"]  # a field an older mpifed did not write
    b = write_log(tmp_path / "b" / "run.h5", b_job)
    runs = [load_run(a), load_run(b)]
    assert differing_settings(runs) == [("train.batch", ["32", "-"]), ("optim.lr", ["0.1", "0.05"]),
                                        ("clients.groups", ["[]", '[{count = 1, profile = "slow"}]'])]
    assert differing_settings(runs[:1]) == [] and differing_settings([runs[0], runs[0]]) == []
    result = CliRunner().invoke(analyze, [str(a), str(b), "--no-plots"])
    assert result.exit_code == 0, result.output
    table = result.output.split("comparison", 1)[1]
    names = [line.split("│")[1].strip() for line in table.splitlines() if line.count("│") == 4]
    assert names[:5] == ["settings that differ", "train.batch", "optim.lr", "clients.groups", "rounds"]


def test_every_figure_is_written_for_an_old_log_without_evaluations_or_bytes(tmp_path):
    log = write_log(tmp_path / "old" / "run.h5", _job("old"), evals=())
    with h5py.File(log, "r+") as f:
        for name in ("server/wall", "server/train_acc", "iter/bytes_up", "iter/acc", "clients"):
            if name in f:
                del f[name]
    run = load_run(log)
    c = learning_curves(run)
    assert c.train_loss.x["wall"].tolist() == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])  # summed round times
    assert np.isnan(c.train_loss.x["bytes"][1:]).all() and len(c.test_acc) == 0
    assert len(c.train_acc) == run.rounds and np.isnan(c.train_acc.y).all()  # logged before train accuracy was
    assert [len(ax.lines) for ax in plot_curves([run], "accuracy").axes] == [0, 0, 0, 0]
    assert [p.name for p in write_plots([run], tmp_path / "figs")] == list(FIGURES)
