"""Per-cell losses whose backward pass is cheaper than autograd's: the Bernoulli reconstruction
loss and the reparameterised sample with its KL term.

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


class _SampleKL(torch.autograd.Function):
    """z = mu + eps * exp(logvar / 2) and KL(N(mu, exp(logvar)) || N(0, I)) per cell, as one
    autograd node: d/dmu = dz + dkl * mu, d/dlogvar = dz * eps * std / 2 + dkl * (var - 1) / 2."""

    @staticmethod
    def forward(
        mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        std = torch.exp(0.5 * logvar)
        z = torch.addcmul(mu, eps, std)
        kl = 0.5 * (torch.addcmul(std.square() - logvar, mu, mu) - 1).sum(dim=-1)
        return z, kl

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        mu, logvar, eps = inputs
        ctx.save_for_backward(mu, logvar, eps)

    @staticmethod
    def backward(
        ctx: Any, grad_z: torch.Tensor, grad_kl: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        mu, logvar, eps = ctx.saved_tensors
        std = torch.exp(0.5 * logvar)
        grad_kl = grad_kl.unsqueeze(-1)
        grad_mu = torch.addcmul(grad_z, grad_kl, mu)
        grad_logvar = 0.5 * torch.addcmul(grad_z * eps * std, grad_kl, std.square() - 1)
        return grad_mu, grad_logvar, None


def sample_and_kl(
    mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reparameterised sample z = mu + eps * exp(logvar / 2) and each cell's KL divergence
    from the standard normal prior, 0.5 * sum(exp(logvar) + mu^2 - 1 - logvar), in one autograd
    node (autograd's chain through the same expressions makes about ten)."""
    return _SampleKL.apply(mu, logvar, eps)
