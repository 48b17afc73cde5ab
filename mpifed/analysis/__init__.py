"""Offline analysis of run logs (run.h5): load a log, summarise it, plot it.

Nothing here needs MPI or torch, so a laptop with the logs copied off the cluster is enough:

    from mpifed.analysis import load_run, summarize
    run = load_run("runs/a/run.h5")
    print(summarize(run).throughput)
"""

from mpifed.analysis.load import Run, RunLogError, load_run
from mpifed.analysis.summary import Summary, summarize

__all__ = ["Run", "RunLogError", "Summary", "load_run", "summarize"]
