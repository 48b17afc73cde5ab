"""The documentation tells the truth: the reference pages are what the code gives, every page is in the
site's navigation, the README stays a front door, and every shell command the README and the docs
show either runs here (when it is cheap), is checked against the code without running, or is named in
COVERED with the MPI test that runs it."""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import re
import shlex
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mpifed.cli import main
from mpifed.config import load_job
from mpifed.reference import PAGES, generated_part
from mpifed.reference.commands import command_paths
from mpifed.trainargs import job_overrides

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDE = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_reference_pages_are_what_the_code_gives(page):
    text = (DOCS / page).read_text()
    assert generated_part(text), f"docs/{page} lost its generated part's markers"
    assert generated_part(text) == PAGES[page]().strip(), (
        f"docs/{page} is stale: run `python -m mpifed.reference` and commit the page")


def test_every_page_is_in_the_navigation():
    nav = set(re.findall(r"^\s+- (?:[^:\n]+|\"[^\"]+\"): (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md")}
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"mkdocs.yml's nav names missing pages: {sorted(nav - pages)}"


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 150, f"README.md has {len(lines)} lines: move detail into docs/"


# Commands the docs show whose whole run needs MPI (or SLURM): the test that runs each kind. A regex on
# the command as written -> "file::test".
COVERED = {
    r"^mpirun -n \d+ mpifed train$": "tests/test_mpi_train.py::test_run_log_layout",
    r"mpifed train .*--resume": "tests/test_mpi_checkpoint.py::test_signal_then_resume_equals_an_uninterrupted_run",
    r"mpifed train .*clients\.count=\d+ --set clients\.per_round":
        "tests/test_mpi_clients.py::test_sampled_fedsgd_is_sgd_on_the_union_and_resumes_bit_for_bit",
    r"mpifed train --job examples/my_job\.toml":
        "tests/test_mpi_own.py::test_own_model_and_data_named_in_the_job_file_train_with_fedsgd_equal_to_sgd_on_the_union",
    r"mpifed train --job jobs/fashionmnist\.toml":
        "tests/test_mpi_own.py::test_fashion_mnist_from_the_debian_files_at_its_own_28x28",
    r"mpifed train --job jobs/shakespeare\.toml":
        "tests/test_mpi_own.py::test_shakespeare_by_role_trains_leaf_lstm_on_natural_clients_sampled_each_round",
    r"scaling\.method=step": "tests/test_mpi_scaling.py::test_step_scaling_is_applied_exactly_outside_critical_phases",
    r"compress\.codec=topk":
        "tests/test_mpi_compress.py::test_topk_with_error_feedback_over_mpi_equals_the_one_process_reference",
    r"plan\.mode=": "tests/test_mpi_plan.py::test_predict_logs_a_finite_prediction_every_round_and_the_curves",
    r"mpifed profile": "tests/test_mpi_plan.py::test_profile_command_writes_the_start_up_model_that_plan_reads",
    r"debug\.corrupt_rank":
        "tests/test_mpi_compress.py::test_a_malformed_payload_is_rejected_by_client_and_round_and_the_job_goes_on",
    r"^sbatch ": "tests/test_slurm_train.py::test_sbatch_of_a_rendered_script_trains_and_writes_the_run_log",
    r"^mpifed slurm ": "tests/test_slurm.py::test_command_writes_absolute_paths_and_passes_extra_args",
    r"^mpifed analyze ": "tests/test_analyze.py::test_analyze_tables_compare_runs_side_by_side",
    r"^mpifed watch ": "tests/test_analyze.py::test_watch_once_prints_the_last_round",
    r"^python analysis/compare_runs\.py": "tests/test_analyze.py::test_compare_runs_script_builds_a_mean_std_table",
    r"^python analysis/compression_sweep\.py":
        "tests/test_analysis_scripts.py::test_compression_sweep_runs_on_three_ranks",
    r"^python -m pytest": ".ci/run",
    r"^mkdocs ": ".ci/run",
}
LAUNCHERS = (["mpirun", "-n"], ["srun", "--mpi=pmi2"])


@dataclass
class Shown:
    page: str
    command: str  # as written (continuations joined, comment dropped)
    argv: list[str]


