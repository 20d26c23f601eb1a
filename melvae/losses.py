"""Per-cell reconstruction losses whose backward pass is cheaper than autograd's.

`bernoulli_nll` is the original study's loss, binary cross-entropy of [0, 1] data against decoder
logits, summed over genes. Written as softplus(logits) − x · logits, its forward is two passes over
the batch and its gradient, sigmoid(logits) − x, one fused pass; autograd through
`binary_cross_entropy_with_logits(reduction="none").sum(-1)` makes about twice as many passes over
the cells × genes batch. In the original configuration the training pass was 6–12 % faster with
this loss than with autograd's (an A/B on 2 cores, 4 alternating runs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class _BernoulliNLL(torch.autograd.Function):
    @staticmethod
    def forward(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(logits).sum(dim=-1) - torch.linalg.vecdot(x, logits)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, x = ctx.saved_tensors
        grad_logits = torch.sigmoid(logits).sub_(x).mul_(grad.unsqueeze(-1))
        grad_x = -logits * grad.unsqueeze(-1) if ctx.needs_input_grad[1] else None
        return grad_logits, grad_x


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-cell Bernoulli negative log-likelihood of `x` (values in [0, 1]) given decoder
    `logits`, summed over genes: the same values as `binary_cross_entropy_with_logits`."""
    return _BernoulliNLL.apply(logits, x)
