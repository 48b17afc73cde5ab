"""The command line is an interface researchers script against: freeze it, and keep the docs'
job reference equal to what the code documents."""

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mpifed.cli import main
from mpifed.config import JobError, load_job
from mpifed.trainargs import job_overrides

ROOT = Path(__file__).resolve().parents[1]


def _options(command) -> set[str]:
    return {opt for p in command.params if isinstance(p, click.Option) for opt in p.opts}


def test_cli_surface_is_frozen():
    assert {"train", "info", "bench", "slurm", "job-reference", "memory", "plan", "analyze", "watch"} \
        <= set(main.commands)
    assert _options(main.commands["train"]) == {"--job", "--set", "--name", "--out", "--progress", "--resume",
                                                    "--auto-resume", "--print-job"}
    bench = main.commands["bench"]
    assert {"exchange", "compress", "memory", "plan", "rounds", "clients"} \
        <= set(bench.list_commands(click.Context(bench)))
    assert _options(main.commands["analyze"]) == {"--out", "--json", "--no-plots"}
    assert _options(main.commands["watch"]) == {"--interval", "--idle", "--once"}


def test_help_lists_every_command_with_its_help_without_loading_the_benchmarks():
    """Commands load torch and MPI when they run, not when `mpifed --help` lists them."""
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from mpifed.cli import main\n"
            "print(CliRunner().invoke(main, ['--help']).output)\n"
            "print('heavy:', sorted(m for m in ('torch', 'mpi4py', 'mpifed.bench.compress') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout, result.stdout
    for name, command in main.commands.items():
        first_words = " ".join(command.get_short_help_str().split()[:3])
        assert f"  {name}  " in result.stdout and first_words in result.stdout, (name, result.stdout)
    bench = CliRunner().invoke(main, ["bench", "--help"])
    assert bench.exit_code == 0 and "OOM-driven search" in bench.output, bench.output  # bench memory's help


def test_memory_help_lists_the_model_registry_and_default_margin():
    from mpifed.memory import DEFAULT_MARGIN
    from mpifed.models import MODELS

    for command in (["memory"], ["bench", "memory"]):
        result = CliRunner().invoke(main, [*command, "--help"])
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        assert f"Model from the registry: {', '.join(sorted(MODELS))}." in text, text
        assert f"DEFAULT_MARGIN ({DEFAULT_MARGIN})" in text, text


def test_print_job_resolves_overrides_without_mpi(tmp_path):
    result = CliRunner().invoke(main, ["train", "--print-job", "--set", "train.rounds=7", "--name", "x"])
    assert result.exit_code == 0, result.output
    job = load_job(text=result.output)
    assert job.train.rounds == 7 and job.run.name == "x"
    bad = CliRunner().invoke(main, ["train", "--print-job", "--set", "train.rounds=zero"])
    assert bad.exit_code != 0 and "train.rounds = 'zero': expected int" in bad.output


def test_every_job_in_jobs_dir_is_valid():
    files = sorted((ROOT / "jobs").rglob("*.toml"))
    assert len(files) >= 13
    for path in files:
        load_job(path)


@pytest.mark.parametrize("where, args", [
    ("--name", ["--name", "../../etc/x", "--out", "runs/deep/er"]),  # wrote runs/etc/x-<timestamp>/
    ("the job's run.name", ["--job", "job.toml"]),
])
def test_a_run_name_that_leaves_run_out_is_refused_before_anything_is_written(tmp_path, where, args):
    (tmp_path / "job.toml").write_text('[run]\nname = "../outside"\nout = "runs"\n')
    proc = subprocess.run([sys.executable, "-m", "mpifed", "train", "--progress", "off", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, (where, proc.stdout, proc.stderr)
    assert re.search(r"run\.name = '[^']+': a run name is one folder under run\.out", proc.stderr), proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["job.toml"]  # no run directory, no lock


@pytest.mark.parametrize("name", ["", " ", ".", "..", "a/b", "/abs/x", "a\\b", "x/../y"])
def test_run_names_that_are_not_one_plain_folder_are_refused(name):  # an absolute --name ignored --out
    with pytest.raises(JobError, match=r"run\.name = .*: a run name is one folder under run\.out"):
        load_job(overrides=job_overrides([], name, None))
    assert load_job(overrides=job_overrides([], "lr-0.1_seed.3", None)).run.name == "lr-0.1_seed.3"
