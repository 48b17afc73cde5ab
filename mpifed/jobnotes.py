"""What a job asks for that would never act, said before training (rank 0, once, as a warning).

A setting that silently does nothing costs a whole run to notice: a scaling rule whose warmup outlasts
the run, a learning-rate milestone after the last round, an option of a mode the job does not use.
Each note names the fields and the numbers, and how to make the setting act. The job still runs as
asked (a job with explicit settings behaves as before); a note is only said.
"""

from __future__ import annotations

import dataclasses

from mpifed.config import Job


def job_notes(job: Job) -> list[str]:
    """One line per setting of `job` that cannot act at its length or with its other settings."""
    notes = _scaling_notes(job) + _schedule_notes(job)
    given = _changed_from_default(job)
    ignored = (
        ("optim.server_lr", job.train.local_steps == 1, "acts only with train.local_steps > 1 (FedAvg)"),
        ("optim.server_momentum", job.train.local_steps == 1, "acts only with train.local_steps > 1 (FedAvg)"),
        ("optim.nesterov", job.train.local_steps > 1, "acts only with train.local_steps = 1 (the server's "
                                                      "SGD); FedAvg's server uses optim.server_momentum"),
        ("data.alpha", job.data.partition != "dirichlet", "acts only with data.partition = \"dirichlet\""),
        ("data.volume_sigma", job.data.partition != "volume", "acts only with data.partition = \"volume\""),
        ("clients.sampling", not job.clients.per_round, "acts only when clients.per_round samples some of the "
                                                        "clients; with 0 every client trains every round"),
        ("scaling.scale", not job.scaling.uses_step, "acts only with scaling.method = \"step\" or "
                                                     "\"step+teacher\""),
        ("plan.points", job.plan.mode == "off", "acts only with plan.mode other than \"off\" (the start-up "
                                                "probes)"),
        ("plan.profile_max", job.plan.mode == "off", "acts only with plan.mode other than \"off\" (the start-up "
                                                     "probes)"),
    )
    for name, unused, why in ignored:
        if unused and name in given:
            notes.append(f"{name} = {given[name]!r} {why}: as the job stands it does nothing")
    return notes


def _scaling_notes(job: Job) -> list[str]:
    """The step and the teacher act outside critical phases only; every round up to the warmup and the
    first two windows is critical."""
    s, rounds = job.scaling, job.train.rounds
    acts_outside = s.uses_step or (s.uses_teacher and s.only_outside_critical)
    first = s.first_scaled_round()
    if not acts_outside or first <= rounds:
        return []
    return [f"scaling.method = {s.method!r} never acts: it acts outside critical phases only, and rounds 1 to "
            f"{first - 1} are all critical (scaling.warmup = {s.warmup} rounds, and two windows of scaling.window "
            f"= {s.window} before the detector can compare), but train.rounds = {rounds}; lower scaling.warmup "
            f"and scaling.window, or leave them out of the job so that they follow train.rounds"]


def _schedule_notes(job: Job) -> list[str]:
    o, rounds = job.optim, job.train.rounds
    notes = []
    if o.warmup_rounds >= rounds:
        notes.append(f"optim.warmup_rounds = {o.warmup_rounds} >= train.rounds = {rounds}: the learning rate "
                     f"never reaches optim.lr = {o.lr}")
    late = [m for m in o.milestones if m >= rounds]
    if o.schedule == "step" and late:
        notes.append(f"optim.milestones {late} come at or after the last round ({rounds - 1}, counted from 0): "
                     f"the learning rate is never multiplied by gamma there")
    if o.schedule == "step" and not o.milestones:
        notes.append("optim.schedule = \"step\" without optim.milestones keeps the learning rate constant; "
                     "give the rounds, e.g. milestones = [150, 225]")
    if o.schedule != "step" and o.milestones:
        notes.append(f"optim.milestones = {list(o.milestones)} act only with optim.schedule = \"step\", but it "
                     f"is {o.schedule!r}")
    return notes


def _changed_from_default(job: Job) -> dict[str, object]:
    """Dotted field name -> value, for the fields of `job`'s sections that differ from the defaults."""
    out = {}
    for section in dataclasses.fields(job):
        value, default = getattr(job, section.name), getattr(Job(), section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for f in dataclasses.fields(value):
            if getattr(value, f.name) != getattr(default, f.name):
                out[f"{section.name}.{f.name}"] = getattr(value, f.name)
    return out
