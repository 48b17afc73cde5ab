"""`mpifed bench data` at tiny sizes: every run measured, and the node layout no heavier than the rank layout."""

from __future__ import annotations

import math

import pytest
from rich.console import Console

from mpifed.bench.data import GIB, results_table, run_bench
from mpifed.bench.launch import find_tool


@pytest.mark.mpi
def test_bench_data_measures_both_layouts():
    if find_tool("mpirun") is None:
        pytest.skip("mpirun not found; install the MPICH wheel: pip install -e '.[mpich]'")
    runs = run_bench([20, 40], ["node", "rank"], ranks=3, samples=10, rounds=1, timeout=120)
    assert [(r.clients, r.layout) for r in runs] == [(20, "node"), (20, "rank"), (40, "node"), (40, "rank")]
    for r in runs:
        assert r.ok, r.error
        for value in (r.pss, r.rss, r.startup, r.wall):
            assert math.isfinite(value) and value > 0, r
        assert r.pss <= r.rss < 24 * GIB and r.startup < r.wall, r
    by = {(r.clients, r.layout): r for r in runs}
    # tiny splits: the layouts hold about the same, the window adds no copy; the ranks' ~1.6 GiB of PSS
    # (torch mostly) moves by ~0.1 GiB between launches (1.00x on one run, 1.06x on another)
    for n in (20, 40):
        assert by[n, "node"].pss <= 1.15 * by[n, "rank"].pss, (by[n, "node"], by[n, "rank"])
    console = Console(width=170, record=True)
    console.print(results_table(runs, 3, 10))
    assert "node/rank" in console.export_text()
