"""How --resume reads the stored job.toml: checked together with the resume's --set, so a job that a
newer mpifed refuses can be fixed on the resume; fields a stored job predates count as defaults."""

import tomllib

import pytest
import tomli_w

from mpifed.config import Job, JobError
from mpifed.resume import _changed_fields, _stored_job, check_resume


def _stored(tmp_path, **changes):
    data = tomllib.loads(Job().to_toml())
    for dotted, value in changes.items():
        table, key = dotted.split("__")
        data[table][key] = value
    path = tmp_path / "job.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def test_a_stored_job_that_newer_checks_refuse_is_fixed_with_set_on_the_resume(tmp_path):
    path = _stored(tmp_path, plan__profile_max=1)
    with pytest.raises(JobError) as refused:
        _stored_job(path, [])
    assert "plan.profile_max = 1" in str(refused.value) and "--set FIELD=VALUE" in str(refused.value)
    data = _stored_job(path, ["plan.profile_max=2"])
    assert data["plan"]["profile_max"] == 1  # the stored job itself, for the comparison with the resumed one


def test_a_stored_job_that_is_not_toml_says_restore_it(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[train\nrounds = 3")
    with pytest.raises(JobError, match="cannot be read .*restore it from a copy"):
        _stored_job(path, [])


def test_a_field_the_stored_job_predates_counts_as_its_default(tmp_path):
    full = tomllib.loads(Job().to_toml())
    older = {**full, "comm": {k: v for k, v in full["comm"].items() if k != "timeout"}}
    assert _changed_fields(older, full) == []
    assert _changed_fields(older, {**full, "comm": {**full["comm"], "timeout": 5.0}}) == ["comm.timeout"]
    changed = {**full, "optim": {**full["optim"], "lr": full["optim"]["lr"] * 2}}
    assert _changed_fields(full, changed) == ["optim.lr"]


def test_scaling_defaults_that_follow_train_rounds_stay_as_the_run_set_them(tmp_path):
    """A stored job that leaves scaling.window and warmup to follow train.rounds ran with the numbers of
    its own length: a resume with more rounds keeps them rather than moving the detector mid-run."""
    for stored in ("[train]\nrounds = 300\n[optim]\nschedule = \"step\"\n",
                   "[train]\nrounds = 300\n[optim]\nschedule = \"step\"\n[scaling]\nwindow = 0\nwarmup = -1\n"):
        (tmp_path / "job.toml").write_text(stored)
        (tmp_path / "run.h5").write_bytes(b"")
        job = check_resume(tmp_path, ["train.rounds=600"])
        assert (job.train.rounds, job.scaling.window, job.scaling.warmup) == (600, 6, 30)
