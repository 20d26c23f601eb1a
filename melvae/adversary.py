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

With `batch_adversary_conditioning = "label"` the classifier also reads each cell's cell-type
label as a one-hot code ([mu, one-hot(label)] -> batch; one extra "unknown" slot for cells
without a label or with one the training cells lack). Patients differ in cell-type composition,
so a plain adversary, which can read a patient off the cell type, pushes cell-type structure out
of the latent with the patient; a classifier that is given the cell type learns only what `mu`
says about the patient *beyond* it, and the encoder is pushed to remove only that: the patient
within each cell type, what scib's batch ASW measures. The labels are given to the classifier,
never to the encoder, and only while training: encoding needs no label.

`batch_adversary_learning_rate_scale` (default 1: the shared rate of before) gives the
classifier its own learning rate, a multiple of the module's (the one optimizer updates it at
that rate, `melvae.train`). At the shared rate the adversary loses its game: a study's early
stopping ends training after some 25 epochs, a few hundred classifier steps, and a fresh
classifier trained on the frozen latent reads validation cells' patients far better than the
adversary does (`bench/adversary_game.py`), so the encoder is pushed against a classifier that
no longer tells it where the patient is. A faster classifier (rates 10, 30) measured no better:
the encoder then leaves more patient in the latent (README "Patients and samples"), so the
default study does not search it.

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

from melvae.errors import InputError

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
    n_labels
        Cell-type labels it also reads, one-hot, next to the latent (0: none); the classifier
        has one slot more, `n_labels`, for cells without a known label (`label_codes`).
    learning_rate_scale
        Its classifier's learning rate as a multiple of the module's (`melvae.train` reads it).
    """

    def __init__(
        self,
        latent_dim: int,
        n_batches: int,
        weight: float,
        n_labels: int = 0,
        learning_rate_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.weight = weight
        self.learning_rate_scale = learning_rate_scale
        self.label_slots = n_labels + 1 if n_labels else 0
        self.classifier = nn.Sequential(
            nn.Linear(latent_dim + self.label_slots, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, n_batches),
        )

    @property
    def reads_labels(self) -> bool:
        """Whether the classifier reads cell-type label codes next to the latent."""
        return self.label_slots > 0

    def logits(self, mu: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Batch logits for latent codes `mu` (and, for a classifier that reads them, the
        cells' label codes `labels`, int64, `n_labels` = unknown)."""
        if not self.reads_labels:
            return self.classifier(mu)
        if labels is None:
            raise InputError(
                "this batch adversary reads cell-type labels, and none were given",
                where="BatchAdversary",
                fix="pass each cell's label code (MelVAE.fit does so from its label_key)",
            )
        one_hot = F.one_hot(labels, self.label_slots).to(mu.dtype)
        return self.classifier(torch.cat([mu, one_hot], dim=1))

    def loss(
        self, mu: torch.Tensor, batch: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Weighted cross-entropy of the classifier on `mu` (and `labels`), with the gradient
        to `mu` reversed: descending it trains the classifier to predict `batch` and the
        encoder to defeat it."""
        return self.weight * F.cross_entropy(self.logits(reverse_gradient(mu), labels), batch)

    def gradient_only(
        self, mu: torch.Tensor, batch: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`loss(mu, batch, labels)` as a term whose value is exactly 0: added to the negative
        ELBO it leaves the value as it is and adds the adversary's gradients."""
        term = self.loss(mu, batch, labels)
        return term - term.detach()


def label_codes(labels: np.ndarray, label_names: list[str]) -> np.ndarray:
    """Each cell's label code for a classifier that reads labels: the index of its label in
    `label_names`, or `len(label_names)` (the "unknown" slot) for a missing or unseen label.

    Examples
    --------
    >>> label_codes(np.array(["T", None, "B", "NK"], dtype=object), ["B", "T"]).tolist()
    [1, 2, 0, 2]
    """
    named = pd.Series(labels, dtype=object)
    codes = pd.Categorical(named.where(named.isna(), named.astype(str)), categories=label_names)
    codes = codes.codes.astype(np.int64)
    return np.where(codes < 0, len(label_names), codes)


def adversary_metrics(
    model: Any,
    latent: np.ndarray,
    batches: np.ndarray | None,
    *,
    labels: np.ndarray | None = None,
    prefix: str = "val",
) -> dict[str, float]:
    """The trained adversary on cells' latent codes: `{prefix}_adversary_loss` (unweighted
    cross-entropy) and `{prefix}_adversary_accuracy` (share of cells whose batch it predicts);
    empty for a model without an adversary or cells without batches.

    `model`: a `melvae.MelVAE` (its module, batch and label names); `latent`: the cells'
    posterior means; `batches`: their batch names (cells of batches the model never saw are
    skipped); `labels`: their cell-type labels, which an adversary that reads labels is given
    (None: cells without labels, each in the "unknown" slot).
    """
    adversary = getattr(model.module, "adversary", None)
    if adversary is None or batches is None:
        return {}
    codes = pd.Categorical(batches, categories=model.batch_names).codes.astype(np.int64)
    known = codes >= 0  # cells of batches the model never saw have no class to predict
    if labels is None:
        labels = np.full(len(codes), None, dtype=object)
    label_code = label_codes(labels, model.label_names)[known]
    latent, codes = latent[known], codes[known]
    device = next(adversary.parameters()).device
    with torch.no_grad():
        logits = adversary.logits(
            torch.as_tensor(latent, dtype=torch.float32, device=device),
            torch.as_tensor(label_code, device=device) if adversary.reads_labels else None,
        )
        target = torch.as_tensor(codes, device=device)
        loss = F.cross_entropy(logits, target).item()
        accuracy = (logits.argmax(dim=1) == target).double().mean().item()
    return {f"{prefix}_adversary_loss": loss, f"{prefix}_adversary_accuracy": accuracy}
