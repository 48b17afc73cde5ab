"""mpifed: MPI-distributed federated learning with large batches.

Rank 0 is the federated server, ranks 1..N-1 are clients. See README.md for the launch commands, and
the docstrings of mpifed.server and mpifed.client for how one round flows.
"""

__version__ = "0.1.0"
