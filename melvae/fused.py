"""The whole negative ELBO of the common VAE as one autograd node, its gradient written by hand.

For the shapes the default study trains (2,000 or 765 genes, hidden 64-512, batches of 32-128
cells) a step's arithmetic is a few matrix products, and autograd's bookkeeping of the ~20 nodes
of the plain module (each Linear, activation, the sample, the loss, the means and their sum) is
a third of the step on top. `vae_loss` computes the same loss as `VAEModule.loss` and, in one
backward, every weight's gradient with the products of `melvae.layers` (the arranged layouts for
the gene-facing layers where `WideLinear` uses them) and in-place element-wise passes.

It covers the original architecture and its searched variants without normalisation: 1-3
Linear + ReLU blocks each side, each optionally followed by dropout, and the Bernoulli
likelihood. Anything else (another activation or likelihood, a norm, a decoder that reads more
than the latent code, extra parameters) is not `covered` and takes the plain autograd path.
The same draws are made in the same order as the plain module's (encoder dropout, the noise,
decoder dropout), so both give the same numbers within float rounding for a seed
(`tests/test_fused.py` compares losses and gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from melvae.layers import arranged, input_gradient, linear_forward, weight_gradient
from melvae.likelihoods import Bernoulli


@dataclass(frozen=True)
class Block:
    """A Linear layer, whether a ReLU follows it, and the dropout probability after that."""

    linear: nn.Linear
    relu: bool
    dropout: float


@dataclass(frozen=True)
class Plan:
    """The module's layers in the order the loss uses them."""

    encoder: tuple[Block, ...]
    mu: nn.Linear
    logvar: nn.Linear
    decoder: tuple[Block, ...]

    def linears(self) -> list[nn.Linear]:
        """Every Linear layer: encoder, mu, logvar, decoder."""
        return [
            *(b.linear for b in self.encoder),
            self.mu,
            self.logvar,
            *(b.linear for b in self.decoder),
        ]


def _blocks(layers: nn.Sequential) -> tuple[Block, ...] | None:
    """Linear (+ ReLU (+ Dropout)) blocks of `layers`, or None if anything else is in it."""
    blocks: list[Block] = []
    items = list(layers)
    i = 0
    while i < len(items):
        linear = items[i]
        if not isinstance(linear, nn.Linear) or linear.bias is None:
            return None
        relu = i + 1 < len(items) and isinstance(items[i + 1], nn.ReLU)
        i += 1 + relu
        dropout = 0.0
        if relu and i < len(items) and isinstance(items[i], nn.Dropout):
            dropout = items[i].p
            i += 1
        blocks.append(Block(linear, relu, dropout))
    return tuple(blocks)


def plan_of(module: nn.Module) -> Plan | None:
    """The `Plan` of `module` if `vae_loss` covers it, else None (use the plain path)."""
    if type(module.likelihood_model) is not Bernoulli:
        return None
    encoder, decoder = _blocks(module.encoder), _blocks(module.decoder)
    if not encoder or not decoder:
        return None
    if not all(b.relu for b in encoder) or not all(b.relu for b in decoder[:-1]):
        return None
    last = decoder[-1]
    if last.relu or decoder[0].linear.in_features != module.mu.out_features:
        return None
    plan = Plan(encoder, module.mu, module.logvar, decoder)
    ours = {id(p) for layer in plan.linears() for p in (layer.weight, layer.bias)}
    if {id(p) for p in module.parameters()} != ours:
        return None
    return plan


