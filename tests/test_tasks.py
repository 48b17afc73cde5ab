"""A task's metric of a batch: accuracy per sample, per token for next-token, or the data's own; the
clients' train accuracy and the server's evaluation both count with it."""

import torch

from mpifed.learn.tasks import Task


def test_metric_counts_samples_or_tokens_or_what_the_users_function_says():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])  # predicts 0, 1, 0
    task = Task.classification((4,), 2)
    correct, counted = task.metric(logits, torch.tensor([0, 0, 0]))
    assert (float(correct), counted) == (2.0, 3)
    assert task.totals(logits, torch.tensor([0, 0, 0]))[1:] == (2.0, 3)

    tokens = Task("next-token", (2,), 2, torch.int64, target_shape=(2,))  # two positions a sample
    correct, counted = tokens.metric(logits[:2].repeat(2, 1, 1), torch.tensor([[0, 1], [1, 1]]))
    assert (float(correct), counted) == (3.0, 4)

    own = Task("classification", (4,), 2, metric_fn=lambda output, target: (5.0, 7))
    assert own.metric(logits, torch.tensor([0, 0, 0])) == (5.0, 7)
    assert own.totals(logits, torch.tensor([0, 0, 0]))[1:] == (5.0, 7)
