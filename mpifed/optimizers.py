"""The round's two optimizers, built in one place so that training and the start-up probes (which
time the same steps: mpifed.probes) cannot drift apart.

E = 1 (FedSGD): the server steps the aggregated gradient with the job's SGD (momentum, Nesterov,
weight decay); clients only compute gradients. E > 1 (FedAvg): clients take E plain SGD steps with
weight decay, and the server steps the averaged model delta with its own learning rate and momentum.
"""

from __future__ import annotations

import torch

from mpifed.session import Session


def local_optimizer(s: Session) -> torch.optim.SGD:
    """A client's optimizer for E > 1 local steps (mpifed.client.local_steps sets its learning rate)."""
    return torch.optim.SGD(s.model.params, lr=s.job.optim.lr, weight_decay=s.job.optim.weight_decay)


def server_optimizer(s: Session, params=None) -> torch.optim.SGD:
    """The server's optimizer over the model's parameters, or over `params` (the probes' scratch copy)."""
    o, params = s.job.optim, s.model.params if params is None else params
    if s.job.train.local_steps == 1:
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.server_lr, momentum=o.server_momentum)
