"""The whole negative ELBO of the common VAE, its gradient written by hand.

For the shapes the default study trains (2,000 or 765 genes, hidden 64-512, batches of 32-128
cells) a step's arithmetic is a few matrix products, and autograd's bookkeeping of the ~20 nodes
of the plain module (each Linear, norm, activation, the sample, the loss, the means and their
sum) comes on top. `vae_loss` computes the same loss as `VAEModule.loss` as one autograd node,
and `train_step`, the training loop's step, computes it and sets every weight's gradient
without autograd at all. Both use the products of `melvae.layers` (the arranged layouts for the
gene-facing layers where `WideLinear` uses them), torch's own LayerNorm kernels and in-place
element-wise passes.

They cover the original architecture and the default study's searched variants: 1-3 Linear
(+ LayerNorm) + ReLU blocks each side, each optionally followed by dropout, and the Bernoulli
likelihood. Anything else (another activation or likelihood, batch norm, a decoder that reads
more than the latent code, extra parameters such as a batch-conditioned module's) has no
`plan_of`, and `melvae.train` then takes `VAEModule.loss`, the plain autograd path.
The same draws are made in the same order as the plain module's (encoder dropout, the noise,
decoder dropout), so both give the same numbers within float rounding for a seed
(`tests/test_fused.py` compares losses and gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from melvae.layers import input_gradient, linear_forward, thin, weight_gradient, wide
from melvae.likelihoods import Bernoulli

# Factors in (1, 2] multiplied before one logarithm is taken (`softplus_sum`).
PRODUCT_RUN = 64


@dataclass(frozen=True)
class Dense:
    """A Linear layer as the hand-written step uses it: its weight and bias, held here rather
    than looked up through `nn.Module.__getattr__` ~40 times a step, and whether it takes the
    arranged products for a thin batch (`melvae.layers.wide`)."""

    weight: nn.Parameter
    bias: nn.Parameter
    wide: bool
    # weight.t(), a view taken once: Adam and `load_state_dict` write the weight in place, so
    # it stays the weight's transpose, and a product reads it without a `t()` call of its own.
    weight_t: torch.Tensor

    @classmethod
    def of(cls, layer: nn.Linear) -> Dense:
        """The `Dense` of `layer` (which has a bias)."""
        return cls(layer.weight, layer.bias, wide(layer), layer.weight.detach().t())


@dataclass(frozen=True)
class Block:
    """A Linear layer, the LayerNorm after it (or None), whether a ReLU follows, and the dropout
    probability after that."""

    linear: Dense
    norm: nn.LayerNorm | None
    relu: bool
    dropout: float

    def weights(self) -> list[torch.Tensor]:
        """The block's parameters in the order its gradients are returned."""
        norm = [] if self.norm is None else [self.norm.weight, self.norm.bias]
        return [self.linear.weight, self.linear.bias, *norm]


