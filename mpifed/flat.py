"""A model whose parameters and float buffers live in one contiguous tensor.

MPI moves one buffer per round instead of one per tensor, and receiving the model costs no copy:
each parameter is a view into `flat`, so a broadcast into `flat` *is* the model update. Layout:
[all parameters | all floating-point buffers (BatchNorm running statistics)].
"""

from __future__ import annotations

import torch
from torch import nn


class FlatModel:
    def __init__(self, module: nn.Module, device: torch.device | str = "cpu"):
        module.to(device)
        self.module = module
        self.params = [p for p in module.parameters()]
        self.buffers = [b for b in module.buffers() if b.is_floating_point()]
        self.n_params = sum(p.numel() for p in self.params)
        self.n_buffers = sum(b.numel() for b in self.buffers)
        self.flat = torch.empty(self.n_params + self.n_buffers, dtype=torch.float32, device=device)
        offset = 0
        for t in self.params + self.buffers:
            view = self.flat[offset: offset + t.numel()].view_as(t)
            view.copy_(t.detach())
            t.data = view
            offset += t.numel()
        self.layout = [(name, tuple(p.shape)) for name, p in module.named_parameters()]

    @property
    def size(self) -> int:
        return self.flat.numel()

    def param_view(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector into tensors shaped like the parameters (views, no copy)."""
        out, offset = [], 0
        for p in self.params:
            out.append(vec[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def grads_into(self, out: torch.Tensor) -> None:
        """Copy the parameters' gradients into out[:n_params] (zeros where a parameter got none)."""
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                out[offset: offset + n].zero_()
            else:
                out[offset: offset + n].copy_(p.grad.reshape(-1))
            offset += n

    def buffers_into(self, out: torch.Tensor) -> None:
        out[self.n_params: self.size].copy_(self.flat[self.n_params:])

    def attach_grads(self, vec: torch.Tensor) -> None:
        """Make each parameter's .grad a view into vec[:n_params], so an optimizer reads it in place."""
        for p, g in zip(self.params, self.param_view(vec)):
            p.grad = g
