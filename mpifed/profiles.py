"""Emulating a heterogeneous client on uniform hardware: slower compute, a slower link.

The emulation only ever *adds* time (sleeping), and every added second is logged as t_emul, so
the run log says how much of a measured time is real. Memory budgets are enforced by the memory
model, not here.
"""

from __future__ import annotations

import time

from mpifed.config import Profile


def compute_delay(profile: Profile, measured: float) -> float:
    """Extra seconds that make `measured` compute take as long as on a device `speed` times as fast."""
    return measured * (1.0 / profile.speed - 1.0) if profile.speed < 1.0 else 0.0


def link_delay(profile: Profile, nbytes: int, measured: float) -> float:
    """Extra seconds so a transfer of `nbytes` takes latency + nbytes/bandwidth (never less than measured)."""
    if profile.bandwidth <= 0 and profile.latency <= 0:
        return 0.0
    target = profile.latency + (nbytes / profile.bandwidth if profile.bandwidth > 0 else 0.0)
    return max(0.0, target - measured)


def sleep(seconds: float) -> float:
    if seconds > 0:
        time.sleep(seconds)
    return seconds
