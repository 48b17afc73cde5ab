"""Emulated device profiles (mpifed.profiles): a slow profile slows down the native compute only."""

import time

import pytest

from mpifed.config import DeviceProfile
from mpifed.profiles import compute_delay, link_seconds, native_seconds, native_start


def test_a_profile_sleeps_its_native_compute_times_one_over_speed_less_one():
    assert compute_delay(DeviceProfile(speed=0.25), 0.010) == pytest.approx(0.030)
    assert compute_delay(DeviceProfile(speed=1.0), 0.010) == 0.0
    assert link_seconds(DeviceProfile(bandwidth=1e6, latency=0.002), 500_000) == pytest.approx(0.502)
    assert link_seconds(DeviceProfile(), 500_000) == 0.0


def test_native_compute_on_a_cpu_leaves_out_the_time_the_process_did_not_run():
    start = native_start()
    time.sleep(0.05)  # like a core held by another rank: wall time passes, this process computes nothing
    assert native_seconds(start, on_gpu=False) < 0.02
    assert native_seconds(start, on_gpu=True) >= 0.05  # a GPU's step is its wall time
    start = native_start()
    while time.process_time() - start[1] < 0.05:  # computing 0.05 CPU seconds, however long a loaded core takes
        pass
    native, wall = native_seconds(start, on_gpu=False), time.perf_counter() - start[0]
    assert 0.05 <= native <= wall  # the compute counted whole, and never more than the wall time
