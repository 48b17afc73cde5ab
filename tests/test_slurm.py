"""SLURM scripts: pure rendering tests, then real jobs on the one-node cluster of .ci/slurm-up.

The `slurm` tests submit with sbatch and skip, saying how to start a cluster, where none is up.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mpifed.commands.slurm import slurm as slurm_command
from mpifed.slurm import TEMPLATES, SlurmOptions, render, template_fields, time_seconds
from slurm_helpers import require_slurm, run_batch

PLACEHOLDER = re.compile(r"\{\{.*?\}\}")


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


# --- rendering, no cluster -------------------------------------------------------------------

@pytest.mark.parametrize("opts", [
    SlurmOptions(job="/j.toml"),
    SlurmOptions(job="/j.toml", nodes=3, gpus_per_node=4, partition="gpu", account="proj",
                 launcher="mpirun", requeue=True, venv="/venv"),
    SlurmOptions(sweep="/s.txt", sweep_size=5, array_parallel=2, gpus_per_node=2, overcommit=True),
], ids=lambda o: o.template)
def test_every_placeholder_is_filled_and_the_script_is_valid_bash(opts):
    script = render(opts.template, **opts.fields())
    assert not PLACEHOLDER.search(script)
    assert script.startswith("#!/bin/bash\n")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_single_node_script_asks_for_clients_plus_server():
    opts = SlurmOptions(job="/runs/j.toml", gpus_per_node=4, time="02:00:00", partition="gpu",
                        mpifed_args=("--set", "train.rounds=3"))
    script = render(opts.template, **opts.fields())
    lines = sbatch_lines(script)
    assert "#SBATCH --ntasks=5" in lines
    assert "#SBATCH --gpus-per-node=4" in lines
    assert "#SBATCH --partition=gpu" in lines
    assert "#SBATCH --signal=B:USR1@120" in lines
    assert "#SBATCH --no-requeue" in lines
    assert not any("--account" in line for line in lines)  # optional line dropped, not blank
    assert "srun --mpi=pmi2 --ntasks=5 --cpus-per-task=1 mpifed train --job /runs/j.toml " \
           "--set train.rounds=3 &" in script


def test_multi_node_places_the_server_with_the_first_nodes_clients(tmp_path):
    opts = SlurmOptions(job="/j.toml", nodes=3, gpus_per_node=4, log_dir=str(tmp_path))
    assert opts.ntasks == 13
    script = render(opts.template, **opts.fields())
    assert opts.template == "multi-node"
    assert "#SBATCH --ntasks-per-node=5" in sbatch_lines(script)
    assert 'SLURM_HOSTFILE="$hostfile" srun --mpi=pmi2 --ntasks=13' in script
    assert "--distribution=arbitrary" in script
    # The placement itself is the host file the script writes, one line per rank in rank order: run
    # that part of the script on three nodes that a stand-in scontrol names.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\nprintf "n1\\nn2\\nn3\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    part = re.search(r'^hostfile=.*?^done >"\$hostfile"$', script, re.S | re.M)
    assert part, script
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n[1-3]")
    subprocess.run(["bash", "-euo", "pipefail", "-c", part.group(0)], env=env, check=True)
    hosts = (tmp_path / "hosts-7.txt").read_text().split()
    assert hosts == ["n1"] * 5 + ["n2"] * 4 + ["n3"] * 4  # the server and 4 clients, then 4 clients a node


def test_array_takes_one_index_per_job_file():
    opts = SlurmOptions(sweep="/sweeps/lr.txt", sweep_size=4, array_parallel=2)
    script = render(opts.template, **opts.fields())
    assert "#SBATCH --array=0-3%2" in sbatch_lines(script)
    assert 'mpifed train --job "$job_file"' in script


def test_render_names_missing_and_unknown_fields():
    fields = SlurmOptions(job="/j.toml").fields()
    del fields["time"]
    with pytest.raises(ValueError, match=r"missing field\(s\) time; unknown field\(s\) colour"):
        render("single-node", colour="blue", **fields)
    with pytest.raises(ValueError, match="unknown SLURM template 'tiny'"):
        render("tiny")


def test_every_template_field_comes_from_the_options():
    for name in TEMPLATES:
        opts = {"single-node": SlurmOptions(job="/j"), "multi-node": SlurmOptions(job="/j", nodes=2),
                "array": SlurmOptions(sweep="/s", sweep_size=1)}[name]
        assert opts.template == name
        assert set(opts.fields()) == template_fields(name)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of job"),
    ({"job": "/j", "gpus_per_node": 0}, "ntasks=1: need the server and at least one client"),
    ({"job": "/j", "nodes": 2, "ntasks": 4}, "one client per GPU plus the server, 3 here"),
    ({"job": "/j", "time": "2h"}, "time='2h'"),
    ({"job": "/j", "launcher": "mpiexec"}, "launcher='mpiexec'"),
    ({"job": "/my jobs/j.toml"}, "spaces, quotes"),
    ({"sweep": "/s", "sweep_size": 2, "nodes": 2}, "each array element is a one-node run"),
    ({"job": "/j", "partition": "gpu debug"}, "partition='gpu debug': use letters, digits and _ . , : + - only"),
    ({"job": "/j", "account": "a\n#SBATCH --x"}, "account='a\\n#SBATCH --x': use letters"),
    ({"job": "/j", "time": "1\n"}, "time='1\\n'"),
    ({"job": "/j", "time": "1"}, "signal_seconds=120 is not shorter than time='1' (60 s)"),
    ({"job": "/j", "time": "2:00", "signal_seconds": 300}, "signal_seconds=300 is not shorter than time='2:00'"),
    ({"job": "/j", "mpifed_args": ("--sett", "x=1")}, "after -- (for mpifed train): No such option '--sett'"),
])
def test_options_reject_bad_values_and_say_why(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SlurmOptions(**kwargs)


def test_command_writes_absolute_paths_and_passes_extra_args(tmp_path):
    job = tmp_path / "cifar small.toml"
    job.write_text("")
    runner = CliRunner()
    result = runner.invoke(slurm_command, [
        "--job", str(job), "--gpus-per-node", "2", "--venv", "", "--log-dir", str(tmp_path / "logs"),
        "-o", str(tmp_path / "out.sbatch"), "--", "--set", "train.rounds=2"])
    assert result.exit_code == 2, result.output  # the space in the job path is refused
    assert "spaces, quotes" in result.output
    job = job.rename(tmp_path / "cifar.toml")
    result = runner.invoke(slurm_command, [
        "--job", str(job), "--gpus-per-node", "2", "--venv", "", "--log-dir", str(tmp_path / "logs"),
        "-o", str(tmp_path / "out.sbatch"), "--", "--set", "train.rounds=2"])
    assert result.exit_code == 0, result.output
    script = (tmp_path / "out.sbatch").read_text()
    assert f"mpifed train --job {job} --set train.rounds=2 &" in script
    assert "#SBATCH --job-name=cifar" in script
    assert (tmp_path / "logs").is_dir()


def test_command_counts_the_sweep_and_checks_its_files(tmp_path):
    (tmp_path / "a.toml").write_text("")
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# learning rates\na.toml\n\nmissing.toml\n")
    result = CliRunner().invoke(slurm_command, ["--sweep", str(sweep), "--venv", ""])
    assert result.exit_code == 1
    assert "sweep.txt:4: job file 'missing.toml' not found" in result.output
    sweep.write_text("# learning rates\na.toml\n\n  a.toml  \n")
    result = CliRunner().invoke(slurm_command, ["--sweep", str(sweep), "--venv", "",
                                                "--log-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "#SBATCH --array=0-1\n" in result.output


def _invoke(tmp_path: Path, *args: str):
    """`mpifed slurm` on an empty (default) job file, writing to tmp_path/out.sbatch unless -o says else."""
    job = tmp_path / "job.toml"
    job.write_text("")
    output = [] if "-o" in args else ["-o", str(tmp_path / "out.sbatch")]
    return CliRunner().invoke(slurm_command, ["--job", str(job), "--venv", "", "--log-dir", str(tmp_path / "logs"),
                                              *output, *args])


def test_output_in_a_missing_directory_is_refused_before_anything_is_written(tmp_path):
    result = _invoke(tmp_path, "-o", str(tmp_path / "nodir" / "x.sbatch"))
    assert result.exit_code == 2, result.output
    assert f"directory {tmp_path / 'nodir'} does not exist; create it first" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "nodir").exists()
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("option, value, allowed", [
    ("--partition", "gpu debug", "letters, digits and _ . , : + -"),
    ("--account", "a\n#SBATCH --x", "letters, digits and _ . , : + -"),
    ("--job-name", "my job", "letters, digits and _ . + -"),
])
def test_values_that_would_break_or_add_sbatch_lines_are_refused(tmp_path, option, value, allowed):
    result = _invoke(tmp_path, option, value)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': {value!r}: use {allowed} only" in result.output
    assert not (tmp_path / "out.sbatch").exists()


@pytest.mark.parametrize("args, message", [
    (["--set", "train.rouns=5"], "train.rouns: unknown field (did you mean 'rounds'?)"),
    (["--set", "train.rounds=x"], "train.rounds = 'x': expected int"),
    (["--set", "train"], "--set 'train': expected key=value"),
    (["--sett", "train.rounds=5"], "No such option '--sett'"),
    (["--progress", "loud"], "'loud' is not one of"),
    (["--job", "other.toml"], "--job: the script passes the job file itself"),
    (["--auto-resume"], "--auto-resume after -- needs a fixed run directory"),
])
def test_arguments_for_train_are_checked_when_the_script_is_rendered(tmp_path, args, message):
    result = _invoke(tmp_path, "--", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.sbatch").exists()


def test_arguments_for_train_are_checked_against_every_sweep_job(tmp_path):
    (tmp_path / "a.toml").write_text("")
    (tmp_path / "b.toml").write_text("[train]\nrounds = 4\n")
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("a.toml\nb.toml\n")
    args = ["--sweep", str(sweep), "--venv", "", "--log-dir", str(tmp_path), "-o", str(tmp_path / "s.sbatch")]
    result = CliRunner().invoke(slurm_command, [*args, "--", "--set", "model.nam=cnn"])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'a.toml'}: --set model.nam=cnn: model.nam: unknown field" in result.output
    assert f"{tmp_path / 'b.toml'}: --set model.nam=cnn: model.nam: unknown field" in result.output and not (tmp_path / "s.sbatch").exists()
    result = CliRunner().invoke(slurm_command, [*args, "--", "--set", "model.name=cnn"])
    assert result.exit_code == 0, result.output


def test_requeue_names_the_run_as_train_will_and_quotes_it(tmp_path):
    job = tmp_path / "j.toml"
    job.write_text('[run]\nname = "pre"\n')
    opts = SlurmOptions(job=str(job), requeue=True, mpifed_args=("--name", "my run"))
    assert opts.command_line().endswith(
        """--name 'my run' --name 'my run'"-$SLURM_JOB_ID" --set run.timestamp=false --auto-resume""")
    subprocess.run(["bash", "-n"], input=render(opts.template, **opts.fields()), text=True, check=True)


@pytest.mark.parametrize("limit, seconds", [("30", 1800), ("5:30", 330), ("04:00:00", 14400), ("1-12", 129600),
                                            ("1-12:30", 131400), ("1-0:0:5", 86405), ("0", 0)])
def test_time_limits_in_every_slurm_form_read_as_seconds(limit, seconds):
    assert time_seconds(limit) == seconds


def test_requeue_in_an_array_names_each_elements_run_after_its_job_file_and_job_id():
    """A requeued element restarts its script under the same job id: a fixed run name and
    --auto-resume make it continue from its checkpoint instead of starting a new run at round 0."""
    opts = SlurmOptions(sweep="/s.txt", sweep_size=2, requeue=True, mpifed_args=("--set", "train.rounds=9"))
    command = opts.command_line()
    subprocess.run(["bash", "-n"], input=render(opts.template, **opts.fields()), text=True, check=True)
    # the words mpifed gets, as the element's shell expands them
    argv = subprocess.run(["bash", "-c", f'job_file=/sweeps/lr-0.1.toml SLURM_JOB_ID=77; set -- {command}; '
                                         f'printf "%s\\n" "$@"'], capture_output=True, text=True, check=True)
    assert argv.stdout.splitlines() == ["mpifed", "train", "--job", "/sweeps/lr-0.1.toml", "--set", "train.rounds=9",
                                        "--name", "lr-0.1-77", "--set", "run.timestamp=false", "--auto-resume"]


# --- real jobs on a SLURM cluster ------------------------------------------------------------

RANKS_PROGRAM = """\
import signal, sys, time
from pathlib import Path
from mpi4py import MPI
comm = MPI.COMM_WORLD
out, tag = Path(sys.argv[1]), sys.argv[2]
(out / f"rank-{comm.rank}.txt").write_text(f"{comm.rank} {comm.size} {tag}")
if "--wait-usr1" in sys.argv:
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    (out / f"ready-{comm.rank}").touch()
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.1)
    (out / f"usr1-{comm.rank}.txt").write_text("yes" if got else "no")
