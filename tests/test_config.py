import dataclasses
import math
import re

import pytest

from mpifed.compress import codec_names
from mpifed.config import CompressConfig, JobError, load_job, parse_override, resolve_clients
from mpifed import units


def test_default_job_is_valid_and_round_trips_through_toml():
    job = load_job()
    assert job.model.name == "cnn" and job.clients.count == 0
    assert load_job(text=job.to_toml()) == job


def test_every_problem_is_listed_with_field_value_and_allowed():
    with pytest.raises(JobError) as err:
        load_job(overrides=["train.rounds=0", "trian.rounds=5", 'data.dataset="imagenet"', 'optim.lr="fast"'])
    text = str(err.value)
    assert "4 problems" in text
    assert "train.rounds = 0: must be >= 1" in text
    assert "trian: unknown field (did you mean 'train'?)" in text
    assert "data.dataset = 'imagenet': no such built-in dataset; use one of synthetic, cifar10" in text
    assert "optim.lr = 'fast': expected float" in text


def test_nan_and_infinity_are_refused_not_passed_on():
    """nan compares False with every minimum; it must not reach the run (lr = nan trains nothing)."""
    with pytest.raises(JobError) as err:
        load_job(overrides=["optim.lr=nan", "memory.margin=inf", "profiles.x.memory=inf", "profiles.x.latency=nan"])
    text = str(err.value)
    assert "4 problems" in text
    assert "optim.lr = nan: must be a finite number" in text and "memory.margin = inf: must be a finite" in text
    assert "profiles.x.memory: expected a size" in text and "profiles.x.latency: expected a duration" in text


def test_job_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nbatch = -3\n[profiles.slow]\nspeed = 4.0\nmemory = '2 parsecs'\n")
    with pytest.raises(JobError) as err:
        load_job(bad)
    text = str(err.value)
    assert str(bad) in text and "train.batch = -3" in text
    assert "profiles.slow.memory" in text and "unknown size unit" in text
    with pytest.raises(JobError, match="not valid TOML"):
        load_job(text="[train\n")
    with pytest.raises(JobError, match="cannot read job file"):
        load_job(tmp_path / "missing.toml")


def test_cross_field_checks():
    with pytest.raises(JobError, match="no such profile"):
        load_job(overrides=['clients.profile="gpu"'])
    with pytest.raises(JobError, match="emulation can only slow a device down"):
        load_job(text="[profiles.fast]\nspeed = 2.0\n")
    with pytest.raises(JobError, match="scaling.small_batch is unset"):
        load_job(overrides=['scaling.method="teacher"', "scaling.per_layer=false"])
    with pytest.raises(JobError, match="plan.profile_max = 1: the planner times at least two batch sizes"):
        load_job(overrides=["plan.profile_max=1"])
    with pytest.raises(JobError, match="plan.replan = true needs plan.mode"):
        load_job(overrides=["plan.replan=true"])
    with pytest.raises(JobError, match="both move the clients' batches"):
        load_job(overrides=['plan.mode="balance"', "plan.replan=true", "scaling.grow_batch=true"])
    with pytest.raises(JobError, match="debug.slow_speed = 2.0: must be at most 1"):
        load_job(overrides=["debug.slow_speed=2.0"])
    with pytest.raises(JobError, match="nesterov = true needs optim.momentum > 0"):
        load_job(overrides=["optim.nesterov=true", "optim.momentum=0"])
    # fault injection that could never act is refused, not silently ignored
    with pytest.raises(JobError, match="debug.fail_round = 50: the run has rounds 0..9"):
        load_job(overrides=["train.rounds=10", "debug.fail_rank=1", "debug.fail_round=50"])
    with pytest.raises(JobError, match="debug.slow_rank = 0: must be a client rank"):
        load_job(overrides=["debug.slow_rank=0"])
    with pytest.raises(JobError, match="only corrupt = \"nan\" can show"):
        load_job(overrides=['compress.codec="fp16"', "debug.corrupt_rank=1", 'debug.corrupt="truncate"'])
    with pytest.raises(JobError, match="debug.corrupt_rank = 7 but the world has ranks 0..2"):
        resolve_clients(load_job(overrides=["debug.corrupt_rank=7", 'debug.corrupt="nan"']), 3)


