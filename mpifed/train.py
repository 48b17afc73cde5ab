"""`mpifed train`, after the command line is parsed: prepare the run on rank 0, then each rank's role.

    mpirun -n 4 mpifed train                       # embedded default job, 3 clients
    mpirun -n 16 mpifed train --job jobs/hetero15.toml
    srun --mpi=pmi2 mpifed train --job jobs/x.toml
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import h5py
import mpi4py
import torch
from mpi4py import MPI

import mpifed
from mpifed.client import prepare_client, run_client
from mpifed.cluster import World
from mpifed.config import Job, JobError, load_job, resolve_clients
from mpifed.progress import Progress
from mpifed.runlog import RANK_COLUMNS, RunWriter
from mpifed.server import run_server
from mpifed.scaling import check_scaling
from mpifed.session import Session, agree_batches, open_session


def prepare(world: World, job_file: str | None, overrides: list[str]) -> tuple[Job, Path | None]:
    """Rank 0 reads and validates the job and creates the run directory; every rank gets the
    resolved job. A bad job ends every rank with the same error before any training communication."""
    text, error, run_dir = None, None, None
    if world.is_server:
        try:
            job = load_job(job_file, overrides)
            resolve_clients(job, world.size)
            run_dir = _make_run_dir(job)
            (run_dir / "job.toml").write_text(job.to_toml())
            text = job.to_toml()
        except JobError as err:
            error = str(err)
    text, error = world.comm.bcast((text, error), root=0)
    if error:
        raise JobError(error)
    return load_job(text=text), run_dir


def _make_run_dir(job: Job) -> Path:
    name = job.run.name
    if job.run.timestamp:
        name += datetime.datetime.now().strftime("-%Y%m%d-%H%M%S")
    path = Path(job.run.out) / name
    if path.exists():
        raise JobError(f"run directory {path} already exists; choose another run.name (--name) or "
                       f"remove it (nothing was written)")
    path.mkdir(parents=True)
    return path


def train(world: World, job: Job, run_dir: Path | None, progress_mode: str) -> dict | None:
    s = open_session(world, job)
    setup = None if world.is_server else prepare_client(s)  # partition, data, memory sizing
    agree_batches(s, 0 if setup is None else setup.batch)   # waits politely while clients prepare
    check = check_scaling(job.scaling, s.global_batch, s.n_clients)
    if check:
        raise JobError("after memory sizing: " + "; ".join(check))
    if not world.is_server:
        run_client(s, setup)
        return None
    infos = world.comm.gather(None, root=0)
    infos[0] = dict(role="server", host=world.host, device=str(s.device), profile="-", emulated=False,
                    speed=1.0, memory_budget=0.0, bandwidth=0.0, latency=0.0, data_size=len(s.dataset),
                    requested_batch=0, max_batch=0, batch=s.global_batch)
    ranks = {key: [info[key] for info in infos] for key in RANK_COLUMNS}
    writer = RunWriter(run_dir / "run.h5", _attrs(world, s), ranks)
    for k, info in enumerate(infos[1:]):
        if info["memory_model"]:
            writer.set_model_attrs(f"memory.client{k}", info["memory_model"])
    messages = [info["message"] for info in infos[1:] if info["message"]]
    progress = Progress(progress_mode, job.train.rounds, job.train.eval_every or job.train.rounds)
    for message in messages:
        progress.print(f"mpifed: memory model: {message}")
    progress.print(f"mpifed: {s.n_clients} clients on {len(set(ranks['host']))} host(s), model {job.model.name} "
                   f"({s.model.n_params:,} parameters), global batch {s.global_batch}, log {run_dir / 'run.h5'}")
    try:
        final = run_server(s, writer, run_dir, progress)
    finally:
        writer.close()
        progress.close()
    progress.print(f"mpifed: done: test accuracy {final['test_acc']:.4f}, test loss {final['test_loss']:.4f} "
                   f"after {final['round']} rounds ({final['wall']:.1f} s); model in {run_dir / 'model.pt'}")
    return final


def _attrs(world: World, s: Session) -> dict:
    return dict(mpifed_version=mpifed.__version__, torch_version=torch.__version__,
                mpi4py_version=mpi4py.__version__, h5py_version=h5py.__version__,
                mpi_library=MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0],
                job=s.job.to_toml(), command=" ".join(sys.argv), world_size=world.size,
                started=datetime.datetime.now().isoformat(timespec="seconds"),
                wait_mode="sleep" if s.exchange.polite else "poll",
                n_params=s.model.n_params, n_buffers=s.model.n_buffers)