"""


# The venv running the tests holds mpi4py and the MPICH wheel's mpirun: the jobs activate it.
VENV = sys.prefix if (Path(sys.prefix) / "bin" / "activate").is_file() else None


def mpi_job(tmp_path: Path, template: str, launcher: str, *extra: str) -> str:
    """A rendered script that runs RANKS_PROGRAM on 3 ranks (server + 2 clients, overcommitted)."""
    prog = tmp_path / "ranks.py"
    prog.write_text(RANKS_PROGRAM)
    nodes = 2 if template == "multi-node" else 1
    opts = SlurmOptions(job=str(tmp_path / "unused.toml"), nodes=nodes, gpus_per_node=1 if nodes > 1 else 0,
                        ntasks=3, overcommit=True, launcher=launcher, time="5", log_dir=str(tmp_path),
                        venv=VENV)
    # The one-node test cluster has no GPUs: run the multi-node script on one node with two
    # "clients per node", so its host file puts all 3 ranks on this node. SLURM refuses more
    # tasks per node than CPUs even with --overcommit, hence at most 2 on a 2-core machine.
    fields = opts.fields()
    if template == "multi-node":
        fields.update(nodes=1, gpus_per_node=2, tasks_per_node=min(3, os.cpu_count() or 1), gpu_line="")
    tag = '"$job_file"' if template == "array" else "single"
    fields["command"] = " ".join(shlex.quote(a) for a in (sys.executable, str(prog), str(tmp_path))) \
        + f" {tag} " + " ".join(extra)
    return render(template, **fields)


def read_ranks(tmp_path: Path) -> list[tuple[int, int, str]]:
    return sorted(tuple(int(x) if i < 2 else x for i, x in enumerate(p.read_text().split()))
                  for p in tmp_path.glob("rank-*.txt"))


@pytest.mark.slurm
@pytest.mark.parametrize("template, launcher", [
    ("single-node", "srun"), pytest.param("single-node", "mpirun", marks=pytest.mark.mpi),
    ("multi-node", "srun"), pytest.param("multi-node", "mpirun", marks=pytest.mark.mpi)])
def test_sbatch_runs_every_rank(tmp_path, template, launcher):
    require_slurm()
    job_id, code, logs = run_batch(mpi_job(tmp_path, template, launcher), tmp_path, timeout=180)
    assert code == 0, logs
    assert read_ranks(tmp_path) == [(0, 3, "single"), (1, 3, "single"), (2, 3, "single")], logs
    assert f"mpifed: job {job_id} on" in logs


@pytest.mark.slurm
def test_sbatch_array_runs_one_job_file_per_index(tmp_path):
    require_slurm()
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# two runs\nfirst.toml\n\nsecond.toml\n")
    opts = SlurmOptions(sweep=str(sweep), sweep_size=2, array_parallel=1, gpus_per_node=0, ntasks=3,
                        overcommit=True, time="5", log_dir=str(tmp_path), venv=VENV)
    fields = opts.fields()
    prog = tmp_path / "ranks.py"
    prog.write_text(RANKS_PROGRAM)
    # Each element writes into its own directory, named after its job file.
    for name in ("first.toml", "second.toml"):
        (tmp_path / f"{name}.d").mkdir()
    fields["command"] = f'{shlex.quote(sys.executable)} {prog} "$job_file.d" "$job_file"'
    _, code, logs = run_batch(render("array", **fields), tmp_path, timeout=180)
    assert code == 0, logs
    for name in ("first.toml", "second.toml"):
        ranks = read_ranks(tmp_path / f"{name}.d")
        assert ranks == [(r, 3, str(tmp_path / name)) for r in range(3)], logs


@pytest.mark.slurm
@pytest.mark.parametrize("launcher", ["srun", pytest.param("mpirun", marks=pytest.mark.mpi)])
def test_time_limit_signal_reaches_every_rank(tmp_path, launcher):
    """--signal=B:USR1 goes to the batch shell only; the template's trap must forward it."""
    require_slurm()
    script = mpi_job(tmp_path, "single-node", launcher, "--wait-usr1")
    (tmp_path / "job.sbatch").write_text(script)
    proc = subprocess.Popen(["sbatch", "--parsable", "--wait", f"--chdir={tmp_path}", "job.sbatch"],
                            cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        job_id = proc.stdout.readline().strip()
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < 3:
            assert time.monotonic() < deadline, "ranks never started"
            assert proc.poll() is None, "job ended before its ranks were ready"
            time.sleep(0.2)
        # What SLURM does near the time limit, now: SIGUSR1 to the batch shell alone.
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            subprocess.run(["scancel", job_id], check=False)
            proc.kill()
    assert [p.read_text() for p in sorted(tmp_path.glob("usr1-*.txt"))] == ["yes"] * 3


def test_a_job_that_fixes_its_client_count_gets_no_more_ranks_than_it_can_use(tmp_path):
    """Fewer ranks than clients is fine (each rank trains several clients); more would leave ranks idle."""
    job = tmp_path / "fixed.toml"
    job.write_text("[clients]\ncount = 15\n")
    with pytest.raises(ValueError, match=r"clients.count = 15, so at most 16 ranks can train.*ntasks = 17"):
        SlurmOptions(job=str(job), nodes=4, gpus_per_node=4)
    assert SlurmOptions(job=str(job), nodes=5, gpus_per_node=3).ntasks == 16
    assert SlurmOptions(job=str(job), nodes=1, gpus_per_node=8, ntasks=16).ntasks == 16
    assert SlurmOptions(job=str(job), nodes=1, gpus_per_node=4).ntasks == 5