def test_overrides_parse_toml_values_and_fall_back_to_strings():
    assert parse_override("train.rounds=10") == (["train", "rounds"], 10)
    assert parse_override("optim.milestones=[10, 20]") == (["optim", "milestones"], [10, 20])
    assert parse_override("run.name=abc") == (["run", "name"], "abc")
    with pytest.raises(JobError, match="expected key=value"):
        parse_override("train.rounds")


@pytest.mark.parametrize("value, where", [
    ('[{count = 1, profile = "s"}', "Unclosed array at the end of '[{count"),
    ("{a = 1,, b = 2}", "column 8 of '{a = 1,, b = 2}'"),
    ('"unterminated', "Unterminated string at the end"),
])
def test_a_set_value_that_is_broken_toml_says_where_not_that_it_is_the_wrong_type(value, where):
    with pytest.raises(JobError, match=r"--set 'clients\.groups=.*': the value is not valid TOML \(.*" + re.escape(where)
                       ) as err:
        load_job(overrides=[f"clients.groups={value}"])
    assert "expected a" not in str(err.value)
    assert parse_override("profiles.x.memory=2GiB") == (["profiles", "x", "memory"], "2GiB")  # bare words stay strings


def test_units_in_profiles():
    job = load_job(text='[profiles.edge]\nmemory = "2GiB"\nbandwidth = "100Mbit/s"\nlatency = "5ms"\n')
    p = job.profiles["edge"]
    assert (p.memory, p.bandwidth, p.latency) == (2 * 2**30, 12.5e6, 0.005)
    assert p.emulated and not job.profile("native").emulated
    assert units.parse_rate("1GB/s") == 1e9 and units.parse_seconds(0.5) == 0.5


@pytest.mark.parametrize("text, rate", [
    ("100Mb/s", 12.5e6), ("100Mbit/s", 12.5e6), ("100mbit/s", 12.5e6), ("1Gb/s", 1.25e8), ("1Gbit/s", 1.25e8),
    ("8kb/s", 1e3), ("8Kbit/s", 1e3), ("8b/s", 1.0), ("100MB/s", 1e8), ("1GB/s", 1e9), ("8kB/s", 8e3),
    ("8KB/s", 8e3), ("1MiB/s", 2**20), ("8B/s", 8.0), ("8", 8.0)])
def test_rates_tell_bits_from_bytes_by_case(text, rate):
    assert units.parse_rate(text) == rate


@pytest.mark.parametrize("text", ["100mb/s", "1gb/s", "1GIB/s", "2gib"])
def test_units_whose_case_leaves_bits_or_bytes_in_doubt_are_refused(text):
    parse = units.parse_rate if text.endswith("/s") else units.parse_bytes
    with pytest.raises(ValueError, match="ambiguous unit .*case-sensitive"):
        parse(text)


def test_sizes_in_bits_are_refused_and_a_job_says_which_field():
    assert units.parse_bytes("512MB") == 512e6 and units.parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="'512Mb' is in bits"):
        units.parse_bytes("512Mb")
    with pytest.raises(JobError, match=r"profiles\.edge\.bandwidth: ambiguous unit 'mb'"):
        load_job(text='[profiles.edge]\nbandwidth = "100mb/s"\n')


def test_clients_adapt_to_world_size_unless_fixed():
    job = load_job(text='[[clients.groups]]\ncount = 2\nprofile = "slow"\n[profiles.slow]\nspeed = 0.5\n')
    assert resolve_clients(job, 5).tolist() == ["slow", "slow", "native", "native"]
    with pytest.raises(JobError, match=r"mpirun -n 3"):
        resolve_clients(job, 2)
    fixed = load_job(overrides=["clients.count=15"])
    assert len(resolve_clients(fixed, 16)) == 15
    assert len(resolve_clients(fixed, 4)) == 15  # three worker ranks, five clients each
    with pytest.raises(JobError, match=r"clients.count = 15 but 17 ranks.*1 rank\(s\) would never train.*mpirun -n 16"):
        resolve_clients(fixed, 17)
    with pytest.raises(JobError, match="at least 2 MPI ranks"):
        resolve_clients(load_job(), 1)


def test_codec_choices_are_the_codec_registry():
    """compress.codec lists its choices in the order its help explains them; the registry is the real list."""
    codec = next(f for f in dataclasses.fields(CompressConfig) if f.name == "codec")
    assert sorted(codec.metadata["choices"]) == codec_names()
    assert set(codec_names()) <= set(re.findall(r"\w+", codec.metadata["doc"]))


