"""`mpifed bench ...`: benchmarks that measure ratios side by side in one run (not timed tests).

The benchmarks load on first use: mpifed/bench/compress.py imports torch and the models, and every
`mpifed` command (analyze, watch, --help) would otherwise pay for that at start-up.
"""

from __future__ import annotations

import importlib

import click

#: Subcommand name -> the module under mpifed.bench that defines it (a click command of the same name).
BENCHMARKS = {name: f"mpifed.bench.{name}"
              for name in ("exchange", "compress", "memory", "plan", "rounds", "clients", "data")}


class LazyBenchGroup(click.Group):
    """A group that imports a benchmark's module only when that benchmark (or `bench --help`) needs it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*BENCHMARKS, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in BENCHMARKS and name not in self.commands:
            self.add_command(getattr(importlib.import_module(BENCHMARKS[name]), name), name)
        return super().get_command(ctx, name)


@click.group("bench", cls=LazyBenchGroup)
def bench():
    """Benchmarks; each prints its measured ratios."""
