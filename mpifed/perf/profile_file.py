"""The profile file that `mpifed profile` and a planned `mpifed train` write and `mpifed plan` reads (JSON).

    {"format": "mpifed-profile", "version": 1,
     "n_ranks": 4, "model_bytes": 44696104, "payload_bytes": 44696104, "up": "reduce",
     "metrics_bytes": 128, "server_seconds": 0.004,
     "clients": [{"client": 0, "rank": 1, "device": "cuda:0", "max_batch": 512,
                  "curve": {"a": .., "c": .., "t_floor": .., "rel_rms": ..},
                  "samples": [[1, 0.011], [2, 0.011], ...]}, ...],
     "comm": {"costs": {"bcast": {"alpha": .., "beta": .., "rel_rms": ..}, ...},
              "samples": [["bcast", 4, 1024, 3.1e-05], ...]}}

Plain JSON, so a person can read it and edit a cap or a curve by hand to ask "what if".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mpifed.perf.comm import CommModel
from mpifed.perf.curves import ComputeCurve

FORMAT, VERSION = "mpifed-profile", 1


@dataclass(frozen=True)
class ClientProfile:
    """One client's measured curve and the largest batch the planner may give it (planning.plan_cap:
    the profiled range, or the memory cap and the global batch)."""

    client: int
    rank: int
    device: str
    max_batch: int
    curve: ComputeCurve
    samples: tuple[tuple[int, float], ...] = field(default=(), compare=False)

    def to_dict(self) -> dict:
        return {"client": self.client, "rank": self.rank, "device": self.device,
                "max_batch": self.max_batch, "curve": self.curve.to_dict(),
                "samples": [[b, t] for b, t in self.samples]}

    @classmethod
    def from_dict(cls, d: dict) -> "ClientProfile":
        return cls(int(d["client"]), int(d["rank"]), str(d.get("device", "")), int(d["max_batch"]),
                   ComputeCurve.from_dict(d["curve"]),
                   tuple((int(b), float(t)) for b, t in d.get("samples", ())))


@dataclass(frozen=True)
class Profile:
    """Everything the planner needs: per-client curves and caps, the comm model, round sizes.

    model_bytes: broadcast buffer, bytes. payload_bytes: one client's upload, bytes (the codec's
    byte count). up: "reduce" or "gatherv". metrics_bytes: per-rank metrics row, bytes.
    server_seconds: server decode + aggregate + optimizer step, seconds.
    """

    n_ranks: int
    model_bytes: int
    payload_bytes: int
    clients: tuple[ClientProfile, ...]
    comm: CommModel
    up: str = "reduce"
    metrics_bytes: int = 0
    server_seconds: float = 0.0

    @property
    def curves(self) -> list[ComputeCurve]:
        return [c.curve for c in self.clients]

    @property
    def max_batches(self) -> list[int]:
        return [c.max_batch for c in self.clients]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "n_ranks": self.n_ranks,
                "model_bytes": self.model_bytes, "payload_bytes": self.payload_bytes, "up": self.up,
                "metrics_bytes": self.metrics_bytes, "server_seconds": self.server_seconds,
                "clients": [c.to_dict() for c in self.clients], "comm": self.comm.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(f"not an {FORMAT} v{VERSION} file (format={d.get('format')!r}, "
                             f"version={d.get('version')!r}); re-create it with `mpifed profile`")
        try:
            return cls(int(d["n_ranks"]), int(d["model_bytes"]), int(d["payload_bytes"]),
                       tuple(ClientProfile.from_dict(c) for c in d["clients"]),
                       CommModel.from_dict(d["comm"]), str(d.get("up", "reduce")),
                       int(d.get("metrics_bytes", 0)), float(d.get("server_seconds", 0.0)))
        except KeyError as e:
            raise ValueError(f"profile file lacks the field {e}; re-create it with `mpifed profile`") from None


def save_profile(profile: Profile, path: str | os.PathLike) -> None:
    """Write atomically (temp file + rename), so a reader never sees half a profile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    os.replace(tmp, path)


def load_profile(path: str | os.PathLike) -> Profile:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-create it with `mpifed profile`") from None
    return Profile.from_dict(data)
