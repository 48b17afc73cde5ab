"""What a model learns: its inputs, its targets, its loss and its metric.

A task is declared by the data (mpifed.learn.loading): classification gives one label per sample out
of `classes`; next-token gives token ids in and the next token (one per sample, or one per position)
out of a vocabulary of `classes` tokens. Training, evaluation, the memory model and the start-up
checks all take the loss and the shapes from here, so a user's data with its own loss and metric
reaches every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

KINDS = ("classification", "next-token")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], "tuple[float, int]"]


@dataclass(frozen=True)
class Task:
    """One sample's shapes and the functions that score a batch.

    kind: classification or next-token. classes: labels, or the vocabulary size (token ids 0..classes-1).
    input_shape: one sample's input, without the batch axis; input_dtype: float32 (features, images) or
    int64 (token ids). target_shape: () for one target per sample, (T,) for one per position.
    loss_fn(output, target) -> mean loss, and metric_fn(output, target) -> (correct, counted): a user's
    own, or None for cross-entropy and accuracy (per token for next-token).
    """

    kind: str
    input_shape: tuple[int, ...]
    classes: int
    input_dtype: torch.dtype = torch.float32
    target_shape: tuple[int, ...] = ()
    loss_fn: LossFn | None = None
    metric_fn: MetricFn | None = None

    @classmethod
    def classification(cls, input_shape, classes: int) -> Task:
        """Float inputs of `input_shape`, one label of `classes` per sample: the built-in image sets."""
        return cls("classification", tuple(int(d) for d in input_shape), int(classes))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch, the quantity every client differentiates."""
        if self.loss_fn is not None:
            return self.loss_fn(output, target)
        if self.target_shape:
            return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
        return F.cross_entropy(output, target)

    def totals(self, output: torch.Tensor, target: torch.Tensor) -> tuple[float, float, int]:
        """(summed loss, correct, counted) of a batch, for the server's evaluation over many batches.
        counted is samples, or tokens when each position has a target."""
        counted = target.numel()
        if self.loss_fn is not None:
            loss_sum = float(self.loss_fn(output, target)) * counted
        elif self.target_shape:
            loss_sum = float(F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1),
                                             reduction="sum"))
        else:
            loss_sum = float(F.cross_entropy(output, target, reduction="sum"))
        correct, counted = self.metric(output, target)
        return loss_sum, float(correct), counted

    def metric(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor | float, int]:
        """(correct, counted) of a batch: the user's metric_fn, else accuracy (per token where each position
        has a target). The built-in correct stays a tensor on the output's device, so a training step
        can sum it over its local steps without waiting for the device."""
        if self.metric_fn is not None:
            correct, counted = self.metric_fn(output, target)
            return correct, int(counted)
        return (output.argmax(-1) == target).sum(), target.numel()

    def output_problem(self, shape: tuple[int, ...]) -> str:
        """Why a model's output of `shape` (for a batch of one) cannot be scored, or ''."""
        if self.loss_fn is not None:
            return ""  # the user's loss decides what it takes
        want = (1, *self.target_shape, self.classes)
        if tuple(shape) == want:
            return ""
        noun = "classes" if self.kind == "classification" else "tokens in the vocabulary"
        return (f"the model's output has shape {tuple(shape)} for one sample, but the {self.kind} task needs "
                f"{want} ({self.classes} {noun}); build its last layer with the `classes` (or `vocab`) the "
                f"factory is given")

    def example(self, batch: int, device: str | torch.device = "cpu",
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of the task's shapes and dtypes: random values where a generator is given (a
        measured memory step), else uninitialized (a walk on the meta device)."""
        device = torch.device(device)
        x_shape, y_shape = (batch, *self.input_shape), (batch, *self.target_shape)
        if generator is None:
            return (torch.empty(x_shape, dtype=self.input_dtype, device=device),
                    torch.empty(y_shape, dtype=torch.long, device=device))
        if self.input_dtype.is_floating_point:
            x = torch.randn(x_shape, generator=generator, dtype=self.input_dtype)
        else:
            x = torch.randint(0, self.classes, x_shape, generator=generator, dtype=self.input_dtype)
        y = torch.randint(0, self.classes, y_shape, generator=generator)
        return x.to(device), y.to(device)


def as_task(task: Task | None, input_shape, num_classes: int) -> Task:
    """The memory model's callers may pass a shape and a class count (classification) or a task."""
    return task if task is not None else Task.classification(input_shape, num_classes)
