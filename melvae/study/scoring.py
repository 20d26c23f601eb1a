"""Scoring a model on the study's splits: one module for trials, the champion and baselines.

A `SplitScores` encodes each split's scored cells at most once per model (the validation cells
in one pass that also reconstructs them), then computes from those latents the final metrics
(k-NN fitted on the training latent), the selection score `bio_score` on train + validation,
the batch-mixing metrics (`batch_score` and its parts) where the data have a batch key, and the
held-out `test_*` metrics. Every split is bounded by `metric_cells`: at most
`EVAL_MAX_CELLS` cells, a stratified subsample beyond, so scoring an atlas costs as much as
scoring a small data set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import anndata as ad
import numpy as np

from melvae.data.backed import subset
from melvae.evaluate import batch_correction, bio_conservation, evaluate_latent
from melvae.subsample import stratified_subsample

if TYPE_CHECKING:
    from melvae.study.objective import PreparedData

FINAL_METRICS = (
    "silhouette",
    "davies_bouldin",
    "knn_accuracy",
    "knn_macro_f1",
    "ari",
    "nmi",
    "recon_corr",
)
# Final metrics and the t-SNE use at most this many cells of a split (a stratified subsample,
# the same for every trial): silhouette is quadratic in cells and t-SNE worse.
EVAL_MAX_CELLS = 5000


class Embedding(Protocol):
    """What scoring needs of a model: latents of cells, with their reconstruction in one pass."""

    def encode(self, adata: ad.AnnData) -> np.ndarray: ...

    def encode_and_reconstruct(
        self, adata: ad.AnnData
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def _metric_index(data: PreparedData, split: str) -> np.ndarray | None:
    """Indices of the split's scored cells; None when that is all of them."""
    cells, labels = getattr(data, split), data.labels(split)
    strata = np.zeros(cells.n_obs) if labels is None else labels
    keep = stratified_subsample(strata, EVAL_MAX_CELLS, seed=0)
    return None if keep.size == cells.n_obs else keep


def metric_cells(data: PreparedData, split: str) -> tuple[ad.AnnData, np.ndarray | None]:
    """The split's cells that final metrics are computed on, and their labels: all cells up to
    EVAL_MAX_CELLS, else a stratified subsample of that size (a view, not a copy)."""
    cells, labels = getattr(data, split), data.labels(split)
    keep = _metric_index(data, split)
    if keep is None:
        return cells, labels
    return subset(cells, keep), None if labels is None else labels[keep]


def metric_batches(data: PreparedData, split: str) -> np.ndarray | None:
    """The batch of each of `metric_cells`' cells, in the same order; None without a batch key."""
    batches, keep = data.batches(split), _metric_index(data, split)
    return batches if batches is None or keep is None else batches[keep]


class SplitScores:
    """One model's scores on the study's splits, each split encoded at most once.

    Parameters
    ----------
    model
        A MelVAE or a baseline embedding (`Embedding`).
    data
        The study's prepared splits.

    Examples
    --------
    >>> scores = SplitScores(model, data)  # doctest: +SKIP
    >>> scores.final("val") | scores.bio() | scores.batch("val")  # a trial's  # doctest: +SKIP
    >>> scores.test()  # the held-out numbers, never used for selection  # doctest: +SKIP
    """

    def __init__(self, model: Embedding, data: PreparedData) -> None:
        self.model = model
        self.data = data
        self._latents: dict[str, np.ndarray] = {}
        self._reconstructions: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def cells(self, split: str) -> tuple[ad.AnnData, np.ndarray | None]:
        """The split's scored cells and labels (`metric_cells`)."""
        return metric_cells(self.data, split)

    def latent(self, split: str) -> np.ndarray:
        """The latent of the split's scored cells, encoded on first use only."""
        if split not in self._latents:
            self._latents[split] = self.model.encode(self.cells(split)[0])
        return self._latents[split]

    def _reconstruction(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._reconstructions:
            latent, x, x_hat = self.model.encode_and_reconstruct(self.cells(split)[0])
            self._latents[split] = latent
            self._reconstructions[split] = (x, x_hat)
        return self._reconstructions[split]

    def final(self, split: str = "val") -> dict[str, float]:
        """The final metrics (`FINAL_METRICS`) on one held-out split."""
        x, x_hat = self._reconstruction(split)
        return evaluate_latent(
            train_latent=self.latent("train"),
            train_labels=self.cells("train")[1],
            val_latent=self.latent(split),
            val_labels=self.cells(split)[1],
            val_x=x,
            val_x_hat=x_hat,
        )

    def bio(self) -> dict[str, float]:
        """The selection score (`bio_score` and its parts) on the labelled train + validation
        cells; empty for unlabelled data. The test split is never scored here."""
        if self.data.label_key is None:
            return {}
        latent = np.concatenate([self.latent("train"), self.latent("val")])
        labels = np.concatenate([self.cells("train")[1], self.cells("val")[1]])
        return bio_conservation(latent, labels)

    def batch(self, split: str = "val") -> dict[str, float]:
        """How well the batches mix in one split's latent (`evaluate.BATCH_METRICS`: batch ASW,
        iLISI, graph connectivity and their mean `batch_score`), on the same cells as the other
        metrics; empty without a batch key."""
        batches = metric_batches(self.data, split)
        if batches is None:
            return {}
        return batch_correction(self.latent(split), self.cells(split)[1], batches)

    def test(self) -> dict[str, float]:
        """The held-out test metrics (final and batch), named test_<metric>."""
        held_out = self.final("test") | self.batch("test")
        return {f"test_{name}": value for name, value in held_out.items()}


def evaluate_model(model: Embedding, data: PreparedData, split: str = "val") -> dict[str, float]:
    """The final metrics of `model` on one split: `SplitScores(model, data).final(split)`."""
    return SplitScores(model, data).final(split)
