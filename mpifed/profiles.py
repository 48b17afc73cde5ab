"""Emulating a heterogeneous client on uniform hardware: slower compute, a slower link.

The emulation only ever *adds* time (sleeping), and every added second is logged as t_emul, so
the run log says how much of a measured time is real. Memory budgets are enforced by the memory
model, not here.
"""

from __future__ import annotations

import time

from mpifed.config import DeviceProfile
from mpifed.rollcall import ANSWER_AFTER


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


def link_problems(job, model_bytes: int) -> list[str]:
    """The profiles whose emulated link alone makes a round outlast comm.timeout (a bandwidth of bytes
    instead of megabytes, a latency of hours): every round would end the job with a timeout, so the job
    is refused before it starts, naming the field. The round's link time is at least its latency both
    ways plus the model's broadcast (the upload is at most as large, so it is not counted)."""
    timeout = job.comm.timeout
    used = {job.clients.profile, *(g.profile for g in job.clients.groups)}
    problems = []
    for name in sorted(used):
        profile = job.profile(name)
        seconds = link_seconds(profile, model_bytes) + profile.latency
        if timeout and seconds > timeout:
            problems.append(f"profiles.{name}: its emulated link takes {seconds:,.0f} s a round (latency "
                            f"{profile.latency:g} s each way, the {model_bytes:,}-byte model at "
                            f"{profile.bandwidth:g} bytes/s), more than comm.timeout = {timeout:g} s, so every "
                            f"round would time out; raise profiles.{name}.bandwidth ('100Mbit/s'), lower its "
                            f"latency, or raise comm.timeout")
    return problems


SLICE = 0.05
"""Seconds an emulated sleep sleeps between two looks at a stop request and rank 0's roll call."""


def sleep(seconds: float, stop=None, exchange=None) -> float:
    """Sleep `seconds` of emulated time; returns the seconds emulated. It sleeps in slices: a stop request
    (`stop` true: SIGTERM, SIGUSR1, Ctrl-C) cuts it short, so that the round ends and the ranks agree to
    checkpoint instead of waiting out a slow profile's link; and, as a wait in a collective does, it
    answers rank 0's roll call (through `exchange`), saying it is in an emulated wait, not stuck."""
    if seconds <= 0:
        return 0.0
    start = time.monotonic()
    end = start + seconds
    while (now := time.monotonic()) < end:
        if stop:
            return now - start
        if exchange is not None and now - start > ANSWER_AFTER:
            exchange.answer_roll_call("emulated", now - start)
        time.sleep(min(SLICE, end - now))
    return seconds
