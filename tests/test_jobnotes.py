"""Settings that would never act are said before training, with the numbers; a job that uses what it
asks for hears nothing."""

from mpifed.config import load_job
from mpifed.jobnotes import job_notes


def _notes(*overrides: str) -> list[str]:
    return job_notes(load_job(overrides=list(overrides)))


def test_the_default_job_and_a_step_job_at_the_defaults_hear_nothing():
    assert _notes() == []
    assert _notes('scaling.method="step"', "scaling.small_batch=8") == []


def test_a_warmup_that_outlasts_the_run_is_said_with_its_numbers():
    step = _notes('scaling.method="step"', "scaling.small_batch=8", "scaling.warmup=500", "scaling.window=100")
    assert step == ["scaling.method = 'step' never acts: it acts outside critical phases only, and rounds 1 to 500 "
                    "are all critical (scaling.warmup = 500 rounds, and two windows of scaling.window = 100 before "
                    "the detector can compare), but train.rounds = 300; lower scaling.warmup and scaling.window, or "
                    "leave them out of the job so that they follow train.rounds"]
    assert _notes('scaling.method="step"', "scaling.small_batch=8", "scaling.window=150") != []  # two windows
    teacher = ['scaling.method="teacher"', "scaling.small_batch=8", "scaling.warmup=300"]
    assert len(_notes(*teacher)) == 1
    assert _notes(*teacher, "scaling.only_outside_critical=false") == []  # then it acts in every round


def test_options_of_modes_the_job_does_not_use_are_said():
    notes = "\n".join(_notes("optim.server_lr=0.5", "data.alpha=0.1", 'clients.sampling="data"', "scaling.scale=2.0",
                             "plan.points=8", "optim.milestones=[100]", "optim.warmup_rounds=300"))
    for said in ("optim.server_lr = 0.5 acts only with train.local_steps > 1", "data.alpha = 0.1 acts only with "
                 "data.partition = \"dirichlet\"", "clients.sampling = 'data' acts only when clients.per_round",
                 "scaling.scale = 2.0 acts only with scaling.method", "plan.points = 8 acts only with plan.mode",
                 "optim.milestones = [100] act only with optim.schedule = \"step\", but it is 'cosine'",
                 "optim.warmup_rounds = 300 >= train.rounds = 300: the learning rate never reaches optim.lr"):
        assert said in notes, said
    assert _notes("optim.server_lr=0.5", "train.local_steps=2", "data.alpha=0.1", 'data.partition="dirichlet"',
                  'clients.sampling="data"', "clients.per_round=2", "clients.count=4") == []
    late = _notes('optim.schedule="step"', "optim.milestones=[100, 300, 400]")
    assert late == ["optim.milestones [300, 400] come at or after the last round (299, counted from 0): the learning "
                    "rate is never multiplied by gamma there"]