def vae_loss(
    module: nn.Module,
    plan: Plan,
    x: torch.Tensor,
    kl_weight: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, recon, kl) of `VAEModule.loss` for a module covered by `plan` (`plan_of`).

    Parameters
    ----------
    module
        The VAE module (its `training` flag switches dropout on).
    plan
        `plan_of(module)`.
    x
        Cells x genes batch with values in [0, 1].
    kl_weight
        Weight of the KL term in the total.
    generator
        Where the reparameterisation noise is drawn from (torch's global generator if None).

    Returns
    -------
    tuple of torch.Tensor
        The negative ELBO, its reconstruction and its KL part, each a scalar averaged over cells.
    """
    weights = [t for layer in plan.linears() for t in (layer.weight, layer.bias)]
    return _VAELoss.apply(x, kl_weight, plan, generator, module.training, *weights)


def _forward_linear(h: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    if arranged(layer, h):
        return linear_forward(h, layer.weight, layer.bias)
    return torch.addmm(layer.bias, h, layer.weight.t())


def _backward_linear(
    grad: torch.Tensor, h: torch.Tensor, layer: nn.Linear, *, needs_input: bool
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(input gradient or None, weight gradient, bias gradient) of `layer` applied to `h`."""
    if arranged(layer, h):
        grad_input = input_gradient(grad, layer.weight) if needs_input else None
        grad_weight = weight_gradient(grad, h)
    else:
        grad_input = grad @ layer.weight if needs_input else None
        grad_weight = grad.t() @ h
    return grad_input, grad_weight, grad.sum(dim=0)


def _run_blocks(
    h: torch.Tensor, blocks: tuple[Block, ...], training: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Each block's input (then the last output), and its dropout mask (None without)."""
    inputs, masks = [h], []
    for block in blocks:
        h = _forward_linear(h, block.linear)
        mask = None
        if block.relu:
            h = h.relu_()
            if training and block.dropout > 0:
                # As F.dropout does it on the CPU: the same draws from the global generator.
                mask = torch.empty_like(h).bernoulli_(1 - block.dropout).div_(1 - block.dropout)
                h = h * mask
        inputs.append(h)
        masks.append(mask)
    return inputs, masks


def _backward_blocks(
    grad: torch.Tensor,
    blocks: tuple[Block, ...],
    inputs: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    needs_input: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The gradient at the blocks' input and [weight, bias] gradients of every block, in order."""
    grads: list[torch.Tensor] = []
    for i in range(len(blocks) - 1, -1, -1):
        block = blocks[i]
        if block.relu:
            if masks[i] is not None:
                grad = grad * masks[i]
            grad = torch.ops.aten.threshold_backward(grad, inputs[i + 1], 0)
        needs = needs_input or i > 0
        grad, grad_weight, grad_bias = _backward_linear(
            grad, inputs[i], block.linear, needs_input=needs
        )
        grads[:0] = [grad_weight, grad_bias]
    return grad, grads


@dataclass
class _Saved:
    """What the gradient needs of a forward pass: each block's input (then its output) and
    dropout mask, the posterior mean, the noise and the posterior standard deviation."""

    encoded: list[torch.Tensor]
    encoder_masks: list[torch.Tensor | None]
    mu: torch.Tensor
    eps: torch.Tensor
    std: torch.Tensor
    decoded: list[torch.Tensor]
    decoder_masks: list[torch.Tensor | None]


def _forward(
    x: torch.Tensor, plan: Plan, generator: torch.Generator | None, training: bool
) -> tuple[torch.Tensor, torch.Tensor, _Saved]:
    """(recon, kl), each averaged over cells, and what their gradient needs."""
    encoded, encoder_masks = _run_blocks(x, plan.encoder, training)
    h = encoded[-1]
    mu = _forward_linear(h, plan.mu)
    logvar = _forward_linear(h, plan.logvar)
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    std = torch.exp(0.5 * logvar)
    z = torch.addcmul(mu, eps, std)
    n = x.shape[0]
    kl = 0.5 * (torch.addcmul(std.square() - logvar, mu, mu).sum() - mu.numel()) / n
    decoded, decoder_masks = _run_blocks(z, plan.decoder, training)
    logits = decoded[-1]
    # sum(x * logits) as one BLAS dot product: no cells x genes temporary.
    recon = (F.softplus(logits).sum() - torch.dot(x.reshape(-1), logits.reshape(-1))) / n
    saved = _Saved(encoded, encoder_masks, mu, eps, std, decoded, decoder_masks)
    return recon, kl, saved


def _gradients(
    plan: Plan,
    saved: _Saved,
    per_recon: torch.Tensor | float,
    per_kl: torch.Tensor | float,
    needs_x: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The input's gradient (if `needs_x`) and every weight's, in `plan.linears()` order
    (weight, bias each), given the gradient of each cell's recon (`per_recon`) and KL term."""
    x, logits = saved.encoded[0], saved.decoded[-1]
    grad_logits = torch.sigmoid(logits).sub_(x).mul_(per_recon)
    grad_z, decoder_grads = _backward_blocks(
        grad_logits, plan.decoder, saved.decoded, saved.decoder_masks, needs_input=True
    )
    mu, eps, std = saved.mu, saved.eps, saved.std
    grad_mu = grad_z + per_kl * mu
    grad_logvar = 0.5 * (grad_z * eps * std + per_kl * (std.square() - 1))
    h = saved.encoded[-1]
    grad_h, grad_mu_weight, grad_mu_bias = _backward_linear(grad_mu, h, plan.mu, needs_input=True)
    grad_h_logvar, grad_logvar_weight, grad_logvar_bias = _backward_linear(
        grad_logvar, h, plan.logvar, needs_input=True
    )
    grad_x, encoder_grads = _backward_blocks(
        grad_h.add_(grad_h_logvar),
        plan.encoder,
        saved.encoded,
        saved.encoder_masks,
        needs_input=needs_x,
    )
    if grad_x is not None:  # the loss also reads x itself: d(-x * logits)/dx
        grad_x.sub_(logits * per_recon)
    middle = [grad_mu_weight, grad_mu_bias, grad_logvar_weight, grad_logvar_bias]
    return grad_x, [*encoder_grads, *middle, *decoder_grads]


@torch.no_grad()
def train_step(
    module: nn.Module,
    plan: Plan,
    x: torch.Tensor,
    kl_weight: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`vae_loss` and the gradient of its total, set as each weight's `.grad`, without autograd.

    The training loop's step: the same numbers as `vae_loss(...)[0].backward()` (after
    dropping the old gradients), without building or walking an autograd graph.

    Parameters
    ----------
    module, plan, x, kl_weight, generator
        As for `vae_loss`.

    Returns
    -------
    tuple of torch.Tensor
        The negative ELBO, its reconstruction and its KL part (scalars, averaged over cells).
    """
    recon, kl, saved = _forward(x, plan, generator, module.training)
    n = x.shape[0]
    _, grads = _gradients(plan, saved, 1.0 / n, kl_weight / n, needs_x=False)
    layers = plan.linears()
    for i, layer in enumerate(layers):
        layer.weight.grad, layer.bias.grad = grads[2 * i], grads[2 * i + 1]
    return recon + kl_weight * kl, recon, kl


class _VAELoss(torch.autograd.Function):
    """encoder -> (mu, logvar) -> z = mu + eps * std -> decoder -> Bernoulli NLL, + KL."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        kl_weight: float,
        plan: Plan,
        generator: torch.Generator | None,
        training: bool,
        *weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        recon, kl, saved = _forward(x, plan, generator, training)
        ctx.plan, ctx.kl_weight, ctx.saved = plan, kl_weight, saved
        return recon + kl_weight * kl, recon, kl

    @staticmethod
    def backward(
        ctx: Any, grad_total: torch.Tensor, grad_recon: torch.Tensor, grad_kl: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        n = ctx.saved.encoded[0].shape[0]
        per_recon = (grad_total + grad_recon) / n
        per_kl = (grad_total * ctx.kl_weight + grad_kl) / n
        grad_x, grads = _gradients(
            ctx.plan, ctx.saved, per_recon, per_kl, needs_x=ctx.needs_input_grad[0]
        )
        return (grad_x, None, None, None, None, *grads)