def shell_commands(text: str, page: str) -> list[Shown]:
    """The commands in a page's ```bash blocks: one per line or per `&&` part, without comments, a
    trailing `&` or a redirection."""
    out = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv: list[str] = []
            for token in [*shlex.split(line, comments=True), "&&"]:
                if token not in ("&&", "&"):
                    argv.append(token)
                elif argv:
                    argv = argv[:argv.index(">")] if ">" in argv else argv
                    out.append(Shown(page, shlex.join(argv), argv))
                    argv = []
    return out


def docs_commands() -> list[Shown]:
    return [shown for path in GUIDE for shown in shell_commands(path.read_text(), str(path.relative_to(ROOT)))]


def _written() -> set[str]:
    """The files the docs' commands write (--out FILE, -o FILE), which later commands may read."""
    return {value for shown in docs_commands() for option, value in zip(shown.argv, shown.argv[1:])
            if option in ("--out", "-o")}


def _covering(command: str) -> str | None:
    return next((test for pattern, test in COVERED.items() if re.search(pattern, command)), None)


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=\[ ]", dep)[0] for dep in project["dependencies"]}


def _check_mpifed(argv: list[str], under_mpi: bool, ranks: int) -> str:
    """'ran' or 'checked'; an AssertionError for what the code refuses. ranks: mpirun's -n (0: not given)."""
    paths = command_paths()
    words = argv[1:]
    path = "mpifed"
    while words and f"{path} {words[0]}" in paths:
        path, words = f"{path} {words[0]}", words[1:]
    command = paths[path]
    if "--help" in words or "-h" in words or path == "mpifed job-reference":
        result = CliRunner().invoke(main, argv[1:])
        assert result.exit_code == 0, result.output
        return "ran"
    assert path != "mpifed" and not isinstance(command, click.Group), f"no such command: {shlex.join(argv)}"
    try:
        ctx = command.make_context(path, list(words))
    except click.BadParameter as err:  # a file an earlier command writes, or a run, is fine to name
        missing = isinstance(err.param.type, click.Path) and "does not exist" in err.format_message()
        value = next((w for w in words if w in err.format_message()), None)
        assert missing and value and (value.startswith("runs/") or value in _written()), (
            f"`{shlex.join(argv)}`: {err.format_message()}")
        return "checked"
    except click.ClickException as err:
        raise AssertionError(f"`{shlex.join(argv)}`: {err.format_message()}") from None
    params = ctx.params
    if path == "mpifed train":
        if params["print_job"]:
            result = CliRunner().invoke(main, argv[1:])
            assert result.exit_code == 0, result.output
            return "ran"
        assert under_mpi, f"`{shlex.join(argv)}` trains: show it under mpirun or srun"
    if path == "mpifed train" and not params["resume"]:  # a resume's rules need its run: COVERED
        job = load_job(params["job_file"], overrides=job_overrides(params["overrides"], params["name"], params["out"]))
        assert not (ranks and job.clients.count) or 2 <= ranks <= job.clients.count + 1, (
            f"`{shlex.join(argv)}` on {ranks} ranks: the job fixes clients.count = {job.clients.count}")
    if path == "mpifed profile":
        load_job(params["job"], overrides=params["overrides"])
    if path == "mpifed slurm":  # renders the script (and checks the job) where no file of the repo changes
        with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
            for folder in ("jobs", "examples"):
                os.symlink(ROOT / folder, folder)
            result = CliRunner().invoke(main, [arg for arg in argv[1:] if arg != "--submit"])
        assert result.exit_code == 0, f"`{shlex.join(argv)}`: {result.output}"
        return "ran (without --submit)"
    return "checked"


