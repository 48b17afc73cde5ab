"""`mpifed memory`: predicted against measured peak memory of a training step, and the max batch.

    mpifed memory --model resnet50 --dataset cifar10 --optimizer sgd --budget 16GiB --measure
    mpifed memory --model cnn --budget 512MiB --batches 1,8,64 --measure --device cpu
    mpifed memory --model examples/my_model.py:mlp --model-option hidden=32 --dataset examples/my_data.py:sites
    mpifed memory --model leaf-lstm --dataset shakespeare --optimizer none

Predicted is the analytic walk (meta tensors, no allocation) at each batch; measured is a real
step on the device (CUDA: max_memory_allocated; CPU: the allocator's accounting via the profiler).
With --measure the command also fits the measured model (probes at small batches) and prints both
models side by side with the max batch each gives for the budget. The last lines give the max batch that
`mpifed train` would use (the analytic line's, checked by a walk at that batch) and why it may be lower.
"""

from __future__ import annotations

import json
from functools import partial

import click

from mpifed.commands.lazy_help import LazyHelpOption
from mpifed.datasets import DATASETS

#: Largest batch of the default sweep (powers of two from 1, then the max batch itself).
SWEEP_CAP = 256


def resolve_device(name: str):
    """auto -> cuda if a GPU is visible, else cpu; cuda without a GPU is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is visible; use --device cpu or auto", param_hint="--device")
    return torch.device(name)


def parse_batches(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        batches = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise click.BadParameter(f"{text!r}: give batch sizes as a comma list, e.g. 1,8,64",
                                 param_hint="--batches") from None
    if not batches or batches[0] < 1:
        raise click.BadParameter(f"{text!r}: batch sizes must be positive", param_hint="--batches")
    return batches


def sweep(largest: int, cap: int = SWEEP_CAP) -> list[int]:
    """Powers of two from 1 up to min(largest, cap), then `largest` itself if it is not above cap."""
    batches, b = [], 1
    while b <= min(largest, cap):
        batches.append(b)
        b *= 2
    if largest <= cap and largest not in batches:
        batches.append(largest)
    return batches


#: Optimizer names, as mpifed.memory.OPTIMIZERS (kept here so importing the CLI does not import torch).
OPTIMIZERS = ("sgd", "adam", "none")


def _model_help() -> str:
    from mpifed.models import MODELS

    return (f"Model from the registry: {', '.join(sorted(MODELS))}. Or your own factory, 'package.module:factory' "
            f"or 'path/file.py:factory' (a path relative to the working directory), as the job's model.name.")


def _dataset_help() -> str:
    return (f"Sets the task: input shape, classes or vocabulary. A built-in ({', '.join(BUILTIN_DATASETS)}; "
            f"the image sets from their table, not their files), or your own factory as the job's data.dataset, "
            f"loaded to read its shapes.")


def _margin_help() -> str:
    from mpifed.memory import DEFAULT_MARGIN

    return f"Fraction of the budget kept free. Default: mpifed.memory.DEFAULT_MARGIN ({DEFAULT_MARGIN})."


def model_options(f):
    """--model, --model-option, --dataset, --data-option, --optimizer, --budget, --device, --margin,
    --multiple-of (shared with bench)."""
    for option in reversed([
        click.option("--model", "model_name", default="resnet18", show_default=True, cls=LazyHelpOption,
                     help_text=_model_help),
        click.option("--model-option", "model_opts", multiple=True, metavar="KEY=VALUE",
                     help="A keyword argument of a model factory (the job's model.options), the value read as "
                          "TOML like --set's: --model-option hidden=32. Repeatable."),
        click.option("--dataset", default="cifar10", show_default=True, cls=LazyHelpOption,
                     help_text=_dataset_help),
        click.option("--data-option", "data_opts", multiple=True, metavar="KEY=VALUE",
                     help="A keyword argument of a dataset factory, or a shakespeare option (the job's "
                          "data.options): --data-option sites=6. Repeatable."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="sgd", show_default=True,
                     help="sgd: one momentum buffer per parameter; adam: two; none: gradients only "
                          "(FedSGD clients)."),
        click.option("--budget", default=None,
                     help="Memory budget, e.g. 2GiB, 512MiB, 16GB. Default: the device's free memory "
                          "(CUDA) or the host's (CPU: the smallest of MemAvailable, the memory cgroups' room "
                          "and SLURM's allocation)."),
        click.option("--device", "device_name", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True, help="auto: cuda if a GPU is visible, else cpu."),
        click.option("--margin", type=float, default=None, cls=LazyHelpOption, help_text=_margin_help),
        click.option("--multiple-of", type=int, default=1, show_default=True,
                     help="Round the max batch down to a multiple of this (e.g. 8)."),
    ]):
        f = option(f)
    return f


#: The built-in datasets, as the job's data.dataset takes them (mpifed.config.BUILTIN_DATASETS, without its torch).
BUILTIN_DATASETS = (*DATASETS, "shakespeare")


def build(model_name: str, dataset: str, model_opts: tuple[str, ...] = (), data_opts: tuple[str, ...] = ()):
    """(model, task) as a job naming them would train: mpifed.learn.loading builds the model for the task and
    checks its output. The built-in image sets' task comes from their table (no files read), shakespeare's
    from its window and alphabet (not loaded); a factory dataset is loaded. Every problem is a usage error
    with the one-line message a launch would end with."""
    from mpifed.config import JobError, load_job
    from mpifed.errors import InputError
    from mpifed.learn.factory import is_factory, one_line
    from mpifed.learn.loading import load_data, make_model
    from mpifed.learn.tasks import Task
    from mpifed.models import MIN_SIDE, MODELS

    if not is_factory(model_name) and model_name not in MODELS:
        raise click.BadParameter(f"unknown model {model_name!r}; choose one of {', '.join(sorted(MODELS))}, or your "
                                 f"own factory as 'package.module:factory' or 'path/file.py:factory'",
                                 param_hint="--model")
    if not is_factory(dataset) and dataset not in BUILTIN_DATASETS:
        raise click.BadParameter(f"unknown dataset {dataset!r}; choose one of {', '.join(BUILTIN_DATASETS)}, or your "
                                 f"own factory as 'package.module:factory' or 'path/file.py:factory'",
                                 param_hint="--dataset")
    overrides = [f"model.name={json.dumps(model_name)}", f"data.dataset={json.dumps(dataset)}",
                 *_options("model", model_opts, "--model-option"), *_options("data", data_opts, "--data-option")]
    try:
        job = load_job(overrides=overrides)
    except JobError as e:
        raise click.UsageError(one_line(str(e))) from None
    if is_factory(dataset):
        try:
            task = load_data(job).task
        except InputError as e:
            raise click.BadParameter(one_line(str(e)), param_hint="--dataset") from None
    elif dataset == "shakespeare":
        task = _shakespeare_task(job.data.options)
    else:
        if job.data.options:
            raise click.BadParameter(f"the built-in dataset {dataset!r} takes no options ({job.data.options})",
                                     param_hint="--data-option")
        spec = DATASETS[dataset]
        side = max(spec.side, MIN_SIDE.get(model_name, 0))  # as the data layer pads for a VGG
        task = Task.classification((spec.channels, side, side), spec.classes)
    try:
        return make_model(job, task), task
    except InputError as e:
        raise click.BadParameter(one_line(str(e)), param_hint="--model") from None


def _options(section: str, pairs: tuple[str, ...], flag: str) -> list[str]:
    """KEY=VALUE pairs -> --set overrides of the job's `section`.options (values read as TOML, else strings)."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE with KEY a keyword argument's name, e.g. "
                                     f"{flag} hidden=32", param_hint=flag)
        out.append(f"{section}.options.{key.strip()}={value}")
    return out


