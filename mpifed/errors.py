"""The exceptions that end a job with their message alone, without a traceback: bad input a user can fix, a
stop asked for during start-up, a rank that stopped answering. Free of torch and MPI, like the job checks."""


class InputError(Exception):
    """Something the user gave (a job field, a dataset, a memory budget, a checkpoint) is wrong, and the
    message says what and how to fix it. A traceback would bury that, so a failing rank prints the
    message only (mpifed.cluster.run_or_abort); every other exception keeps its traceback."""


class StoppedEarly(BaseException):
    """A signal stopped the job during start-up (data, memory sizing, probe rounds): nothing is trained
    yet, so there is nothing to checkpoint; the job exits with STOPPED. `agreed`: every rank raised it
    at the same step (the ranks then simply return); else this rank alone, at once (the job is aborted).
    Like KeyboardInterrupt, not an Exception: code that reports a failure to the other ranks before
    raising it (which waits for them) must not hold it up."""

    def __init__(self, why: str, agreed: bool = True):
        super().__init__(why)
        self.agreed = agreed


class RankTimeout(RuntimeError):
    """A collective waited longer than comm.timeout: some rank stopped answering (mpifed.exchange)."""
