"""SLURM batch scripts for mpifed: fill a template from cluster options, and submit one.

The templates live in mpifed/slurm_templates/*.sbatch (shipped with the package, one copy only).
Each holds `{{field}}` placeholders; `render` fills them and refuses a missing or unknown field, so a
template and its options cannot drift apart silently. A line made only of placeholders that render
to nothing (an optional `#SBATCH --account=...`, say) is dropped instead of left blank.

    opts = SlurmOptions(job="jobs/cifar.toml", nodes=2, gpus_per_node=4, time="04:00:00")
    script = render(opts.template, **opts.fields())   # 9 ranks: the server + 8 clients
    job_id, exit_code = submit("cifar.sbatch", wait=True, timeout=3600)

`mpifed slurm` (mpifed/commands/slurm.py) is the command-line face of this module.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from importlib import resources

import click

from mpifed.trainargs import job_overrides, parse

TEMPLATES = ("single-node", "multi-node", "array")
LAUNCHERS = ("srun", "mpirun")
_FIELD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
# SLURM's accepted --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})$")


def time_seconds(limit: str) -> int:
    """Seconds in a SLURM --time value (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); 0 is no limit."""
    days, _, clock = limit.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    if days:  # D-H[:M[:S]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:  # M or M:S
        hours, minutes, seconds = 0, parts[0], parts[1] if len(parts) == 2 else 0
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


# Characters that would break an unquoted #SBATCH line or a quoted bash word in the templates.
_UNSAFE_PATH = re.compile(r"[\s\"'`$\\]")
# Free-text options written unquoted into #SBATCH lines: (pattern, what it allows). A space would cut
# the value short and a newline would start a directive of its own, so only plain words pass.
_SBATCH_WORDS = {
    "job_name": (re.compile(r"[A-Za-z0-9_.+-]+"), "letters, digits and _ . + -"),
    "partition": (re.compile(r"[A-Za-z0-9_.,:+-]+"), "letters, digits and _ . , : + -"),
    "account": (re.compile(r"[A-Za-z0-9_.,:+-]+"), "letters, digits and _ . , : + -"),
}


def template_text(name: str) -> str:
    """The raw text of template `name` (one of TEMPLATES)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown SLURM template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return resources.files("mpifed").joinpath(f"slurm_templates/{name}.sbatch").read_text()


def template_fields(name: str) -> set[str]:
    """The placeholder names that template `name` needs."""
    return set(_FIELD.findall(template_text(name)))


def sbatch_word_problem(name: str, value: str | None) -> str | None:
    """Why `value` cannot be the #SBATCH value of option `name` (a key of _SBATCH_WORDS), or None.
    An empty value or None means the option is left out, so it passes."""
    pattern, allowed = _SBATCH_WORDS[name]
    if not value or pattern.fullmatch(value):
        return None
    return f"{value!r}: use {allowed} only (it is written into an #SBATCH line, where a space or newline " \
           "would break it or add directives)"


def train_options(args: Sequence[str]) -> dict[str, object]:
    """`mpifed train`'s options in `args` (what follows `--`), read by that command's own parser
    (mpifed.trainargs) so that a typo fails when the script is rendered, not when the job starts in the
    queue. Returns its parameters, with --name and --out folded into `overrides` as train does. Raises
    ValueError for what train would refuse and for what the script itself decides (--job, --resume,
    --print-job)."""
    try:
        params = parse(args)
    except click.ClickException as err:
        raise ValueError(f"arguments after -- (for mpifed train): {err.format_message()}") from None
    refused = [("job_file", "--job: the script passes the job file itself; give it to mpifed slurm --job"),
               ("resume", "--resume: the script trains its job file from the start; for a job that resumes "
                          "itself after the time limit use mpifed slurm --requeue"),
               ("print_job", "--print-job: run `mpifed train --job FILE --print-job` here instead")]
    problems = [message for key, message in refused if params.get(key)]
    if problems:
        raise ValueError("arguments after -- (for mpifed train): " + "; ".join(problems))
    params["overrides"] = job_overrides(params["overrides"], params["name"], params["out"])
    return params


