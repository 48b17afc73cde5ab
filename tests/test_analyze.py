"""Offline analysis: `mpifed analyze`, `mpifed watch` and analysis/compare_runs.py on real logs.

Two tiny real jobs (one with an emulated half-speed client) give the logs; every number the
summary prints is checked against a value computed here straight from the HDF5 datasets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import matplotlib.image as mpimg
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import fill, ok, train
from mpifed.analysis import load_run, summarize
from mpifed.analysis.load import open_log
from mpifed.analysis.plots import FIGURES, write_plots
from mpifed.commands.analyze import analyze
from mpifed.commands.watch import watch

ROOT = Path(__file__).resolve().parents[1]
SLOW = ["--set", "profiles.slow.speed=0.5", "--set", 'clients.groups=[{count = 1, profile = "slow"}]']
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    ok(train(3, tmp, "base"))
    ok(train(3, tmp, "slow", *SLOW))
    return {"base": tmp / "base" / "run.h5", "slow": tmp / "slow" / "run.h5"}


def _invoke(command, *args: str):
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


def _expected(path: Path) -> dict:
    """What the summary must say, computed from the raw datasets."""
    with h5py.File(path, "r") as f:
        role = f["ranks/role"].asstr()[()]
        clients = np.flatnonzero(role != "server")
        server = int(np.flatnonzero(role == "server")[0])
        t_iter, batch = f["iter/t_iter"][()], f["iter/batch"][()]
        t_emul, t_wait = f["iter/t_emul"][()], f["iter/t_wait"][()]
        evaluated = f["eval/round"][()].astype(int) - 1
        steady = [t for t in range(3, t_iter.shape[0]) if t not in evaluated]  # the server's steady rounds
        pred, meas = f["iter/t_iter_pred"][()][steady, server], t_iter[steady, server]
        ok_pred = np.isfinite(pred)
        raw = {name: np.nan_to_num(f[f"iter/{name}"][()]) for name in f["iter"] if name.startswith("t_")}
        return dict(
            rounds=t_iter.shape[0], t_iter=t_iter,
            throughput=batch[:, clients].sum() / t_iter[:, server].sum(),
            bytes_up=f["iter/bytes_up"][()][:, clients].sum(axis=1).mean(),
            final_acc=f["eval/test_acc"][-1], best_acc=f["eval/test_acc"][()].max(),
            wall=f["server/wall"][-1],
            emul_share=np.nansum(t_emul, axis=0) / t_iter.sum(axis=0),
            wait_share=np.nansum(t_wait, axis=0) / t_iter.sum(axis=0),
            mdape=None if not ok_pred.any()
            else 100 * np.median(np.abs(pred[ok_pred] - meas[ok_pred]) / meas[ok_pred]),
            profiles=list(f["ranks/profile"].asstr()[()]),
            phases={"down": raw["t_down"], "compute": raw["t_compute"], "encode": raw["t_encode"],
                    "comm": raw["t_up"] - raw["t_wait"], "wait": raw["t_wait"], "decode": raw["t_decode"],
                    "eval": raw["t_eval"]})


@pytest.mark.mpi
def test_analyze_json_matches_the_log_and_shows_the_slow_client(logs, tmp_path):
    result = _invoke(analyze, logs["base"], logs["slow"], "--json", "--out", tmp_path / "figs")
    assert result.exit_code == 0, result.output
    summaries = json.loads(result.output)
    assert [s["name"] for s in summaries] == ["base", "slow"]
    for s, key in zip(summaries, ("base", "slow")):
        want = _expected(logs[key])
        assert s["rounds"] == want["rounds"] == 6
        assert s["throughput"] == pytest.approx(want["throughput"], rel=1e-9)
        assert s["bytes_up_per_round"] == pytest.approx(want["bytes_up"])
        assert s["accuracy"]["final"] == pytest.approx(want["final_acc"])
        assert s["accuracy"]["best"] == pytest.approx(want["best_acc"])
        assert s["wall_s"] == pytest.approx(want["wall"])
        assert [r["emul_share"] for r in s["ranks"]] == pytest.approx(list(want["emul_share"]))
        assert [r["wait_share"] for r in s["ranks"]] == pytest.approx(list(want["wait_share"]))
        assert [r["profile"] for r in s["ranks"]] == want["profiles"]
        if want["mdape"] is None:
            assert s["perf_mdape"] is None and s["perf_points"] == 0
        else:
            assert s["perf_mdape"] == pytest.approx(want["mdape"])
        # each phase is its own dataset (comm: the update collective less the straggler wait; NaN, not
        # measured on that rank, as 0 s); the timed phases never exceed the round, and what they leave
        # unexplained (other: the loop between them) is small, so together they are the measured round
        phases = want["phases"]
        explained = sum(phases.values())
        assert (explained <= want["t_iter"] * (1 + 1e-6)).all()
        for rank, r in enumerate(s["ranks"]):
            for name, values in phases.items():
                assert r["mean"][name] == pytest.approx(values[:, rank].mean(), abs=1e-9), (rank, name)
                assert r["median"][name] == pytest.approx(np.median(values[:, rank]), abs=1e-9), (rank, name)
            assert r["mean"]["other"] <= 0.05 * r["t_iter_mean"], (rank, r["mean"])
            assert sum(r["mean"].values()) == pytest.approx(r["t_iter_mean"], rel=1e-6)
    base, slow = summaries
    slow_rank = slow["ranks"][1]
    assert slow_rank["profile"] == "slow"
    # the half-speed client sleeps as long as it computes: a real share of its round is emulated,
    # while the native client next to it and every client of the base run emulate nothing
    assert slow_rank["emul_share"] > 0.05
    assert slow["ranks"][2]["emul_share"] == 0.0
    assert all(r["emul_share"] == 0.0 for r in base["ranks"])
    assert slow["client_emul_share"] > base["client_emul_share"]
    assert summaries[0]["plots"] == [str(tmp_path / "figs" / n) for n in FIGURES]


@pytest.mark.mpi
def test_analyze_writes_non_trivial_pngs_next_to_the_log(logs):
    result = _invoke(analyze, logs["slow"].parent)  # a run folder works as well as its run.h5
    assert result.exit_code == 0, result.output
    for name in FIGURES:
        png = logs["slow"].parent / name
        assert png.read_bytes()[:8] == PNG_MAGIC, name
        assert png.stat().st_size > 8_000, name
        rgb = mpimg.imread(png)[..., :3]
        assert min(rgb.shape[:2]) > 300, name
        assert rgb.std() > 0.05, f"{name}.png is (nearly) one colour"
        # axes, text and grid are grey; only plotted data is coloured (an empty set of axes: 0 %)
        coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2
        assert coloured.mean() > 0.001, f"{name}.png shows no data"
        assert f"wrote {png}" in result.output


@pytest.mark.mpi
def test_analyze_tables_compare_runs_side_by_side(logs, tmp_path):
    result = _invoke(analyze, logs["base"], logs["slow"], "--out", tmp_path, "--no-plots")
    assert result.exit_code == 0, result.output
    assert "client 0 (slow)" in result.output
    # the comparison: one row per quantity (the only rows of 3 cells), each run's value in its column
    lines = result.output.split("comparison", 1)[1].replace("┃", "│").splitlines()
    header, *rows = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if "│" in line]
    assert header == ["", "base", "slow"], result.output
    table = {cells[0]: cells[1:] for cells in rows if len(cells) == 3}
    # first the settings that differ: the slow profile, which the base job lacks, and who uses it
    assert [cells[0] for cells in rows[:3]] == ["settings that differ", "clients.groups", "profiles.slow.speed"]
    assert table["profiles.slow.speed"] == ["-", "0.5"], result.output
    assert table["clients.groups"] == ["[]", '[{count = 1, profile = "slow"}]'], result.output
    assert "optim.lr" not in table and "run.name" not in table
    want = [_expected(logs[k]) for k in ("base", "slow")]
    assert table["rounds"] == ["6", "6"]
    assert table["throughput"] == [f"{w['throughput']:,.0f} samples/s" for w in want], result.output
    assert table["wall time"] == [f"{w['wall']:.2f} s" for w in want], result.output
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.mpi
def test_watch_once_prints_the_last_round(logs):
    result = _invoke(watch, logs["slow"], "--once")
    assert result.exit_code == 0, result.output
    with h5py.File(logs["slow"], "r") as f:
        acc, loss = f["eval/test_acc"][-1], f["server/train_loss"][-1]
    assert result.output.startswith("round 6/6 ")
    assert f"loss {loss:.3f}" in result.output and f"acc {acc:.3f} (round 6)" in result.output
    assert "t_iter ms 0:" in result.output


@pytest.mark.mpi
def test_watch_stops_on_a_complete_run(logs):
    result = _invoke(watch, logs["base"], "--interval", "0.1", "--idle", "30")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 and lines[0].startswith("round 6/6 ") and lines[1] == "run complete: 6 rounds"


@pytest.mark.mpi
def test_compare_runs_script_builds_a_mean_std_table(logs, tmp_path):
    script = [sys.executable, str(ROOT / "analysis" / "compare_runs.py")]
    runs_dir = logs["base"].parent.parent
    by_name = subprocess.run([*script, runs_dir], capture_output=True, text=True, timeout=120)
    assert by_name.returncode == 0, by_name.stderr
    rows = [line for line in by_name.stdout.splitlines() if line.startswith("| ") and "method" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| base", "| slow"]

    together = subprocess.run([*script, logs["base"], logs["slow"], "--group-by", "train.rounds",
                               "--format", "csv"], capture_output=True, text=True, timeout=120)
    assert together.returncode == 0, together.stderr
    header, row = together.stdout.splitlines()
    cells = dict(zip(header.split(","), row.split(",")))
    accs = [_expected(logs[k])["final_acc"] for k in ("base", "slow")]
    assert cells["method"] == "train.rounds=6" and cells["runs"] == "2"
    assert float(cells["final_acc_mean"]) == pytest.approx(np.mean(accs))
    assert float(cells["final_acc_std"]) == pytest.approx(np.std(accs, ddof=1))

    bad = subprocess.run([*script, logs["base"], "--group-by", "train.nope"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "the job has no field 'train.nope'" in bad.stderr


def test_compare_runs_groups_seeds_but_not_numbered_methods():
    sys.path.insert(0, str(ROOT / "analysis"))
    try:
        import compare_runs
    finally:
        sys.path.remove(str(ROOT / "analysis"))
    strip = compare_runs.SEED_SUFFIX.sub
    assert [strip("", n) for n in ("large-s0", "large_s12", "large-seed2", "large.seed3")] == ["large"] * 4
    assert [strip("", n) for n in ("batch-64", "lr-0.1", "topk0.01", "run_2")] == ["batch-64", "lr-0.1",
                                                                                  "topk0.01", "run_2"]


def test_unreadable_paths_give_errors_that_say_what_to_give(tmp_path):
    missing = _invoke(analyze, tmp_path / "nope.h5")
    assert missing.exit_code == 1 and "no such file" in missing.output and "run.h5" in missing.output

    (tmp_path / "text.h5").write_text("not hdf5")
    text = _invoke(analyze, tmp_path / "text.h5")
    assert text.exit_code == 1 and "not an HDF5 file" in text.output

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.arange(3)
    other = _invoke(analyze, tmp_path / "other.h5")
    assert other.exit_code == 1 and "not an mpifed run log" in other.output

    newer = _synthetic_log(tmp_path / "newer.h5", schema=99)
    result = _invoke(analyze, newer)
    assert result.exit_code == 1 and "schema 99" in result.output and "upgrade mpifed" in result.output

    watched = _invoke(watch, tmp_path / "other.h5", "--once")
    assert watched.exit_code == 1 and "not an mpifed run log" in watched.output


def test_a_folder_without_run_h5_names_the_runs_it_holds(tmp_path):
    runs = tmp_path / "runs"
    for name in ("a", "b", "c", "d"):
        (runs / name).mkdir(parents=True)
        _synthetic_log(runs / name / "run.h5")
    (runs / "notes").mkdir()  # no run.h5: not suggested
    result = _invoke(analyze, runs, "--no-plots")
    assert result.exit_code == 1 and "no such file" not in result.output, result.output
    assert f"{runs} holds no run.h5: give a run directory ({runs}/<name>) or its run.h5" in result.output
    assert f"{runs / 'a'}, {runs / 'b'}, {runs / 'c'} (and 1 more)" in result.output and "notes" not in result.output
    empty = _invoke(analyze, runs / "notes")
    assert empty.exit_code == 1 and f"{runs / 'notes'} holds no run.h5 (nor do its folders)" in empty.output
    assert _invoke(analyze, runs / "a", "--no-plots").exit_code == 0


def test_analyze_does_not_import_torch(tmp_path):
    """The analysis path is torch-free: importing the CLI, and analysing a log, must not pay torch's seconds."""
    log = _synthetic_log(tmp_path / "run.h5")
    code = ("import sys\n"
            "from mpifed.cli import main\n"
            "assert 'torch' not in sys.modules, 'import mpifed.cli imported torch'\n"
            f"main(['analyze', {str(log)!r}, '--no-plots'], standalone_mode=False)\n"
            "print('torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stdout, result.stdout


def _synthetic_log(path: Path, schema: int | str = 1, rounds: int = 8) -> Path:
    """A log with only the required datasets plus ones that later versions add (scale, a fitted
    performance model's predictions), and no /eval group at all. In the file format mpifed writes
    (libver latest), which an SWMR reader does not check for truncation."""
    rng = np.random.default_rng(0)
    t_iter = 0.1 + 0.01 * rng.random((rounds, 3))
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["schema"] = schema
        f["ranks/role"] = np.array(["server", "client 0", "client 1"], dtype=h5py.string_dtype())
        f["iter/t_iter"] = t_iter
        f["iter/batch"] = np.tile([96.0, 64.0, 32.0], (rounds, 1))
        pred = t_iter * np.array([1.1, 0.8, 1.0])
        pred[:2] = np.nan  # no prediction before the model was fitted
        f["iter/t_iter_pred"] = pred
        f["server/scale"] = np.linspace(1.0, 2.0, rounds)
        f["server/critical"] = (np.arange(rounds) < 3).astype(float)
    return path


def test_optional_datasets_are_used_when_present_and_absent_ones_tolerated(tmp_path):
    run = load_run(_synthetic_log(tmp_path / "run.h5"))
    s = summarize(run)
    # |pred - t| / t is 10 % on the server (20 % and 0 % on the clients, which do not count), over
    # the 5 steady rounds (the first 3 left out)
    assert s.perf_mdape == pytest.approx(10.0) and s.perf_points == 5
    assert s.throughput == pytest.approx(96 * 8 / run.iter["t_iter"][:, 0].sum())
    assert np.isnan(s.accuracy.final) and s.accuracy.evals == 0
    assert s.client_emul_share == 0.0 and np.isnan(s.bytes_up_per_round)
    paths = write_plots([run], tmp_path / "figs")
    assert [p.name for p in paths] == list(FIGURES)
    result = _invoke(analyze, tmp_path / "run.h5", "--json", "--no-plots")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["accuracy"]["final"] is None and data["perf_mdape"] == pytest.approx(10.0)


def test_plots_on_a_full_disk_fail_in_one_line_and_leave_no_partial_png(tmp_path, disk):
    """PIL's traceback and a cut PNG, before: each plot is now written to a temporary name and renamed."""
    log = _synthetic_log(tmp_path / "run.h5")
    figs = disk("512k") / "figs"
    written = write_plots([load_run(log)], figs)
    before = {p.name: p.read_bytes() for p in written}
    (figs.parent / "fresh").mkdir()
    fill(figs.parent)
    for out in (figs, figs.parent / "fresh"):
        proc = subprocess.run([sys.executable, "-m", "mpifed", "analyze", str(log), "--out", str(out)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.startswith(f"Error: plot loss.png could not be written: the disk holding {out} is "
                                      f"full (") and proc.stderr.count("\n") == 1, proc.stderr
        assert "(--out DIR) or not at all (--no-plots)" in proc.stderr
    assert {p.name: p.read_bytes() for p in figs.iterdir()} == before  # the old plots, whole
    assert not list((figs.parent / "fresh").iterdir())


# Runs `mpifed analyze LOG` and `mpifed watch LOG --once`; prints [[exit code, output], ...] as JSON.
BOTH_COMMANDS = """
import json, sys
from click.testing import CliRunner
from mpifed.commands.analyze import analyze
from mpifed.commands.watch import watch
results = [CliRunner().invoke(cmd, args) for cmd, args in ((analyze, [sys.argv[1], "--no-plots"]),
                                                           (watch, [sys.argv[1], "--once"]))]
print(json.dumps([[r.exit_code, r.output] for r in results]))
"""


def _both_commands(log: Path) -> list[tuple[int, str]]:
    """In a subprocess, so that a reader stuck retrying reads past the end fails the test instead of
    stalling it (the retries sit in HDF5's C code, where pytest-timeout's signal cannot reach)."""
    proc = subprocess.run([sys.executable, "-c", BOTH_COMMANDS, str(log)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _assert_truncated(log: Path, have: int, want: int) -> None:
    for code, output in _both_commands(log):
        assert code == 1, output
        assert f"is truncated ({have:,} of {want:,} bytes)" in output and "copy it again" in output, output


def test_a_truncated_log_is_refused_at_once(tmp_path):
    log = _synthetic_log(tmp_path / "run.h5")
    size = log.stat().st_size
    os.truncate(log, 500)  # within the objects' headers: an SWMR open alone would retry for minutes
    _assert_truncated(log, 500, size)


@pytest.mark.mpi
def test_a_truncated_copy_of_a_real_log_is_refused_at_once(logs, tmp_path):
    log = tmp_path / "run.h5"
    log.write_bytes(logs["base"].read_bytes()[:20_000])
    _assert_truncated(log, 20_000, logs["base"].stat().st_size)


# A job's log while it runs: created, switched to SWMR, two rounds flushed; one more round for each line
# read from stdin, and a line "round N" on stdout after each flush.
LIVE_WRITER = """
import sys
import h5py
import numpy as np
f = h5py.File(sys.argv[1], "w", libver="latest")
f.attrs["schema"] = 1
f["ranks/role"] = np.array(["server", "client 0"], dtype=h5py.string_dtype())
shapes = {"iter/t_iter": (2,), "iter/batch": (2,), "server/train_loss": (), "eval/round": (), "eval/test_acc": ()}
data = {name: f.create_dataset(name, (0, *shape), "f8", maxshape=(None, *shape)) for name, shape in shapes.items()}
f.swmr_mode = True
for rounds in range(1, 10):
    for name in ("iter/t_iter", "iter/batch", "server/train_loss"):
        data[name].resize(rounds, axis=0)
        data[name][-1] = {"iter/t_iter": 0.1, "iter/batch": 32.0}.get(name, 2.0 / rounds)
    f.flush()
    if rounds >= 2:
        print(f"round {rounds}", flush=True)
        if not sys.stdin.readline():
            break
f.close()
"""


def test_a_log_that_a_job_is_writing_is_read_with_swmr(tmp_path):
    log = tmp_path / "run.h5"
    writer = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(log)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "round 2\n"
        _, f = open_log(log)
        with f:
            assert f.swmr_mode  # the plain open was refused: the writer holds the file
        result = _invoke(watch, log, "--once")
        assert result.exit_code == 0 and result.output.startswith("round 2 "), result.output
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.stdout.readline() == "round 3\n"
        assert load_run(log).rounds == 3
    finally:
        writer.stdin.close()
        writer.wait(timeout=30)
    assert load_run(log).rounds == 3  # and once the writer closed it, with a plain open


def test_a_schema_that_is_not_an_integer_is_named(tmp_path):
    log = _synthetic_log(tmp_path / "run.h5", schema="one")
    for command, args in ((analyze, ("--no-plots",)), (watch, ("--once",))):
        result = _invoke(command, log, *args)
        assert result.exit_code == 1, result.output
        assert "'schema' attribute is 'one', not an integer" in result.output, result.output
