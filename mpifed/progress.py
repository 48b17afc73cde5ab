"""Rank 0's view of a run: a live bar on a terminal, or one plain line per interval in a log file."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn


def choose_mode(mode: str) -> str:
    """auto: a live bar when someone watches a terminal, else one line per interval.

    Under mpirun a rank's stdout is a pipe even when the user sits at a terminal, so look at the
    launcher's stdout instead (Linux /proc; rank 0 runs on the launching host under mpirun/srun)."""
    if mode != "auto":
        return mode
    if sys.stdout.isatty() or _launcher_on_terminal():
        return "bar"
    return "log"


def _launcher_on_terminal() -> bool:
    pid = os.getppid()
    for _ in range(6):  # rank <- proxy <- mpiexec/srun, with some slack
        try:
            name = open(f"/proc/{pid}/comm").read().strip()
            if name.startswith(("mpiexec", "mpirun", "srun", "orterun", "prterun")):
                return os.path.realpath(f"/proc/{pid}/fd/1").startswith(("/dev/pts/", "/dev/tty"))
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


class Progress:
    def __init__(self, mode: str, rounds: int, every: int):
        self.mode, self.rounds, self.every = choose_mode(mode), rounds, max(1, every)
        self.console = Console(force_terminal=self.mode == "bar", soft_wrap=True, highlight=False)
        self.bar = None
        self.samples, self.seconds = 0, 0.0  # since the last line
        if self.mode == "bar":
            self.bar = RichProgress(TextColumn("round"), MofNCompleteColumn(), BarColumn(),
                                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                    console=self.console, refresh_per_second=4)
            self.task = self.bar.add_task("train", total=rounds, status="")
            self.bar.start()

    def print(self, text: str) -> None:
        if self.mode != "off":
            self.console.print(text)

    def warn(self, text: str) -> None:
        """Problems go to stderr whatever the display mode, so a log file keeps them."""
        print(text, file=sys.stderr, flush=True)

    def update(self, done: int, loss: float, acc: float | None, samples: int, seconds: float) -> None:
        """One round done. The rate shown is over every round since the last line (evaluation
        included), not the last round's alone: lines fall on evaluation rounds, which are slow."""
        self.samples += samples
        self.seconds += seconds
        status = (f"loss {loss:.3f}  acc {'-' if acc is None else f'{acc:.3f}'}  "
                  f"{self.samples / self.seconds:,.0f} samples/s")
        line_due = done % self.every == 0 or done == self.rounds
        if self.bar is not None:
            self.bar.update(self.task, completed=done, status=status)
        elif self.mode == "log" and line_due:
            print(f"round {done}/{self.rounds}  {status}", flush=True)
        if line_due:
            self.samples, self.seconds = 0, 0.0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