def check(shown: Shown) -> str:
    """How the docs check holds one command: 'ran', 'checked', or the test that runs it."""
    argv = shown.argv
    under_mpi = any(argv[:len(launcher)] == launcher for launcher in LAUNCHERS)
    ranks = int(argv[2]) if argv[:2] == ["mpirun", "-n"] else 0
    if under_mpi:
        argv = argv[3:] if argv[0] == "mpirun" else argv[2:]
    covered = _covering(shown.command)
    if argv[0] == "mpifed":
        how = _check_mpifed(argv, under_mpi, ranks)
        return f"{how}; run by {covered}" if covered else how
    if argv[:3] == ["python3", "-m", "venv"] or argv[0] == ".":
        return "checked"  # the set-up commands: CI runs the README's (.ci/run)
    if argv[:2] == ["pip", "install"]:
        extras = {extra for arg in argv for group in re.findall(r"\[([^\]]+)\]", arg) for extra in group.split(",")}
        assert extras <= _extras(), f"`{shown.command}`: no such extra {sorted(extras - _extras())} in pyproject.toml"
        named = {arg for before, arg in zip(argv[1:], argv[2:])
                 if not arg.startswith(("-", ".")) and before != "--index-url"}
        assert named <= _dependencies(), f"`{shown.command}`: installs {sorted(named - _dependencies())}, " \
                                         f"which mpifed does not depend on"
        return "checked"
    if argv[0] == "python" and argv[1].startswith("analysis/"):
        script = ROOT / argv[1]
        assert script.is_file(), f"`{shown.command}`: no {argv[1]}"
        source = script.read_text() + (ROOT / "analysis" / "sweep_runs.py").read_text()
        unknown = [arg for arg in argv[2:] if arg.startswith("--") and f'"{arg}"' not in source]
        assert not unknown, f"`{shown.command}`: {argv[1]} has no option {unknown}"
        return f"checked; run by {covered}" if covered else "checked"
    assert covered, f"`{shown.command}` ({shown.page}) is neither run, checked nor covered by a test: add it to COVERED"
    return f"run by {covered}"


def test_every_command_the_docs_show_runs_or_is_checked_or_covered(monkeypatch, capsys, request):
    monkeypatch.chdir(ROOT)
    shown = docs_commands()
    assert len(shown) >= 60 and any(s.page == "README.md" for s in shown), len(shown)
    report = [f"{s.page}: {s.command}\n    {check(s)}" for s in shown]
    if request.config.getoption("verbose") > 0:  # pytest -v tests/test_docs.py: how each command is held
        with capsys.disabled():
            print("\n" + "\n".join(report))
    used = {test for pattern, test in COVERED.items() if any(re.search(pattern, s.command) for s in shown)}
    assert used == set(COVERED.values()), f"COVERED names tests no docs command needs: {set(COVERED.values()) - used}"


@pytest.mark.parametrize("test", sorted(set(COVERED.values()) - {".ci/run"}))
def test_the_tests_that_cover_docs_commands_exist(test):
    file, name = test.split("::")
    assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), re.M), f"{test} does not exist"


@pytest.mark.parametrize("line, argv", [
    ("mpirun -n 4 mpifed train --set x=1 &   # a comment", [["mpirun", "-n", "4", "mpifed", "train", "--set", "x=1"]]),
    ("a && b 'c d' && e", [["a"], ["b", "c d"], ["e"]]),
    ("mpifed analyze runs/a --json > a.json", [["mpifed", "analyze", "runs/a", "--json"]]),
])
def test_commands_are_read_as_a_shell_would(line, argv):
    assert [s.argv for s in shell_commands(f"```bash\n{line}\n```\n", "p")] == argv


def test_a_command_the_code_refuses_fails_the_check(monkeypatch):
    monkeypatch.chdir(ROOT)
    for line, message in [("mpirun -n 4 mpifed train --rounds 5", "No such option"),
                          ("mpirun -n 4 mpifed train --set train.rounds=zero", "expected int"),
                          ("mpifed trian", "no such command"),
                          ("mpifed train --set train.rounds=5", "show it under mpirun"),
                          ("mpirun -n 4 mpifed train --job jobs/hetero15.toml", None),
                          ("mpirun -n 17 mpifed train --job jobs/hetero15.toml", "fixes clients.count = 15"),
                          ("pip install -e '.[cuda]'", "no such extra"),
                          ("rm -rf runs", "neither run, checked nor covered")]:
        shown = shell_commands(f"```bash\n{line}\n```\n", "p")[0]
        if message is None:
            assert check(shown) == "checked"
            continue
        with pytest.raises(Exception, match=message):
            check(shown)


def test_python_and_toml_the_docs_show_are_valid():
    blocks = 0
    for path in GUIDE:
        text = path.read_text()
        for code in re.findall(r"^```python\n(.*?)^```", text, re.M | re.S):
            tree = ast.parse(code, str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module.startswith("mpifed"):
                    module = importlib.import_module(node.module)
                    missing = [a.name for a in node.names if not hasattr(module, a.name)]
                    assert not missing, f"{path.name}: {node.module} has no {missing}"
            blocks += 1
        for code in re.findall(r"^```toml\n(.*?)^```", text, re.M | re.S):
            tomllib.loads(code)
            if ".py:" not in code:  # a job that names no file of its own: the whole job is checked
                load_job(text=code)
            blocks += 1
    assert blocks >= 5, blocks
