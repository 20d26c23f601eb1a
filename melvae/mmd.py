"""Batch removal without a game: a maximum mean discrepancy between each batch's cells and the
other batches' cells of the same cell type, on the latent (as trVAE and scArches match batches
by MMD).

With `batch_mmd_weight` > 0 (declared in `melvae.params`, a module parameter; it needs a batch
key and cell-type labels) every training step adds `weight x` the minibatch's within-cell-type
MMD to the gradients: for each (cell type, batch) group of the minibatch whose cell type has
cells of another batch there, the squared MMD (biased estimate, a sum of Gaussian kernels of
several widths) between the group's posterior means and those of its cell type's other cells,
averaged over groups weighted by their cells. Where the adversary (`melvae.adversary`) trains a
classifier that the encoder can outrun (`bench/adversary_game.py`), this term measures the
mismatch directly, and the patient is removed only within cell types, as scib's batch ASW
measures it. Cells without a known label are left out. Labels are needed only while training;
the term changes the gradients, never a loss value (`term - term.detach()`, exactly 0).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

WIDTHS = (0.25, 1.0, 4.0)  # squared kernel widths, about the prior's unit scale


def within_label_mmd(
    mu: torch.Tensor, batch: torch.Tensor, labels: torch.Tensor, n_labels: int, n_batches: int
) -> torch.Tensor:
    """The cell-weighted mean squared MMD between each (label, batch) group of `mu` and its
    label's cells of other batches; 0 where no label has two batches. Label code `n_labels`
    (unknown) is left out.

    Examples
    --------
    >>> mu = torch.tensor([[0.0], [0.0], [3.0], [3.0]])
    >>> batch, labels = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
    >>> float(within_label_mmd(mu, batch, labels, 2, 2))
    0.0
    """
    known = labels < n_labels
    mu, batch, labels = mu[known], batch[known], labels[known]
    group = F.one_hot(labels * n_batches + batch, n_labels * n_batches).to(mu.dtype)
    same_label = (
        F.one_hot(labels, n_labels).to(mu.dtype)
        @ F.one_hot(torch.arange(n_labels * n_batches, device=mu.device) // n_batches, n_labels)
        .to(mu.dtype)
        .T
    )
    rest = same_label - group  # the cells of each group's label in other batches
    sizes, rest_sizes = group.sum(0), rest.sum(0)
    used = (sizes > 0) & (rest_sizes > 0)
    if not used.any():
        return mu.sum() * 0
    a = group[:, used] / sizes[used]
    r = rest[:, used] / rest_sizes[used]
    distances = torch.cdist(mu, mu).square()
    kernel = sum(torch.exp(-distances / (2 * width)) for width in WIDTHS)
    mmd = (a * (kernel @ a)).sum(0) + (r * (kernel @ r)).sum(0) - 2 * (a * (kernel @ r)).sum(0)
    return (mmd * sizes[used]).sum() / sizes[used].sum()


class BatchMMD(torch.nn.Module):
    """The within-cell-type MMD term (no weights of its own).

    Parameters
    ----------
    n_labels
        Cell-type labels; code `n_labels` is a cell without a known label, left out.
    n_batches
        Batches (codes 0 .. n_batches - 1).
    weight
        Weight of the MMD in the gradients (> 0).
    """

    def __init__(self, n_labels: int, n_batches: int, weight: float) -> None:
        super().__init__()
        self.n_labels = n_labels
        self.n_batches = n_batches
        self.weight = weight

    def gradient_only(
        self, mu: torch.Tensor, batch: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """`weight x within_label_mmd(...)` as a term whose value is exactly 0."""
        term = self.weight * within_label_mmd(mu, batch, labels, self.n_labels, self.n_batches)
        return term - term.detach()
