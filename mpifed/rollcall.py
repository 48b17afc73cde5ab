"""Naming the stuck rank when a collective times out: rank 0 calls the roll.

A timed-out wait cannot tell which rank is missing: a non-blocking collective either completes or
not. So rank 0, when its own wait times out, sends every other rank a roll call (point-to-point, on
tags nothing else uses); a rank that is waiting in a collective answers from inside its wait loop
with where it is: the collective's number (every rank starts the same collectives in the same order),
its kind and how long it has waited. A rank that does not answer within the grace is busy outside
MPI: stuck in its computation or I/O, stopped, or on a lost node. A rank one collective ahead or
behind is normal (a client's part of a reduce to rank 0 ends once its data is sent, so it waits in
the next broadcast); one in another kind of collective under the same number is a bug. Nothing here
runs until a wait has lasted ANSWER_AFTER seconds, so a round pays only a counter for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mpifed.placement import Placement

ROOT = 0
CALL_TAG, ANSWER_TAG = 7301, 7302
ANSWER_AFTER = 0.5
"""Seconds a wait lasts before it looks for a roll call: far below any comm.timeout that makes sense,
far above a healthy round's wait."""
LISTEN_EVERY = 0.02
"""Seconds between two looks for a call in a long wait: answers come well within the grace, and a
waiting rank does not spend its polls probing."""

KINDS = ("collective", "barrier", "broadcast", "reduce", "allreduce", "allgather", "gather", "scatter", "emulated")
"""What a rank waits in; "emulated": not a collective but an emulated profile's sleep before the next one."""


def grace(timeout: float) -> float:
    """Seconds rank 0 gives the others to answer its call: ranks in a wait answer within a poll, so
    this only needs to cover a wait that has just begun (ANSWER_AFTER) and a loaded machine."""
    return min(5.0, max(2.0, timeout))


@dataclass(frozen=True)
class Position:
    """Where a rank waits: its collective's number and kind, and the seconds it has waited there."""
    number: int
    kind: str
    waited: float = 0.0

    def encode(self) -> np.ndarray:
        return np.array([self.number, KINDS.index(self.kind), self.waited], dtype=np.float64)

    @classmethod
    def decode(cls, row: np.ndarray) -> Position:
        return cls(int(row[0]), KINDS[int(row[1])], float(row[2]))

    def describe(self) -> str:
        return f"collective {self.number} (a {self.kind})"


def answer(comm: MPI.Intracomm, here: Position) -> bool:
    """On a rank other than 0, inside a long wait: answer rank 0's roll call, if one came."""
    if not comm.Iprobe(source=ROOT, tag=CALL_TAG):
        return False
    comm.Recv([np.empty(0, dtype=np.uint8), MPI.BYTE], source=ROOT, tag=CALL_TAG)
    comm.Send(here.encode(), dest=ROOT, tag=ANSWER_TAG)
    return True


class RollCall:
    """Rank 0's side: call every other rank, then collect the answers that come."""

    def __init__(self, comm: MPI.Intracomm, placement: Placement | None = None):
        self.placement = placement or Placement.one_per_rank(comm.size)  # names each rank's clients
        self.ranks = range(1, comm.size)
        self.rows = np.full((comm.size, 3), np.nan)
        empty = [np.empty(0, dtype=np.uint8), MPI.BYTE]
        self.calls = [comm.Isend(empty, dest=r, tag=CALL_TAG) for r in self.ranks]
        self.answers = [comm.Irecv(self.rows[r], source=r, tag=ANSWER_TAG) for r in self.ranks]

    def complete(self) -> bool:
        """Every rank answered."""
        return MPI.Request.Testall(self.answers)

    def report(self, here: Position, waited_for_answers: float) -> str:
        """What the answers (and the silences) say, for the timeout's message."""
        MPI.Request.Testall(self.answers)
        silent, at, emulated = [], {}, []
        for r in self.ranks:
            if np.isnan(self.rows[r, 0]):
                silent.append(r)
            else:
                there = Position.decode(self.rows[r])
                if there.kind == "emulated":
                    emulated.append((r, there))
                    continue
                at.setdefault((there.number, there.kind), []).append(r)
        parts, names = [], self.placement.names
        for r, there in emulated:
            parts.append(f"{names([r])} is in an emulated wait (its profile's slower compute or link), "
                         f"{there.waited:.0f} s so far, before collective {there.number}: not stuck, but its "
                         f"emulated round takes longer than comm.timeout")
        if silent:
            parts.append(f"{names(silent)} did not answer within {waited_for_answers:.0f} s: busy outside MPI "
                         f"(stuck in its computation or I/O, stopped, or on a lost node)")
        for (number, kind), ranks in sorted(at.items()):
            verb = "waits" if len(ranks) == 1 else "wait"
            if number != here.number:
                step = f"{abs(number - here.number)} {'ahead' if number > here.number else 'behind'}"
                parts.append(f"{names(ranks)} {verb} in {Position(number, kind).describe()}, {step}")
            elif kind != here.kind:
                parts.append(f"{names(ranks)} {verb} in collective {number} but in a {kind}, not a {here.kind}: "
                             f"the ranks disagree on their collectives (a bug in mpifed; please report it)")
            else:
                parts.append(f"{names(ranks)} {verb} in the same collective")
        if not silent and not emulated and all(where == (here.number, here.kind) for where in at):
            parts.append("no rank is missing from it, so MPI itself did not complete it (a network fault?)")
        return "; ".join(parts)