def _shakespeare_task(options: dict):
    """LEAF's next-character task at the options' window, without reading the plays."""
    import inspect

    import torch

    from mpifed.learn.shakespeare import VOCAB, load_shakespeare
    from mpifed.learn.tasks import Task

    accepted = list(inspect.signature(load_shakespeare).parameters)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise click.BadParameter(f"shakespeare does not take {', '.join(unknown)}; it takes {', '.join(accepted)}",
                                 param_hint="--data-option")
    seq_len = options.get("seq_len", 80)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise click.BadParameter(f"seq_len = {seq_len!r}: give a positive number of characters (LEAF's 80)",
                                 param_hint="--data-option")
    return Task("next-token", (seq_len,), VOCAB, torch.int64)


@click.command("memory")
@model_options
@click.option("--batches", default=None,
              help=f"Comma list of batch sizes to show. Default: 1, 2, 4, ... up to the max batch "
                   f"(at most {SWEEP_CAP}), then the max batch.")
@click.option("--measure", is_flag=True, help="Also run real steps and show the measured peak and error.")
def memory(model_name, model_opts, dataset, data_opts, optimizer, budget, device_name, margin, multiple_of, batches,
           measure):
    """Predict (and with --measure, measure) the peak memory of a training step; print the max batch."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from mpifed import memory as mem
    from mpifed.units import format_bytes, parse_bytes

    console = Console()
    device = resolve_device(device_name)
    model, task = build(model_name, dataset, model_opts, data_opts)
    shape, classes = task.input_shape, task.classes
    margin = mem.DEFAULT_MARGIN if margin is None else margin
    try:
        sized_against = mem.client_budget(device, parse_bytes(budget) if budget else 0)
        budget_bytes = sized_against.bytes
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--budget") from None
    client = f"{model_name} on {device}"
    try:
        sizing = mem.size_client(model, shape, classes, optimizer, device, budget_bytes, 1, client,
                                 margin=margin, multiple_of=multiple_of, task=task)
        largest, sized_by = sizing.max_batch, sizing.model
    except mem.MemoryBudgetError as e:
        console.print(f"[red]{e}[/red]")
        largest, sized_by = 0, None
    analytic = mem.analytic_memory_model(model, shape, classes, optimizer, device, task=task)
    rows = parse_batches(batches) or sweep(max(largest, 1))

    table = Table(title=f"{model_name} / {dataset} / {optimizer} on {device}: peak memory of one training step")
    for col in ("batch", "predicted", "measured", "error %"):
        table.add_column(col, justify="right")
    worst = 0.0
    for b in rows:
        predicted = mem.analytic_peak(model, shape, classes, optimizer, device, b, task=task).total
        measured, error = "-", "-"
        if measure:
            try:
                truth = mem.measured_peak(model, shape, classes, optimizer, device, b, task=task).total
                measured = format_bytes(truth)
                err = 100.0 * (predicted - truth) / truth
                worst = max(worst, abs(err))
                error = f"{err:+.2f}"
            except torch.cuda.OutOfMemoryError:
                measured = "OOM"
                torch.cuda.empty_cache()
        table.add_row(str(b), format_bytes(predicted), measured, error)
    console.print(table)

    models = [analytic]
    if measure:
        models.append(mem.measured_memory_model(model, shape, classes, optimizer, device, task=task))
    usable = budget_bytes * (1 - margin)
    summary = Table(title="memory models (peak(b) = max(static + b*per_sample, update + b*update_per_sample))")
    fits = f"max batch in {format_bytes(usable)} (budget - {margin:.0%})"
    for col in ("method", "fitted at", "static", "per sample", "update", fits):
        summary.add_column(col, justify="right")
    caps = {}
    for m in models:
        try:
            caps[m.method] = mem.max_batch(m, budget_bytes, margin, multiple_of, client)
        except mem.MemoryBudgetError:
            caps[m.method] = 0
        summary.add_row(m.method, ",".join(map(str, m.fit_batches)), format_bytes(m.static_bytes),
                        format_bytes(m.per_sample_bytes), format_bytes(m.update_bytes),
                        str(caps[m.method] or "none fits"))
    console.print(summary)
    if measure:
        a, m = models
        console.print(f"analytic vs measured model: static {_gap(a.static_bytes, m.static_bytes)}, "
                      f"per sample {_gap(a.per_sample_bytes, m.per_sample_bytes)}; "
                      f"largest |error| of the walk over the table: {worst:.2f}%")
    console.print(f"max batch for budget {format_bytes(budget_bytes)} (margin {margin:.0%}, "
                  f"multiple of {multiple_of}): [bold]{largest if largest else 'none fits'}[/bold]")
    if not budget:  # the device's own: say what bound it (a GPU's free memory, MemAvailable, a cgroup, SLURM)
        console.print(f"budget: {sized_against.bound}", highlight=False)
    if largest and sized_by is not None and sized_by.method == "measured":
        console.print(_why_measured(largest, caps, sized_by), highlight=False)
    elif largest:
        walk = partial(mem.analytic_peak, model, shape, classes, optimizer, device, task=task)
        console.print(_why(largest, caps, walk, usable, margin), highlight=False)


def _why(largest: int, caps: dict[str, int], walk, usable: float, margin: float) -> str:
    """Why the max batch can be below the analytic line's: the line is fitted at small batches, so sizing
    (size_client, as `mpifed train` runs it) walks the step at the batch itself and steps down while it does not fit."""
    from mpifed.units import format_bytes

    line = caps["analytic"]
    room = f"{format_bytes(usable)} (the budget less the {margin:.0%} margin)"
    if largest == line:
        text = (f"Why {largest}: the analytic line's max batch, confirmed by walking the step at batch {largest}: "
                f"it needs {format_bytes(walk(largest).total)} of {room}.")
    else:
        text = (f"Why {largest}: the analytic line's {line}, stepped down until a walk of the step at the batch "
                f"itself fits in {room}: at {line} it needs {format_bytes(walk(line).total)}, at {largest} "
                f"{format_bytes(walk(largest).total)}. The line, fitted at small batches, underestimates large ones.")
    if caps.get("measured"):
        text += f" The measured line's {caps['measured']} is for comparison; sizing uses the analytic walk."
    return text + " `mpifed train` sizes each client this way (mpifed.memory.size_client)."


def _why_measured(largest: int, caps: dict[str, int], sized_by) -> str:
    """Why the max batch of a model the walk cannot see (recurrent layers: mpifed.memory.sizing.walk_sees)
    comes from real steps, not from the analytic line."""
    from mpifed.units import format_bytes

    return (f"Why {largest}: the walk on meta tensors does not see this model's step as the device runs it "
            f"(recurrent layers run as fused kernels with workspaces of their own), so sizing fits its line to "
            f"real steps at batches {','.join(map(str, sized_by.fit_batches))} (static "
            f"{format_bytes(sized_by.static_bytes)}, {format_bytes(sized_by.per_sample_bytes)} per sample) and "
            f"takes that line's max batch; the analytic line's {caps['analytic'] or 'none'} and the predicted "
            f"column are the walk's, for comparison. `mpifed train` sizes each client this way "
            f"(mpifed.memory.size_client).")


def _gap(a: float, b: float) -> str:
    return f"{100.0 * (a - b) / b:+.2f}%" if b else "n/a"