def test_scaling_bounds_are_stated_once_and_checked_on_load_and_in_code():
    """The metadata's bounds are what both a job file and a config built in code are held to."""
    from mpifed.scaling import ScalingConfig, ServerScalingPolicy

    bad = {"threshold": (0.0, "must be > 0.0"), "noise_ema": (1.0, "must be in [0.0, 1.0)"),
           "batch_rate": (0.0, "must be in (0.0, 1.0]"), "window": (-1, "must be >= 0"),
           "scale": (math.inf, "must be a finite number"), "method": ("scaled", "must be one of none, step")}
    with pytest.raises(JobError) as err:
        load_job(overrides=[f"scaling.{name}={value!r}" if isinstance(value, str) else f"scaling.{name}={value}"
                            for name, (value, _) in bad.items()])
    text = str(err.value)
    assert f"{len(bad)} problems" in text
    for name, (value, allowed) in bad.items():
        assert f"scaling.{name} = {value!r}: {allowed}" in text, text
        with pytest.raises(ValueError, match=re.escape(f"scaling.{name} = {value!r}: {allowed}")):
            ServerScalingPolicy(ScalingConfig(**{name: value}), [4], seed=0)
    load_job(overrides=["scaling.batch_rate=1.0", "scaling.noise_ema=0.0"])  # the closed ends are allowed


def test_a_set_problem_names_the_set_not_the_default_job(tmp_path):
    """The value came from the command line: the message says which --set, in one line when it is one."""
    with pytest.raises(JobError) as err:
        load_job(overrides=["train.rounds=5", "train.rouns=3"])
    assert str(err.value) == ("--set train.rouns=3: train.rouns: unknown field (did you mean 'rounds'?); allowed: "
                              "rounds, local_steps, batch, eval_every, eval_batch, max_skipped")
    with pytest.raises(JobError) as err:  # a table --set fills, and a later --set of the same field
        load_job(overrides=["train.batch=4", "train.batch=0", "clients.groups=[{count = 0}]"])
    assert str(err.value).splitlines() == [
        "the --set values have 2 problems:", "  - --set train.batch=0: train.batch = 0: must be >= 1",
        "  - --set clients.groups=[{count = 0}]: clients.groups[0].count = 0: must be >= 1"]
    job = tmp_path / "job.toml"
    job.write_text("[train]\nrounds = 0\n")
    with pytest.raises(JobError) as err:  # the file's own problem stays the file's
        load_job(job, overrides=["train.batch=0"])
    assert str(err.value).splitlines() == [f"{job} has 2 problems:", "  - train.rounds = 0: must be >= 1",
                                           "  - --set train.batch=0: train.batch = 0: must be >= 1"]


def test_the_job_checks_import_no_torch_and_know_the_models_torch_builds():
    """mpifed.jobcheck checks a launch before any rank imports torch (8-25 s): the job's modules must not."""
    import subprocess
    import sys

    code = ("import sys, mpifed.jobcheck, mpifed.commands.train, mpifed.commands.profile\n"
            "from mpifed.config import load_job\n"
            "load_job(overrides=['scaling.method=\"step\"', 'scaling.small_batch=8'], light=True)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-3000:] + out.stdout
    from mpifed.config import BUILTIN_MODELS
    from mpifed.models import MODELS

    assert sorted(BUILTIN_MODELS) == sorted(MODELS)


def test_scaling_window_and_warmup_follow_train_rounds_unless_given():
    """At the defaults a step job of any length leaves critical phases (500 warmup rounds outlasted the
    default 300-round run); given values stay, and the job stores the numbers it ran with."""
    for rounds, window, warmup in ((6, 1, 5), (24, 1, 5), (300, 6, 30), (5000, 100, 500)):
        job = load_job(overrides=[f"train.rounds={rounds}", 'scaling.method="step"', "scaling.small_batch=8"])
        assert (job.scaling.window, job.scaling.warmup) == (window, warmup)
        assert job.scaling.first_scaled_round() <= rounds
        assert load_job(text=job.to_toml()) == job
    given = load_job(overrides=["scaling.window=100", "scaling.warmup=500"]).scaling
    assert (given.window, given.warmup) == (100, 500)
    with pytest.raises(JobError, match="scaling.small_batch is unset but method = 'step' needs it"):
        load_job(overrides=['scaling.method="step"'])  # the reason the bare default job is refused
