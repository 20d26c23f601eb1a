"""Decoder likelihoods: each owns its loss, its decoded mean and the transforms it can model.

Nothing else branches on a likelihood's name: `VAEModule`, `MelVAE`, the study file checks and
the search space all ask the object in `LIKELIHOODS`. The decoder's output is read as
- `bernoulli`: logits of a Bernoulli per gene, loss = BCE (the original, for [0, 1] min-max data);
- `gaussian`: the mean of a unit-variance Gaussian, loss = 0.5 * squared error (its negative
  log-likelihood without the constant);
- `negative_binomial`: logits of the expression proportions; the mean is softmax(logits) times
  the cell's library size, with a learned per-gene inverse dispersion `log_theta`. The encoder
  sees log1p(counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from melvae.errors import InputError
from melvae.losses import bernoulli_nll

LikelihoodName = Literal["bernoulli", "gaussian", "negative_binomial"]


@dataclass(frozen=True)
class Likelihood:
    """How a decoder's output models the data: the base, a unit-variance Gaussian.

    Parameters
    ----------
    name
        The name study files, `MelVAE.fit` and `melvae.json` use.
    transforms
        The preprocessing transforms (`melvae.preprocess`) whose output it can model.

    Examples
    --------
    >>> LIKELIHOODS["bernoulli"].transforms
    ('minmax',)
    """

    name: str
    transforms: tuple[str, ...]
    # Whether decoding needs each cell's library size (total counts).
    uses_library: bool = False

    def extra_parameters(self, n_genes: int) -> dict[str, nn.Parameter]:
        """Learned parameters besides the decoder's (registered on the module by name)."""
        return {}

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder reads of the (transformed) input `x`."""
        return x

    def mean(
        self, module: nn.Module, out: torch.Tensor, library: torch.Tensor | None
    ) -> torch.Tensor:
        """Expected expression in the transformed space for decoder output `out`."""
        return out

    def nll(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Per-cell negative log-likelihood of `x` given decoder output `out`, summed over genes."""
        return 0.5 * (x - out).square().sum(dim=-1)


class Bernoulli(Likelihood):
    """Bernoulli per gene on [0, 1] values; the decoder outputs logits."""

    def mean(
        self, module: nn.Module, out: torch.Tensor, library: torch.Tensor | None
    ) -> torch.Tensor:
        return torch.sigmoid(out)

    def nll(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return bernoulli_nll(out, x)


class NegativeBinomial(Likelihood):
    """Negative binomial on raw counts: proportions from the decoder, per-gene dispersion."""

    def extra_parameters(self, n_genes: int) -> dict[str, nn.Parameter]:
        return {"log_theta": nn.Parameter(torch.zeros(n_genes))}

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(x)

    def mean(
        self, module: nn.Module, out: torch.Tensor, library: torch.Tensor | None
    ) -> torch.Tensor:
        """Expected counts at `library` total counts per cell; without it, the proportions."""
        proportions = torch.softmax(out, dim=-1)
        return proportions if library is None else proportions * library

    def nll(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        library = x.sum(dim=-1, keepdim=True)
        log_mu = torch.log_softmax(out, dim=-1) + torch.log(library.clamp_min(1e-8))
        log_theta = module.log_theta
        theta = log_theta.exp()
        log_theta_plus_mu = torch.logaddexp(log_theta, log_mu)
        log_prob = (
            theta * (log_theta - log_theta_plus_mu)
            + x * (log_mu - log_theta_plus_mu)
            + torch.lgamma(x + theta)
            - torch.lgamma(theta)
            - torch.lgamma(x + 1)
        )
        return -log_prob.sum(dim=-1)


LIKELIHOODS: dict[str, Likelihood] = {
    lik.name: lik
    for lik in (
        Bernoulli("bernoulli", ("minmax",)),
        Likelihood("gaussian", ("minmax", "log1p", "counts")),
        NegativeBinomial("negative_binomial", ("counts",), uses_library=True),
    )
}


def get_likelihood(name: str, *, where: str) -> Likelihood:
    """The likelihood called `name`; an InputError naming `where` and the choices otherwise.

    Examples
    --------
    >>> get_likelihood("gaussian", where="example").transforms
    ('minmax', 'log1p', 'counts')
    """
    if name not in LIKELIHOODS:
        raise InputError(
            f"unknown likelihood {name!r}", where=where, fix=f"use one of {', '.join(LIKELIHOODS)}"
        )
    return LIKELIHOODS[name]


def check_pair(likelihood: str, transform: str, *, where: str) -> None:
    """Refuse a likelihood that cannot model `transform`-ed data, naming the valid pairs."""
    allowed = get_likelihood(likelihood, where=where).transforms
    if transform not in allowed:
        raise InputError(
            f"the {likelihood} decoder cannot model {transform!r}-transformed data",
            where=where,
            fix=f"use transform {' or '.join(map(repr, allowed))} with {likelihood}, or one of "
            f"the pairs {', '.join(valid_pairs())}",
        )


def valid_pairs() -> list[str]:
    """Every "transform/likelihood" pair a model can use, e.g. "minmax/bernoulli"."""
    return [f"{t}/{name}" for name, lik in LIKELIHOODS.items() for t in lik.transforms]
