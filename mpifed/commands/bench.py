"""`mpifed bench ...`: benchmarks that measure ratios side by side in one run (not timed tests)."""

from __future__ import annotations

import click

from mpifed.bench.compress import compress
from mpifed.bench.exchange import exchange
from mpifed.bench.memory import memory
from mpifed.bench.plan import plan
from mpifed.bench.rounds import rounds


@click.group("bench")
def bench():
    """Benchmarks; each prints its measured ratios."""


bench.add_command(exchange)
bench.add_command(compress)
bench.add_command(memory)
bench.add_command(plan)
bench.add_command(rounds)
