"""`mpifed info`: what this launch sees: MPI library, world size, hosts, GPUs, versions."""

from __future__ import annotations

import click


@click.command("info")
def info():
    """Print the MPI library, world size, each rank's host and device, and package versions."""
    import platform

    import h5py
    import mpi4py
    import numpy
    import torch
    import torchvision
    from mpi4py import MPI

    import mpifed
    from mpifed.cluster import init_world
    from mpifed.placement import Placement

    world = init_world()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rows = world.comm.gather((world.rank, world.host, world.local_rank, world.cores, gpus), root=0)
    if not world.is_server:
        return
    click.echo(f"mpifed       {mpifed.__version__}")
    click.echo(f"python       {platform.python_version()}")
    click.echo(f"torch        {torch.__version__} (CUDA {torch.version.cuda or '-'})")
    click.echo(f"torchvision  {torchvision.__version__}")
    click.echo(f"mpi4py       {mpi4py.__version__}")
    click.echo(f"h5py         {h5py.__version__} (HDF5 {h5py.version.hdf5_version})")
    click.echo(f"numpy        {numpy.__version__}")
    click.echo(f"MPI library  {MPI.Get_library_version().strip().splitlines()[0]}")
    click.echo(f"MPI standard {'.'.join(map(str, MPI.Get_version()))}")
    click.echo(f"world size   {world.size} (rank 0 = server, {world.size - 1} clients)")
    click.echo(f"hosts        {len({r[1] for r in rows})}")
    placement = Placement.one_per_rank(world.size)
    for rank, host, local, cores, ngpu in rows:
        role = placement.role(rank)
        device = f"cuda:{local % ngpu}" if ngpu else "cpu"
        click.echo(f"  rank {rank:>3}  {role:<10} {host}  local rank {local}  cores {cores}  device {device}")
