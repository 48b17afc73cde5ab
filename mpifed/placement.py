"""Which rank trains which client: the one place that maps client ids to ranks and back.

A client is data, state and a device profile; a rank is a process. With one client per client rank
(the default: client k on rank k + 1, rank 0 the server) the mapping is fixed. With more clients than
client ranks, or K of N clients sampled each round ("pooled"), the ranks are workers: each round the
server samples and places the clients (mpifed.sampling) and tells every worker which to train. Everything
that means "which client" asks a Placement instead of computing rank - 1.
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
    workers: int = 0    # client ranks; 0 = one per client
    per_round: int = 0  # clients sampled each round; 0 = all

    def __post_init__(self):
        if not self.workers:
            object.__setattr__(self, "workers", self.n_clients)

    @classmethod
    def one_per_rank(cls, world_size: int) -> Placement:
        """Client k on rank k + 1: every rank but the server hosts one client."""
        return cls(world_size - 1)

    @classmethod
    def of_job(cls, n_clients: int, world_size: int, per_round: int) -> Placement:
        """N clients on the world's client ranks, K = per_round of them (0: all) each round."""
        return cls(n_clients, world_size - 1, per_round if per_round < n_clients else 0)

    @property
    def pooled(self) -> bool:
        """Clients are placed each round (more clients than client ranks, or sampled), not fixed."""
        return self.workers != self.n_clients or bool(self.per_round)

    @property
    def round_size(self) -> int:
        """K: the clients that train in one round."""
        return self.per_round or self.n_clients

    @property
    def world_size(self) -> int:
        return self.workers + 1

    @property
    def worker_ranks(self) -> list[int]:
        """The ranks that train clients: all but the server."""
        return list(range(1, self.workers + 1))

    def rank_of(self, client: int) -> int:
        """The rank that trains `client` (one client per rank only: pooled clients move every round)."""
        if not 0 <= client < self.n_clients:
            raise ValueError(f"client {client} does not exist: the job has clients 0..{self.n_clients - 1}")
        if self.pooled:
            raise ValueError(f"client {client} has no fixed rank: pooled clients are placed each round")
        return client + 1

    def clients_on(self, rank: int) -> list[int]:
        """The clients `rank` always trains (none on the server, none fixed on a pooled worker)."""
        return [] if rank == SERVER or self.pooled else [rank - 1]

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
        if rank == SERVER:
            return "server"
        on = self.clients_on(rank)
        return "client " + ", ".join(map(str, on)) if on else "worker"

    def names(self, ranks: Sequence[int]) -> str:
        """Ranks with the clients they train, for the roll call: 'rank 2 (client 1)'."""
        if len(ranks) == 1:
            return f"rank {ranks[0]} ({self.role(ranks[0])})"
        clients = [str(k) for r in ranks for k in self.clients_on(r)]
        if not clients:
            return f"ranks {', '.join(map(str, ranks))} ({'server and ' * (SERVER in ranks)}workers)"
        return f"ranks {', '.join(map(str, ranks))} (clients {', '.join(clients)})"
