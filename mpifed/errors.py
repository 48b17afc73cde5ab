"""The base of the errors a user can act on: shown as their message alone, without a traceback."""


class InputError(Exception):
    """Something the user gave (a job field, a dataset, a memory budget, a checkpoint) is wrong, and the
    message says what and how to fix it. A traceback would bury that, so a failing rank prints the
    message only (mpifed.cluster.run_or_abort); every other exception keeps its traceback."""
