"""Which rank trains which client: the one place that maps client ids to ranks and back.

A client is data, state and a device profile; a rank is a process. Today each client rank hosts one
client (client k on rank k + 1, rank 0 the server), and everything that means "which client" asks a
Placement instead of computing rank - 1, so that hosting several clients on a rank, or sampling
clients each round, changes this module and not the loops that use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

SERVER = 0
"""The server's rank: it hosts no client."""

T = TypeVar("T")


@dataclass(frozen=True)
class Placement:
    n_clients: int

    @classmethod
    def one_per_rank(cls, world_size: int) -> Placement:
        """Client k on rank k + 1: every rank but the server hosts one client."""
        return cls(world_size - 1)

    @property
    def world_size(self) -> int:
        return self.n_clients + 1

    def rank_of(self, client: int) -> int:
        """The rank that trains `client`."""
        if not 0 <= client < self.n_clients:
            raise ValueError(f"client {client} does not exist: the job has clients 0..{self.n_clients - 1}")
        return client + 1

    def clients_on(self, rank: int) -> list[int]:
        """The clients `rank` trains (none on the server)."""
        return [] if rank == SERVER else [rank - 1]

    def client_on(self, rank: int) -> int | None:
        """The one client `rank` hosts, or None on the server."""
        on = self.clients_on(rank)
        return on[0] if on else None

    @property
    def client_ranks(self) -> list[int]:
        """Per client, the rank that trains it: per-rank rows (rank 0 first) indexed by this list are
        per-client rows in client order."""
        return [self.rank_of(k) for k in range(self.n_clients)]

    def by_client(self, per_rank: Sequence[T]) -> list[T]:
        """Per-rank values (rank 0 first, e.g. a pickled start-up gather) reordered as one per client."""
        return [per_rank[r] for r in self.client_ranks]

    def role(self, rank: int) -> str:
        """'server', or the client(s) a rank trains, for messages."""
        on = self.clients_on(rank)
        return "server" if not on else "client " + ", ".join(map(str, on))

    def names(self, ranks: Sequence[int]) -> str:
        """Ranks with the clients they train, for the roll call: 'rank 2 (client 1)'."""
        if len(ranks) == 1:
            return f"rank {ranks[0]} ({self.role(ranks[0])})"
        clients = [str(k) for r in ranks for k in self.clients_on(r)]
        return f"ranks {', '.join(map(str, ranks))} (clients {', '.join(clients)})"
