"""Atomic checkpoints of a run, and choosing one to resume from.

A checkpoint is everything a run needs to continue exactly as if uninterrupted: the server's model
(parameters, BatchNorm statistics and counters), its optimizer state (momentum), the next round, the
scaling policy's state, and each client's sampler cursor and error-feedback residual. No random
generator state is stored because mpifed has none: every stream is derived from (seed, purpose,
round, client) by mpifed.seeding, so a resumed round draws what the uninterrupted one would have.

Files: <run>/checkpoints/round-<R>.pt, written to a temporary name, fsynced, then renamed, so a
crash while writing leaves the previous checkpoint intact; the newest `keep` are kept. A write that
fails (a full disk) removes its temporary file and says what to do. Loading uses
torch.load(weights_only=True): tensors, numbers and strings only, never arbitrary objects. Not
stored: PowerSGD's warm-start factors (a resumed PowerSGD run restarts them cold).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from mpifed.diskfull import checkpoint_dir, checkpoint_files, resume_advice, write_whole
from mpifed.errors import InputError

FORMAT = 2
"""Bumped whenever resuming an older checkpoint would not continue the same run. 2: the random streams
derived afresh (mpifed.seeding), as format 1's could alias."""
_OLDER_FORMATS = {1: "its random streams (data partition, sampling, initial model, codecs) differ from this "
                     "version's"}


class CheckpointError(InputError, RuntimeError):
    """No usable checkpoint, or one that belongs to another job; the message says which and why."""


class OlderCheckpointError(CheckpointError):
    """A whole checkpoint that an older mpifed wrote in a format this one cannot continue."""


def identity(job, clients: int) -> dict:
    """What a checkpoint must share with the job that resumes it."""
    return dict(model=job.model.name, dataset=job.data.dataset, clients=clients, codec=job.compress.codec,
                seed=job.run.seed, local_steps=job.train.local_steps)


def save(run_dir: Path, payload: dict, keep: int, ranks: int) -> Path:
    """Write `payload` (which holds 'round') atomically and drop all but the newest `keep`. A failed
    write leaves no partial file; on a full disk it raises a DiskFullError that says how to go on
    with the run's `ranks` (torch.save alone reports that as "unexpected pos" in its zip writer)."""
    final = checkpoint_dir(run_dir) / checkpoint_name(payload["round"])
    write_whole(final, _saver(dict(payload, format=FORMAT)), f"checkpoint {final.name}",
                lambda: resume_advice(run_dir, ranks), lambda: _size(run_dir, payload))
    for old in checkpoint_files(run_dir)[keep:]:
        old.unlink()
    return final


def checkpoint_name(round_: int) -> str:
    """The file name of the checkpoint that resumes at round `round_`."""
    return f"round-{round_:08d}.pt"


def save_model(run_dir: Path, state: dict) -> Path:
    """Write the final model (a plain state dict) to <run>/model.pt as save() writes a checkpoint:
    whole or not at all, and a full disk said as such."""
    path = Path(run_dir) / "model.pt"

    def advice() -> str:
        found = checkpoint_files(run_dir)
        keeps = (f"{found[0]} holds the model of its round (torch.load(path, weights_only=True)['model'])"
                 if found else "train again with a run.out (--out) with room")
        return f"free space there; {keeps}"

    write_whole(path, _saver(state), f"the trained model {path.name}", advice)
    return path


def _saver(obj) -> Callable[[BinaryIO], object]:
    return lambda fh: torch.save(obj, fh)


def _size(run_dir: Path, payload: dict) -> int:
    """About what a checkpoint takes: as much as the one before, or at least its tensors."""
    found = checkpoint_files(run_dir)
    if found:
        return found[0].stat().st_size

    def nbytes(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.nelement() * value.element_size()
        if isinstance(value, dict):
            return sum(map(nbytes, value.values()))
        return sum(map(nbytes, value)) if isinstance(value, (list, tuple)) else 0

    return nbytes(payload)


def _load(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a corrupt checkpoint
        raise CheckpointError(f"{path} is unreadable ({type(err).__name__}: {str(err)[:200]})") from None
    older = payload.get("format") if isinstance(payload, dict) else None
    if type(older) is int and older in _OLDER_FORMATS:
        raise OlderCheckpointError(f"{path} was written by an older mpifed (checkpoint format {older}, this one "
                                   f"reads {FORMAT}): {_OLDER_FORMATS[older]}, so resuming would not continue the "
                                   "same run; start a new run, or resume with the mpifed version that wrote it")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "round" not in payload:
        raise CheckpointError(f"{path} is not an mpifed checkpoint of format {FORMAT}")
    return payload


def choose(run_dir: Path, identity: dict) -> tuple[Path, dict, list[str]]:
    """The newest readable checkpoint of `run_dir`, checked against this job's `identity`.

    A corrupt file is renamed to *.corrupt (kept apart, never deleted) and the next older one is
    tried; returns (path, payload, notes about what was set aside). A readable checkpoint whose
    identity differs (another model, dataset, client count, codec, seed or local_steps) is refused: resuming it would
    silently train something else. So is one whose name says another round than it holds (renamed, or
    copied in from another run of the job): it would be chosen by its name and resumed at its round.
    """
    notes = []
    for path in checkpoint_files(run_dir):
        try:
            payload = _load(path)
        except OlderCheckpointError:
            raise  # whole and not corrupt: keep it in place for the version that wrote it
        except CheckpointError as err:
            apart = path.with_suffix(".pt.corrupt")
            os.replace(path, apart)
            notes.append(f"{err}; moved to {apart.name} and fell back to the previous checkpoint")
            continue
        stored = payload.get("identity", {})
        wrong = {k: (stored.get(k), v) for k, v in identity.items() if stored.get(k) != v}
        if wrong:
            diffs = ", ".join(f"{k}: checkpoint {a!r}, job {b!r}" for k, (a, b) in wrong.items())
            fix = "resume with the job it was written for, or start a new run"
            if set(wrong) == {"clients"} and isinstance(stored["clients"], int):  # the launch, not the job
                fix = f"launch the resume with {stored['clients'] + 1} ranks (mpirun -n {stored['clients'] + 1})"
            raise CheckpointError(f"{path} belongs to a different job ({diffs}); {fix}")
        if path.name != checkpoint_name(payload["round"]):
            named = path.stem.removeprefix("round-").lstrip("0") or "0"
            raise CheckpointError(f"{path} holds round {payload['round']}, not round {named} as its name says: it was "
                                  f"renamed, or copied from another run of this job. Move it out of {path.parent} "
                                  f"to resume from the checkpoint before it, or, if it is this run's, give it its "
                                  f"own name, {checkpoint_name(payload['round'])} (nothing was changed)")
        return path, payload, notes
    raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(run_dir)}"
                          + (f" ({'; '.join(notes)})" if notes else "")
                          + "; the job's [checkpoint] every = K writes one every K rounds, and SIGTERM/SIGUSR1 "
                            "or a Ctrl-C write one before stopping")
