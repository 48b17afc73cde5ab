"""A model of your own: any function that returns a torch.nn.Module.

mpifed calls it with what the data declares, by the names it takes: input_shape (one sample's input,
without the batch axis), and classes (classification) or vocab (next-token); plus the job's
model.options as keyword arguments.
"""

import math

from torch import nn


def mlp(input_shape, classes, hidden=64):
    """Two fully connected layers on the flattened input."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )
