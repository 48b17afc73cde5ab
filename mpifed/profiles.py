"""Emulating a heterogeneous client on uniform hardware: slower compute, a slower link.

The emulation only ever *adds* time (sleeping), and every added second is logged as t_emul, so
the run log says how much of a measured time is real. Memory budgets are enforced by the memory
model, not here.
"""

from __future__ import annotations

import time

from mpifed.config import DeviceProfile


def compute_delay(profile: DeviceProfile, measured: float) -> float:
    """Extra seconds that make `measured` compute take as long as on a device `speed` times as fast."""
    return measured * (1.0 / profile.speed - 1.0) if profile.speed < 1.0 else 0.0


def native_start() -> tuple[float, float]:
    """Now, by the wall clock and by this process's CPU time: the start of a compute section."""
    return time.perf_counter(), time.process_time()


def native_seconds(start: tuple[float, float], on_gpu: bool) -> float:
    """Seconds of compute since `start` as the device itself took them, the time compute_delay slows
    down: the wall time on a GPU; on a CPU, at most this process's CPU time, so the time the core
    served other ranks (more ranks than cores) is not slowed down too. Measured here, wall time
    alone: 5 workers on 2 cores made a client's native step 2-3x longer whenever they all computed
    at once (a round's first clients), which a 1/16-speed profile turned into 15 times as much sleep."""
    wall = time.perf_counter() - start[0]
    return wall if on_gpu else min(wall, time.process_time() - start[1])


def link_seconds(profile: DeviceProfile, nbytes: int) -> float:
    """Seconds an emulated link adds to a transfer of `nbytes`: latency + nbytes / bandwidth (0 for a
    native link). Added to the real transfer, in both directions, rather than padding it up to that:
    a client sees a broadcast start only when the server is ready, so the time it waits (the server
    evaluating or checkpointing) would otherwise count as transfer and hide the emulated link."""
    if profile.bandwidth <= 0 and profile.latency <= 0:
        return 0.0
    return profile.latency + (nbytes / profile.bandwidth if profile.bandwidth > 0 else 0.0)


def sleep(seconds: float) -> float:
    if seconds > 0:
        time.sleep(seconds)
    return seconds
