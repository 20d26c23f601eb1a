"""Encoder-side batch removal: an adversarial batch classifier on the latent space.

Decoder conditioning (`melvae.module`) lets the decoder explain what is patient, but nothing
pushes patient information out of the encoder. With `batch_adversary_weight` > 0 (declared in
`melvae.params`, a module parameter) the module also holds a small classifier, latent -> batch
logits (2 hidden layers of 32, as scvi-tools' `TrainingPlan(adversarial_classifier=True)`), and
every training step adds `weight x cross-entropy(classifier(reverse(mu)), batch)` to the
gradients: the classifier learns to tell each cell's batch from its posterior mean `mu`, and the
gradient reversal `reverse` (identity forward, minus the gradient backward; Ganin & Lempitsky's
domain-adversarial training) makes the encoder move `mu` so that the classifier fails.

One backward pass and one optimizer, rather than scvi-tools' two optimizer steps per batch:
the training loop (`melvae.train`) then stays the one every module uses, and the two players'
updates come from the same minibatch and the same forward pass. The weight is a constant (scvi's
`scale_adversarial_loss="auto"` is 1 - KL weight, which is 0 after a KL warm-up and with the
default `kl_warmup_epochs = 0`, i.e. off).

The term changes the gradients, never a loss value: it enters the training loss as
`term - term.detach()`, which is exactly 0, so `train_loss`, `val_loss` and every logged loss
remain the negative ELBO. The adversary is logged on its own (`adversary_metrics`: the trained
classifier's cross-entropy and accuracy on validation cells).

The saved model keeps the classifier: `melvae.json` records the weight, so `load` rebuilds the
same module and its state loads whole; encoding never uses it (cells of an unseen patient
encode as without it), and its accuracy stays a diagnostic of how much batch the latent holds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

HIDDEN = 32  # scvi-tools' adversarial classifier: 2 hidden layers of 32


class _Reversed(torch.autograd.Function):
    """Identity forward, negated gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    """`x` unchanged, with the gradient that flows back through it negated.

    Examples
    --------
    >>> x = torch.ones(2, requires_grad=True)
    >>> reverse_gradient(x).sum().backward()
    >>> x.grad.tolist()
    [-1.0, -1.0]
    """
    return _Reversed.apply(x)


class BatchAdversary(nn.Module):
    """A batch classifier on the latent, trained against the encoder.

    Parameters
    ----------
    latent_dim
        Size of the latent space it reads.
    n_batches
        Batches it tells apart (>= 2).
    weight
        Weight of its cross-entropy in the gradients (> 0).
    """

    def __init__(self, latent_dim: int, n_batches: int, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.classifier = nn.Sequential(
            nn.Linear(latent_dim, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, n_batches),
        )

    def loss(self, mu: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Weighted cross-entropy of the classifier on `mu`, with the gradient to `mu` reversed:
        descending it trains the classifier to predict `batch` and the encoder to defeat it."""
        return self.weight * F.cross_entropy(self.classifier(reverse_gradient(mu)), batch)

    def gradient_only(self, mu: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """`loss(mu, batch)` as a term whose value is exactly 0: added to the negative ELBO it
        leaves the value as it is and adds the adversary's gradients."""
        term = self.loss(mu, batch)
        return term - term.detach()


def adversary_metrics(
    model: Any, latent: np.ndarray, batches: np.ndarray | None, *, prefix: str = "val"
) -> dict[str, float]:
    """The trained adversary on cells' latent codes: `{prefix}_adversary_loss` (unweighted
    cross-entropy) and `{prefix}_adversary_accuracy` (share of cells whose batch it predicts);
    empty for a model without an adversary or cells without batches.

    `model`: a `melvae.MelVAE` (its module and batch names); `latent`: the cells' posterior
    means; `batches`: their batch names (cells of batches the model never saw are skipped).
    """
    adversary = getattr(model.module, "adversary", None)
    if adversary is None or batches is None:
        return {}
    codes = pd.Categorical(batches, categories=model.batch_names).codes.astype(np.int64)
    known = codes >= 0  # cells of batches the model never saw have no class to predict
    latent, codes = latent[known], codes[known]
    device = next(adversary.parameters()).device
    with torch.no_grad():
        logits = adversary.classifier(torch.as_tensor(latent, dtype=torch.float32, device=device))
        target = torch.as_tensor(codes, device=device)
        loss = F.cross_entropy(logits, target).item()
        accuracy = (logits.argmax(dim=1) == target).double().mean().item()
    return {f"{prefix}_adversary_loss": loss, f"{prefix}_adversary_accuracy": accuracy}
