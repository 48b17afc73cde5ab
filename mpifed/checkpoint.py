"""Atomic checkpoints of a run, and choosing one to resume from.

A checkpoint is everything a run needs to continue exactly as if uninterrupted: the server's model
(parameters, BatchNorm statistics and counters), its optimizer state (momentum), the next round, the
scaling policy's state, and each client's sampler cursor and error-feedback residual. No random
generator state is stored because mpifed has none: every stream is derived from (seed, purpose,
round, client), so a resumed round draws what the uninterrupted one would have.

Files: <run>/checkpoints/round-<R>.pt, written to a temporary name, fsynced, then renamed, so a
crash while writing leaves the previous checkpoint intact; the newest `keep` are kept. Loading uses
torch.load(weights_only=True): tensors, numbers and strings only, never arbitrary objects. Not
stored: PowerSGD's warm-start factors (a resumed PowerSGD run restarts them cold).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mpifed.errors import InputError

FORMAT = 1


class CheckpointError(InputError, RuntimeError):
    """No usable checkpoint, or one that belongs to another job; the message says which and why."""


def identity(job, clients: int) -> dict:
    """What a checkpoint must share with the job that resumes it."""
    return dict(model=job.model.name, dataset=job.data.dataset, clients=clients, codec=job.compress.codec,
                seed=job.run.seed, local_steps=job.train.local_steps)


def directory(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, payload: dict, keep: int) -> Path:
    """Write `payload` (which holds 'round') atomically and drop all but the newest `keep`."""
    folder = directory(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"round-{payload['round']:08d}.pt"
    tmp = final.with_suffix(".pt.tmp")
    with open(tmp, "wb") as fh:
        torch.save(dict(payload, format=FORMAT), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    for old in candidates(run_dir)[keep:]:
        old.unlink()
    return final


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoint files, newest first."""
    return sorted(directory(run_dir).glob("round-*.pt"), reverse=True)


def _load(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a corrupt checkpoint
        raise CheckpointError(f"{path} is unreadable ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "round" not in payload:
        raise CheckpointError(f"{path} is not an mpifed checkpoint of format {FORMAT}")
    return payload


def choose(run_dir: Path, identity: dict) -> tuple[Path, dict, list[str]]:
    """The newest readable checkpoint of `run_dir`, checked against this job's `identity`.

    A corrupt file is renamed to *.corrupt (kept apart, never deleted) and the next older one is
    tried; returns (path, payload, notes about what was set aside). A readable checkpoint whose
    identity differs (another model, client count, codec, seed) is refused: resuming it would
    silently train something else.
    """
    notes = []
    for path in candidates(run_dir):
        try:
            payload = _load(path)
        except CheckpointError as err:
            apart = path.with_suffix(".pt.corrupt")
            os.replace(path, apart)
            notes.append(f"{err}; moved to {apart.name} and fell back to the previous checkpoint")
            continue
        stored = payload.get("identity", {})
        wrong = {k: (stored.get(k), v) for k, v in identity.items() if stored.get(k) != v}
        if wrong:
            diffs = ", ".join(f"{k}: checkpoint {a!r}, job {b!r}" for k, (a, b) in wrong.items())
            raise CheckpointError(f"{path} belongs to a different job ({diffs}); resume with the job it "
                                  f"was written for, or start a new run")
        return path, payload, notes
    raise CheckpointError(f"no usable checkpoint in {directory(run_dir)}"
                          + (f" ({'; '.join(notes)})" if notes else "")
                          + "; the job's [checkpoint] every = K writes one every K rounds, and SIGTERM/SIGUSR1 "
                            "write one before stopping")