def render(template_name: str, **fields: object) -> str:
    """Template `template_name` with every `{{field}}` replaced by str(fields[field]).

    Raises ValueError naming every missing and every unknown field: an unknown field is almost
    always a typo or an option the template forgot, and both should fail loudly.
    """
    text = template_text(template_name)
    needed = set(_FIELD.findall(text))
    missing, unknown = sorted(needed - fields.keys()), sorted(fields.keys() - needed)
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing field(s) {', '.join(missing)}")
        if unknown:
            problems.append(f"unknown field(s) {', '.join(unknown)}")
        raise ValueError(f"template {template_name!r}: {'; '.join(problems)}; "
                         f"it takes exactly: {', '.join(sorted(needed))}")
    lines = []
    for line in text.splitlines():
        filled = _FIELD.sub(lambda m: str(fields[m.group(1)]), line)
        if filled.strip() or not _FIELD.search(line):  # keep the template's own blank lines
            lines.append(filled)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SlurmOptions:
    """What `mpifed slurm` asks of the cluster. Paths are used as given: pass absolute ones
    (the command does) so the script works from any directory."""

    job: str | None = None
    """Job TOML file for one run. Exactly one of `job` and `sweep` is set."""
    sweep: str | None = None
    """File listing job TOML files, one per line: renders a job array, one element per file."""
    sweep_size: int = 0
    """Number of job files in `sweep` (the command counts them); sets the array's index range."""
    array_parallel: int | None = None
    """Run at most this many array elements at once (the %k of --array); None: no cap."""
    nodes: int = 1
    gpus_per_node: int = 1
    """GPUs per node, one client rank each; 0 for a CPU-only run, which then needs `ntasks`."""
    ntasks: int | None = None
    """MPI ranks; default nodes * gpus_per_node + 1, the +1 being the server (rank 0)."""
    cpus_per_task: int = 1
    """CPU cores per rank (data loading, host-side codecs)."""
    time: str = "01:00:00"
    """Wall-time limit in a SLURM --time form, e.g. 30, 04:00:00, 1-12:00:00."""
    partition: str | None = None
    """None: the cluster's default partition."""
    account: str | None = None
    launcher: str = "srun"
    """srun: `srun --mpi=pmi2` (SLURM starts the ranks); mpirun: the MPICH wheel's hydra."""
    overcommit: bool = False
    """Allow more ranks than allocated CPUs (small test clusters, CPU-only smoke runs)."""
    requeue: bool = False
    """On the preemption signal, requeue the job after the ranks have checkpointed."""
    signal_seconds: int = 120
    """Send SIGUSR1 this many seconds before the time limit so that the ranks can checkpoint."""
    venv: str | None = None
    """Virtual environment to activate in the script; None: use the submitting shell's PATH."""
    job_name: str = "mpifed"
    log_dir: str = "runs/slurm"
    """Directory of SLURM's stdout/stderr files (slurm-<jobid>.out/.err); must exist at submit."""
    mpifed_args: tuple[str, ...] = field(default_factory=tuple)
    """Extra arguments appended to `mpifed train --job FILE`, e.g. ("--set", "train.rounds=10")."""

    def __post_init__(self) -> None:
        if self.ntasks is None:
            object.__setattr__(self, "ntasks", self.nodes * self.gpus_per_node + 1)
        problems = self._problems()
        if problems:
            raise ValueError("invalid SLURM options:\n  " + "\n  ".join(problems))

    def _problems(self) -> list[str]:
        p = []
        if (self.job is None) == (self.sweep is None):
            p.append("give exactly one of job (one run) and sweep (a job array)")
        if self.nodes < 1:
            p.append(f"nodes={self.nodes}: need at least 1")
        if self.gpus_per_node < 0:
            p.append(f"gpus_per_node={self.gpus_per_node}: need 0 (CPU only) or more")
        if self.ntasks < 2:
            p.append(f"ntasks={self.ntasks}: need the server and at least one client (2 or more); "
                     "with gpus_per_node=0 set ntasks")
        if self.nodes > 1:
            if self.gpus_per_node < 1:
                p.append("nodes>1 places one client per GPU: set gpus_per_node to 1 or more")
            elif self.ntasks != self.nodes * self.gpus_per_node + 1:
                p.append(f"ntasks={self.ntasks}: a multi-node run has one client per GPU plus the "
                         f"server, {self.nodes * self.gpus_per_node + 1} here; leave ntasks unset")
        if self.sweep is not None:
            if self.nodes != 1:
                p.append(f"nodes={self.nodes}: each array element is a one-node run; use nodes=1")
            if self.sweep_size < 1:
                p.append(f"sweep_size={self.sweep_size}: the sweep file lists no job file")
            if self.array_parallel is not None and self.array_parallel < 1:
                p.append(f"array_parallel={self.array_parallel}: need 1 or more, or None for no cap")
        if self.cpus_per_task < 1:
            p.append(f"cpus_per_task={self.cpus_per_task}: need at least 1")
        if not _TIME.fullmatch(self.time):
            p.append(f"time={self.time!r}: use a SLURM time such as 30, 04:00:00 or 1-12:00:00")
        elif 0 < time_seconds(self.time) <= self.signal_seconds:
            p.append(f"signal_seconds={self.signal_seconds} is not shorter than time={self.time!r} "
                     f"({time_seconds(self.time)} s): the stop signal would come at once (and with requeue, "
                     f"again on every restart); raise --time or lower --signal-seconds")
        if self.launcher not in LAUNCHERS:
            p.append(f"launcher={self.launcher!r}: choose one of {', '.join(LAUNCHERS)}")
        if not 0 < self.signal_seconds <= 65535:
            p.append(f"signal_seconds={self.signal_seconds}: SLURM accepts 1 to 65535")
        for name in ("job", "sweep", "venv", "log_dir"):
            value = getattr(self, name)
            if value is not None and _UNSAFE_PATH.search(value):
                p.append(f"{name}={value!r}: spaces, quotes, $ and backslashes break the batch "
                         "script; move or link it to a plain path")
        for name in _SBATCH_WORDS:
            problem = sbatch_word_problem(name, getattr(self, name))
            if problem:
                p.append(f"{name}={problem}")
        try:
            train_options(self.mpifed_args)
        except ValueError as err:
            p.append(str(err))
        else:
            if self.job is not None and Path(self.job).is_file():
                p += self.job_problems(self.job)
        return p

    def job_problems(self, job_file: str) -> list[str]:
        """What `mpifed train` would refuse in `job_file` with the arguments after `--`, found now
        rather than once the job leaves the queue, and more ranks than a fixed client count can use."""
        from mpifed.config import JobError, load_job

        train = train_options(self.mpifed_args)
        try:
            job = load_job(job_file, train["overrides"])
        except JobError as err:
            where = " with the arguments after --" if self.mpifed_args else ""
            return [f"mpifed train would refuse the job{where}: " + str(err).replace("\n", "\n  ")]
        p = []
        count = job.clients.count
        if count and self.ntasks > count + 1:
            p.append(f"{job_file} fixes clients.count = {count}, so at most {count + 1} ranks can train "
                     f"(one client each), but ntasks = {self.ntasks}; choose --nodes and --gpus-per-node with "
                     f"nodes x gpus <= {count} (or, on one node, --ntasks {count + 1} or fewer: each rank then "
                     f"trains several clients), or set clients.count = 0 in the job to use every rank")
        if train["auto_resume"] and not self.requeue and job.run.timestamp:
            p.append("--auto-resume after -- needs a fixed run directory: add --set run.timestamp=false and "
                     "a fixed --name, or use mpifed slurm --requeue, which sets both")
        return p

    @property
    def template(self) -> str:
        """The template these options fill."""
        if self.sweep is not None:
            return "array"
        return "multi-node" if self.nodes > 1 else "single-node"

    def launcher_line(self) -> str:
        """The command that starts the ranks inside the allocation."""
        if self.launcher == "mpirun":
            # Hydra reads the allocation from SLURM's environment and starts its proxies with srun.
            hosts = ' -f "$hostfile"' if self.template == "multi-node" else ""
            return f"mpirun{hosts} -n {self.ntasks}"
        # srun since 22.05 no longer inherits --cpus-per-task from sbatch: pass it again.
        words = ["srun", "--mpi=pmi2", f"--ntasks={self.ntasks}", f"--cpus-per-task={self.cpus_per_task}"]
        if self.overcommit:
            words.append("--overcommit")
        if self.template == "multi-node":
            words = ['SLURM_HOSTFILE="$hostfile"', *words, "--distribution=arbitrary"]
        return " ".join(words)

    def command_line(self) -> str:
        """`mpifed train` for the job file (or, in an array, the element's `$job_file`). With requeue,
        the run is named after the SLURM job id, which a requeued job (an array element too) keeps,
        and --auto-resume makes the restarted script continue from the checkpoint the signal wrote."""
        job = '"$job_file"' if self.sweep is not None else shlex.quote(self.job)
        words = ["mpifed", "train", "--job", job, *map(shlex.quote, self.mpifed_args)]
        if not self.requeue:
            return " ".join(words)
        if self.sweep is not None:  # each element's run: its job file's name and its own job id
            name = '"$(basename "$job_file" .toml)"'
        else:
            from mpifed.config import load_job

            # The run name as train will see it (a --name or --set run.name after -- included); quoted,
            # since it comes from the job file.
            overrides = train_options(self.mpifed_args)["overrides"]
            name = load_job(self.job, overrides).run.name if Path(self.job).is_file() else self.job_name
            name = shlex.quote(name)
        words += ["--name", f'{name}"-$SLURM_JOB_ID"', "--set", "run.timestamp=false", "--auto-resume"]
        return " ".join(words)

    def fields(self) -> dict[str, object]:
        """Exactly the placeholders of `self.template`, filled from these options."""
        values: dict[str, object] = {
            "job_name": self.job_name,
            "nodes": self.nodes,
            "ntasks": self.ntasks,
            "tasks_per_node": self.gpus_per_node + 1,
            "gpus_per_node": self.gpus_per_node,
            "cpus_per_task": self.cpus_per_task,
            "gpu_line": f"#SBATCH --gpus-per-node={self.gpus_per_node}" if self.gpus_per_node else "",
            "time": self.time,
            "partition_line": f"#SBATCH --partition={self.partition}" if self.partition else "",
            "account_line": f"#SBATCH --account={self.account}" if self.account else "",
            "overcommit_line": "#SBATCH --overcommit" if self.overcommit else "",
            "signal_seconds": self.signal_seconds,
            "requeue_flag": "--requeue" if self.requeue else "--no-requeue",
            "requeue": int(self.requeue),
            "log_dir": self.log_dir,
            "venv_line": f"source {self.venv}/bin/activate" if self.venv else "",
            "launcher": self.launcher_line(),
            "command": self.command_line(),
            "sweep_file": self.sweep,
            "sweep_size": self.sweep_size,
            "array": f"0-{self.sweep_size - 1}"
                     + (f"%{self.array_parallel}" if self.array_parallel else ""),
        }
        return {k: values[k] for k in template_fields(self.template)}


def submit(script: str, *, wait: bool = False, timeout: float | None = None,
           sbatch_args: tuple[str, ...] = ()) -> tuple[str, int | None]:
    """Submit a batch script with sbatch; return (job id, exit code or None when not waiting).

    With wait=True, sbatch blocks until the job ends and its exit status is the job's. A job still
    running after `timeout` seconds is cancelled (scancel) and TimeoutError raised, so a test never
    leaves a job behind.
    """
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *sbatch_args, script]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise RuntimeError("sbatch not found: install SLURM's client tools (Debian: slurm-client) "
                           "or run on a login node") from None
    # --parsable prints "<id>[;cluster]" at submission, before --wait starts waiting.
    job_id = proc.stdout.readline().strip().split(";")[0]
    if not job_id:
        proc.wait()
        raise RuntimeError(f"sbatch {script} failed (exit {proc.returncode}): {proc.stderr.read().strip()}")
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", job_id], check=False)
        proc.kill()
        proc.wait()
        raise TimeoutError(f"SLURM job {job_id} still running after {timeout} s; cancelled it") from None
    proc.stdout.close()
    proc.stderr.close()
    if not wait:
        return job_id, None
    return job_id, proc.returncode
