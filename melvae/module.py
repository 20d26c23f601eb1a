"""The VAE as a torch module: the original architecture with a choice of decoder likelihood.

encoder: Linear(n_genes -> hidden) + ReLU -> (mu, logvar) via two Linear(hidden -> latent);
decoder: Linear(latent -> hidden) + ReLU -> Linear(hidden -> n_genes). `n_layers` hidden layers
(each optionally followed by a batch/layer norm before the activation and by dropout after it)
deepen both sides; the activation may be ReLU, GELU or ELU; the defaults (1 layer, no norm, no
dropout, ReLU) are the original module, parameter for parameter. The decoder
output is read by the likelihood object (`melvae.likelihoods`): its loss, mean and encoder input.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from melvae import params
from melvae.errors import InputError
from melvae.fused import plan_of, vae_loss
from melvae.layers import WideLinear
from melvae.likelihoods import LikelihoodName, get_likelihood
from melvae.losses import sample_and_kl


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
    """VAE for cells x genes input: 1-3 hidden layers each side (1 = the original)."""

    def __init__(
        self,
        n_genes: int,
        hidden_dim: int,
        latent_dim: int,
        likelihood: LikelihoodName = "bernoulli",
        **architecture: Any,
    ) -> None:
        """Build the module; `architecture` takes the other module parameters of
        `melvae.params` (n_layers, dropout, norm, ...), each defaulting to the original."""
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
        # The two gene-facing layers hold nearly all weights: WideLinear lays out their products.
        self.encoder = nn.Sequential(*hidden_stack(n_genes, hidden_dim, **block, first=WideLinear))
        self.mu = nn.Linear(hidden_dim, latent_dim)
        self.logvar = nn.Linear(hidden_dim, latent_dim)
        self.decoder = nn.Sequential(
            *hidden_stack(latent_dim, hidden_dim, **block), WideLinear(hidden_dim, n_genes)
        )
        for name, parameter in self.likelihood_model.extra_parameters(n_genes).items():
            self.register_parameter(name, parameter)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of the latent code for each cell."""
        h = self.encoder(self.likelihood_model.encoder_input(x))
        return self.mu(h), self.logvar(h)

    def decode_mean(self, z: torch.Tensor, library: torch.Tensor | None = None) -> torch.Tensor:
        """Expected expression in the transformed space for latent codes `z`.

        `library` (cells x 1 total counts) only matters for a likelihood that uses it
        (negative_binomial; without it the result is each gene's expected proportion).
        """
        return self.likelihood_model.mean(self, self.decoder(z), library)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Expected expression decoded from each cell's posterior mean (no sampling)."""
        mu, _ = self.encode(x)
        return self.decode_mean(mu, library=x.sum(dim=-1, keepdim=True))

    def loss(
        self, x: torch.Tensor, kl_weight: float = 1.0, *, generator: torch.Generator | None = None
    ) -> LossParts:
        """Negative ELBO: reconstruction + kl_weight * KL(q(z|x) || N(0, I)).

        One reparameterised sample per cell, drawn from `generator` (the global RNG if None).
        A module `melvae.fused` covers (ReLU blocks with or without layer norm and dropout, the
        Bernoulli likelihood) computes it as one autograd node; the numbers are
        `autograd_loss`'s within float rounding.
        """
        plan = plan_of(self)
        if plan is not None:
            return LossParts(*vae_loss(self, plan, x, kl_weight, generator))
        return self.autograd_loss(x, kl_weight, generator=generator)

    def autograd_loss(
        self, x: torch.Tensor, kl_weight: float = 1.0, *, generator: torch.Generator | None = None
    ) -> LossParts:
        """`loss` through the layers' own autograd nodes, for any architecture."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        z, kl = sample_and_kl(mu, logvar, eps)
        recon = self.likelihood_model.nll(self, x, self.decoder(z)).mean()
        kl = kl.mean()
        return LossParts(recon + kl_weight * kl, recon, kl)