@dataclass(frozen=True)
class Plan:
    """The module's layers in the order the loss uses them."""

    encoder: tuple[Block, ...]
    mu: Dense
    logvar: Dense
    decoder: tuple[Block, ...]
    _weights: tuple[torch.Tensor, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        middle = [self.mu.weight, self.mu.bias, self.logvar.weight, self.logvar.bias]
        weights = (
            *(w for b in self.encoder for w in b.weights()),
            *middle,
            *(w for b in self.decoder for w in b.weights()),
        )
        object.__setattr__(self, "_weights", weights)

    def weights(self) -> tuple[torch.Tensor, ...]:
        """Every parameter in the order of the gradients: encoder, mu, logvar, decoder."""
        return self._weights


def _blocks(layers: nn.Sequential) -> tuple[Block, ...] | None:
    """Linear (+ LayerNorm) (+ ReLU (+ Dropout)) blocks of `layers`, or None if anything else
    is in it."""
    blocks: list[Block] = []
    items = list(layers)
    i = 0
    while i < len(items):
        linear = items[i]
        if not isinstance(linear, nn.Linear) or linear.bias is None:
            return None
        i += 1
        norm = items[i] if i < len(items) and type(items[i]) is nn.LayerNorm else None
        if norm is not None:
            if norm.weight is None or norm.bias is None or len(norm.normalized_shape) != 1:
                return None
            i += 1
        relu = i < len(items) and isinstance(items[i], nn.ReLU)
        i += relu
        dropout = 0.0
        if relu and i < len(items) and isinstance(items[i], nn.Dropout):
            dropout = items[i].p
            i += 1
        blocks.append(Block(Dense.of(linear), norm, relu, dropout))
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
    if last.relu or last.norm is not None:
        return None
    if decoder[0].linear.weight.shape[1] != module.mu.out_features:
        return None
    plan = Plan(encoder, Dense.of(module.mu), Dense.of(module.logvar), decoder)
    if {id(p) for p in module.parameters()} != {id(p) for p in plan.weights()}:
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
        The negative ELBO, its reconstruction and its KL part, each a scalar averaged over cells
        (one autograd node).
    """
    return _VAELoss.apply(x, kl_weight, plan, generator, module.training, *plan.weights())


def loss_sums(
    module: nn.Module,
    plan: Plan,
    x: torch.Tensor,
    generator: torch.Generator | None,
    *,
    training: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(recon, kl) of `vae_loss`, each summed over the cells of `x` instead of averaged, without
    autograd: what a pass over many batches adds up (the total is recon + kl_weight * kl).
    `training`: whether dropout is applied (None: as the module's own mode says)."""
    if training is None:
        training = module.training
    with torch.inference_mode():
        recon, kl, _ = _forward(x, plan, generator, training, gradient=False)
    return recon, kl


def train_step(
    module: nn.Module,
    plan: Plan,
    x: torch.Tensor,
    kl_weight: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training step's loss and gradient: set the gradient of `vae_loss`'s total as each
    weight's `.grad` (replacing any there) without building or walking an autograd graph, the
    same numbers as `vae_loss(...)[0].backward()` after dropping the old gradients. The
    gradients are written into the `.grad` tensors the last step left (`_grad_buffer`), so a
    copy of the last step's gradient must be taken, not a reference.

    The step runs in inference mode, which spares each of its ~60 tensor operations autograd's
    share of torch's dispatch (about 1 us each once the caches are cold from a product: 1.5 %
    of a step at 2,000 genes). The `.grad` tensors stay normal tensors, so autograd can still
    add to them afterwards.

    Parameters are `vae_loss`'s. Returns `loss_sums`'s (recon, kl), summed over the batch's
    cells: a step then adds no calls of its own to what the training loop keeps.
    """
    with torch.inference_mode():
        recon, kl, saved = _forward(x, plan, generator, module.training, overwrite=True)
        n = x.shape[0]
        _, grads = _gradients(plan, saved, 1.0 / n, kl_weight / n, needs_x=False, in_place=True)
        for weight, grad in zip(plan.weights(), grads, strict=True):
            if weight.grad is not grad:  # a LayerNorm's, from a kernel without an output argument
                _grad_buffer(weight).copy_(grad)
    return recon, kl


def _forward_linear(h: torch.Tensor, layer: Dense) -> torch.Tensor:
    if layer.wide and thin(h):
        return linear_forward(h, layer.weight, layer.bias)
    return torch.addmm(layer.bias, h, layer.weight_t)  # F.linear's own product, without its t()


def _backward_linear(
    grad: torch.Tensor, h: torch.Tensor, layer: Dense, *, needs_input: bool, in_place: bool
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(input gradient or None, weight gradient, bias gradient) of `layer` applied to `h`; with
    `in_place`, the weight and bias gradients are written into their `.grad` tensors
    (`_grad_buffer`), else into new ones."""
    out = _grad_buffer(layer.weight) if in_place else None
    if layer.wide and thin(h):
        grad_input = input_gradient(grad, layer.weight) if needs_input else None
        grad_weight = weight_gradient(grad, h, out=out)
    else:
        # The plain products also for the layer reading the latent code: transposed (as the
        # arranged ones are) its two took 20 and 17 us against 14 and 16 plain (64 cells,
        # hidden 512, latent 5, torch 2.13, 1 thread), and were slower at every shape measured.
        grad_input = torch.mm(grad, layer.weight) if needs_input else None
        grad_weight = torch.mm(grad.t(), h, out=out)
    grad_bias = torch.sum(grad, dim=0, out=_grad_buffer(layer.bias) if in_place else None)
    return grad_input, grad_weight, grad_bias


def _grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    """`weight.grad` if the next gradient can be written into it (contiguous, outside autograd;
    torch keeps a `.grad` of the weight's shape, dtype and device), else a new tensor (a normal
    one, also inside inference mode) set as `weight.grad`.

    A new 2 MB gradient a step (the 2,000-gene layers) costs more than its product: ~0.8 ms
    against ~0.4 ms per pair of weight gradients when Adam ran in between (fresh pages from
    the allocator each step); written into the last step's gradient it costs nothing.
    """
    grad = weight.grad
    if grad is None or grad.requires_grad or not grad.is_contiguous() or grad.is_inference():
        with torch.inference_mode(False):
            grad = weight.grad = torch.empty_like(weight, requires_grad=False)
    return grad


@dataclass(frozen=True)
class _BlockState:
    """What a block's gradient needs besides its input and output: its dropout mask and its
    LayerNorm's input, mean and reciprocal standard deviation (None where it has none)."""

    mask: torch.Tensor | None = None
    norm_input: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    rstd: torch.Tensor | None = None


def _run_blocks(
    h: torch.Tensor, blocks: tuple[Block, ...], training: bool
) -> tuple[list[torch.Tensor], list[_BlockState]]:
    """Each block's input (then the last output), and its `_BlockState`."""
    inputs, states = [h], []
    for block in blocks:
        h = _forward_linear(h, block.linear)
        norm_input = mean = rstd = mask = None
        if block.norm is not None:
            norm = block.norm
            norm_input = h
            h, mean, rstd = torch.native_layer_norm(
                h, norm.normalized_shape, norm.weight, norm.bias, norm.eps
            )
        if block.relu:
            h = h.relu_()
            if training and block.dropout > 0:
                # As F.dropout does it on the CPU: the same draws from the global generator.
                mask = torch.empty_like(h).bernoulli_(1 - block.dropout).div_(1 - block.dropout)
                h = h * mask
        inputs.append(h)
        states.append(_BlockState(mask, norm_input, mean, rstd))
    return inputs, states


def _backward_blocks(
    grad: torch.Tensor,
    blocks: tuple[Block, ...],
    inputs: list[torch.Tensor],
    states: list[_BlockState],
    needs_input: bool,
    in_place: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The gradient at the blocks' input and the gradients of every block's `weights()`."""
    grads: list[torch.Tensor] = []
    for i in range(len(blocks) - 1, -1, -1):
        block, state = blocks[i], states[i]
        if block.relu:
            if state.mask is not None:
                grad = grad * state.mask
            grad = torch.ops.aten.threshold_backward(grad, inputs[i + 1], 0)
        norm_grads: list[torch.Tensor] = []
        if block.norm is not None:
            norm = block.norm
            grad, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
                grad,
                state.norm_input,
                norm.normalized_shape,
                state.mean,
                state.rstd,
                norm.weight,
                norm.bias,
                [True, True, True],
            )
            norm_grads = [grad_norm_weight, grad_norm_bias]
        needs = needs_input or i > 0
        grad, grad_weight, grad_bias = _backward_linear(
            grad, inputs[i], block.linear, needs_input=needs, in_place=in_place
        )
        grads[:0] = [grad_weight, grad_bias, *norm_grads]
    return grad, grads


@dataclass
class _Saved:
    """What the gradient needs of a forward pass: each block's input (then its output) and
    `_BlockState`, the posterior mean, exp(logvar) - 1, the noise, the posterior standard
    deviation and sigmoid(logits) (None where no gradient is taken)."""

    encoded: list[torch.Tensor]
    encoder_states: list[_BlockState]
    mu: torch.Tensor
    variance_minus_one: torch.Tensor
    eps: torch.Tensor
    std: torch.Tensor
    decoded: list[torch.Tensor]
    decoder_states: list[_BlockState]
    probs: torch.Tensor | None


def softplus_sum(logits: torch.Tensor) -> torch.Tensor:
    """The sum of softplus(logits) = log(1 + exp(logits)) over all entries, with one exponential
    per entry and one logarithm per `PRODUCT_RUN` entries.

    With p = sigmoid(l), softplus(l) = max(l, 0) - log(max(p, 1 - p)) (l - log p where l >= 0,
    -log(1 - p) below). Each max(p, 1 - p) = 1/2 + |p - 1/2| lies in [1/2, 1], so a product of
    `PRODUCT_RUN` of them lies in [2**-64, 1] (float32 holds down to 2**-126) and the sum of their
    logarithms is the logarithm of the products. Without the gradient's sigmoid (the validation
    pass) everything is done in the one temporary: 414 cells x 2,000 genes in 1.45 ms against
    1.48 ms for the sum of log(1 + exp(-|l|)) products and 2.9 ms for `F.softplus(l).sum()`.
    """
    probs = torch.sigmoid(logits)
    return _softplus_sum_of(logits, probs, out=probs)


def softplus_sum_and_sigmoid(
    logits: torch.Tensor, *, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`softplus_sum(logits)` and sigmoid(logits), the reconstruction's gradient, from one
    exponential per entry: for 32 cells x 2,000 genes 144 against 217 us for the sum of
    log(1 + exp(-|l|)) products and then `torch.sigmoid` (1 thread), the same within rounding.
    With `overwrite`, `logits` itself is the temporary (its values are lost) instead of a new
    cells x genes tensor."""
    probs = torch.sigmoid(logits)
    if overwrite:
        positive, scratch = logits.clamp_min_(0).sum(), logits
    else:
        scratch = torch.empty_like(probs)
        positive = torch.clamp_min(logits, 0, out=scratch).sum()
    return positive - _log_product(torch.sub(probs, 0.5, out=scratch).abs_().add_(0.5)), probs


def _softplus_sum_of(logits: torch.Tensor, probs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`softplus_sum(logits)` given probs = sigmoid(logits), with `out` (which may be `probs`) as
    the one temporary."""
    logs = _log_product(torch.sub(probs, 0.5, out=out).abs_().add_(0.5))
    return torch.clamp_min(logits, 0, out=out).sum() - logs


def _log_product(factors: torch.Tensor) -> torch.Tensor:
    """The sum of log(factors), one logarithm per product of `PRODUCT_RUN` entries (each entry in
    [1/2, 1], so no product underflows)."""
    if factors.numel() % PRODUCT_RUN == 0:  # the common case: one view, no slices
        return factors.view(-1, PRODUCT_RUN).prod(dim=1).log_().sum()
    flat = factors.reshape(-1)
    whole = flat.numel() // PRODUCT_RUN * PRODUCT_RUN
    logs = flat[:whole].view(-1, PRODUCT_RUN).prod(dim=1).log_().sum()
    return logs + flat[whole:].log().sum()


def _forward(
    x: torch.Tensor,
    plan: Plan,
    generator: torch.Generator | None,
    training: bool,
    *,
    gradient: bool = True,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, _Saved]:
    """(recon, kl), each summed over cells, and what their gradient needs (without
    `gradient`, no sigmoid of the logits; with `overwrite`, the logits are lost, which only
    the input's gradient reads)."""
    encoded, encoder_states = _run_blocks(x, plan.encoder, training)
    h = encoded[-1]
    mu = _forward_linear(h, plan.mu)
    logvar = _forward_linear(h, plan.logvar)
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    std = torch.exp(0.5 * logvar)
    z = torch.addcmul(mu, eps, std)
    variance_minus_one = torch.expm1(logvar)  # exp(logvar) - 1, which the gradient reads too
    kl = 0.5 * torch.sub(variance_minus_one, logvar).addcmul_(mu, mu).sum()
    decoded, decoder_states = _run_blocks(z, plan.decoder, training)
    logits = decoded[-1]
    # sum(x * logits) as one BLAS dot product: no cells x genes temporary.
    x_dot_logits = torch.dot(x.reshape(-1), logits.reshape(-1))
    if gradient:
        softplus, probs = softplus_sum_and_sigmoid(logits, overwrite=overwrite)
    else:
        softplus, probs = softplus_sum(logits), None
    recon = softplus - x_dot_logits
    saved = _Saved(
        encoded, encoder_states, mu, variance_minus_one, eps, std, decoded, decoder_states, probs
    )
    return recon, kl, saved


def _gradients(
    plan: Plan,
    saved: _Saved,
    per_recon: float,
    per_kl: float,
    needs_x: bool,
    in_place: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The input's gradient (if `needs_x`) and every weight's, in `plan.weights()` order, given
    the gradient of each cell's recon (`per_recon`) and KL term (`per_kl`). With `in_place`
    (the training step, whose forward is used once), the Linear layers' gradients are written
    into their `.grad` tensors (`_grad_buffer`), and `saved` is overwritten."""
    x, logits = saved.encoded[0], saved.decoded[-1]
    grad_logits = (saved.probs.sub_(x) if in_place else saved.probs - x).mul_(per_recon)
    grad_z, decoder_grads = _backward_blocks(
        grad_logits,
        plan.decoder,
        saved.decoded,
        saved.decoder_states,
        needs_input=True,
        in_place=in_place,
    )
    # d/dmu = dz + per_kl * mu; d/dlogvar = (dz * eps * std + per_kl * (exp(logvar) - 1)) / 2
    grad_mu = torch.add(grad_z, saved.mu, alpha=per_kl)
    excess = saved.variance_minus_one
    grad_logvar = excess.mul_(0.5 * per_kl) if in_place else excess * (0.5 * per_kl)
    grad_logvar.addcmul_(
        grad_z, saved.eps.mul_(saved.std) if in_place else saved.eps * saved.std, value=0.5
    )
    h = saved.encoded[-1]
    grad_h, grad_mu_weight, grad_mu_bias = _backward_linear(
        grad_mu, h, plan.mu, needs_input=True, in_place=in_place
    )
    _, grad_logvar_weight, grad_logvar_bias = _backward_linear(
        grad_logvar, h, plan.logvar, needs_input=False, in_place=in_place
    )
    grad_x, encoder_grads = _backward_blocks(
        grad_h.addmm_(grad_logvar, plan.logvar.weight),
        plan.encoder,
        saved.encoded,
        saved.encoder_states,
        needs_input=needs_x,
        in_place=in_place,
    )
    if grad_x is not None:  # the loss also reads x itself: d(-x * logits)/dx
        grad_x.sub_(logits * per_recon)
    middle = [grad_mu_weight, grad_mu_bias, grad_logvar_weight, grad_logvar_bias]
    return grad_x, [*encoder_grads, *middle, *decoder_grads]


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
        n = x.shape[0]
        recon, kl = recon / n, kl / n
        return recon + kl_weight * kl, recon, kl

    @staticmethod
    def backward(
        ctx: Any, grad_total: torch.Tensor, grad_recon: torch.Tensor, grad_kl: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        n = ctx.saved.encoded[0].shape[0]
        per_recon = float(grad_total + grad_recon) / n
        per_kl = float(grad_total * ctx.kl_weight + grad_kl) / n
        grad_x, grads = _gradients(
            ctx.plan, ctx.saved, per_recon, per_kl, needs_x=ctx.needs_input_grad[0], in_place=False
        )
        return (grad_x, None, None, None, None, *grads)
