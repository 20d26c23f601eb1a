"""The VAE as a torch module: the original architecture with a choice of decoder likelihood.

encoder: Linear(n_genes -> hidden) + ReLU -> (mu, logvar) via two Linear(hidden -> latent);
decoder: Linear(latent -> hidden) + ReLU -> Linear(hidden -> n_genes). `n_layers` hidden layers
(each optionally followed by a batch/layer norm before the activation and by dropout after it)
deepen both sides; the activation may be ReLU, GELU or ELU; the defaults (1 layer, no norm, no
dropout, ReLU) are the original module, parameter for parameter. The decoder
output is read by the likelihood object (`melvae.likelihoods`): its loss, mean and encoder input.

With `n_batches` > 0 the module is conditioned on each cell's batch in the manner of scVI: the
batch's one-hot code enters the decoder's first layer (and, with `batch_conditioning =
"encoder_decoder"`, the encoder's first layer too). A one-hot input to a linear layer adds one
weight column per batch to its pre-activation, so each conditioned layer gets a table of those
columns (`nn.Embedding`, initialised as `nn.Linear` initialises the one-hot columns it would
have), created after every other weight: without batches the module is the unconditioned one,
parameter for parameter and draw for draw.

With `batch_adversary_weight` > 0 (it needs batches) the module also holds a batch classifier on
the latent trained against the encoder (`melvae.adversary`), created after everything else: its
term changes the training gradients, never the loss values (the negative ELBO). With
`batch_adversary_conditioning = "label"` that classifier also reads each training cell's
cell-type label (`n_labels` > 0 labels, plus an "unknown" slot): the per-cell codes `loss` gets
are then (cells x 2), the batch code and the label code; the encoder and decoder never see it.
The label head (`melvae.label_head`) and the within-cell-type MMD (`batch_mmd_weight`,
`melvae.mmd`) read those label codes too, likewise only while training.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from melvae import params
from melvae.adversary import BatchAdversary
from melvae.errors import InputError
from melvae.label_head import LabelHead
from melvae.layers import WideLinear
from melvae.likelihoods import LikelihoodName, get_likelihood
from melvae.losses import sample_and_kl
from melvae.mmd import BatchMMD


class LossParts(NamedTuple):
    """Negative ELBO parts, each a scalar tensor averaged over cells (summed over genes/latents)."""

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU}


def hidden_stack(
    in_dim: int,
    hidden_dim: int,
    n_layers: int,
    *,
    norm: str,
    dropout: float,
    activation: str,
    first: type[nn.Linear] = nn.Linear,
) -> list[nn.Module]:
    """`n_layers` blocks of Linear -> (norm) -> activation -> (dropout), the first (a `first`)
    reading `in_dim`."""
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers.append(first(in_dim, hidden_dim) if i == 0 else nn.Linear(hidden_dim, hidden_dim))
        if norm == "batch":
            layers.append(nn.BatchNorm1d(hidden_dim))
        elif norm == "layer":
            layers.append(nn.LayerNorm(hidden_dim))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return layers


class VAEModule(nn.Module):
    """VAE for cells x genes input: 1-3 hidden layers each side (1 = the original), optionally
    conditioned on each cell's batch (`n_batches` > 0)."""

    def __init__(
        self,
        n_genes: int,
        hidden_dim: int,
        latent_dim: int,
        likelihood: LikelihoodName = "bernoulli",
        n_batches: int = 0,
        n_labels: int = 0,
        **architecture: Any,
    ) -> None:
        """Build the module; `architecture` takes the other module parameters of
        `melvae.params` (n_layers, dropout, norm, batch_conditioning, ...), each defaulting to
        the original. `n_batches`: the batches it is conditioned on (0: none); `n_labels`: the
        cell-type labels a label-conditioned adversary reads (used only by one)."""
        super().__init__()
        self.likelihood_model = get_likelihood(likelihood, where="VAEModule")
        if n_genes < 1:
            raise InputError(
                f"n_genes = {n_genes}: a module needs at least one gene",
                where="VAEModule",
                fix="give data with at least one gene",
            )
        block = params.module_values(
            {"hidden_dim": hidden_dim, "latent_dim": latent_dim, **architecture}, where="VAEModule"
        )
        self.likelihood = likelihood
        block.pop("latent_dim")
        hidden_dim = block.pop("hidden_dim")
        conditioning = block.pop("batch_conditioning")
        adversary_weight = block.pop("batch_adversary_weight")
        adversary_reads = block.pop("batch_adversary_conditioning")
        adversary_rate = block.pop("batch_adversary_learning_rate_scale")
        label_weight = block.pop("label_classifier_weight")
        mmd_weight = block.pop("batch_mmd_weight")
        # The two gene-facing layers hold nearly all weights: WideLinear lays out their products.
        self.encoder = nn.Sequential(*hidden_stack(n_genes, hidden_dim, **block, first=WideLinear))
        self.mu = nn.Linear(hidden_dim, latent_dim)
        self.logvar = nn.Linear(hidden_dim, latent_dim)
        self.decoder = nn.Sequential(
            *hidden_stack(latent_dim, hidden_dim, **block), WideLinear(hidden_dim, n_genes)
        )
        for name, parameter in self.likelihood_model.extra_parameters(n_genes).items():
            self.register_parameter(name, parameter)
        if n_batches < 0:
            raise InputError(
                f"n_batches = {n_batches}: a count of batches cannot be negative",
                where="VAEModule",
                fix="give 0 (no batch covariate) or the number of batches",
            )
        self.n_batches = n_batches
        # Created last, so the weights above are drawn exactly as without batches.
        self.decoder_batch = _one_hot_columns(n_batches, latent_dim, hidden_dim)
        self.encoder_batch = (
            _one_hot_columns(n_batches, n_genes, hidden_dim)
            if conditioning == "encoder_decoder"
            else None
        )
        if adversary_weight > 0 and n_batches == 0:
            raise InputError(
                f"batch_adversary_weight = {adversary_weight}: an adversarial batch classifier "
                "needs batches, and this module has none",
                where="VAEModule",
                fix='set a batch key (e.g. [data] batch_key = "sample" or --batch-key), or '
                "leave batch_adversary_weight at 0",
            )
        if adversary_weight > 0 and adversary_reads == "label" and n_labels == 0:
            raise InputError(
                'batch_adversary_conditioning = "label": the adversary removes the batch within '
                "cell types, and this module was given no cell-type labels",
                where="VAEModule",
                fix="give the training cells' labels (MelVAE.fit(label_key=...), a study's "
                '[data] label_key), or set batch_adversary_conditioning = "none"',
            )
        # Created after every other weight: without it the module is drawn exactly as before.
        self.adversary = None
        if adversary_weight > 0:
            self.adversary = BatchAdversary(
                latent_dim,
                n_batches,
                adversary_weight,
                n_labels=n_labels if adversary_reads == "label" else 0,
                learning_rate_scale=adversary_rate,
            )
        _needs_batches_and_labels(
            "label_classifier_weight",
            label_weight,
            "a cell-type classifier on the latent",
            n_batches=n_batches,
            n_labels=n_labels,
        )
        # Then the label head, likewise (an adversary's draws come first, as before).
        self.label_head = (
            LabelHead(latent_dim, n_labels, label_weight) if label_weight > 0 else None
        )
        _needs_batches_and_labels(
            "batch_mmd_weight",
            mmd_weight,
            "matching batches within cell types",
            n_batches=n_batches,
            n_labels=n_labels,
        )
        self.batch_mmd = BatchMMD(n_labels, n_batches, mmd_weight) if mmd_weight > 0 else None

    @property
    def reads_labels(self) -> bool:
        """Whether training gives this module each cell's label code (next to its batch code)."""
        return (
            self.label_head is not None
            or self.batch_mmd is not None
            or (self.adversary is not None and self.adversary.reads_labels)
        )

    def learning_rate_scales(self) -> dict[nn.Parameter, float]:
        """The weights trained at a multiple of the learning rate other than 1, with it: the
        adversary's classifier at `batch_adversary_learning_rate_scale` (empty by default)."""
        if self.adversary is None or self.adversary.learning_rate_scale == 1:
            return {}
        scale = self.adversary.learning_rate_scale
        return dict.fromkeys(self.adversary.parameters(), scale)

    @property
    def encoder_conditioned(self) -> bool:
        """Whether encoding a cell needs its batch (the encoder is conditioned too)."""
        return self.encoder_batch is not None

    def encode(
        self, x: torch.Tensor, batch: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of the latent code for each cell.

        `batch`: each cell's batch code (int64), needed only by a conditioned encoder.
        """
        h = _conditioned(
            self.encoder, self.likelihood_model.encoder_input(x), self.encoder_batch, batch
        )
        return self.mu(h), self.logvar(h)

    def decoded(self, z: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's raw output for latent codes `z` of cells of batch codes `batch`."""
        return _conditioned(self.decoder, z, self.decoder_batch, batch)

    def decode_mean(
        self,
        z: torch.Tensor,
        library: torch.Tensor | None = None,
        batch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Expected expression in the transformed space for latent codes `z`.

        `library` (cells x 1 total counts) only matters for a likelihood that uses it
        (negative_binomial; without it the result is each gene's expected proportion).
        `batch`: the batch codes to decode as (a conditioned module needs them).
        """
        return self.likelihood_model.mean(self, self.decoded(z, batch), library)

    def reconstruct(self, x: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
        """Expected expression decoded from each cell's posterior mean (no sampling)."""
        mu, _ = self.encode(x, batch)
        return self.decode_mean(mu, library=x.sum(dim=-1, keepdim=True), batch=batch)

    def loss(
        self,
        x: torch.Tensor,
        kl_weight: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        batch: torch.Tensor | None = None,
    ) -> LossParts:
        """Negative ELBO: reconstruction + kl_weight * KL(q(z|x) || N(0, I)).

        One reparameterised sample per cell, drawn from `generator` (the global RNG if None);
        `batch`: each cell's batch code (int64), for a conditioned module; for a module whose
        adversary reads labels, (cells x 2) codes: batch, then label. In training mode a
        module with an adversary adds its term to `total`'s gradients (its value stays the
        negative ELBO).
        """
        labels = None
        if batch is not None and batch.dim() == 2:
            batch, labels = batch[:, 0], batch[:, 1]
        mu, logvar = self.encode(x, batch)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        z, kl = sample_and_kl(mu, logvar, eps)
        recon = self.likelihood_model.nll(self, x, self.decoded(z, batch)).mean()
        kl = kl.mean()
        total = recon + kl_weight * kl
        if self.adversary is not None and self.training:
            total = total + self.adversary.gradient_only(mu, batch, labels)
        if self.label_head is not None and self.training:
            total = total + self.label_head.gradient_only(mu, labels)
        if self.batch_mmd is not None and self.training:
            total = total + self.batch_mmd.gradient_only(mu, batch, labels)
        return LossParts(total, recon, kl)


def _needs_batches_and_labels(
    name: str, weight: float, what: str, *, n_batches: int, n_labels: int
) -> None:
    """Refuse a weight > 0 of a training term (`what`) that needs batches and labels, in a
    module without them."""
    if weight > 0 and (n_labels == 0 or n_batches == 0):
        raise InputError(
            f"{name} = {weight}: {what} needs batches and cell-type labels, and this module "
            "lacks them",
            where="VAEModule",
            fix="give a batch key and the training cells' labels (MelVAE.fit(batch_key=..., "
            f"label_key=...)), or leave {name} at 0",
        )


def _one_hot_columns(n_batches: int, in_dim: int, out_dim: int) -> nn.Embedding | None:
    """The weight columns a one-hot batch code adds to a Linear(in_dim -> out_dim) layer, drawn
    as `nn.Linear(in_dim + n_batches, out_dim)` draws its weights; None without batches."""
    if n_batches == 0:
        return None
    columns = nn.Embedding(n_batches, out_dim)
    bound = 1 / math.sqrt(in_dim + n_batches)
    nn.init.uniform_(columns.weight, -bound, bound)
    return columns


def _conditioned(
    stack: nn.Sequential,
    x: torch.Tensor,
    columns: nn.Embedding | None,
    batch: torch.Tensor | None,
) -> torch.Tensor:
    """`stack(x)`, with each cell's batch columns added to the first layer's output."""
    if columns is None:
        return stack(x)
    if batch is None:
        raise InputError(
            "this module is conditioned on the batch, but no batch codes were given",
            where="VAEModule",
            fix="pass each cell's batch code (MelVAE does so from the model's batch_key)",
        )
    return stack[1:](stack[0](x) + columns(batch))
