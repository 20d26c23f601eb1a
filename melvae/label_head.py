"""A training-only cell-type classifier on the latent, in the manner of scANVI's classifier.

With `label_classifier_weight` > 0 (declared in `melvae.params`, a module parameter; it needs a
batch key and cell-type labels) the module holds a linear classifier, latent -> cell-type
logits, and every training step adds `weight x cross-entropy(classifier(mu), label)` over the
minibatch's cells with a known label to the gradients. Unlike the batch adversary its gradient
is *not* reversed: the encoder is pushed to keep cell types apart, so that removing the patient
(the adversary, the decoder's batch input) does not remove cell-type structure with it. The
term changes gradients, never a loss value (it enters as `term - term.detach()`, exactly 0), and
labels are needed only while training: encoding reads no label.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LabelHead(nn.Module):
    """A linear cell-type classifier on the latent, trained with the encoder.

    Parameters
    ----------
    latent_dim
        Size of the latent space it reads.
    n_labels
        Cell-type labels it predicts; code `n_labels` is a cell without a known label, left out.
    weight
        Weight of its cross-entropy in the gradients (> 0).
    """

    def __init__(self, latent_dim: int, n_labels: int, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.n_labels = n_labels
        self.classifier = nn.Linear(latent_dim, n_labels)

    def loss(self, mu: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Weighted mean cross-entropy over the cells with a known label (0 for none)."""
        known = labels < self.n_labels
        each = F.cross_entropy(
            self.classifier(mu), labels.clamp(max=self.n_labels - 1), reduction="none"
        )
        return self.weight * (each * known).sum() / known.sum().clamp(min=1)

    def gradient_only(self, mu: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`loss(mu, labels)` as a term whose value is exactly 0."""
        term = self.loss(mu, labels)
        return term - term.detach()
