"""Is a round bound by compute or by its exchange? One row per run log, side by side (e.g. one run per
data plane, comm.data = "mpi-host" and "nccl", of the same job):

    python analysis/data_planes.py runs/plane-mpi-host runs/plane-nccl [--allreduce SECONDS]

Per run, medians over the steady rounds (the first 3 and those with an evaluation left out): the
slowest client's compute, the model broadcast as a client receives it, the update's encoding and
collective (the slowest client's t_up less its straggler wait), the server's round, and the round
over the compute. `--allreduce` is the engine's own all-reduce time for the model's bytes (measured
apart, e.g. by .ci/gpu-check): the table then adds round / (compute + all-reduce), the GPU target's
ratio (at most 1.5).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mpifed.analysis import load_run  # noqa: E402
from mpifed.analysis.summary import server_rank, steady_rounds  # noqa: E402


def plane_row(path) -> dict:
    """The steady rounds' medians of one run, in milliseconds (see the module docstring)."""
    run = load_run(path)
    keep = steady_rounds(run)
    it, clients = run.iter, run.clients

    def slowest(name):
        return float(np.median(np.nanmax(it[name][keep][:, clients], axis=1))) * 1e3

    up = np.nanmax((it["t_up"] - it["t_wait"])[keep][:, clients], axis=1)
    return dict(run=run.name, plane=str(run.attrs.get("data_plane", "mpi-host")),
                model=run.job.get("model", {}).get("name", "?"), rounds=len(keep),
                compute=slowest("t_compute"), down=slowest("t_down"), encode=slowest("t_encode"),
                up=float(np.median(up)) * 1e3, round=float(np.median(it["t_iter"][keep, server_rank(run)])) * 1e3)


def render(rows: list[dict], allreduce_ms: float | None = None) -> str:
    head = ["run", "plane", "model", "rounds", "compute ms", "down ms", "encode ms", "up ms", "round ms",
            "round / compute"]
    if allreduce_ms is not None:
        head += ["round / (compute + all-reduce)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["plane"], r["model"], str(r["rounds"])] + [
            f"{r[k]:.1f}" for k in ("compute", "down", "encode", "up", "round")] + [f"{r['round'] / r['compute']:.2f}x"]
        if allreduce_ms is not None:
            cells.append(f"{r['round'] / (r['compute'] + allreduce_ms):.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories or run.h5 files")
    parser.add_argument("--allreduce", type=float, help="seconds of the engine's own all-reduce of the model")
    args = parser.parse_args(argv)
    allreduce = None if args.allreduce is None else 1e3 * args.allreduce
    print(render([plane_row(p) for p in args.runs], allreduce))
    return 0


if __name__ == "__main__":
    sys.exit(main())
