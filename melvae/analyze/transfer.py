"""Cell-type transfer in the latent space: label query cells from a labelled reference.

A classifier is fitted on the reference cells' latent means and applied to the query's. Each query
cell gets a prediction and a confidence; a cell that the reference cannot vouch for is left
`UNASSIGNED` instead of being forced into a known type. This is SciBet's negative-control idea: in
the melanoma query, malignant cells, fibroblasts and endothelial cells ("Neg.cell") have no
reference type and should come out unassigned, not as T or B cells.

Pure functions: arrays in, a table or a JSON-safe dict out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from melvae.errors import InputError
from melvae.metrics import clean_labels

logger = logging.getLogger(__name__)

UNASSIGNED = "unassigned"
METHODS: tuple[str, ...] = ("knn", "logreg")


@dataclass(frozen=True)
class TransferResult:
    """Per-query-cell predictions and the rule's calibration.

    `table` (index = query cell ids) has columns `predicted` (a reference class or `UNASSIGNED`),
    `confidence` (in [0, 1]; 0 outside the reference's distribution), `best_match` (the class
    the classifier favours, kept for unassigned cells too), `vote`, `neighbour_distance`,
    `distance_percentile` and `out_of_distribution`; see `transfer_labels`.
    `distance_cutoff` is the calibrated distance beyond which a cell is out of distribution
    (None when that check is off).
    """

    table: pd.DataFrame
    classes: list[str]
    distance_cutoff: float | None


def transfer_labels(
    reference_latent: ArrayLike,
    reference_labels: ArrayLike,
    query_latent: ArrayLike,
    *,
    method: Literal["knn", "logreg"] = "knn",
    k: int = 15,
    threshold: float = 0.5,
    distance_quantile: float | None = 0.95,
    query_names: Sequence[str] | None = None,
) -> TransferResult:
    """Predict query cell types from the reference latent, leaving doubtful cells unassigned.

    The confidence of a query cell combines two checks, both calibrated on the reference:

    - vote: with `method="knn"` the fraction of the cell's `k` nearest reference cells that carry
      the winning label (ties go to the class of the nearer neighbour); with `"logreg"` the largest
      class probability of a multinomial logistic regression on the standardised latent.
    - distribution: `neighbour_distance` is the cell's mean euclidean distance to its `k` nearest
      reference cells. The same distance is computed for every reference cell against the other
      reference cells (leave-one-out), and its `distance_quantile` quantile is the cutoff. A
      query cell farther than that lies where no reference cell lies: a vote among its
      neighbours says nothing about it (a malignant cell always has *some* nearest T cells).
      `distance_percentile` is the share of reference cells that are closer to their own
      neighbours than the query cell is to them. Since the cutoff is a quantile of held-out
      reference cells, a query cell of a reference type is flagged with probability about
      1 - `distance_quantile` (5 % at the default): the price paid for catching novel cells.

    `confidence` is the vote for cells within the cutoff and 0 beyond it; cells with
    confidence below `threshold` are `UNASSIGNED`. `distance_quantile=None` turns the
    distribution check off (vote only). Reference cells with a missing label are ignored.
    With k-NN a class with fewer than `threshold * k` reference cells can never win a
    confident vote; a warning names such classes (lower `k` or use `"logreg"`).
    """
    if method not in METHODS:
        raise InputError(
            f"unknown transfer method {method!r}",
            where="transfer_labels(method=...)",
            fix=f"use one of {', '.join(METHODS)}",
        )
    if not 0 <= threshold <= 1:
        raise InputError(
            f"threshold must be in [0, 1], got {threshold}",
            where="transfer_labels(threshold=...)",
            fix="pass a confidence threshold such as 0.5",
        )
    if distance_quantile is not None and not 0 < distance_quantile <= 1:
        raise InputError(
            f"distance_quantile must be in (0, 1] or None, got {distance_quantile}",
            where="transfer_labels(distance_quantile=...)",
            fix="pass e.g. 0.95, or None to skip the out-of-distribution check",
        )
    x_ref, y_ref = _reference(reference_latent, reference_labels)
    x_query = _latent(query_latent, "query latent")
    if x_query.shape[1] != x_ref.shape[1]:
        raise InputError(
            f"reference latent has {x_ref.shape[1]} dimensions, query latent {x_query.shape[1]}",
            where="transfer_labels",
            fix="encode reference and query with the same model",
        )
    if x_query.shape[0] == 0:
        raise InputError(
            "the query has no cells",
            where="transfer_labels(query_latent=...)",
            fix="pass the latent means of at least one query cell",
        )
    if query_names is not None and len(query_names) != x_query.shape[0]:
        raise InputError(
            f"{len(query_names)} query cell names for {x_query.shape[0]} query cells",
            where="transfer_labels(query_names=...)",
            fix="pass one name per query cell, e.g. query.obs_names",
        )
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}", where="transfer_labels", fix="k >= 1")
    k = min(k, y_ref.size - 1)  # the leave-one-out calibration needs k other reference cells
    classes = sorted(set(y_ref))
    if method == "knn":
        _warn_small_classes(y_ref, k=k, threshold=threshold)

    neighbours = NearestNeighbors(n_neighbors=k).fit(x_ref)
    distance, index = neighbours.kneighbors(x_query)
    if method == "knn":
        best, vote = _knn_vote(y_ref[index], classes)
    else:
        best, vote = _logreg_vote(x_ref, y_ref, x_query)

    query_distance = distance.mean(axis=1)
    # Each reference cell is its own nearest neighbour: ask for k + 1 and drop that column.
    reference_distance = np.sort(neighbours.kneighbors(x_ref, n_neighbors=k + 1)[0][:, 1:].mean(1))
    percentile = np.searchsorted(reference_distance, query_distance, side="left") / (
        reference_distance.size
    )
    cutoff = None
    outside = np.zeros(x_query.shape[0], dtype=bool)
    if distance_quantile is not None:
        cutoff = float(np.quantile(reference_distance, distance_quantile))
        outside = query_distance > cutoff
    confidence = np.where(outside, 0.0, vote)
    predicted = np.where(confidence >= threshold, best, UNASSIGNED)
    table = pd.DataFrame(
        {
            "predicted": predicted.astype(object),
            "confidence": confidence,
            "best_match": best.astype(object),
            "vote": vote,
            "neighbour_distance": query_distance,
            "distance_percentile": percentile,
            "out_of_distribution": outside,
        },
        index=None if query_names is None else pd.Index(list(map(str, query_names))),
    )
    return TransferResult(table=table, classes=classes, distance_cutoff=cutoff)


def _latent(latent: ArrayLike, what: str) -> np.ndarray:
    x = np.asarray(latent, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise InputError(
            f"{what} must be a finite cells × dimensions matrix, got shape {x.shape}"
            + ("" if x.ndim != 2 else " with NaN or infinite values"),
            where="transfer_labels",
            fix="pass latent means from MelVAE.encode (NaN means the model diverged)",
        )
    return x


def _reference(latent: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Reference latent rows and string labels of the labelled cells, checked for use."""
    x = _latent(latent, "reference latent")
    names, present = clean_labels(labels)
    if names.size != x.shape[0]:
        raise InputError(
            f"{names.size} reference labels for {x.shape[0]} reference cells",
            where="transfer_labels",
            fix="pass one label per reference cell, in the latent's row order",
        )
    x, names = x[present], names[present]
    if UNASSIGNED in set(names):
        raise InputError(
            f"the reference labels contain {UNASSIGNED!r}, the name reserved for unassigned cells",
            where="transfer_labels(reference_labels=...)",
            fix=f"drop or rename the reference cells labelled {UNASSIGNED!r}",
        )
    if np.unique(names).size < 2 or names.size < 3:
        raise InputError(
            f"the reference has {names.size} labelled cells in {np.unique(names).size} "
            "class(es); transfer needs at least 2 classes and 3 cells",
            where="transfer_labels(reference_labels=...)",
            fix="use a labelled reference with several cell types",
        )
    return x, names


def _warn_small_classes(labels: np.ndarray, *, k: int, threshold: float) -> None:
    names, counts = np.unique(labels, return_counts=True)
    small = [
        f"{name} ({count})"
        for name, count in zip(names, counts, strict=True)
        if count < threshold * k
    ]
    if small:
        logger.warning(
            "reference classes with fewer than threshold * k = %.3g cells can never be assigned "
            "by the k-NN vote: %s; lower k or use method='logreg'",
            threshold * k,
            ", ".join(small),
        )


def _knn_vote(neighbour_labels: np.ndarray, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Winning class and its vote fraction per row of neighbour labels (nearest first)."""
    k = neighbour_labels.shape[1]
    counts = np.stack([(neighbour_labels == c).sum(axis=1) for c in classes], axis=1)
    # Tie-break towards the class whose nearest member ranks first: subtract rank / (k + 1) < 1.
    rank = np.arange(k)[None, :]
    first = np.stack(
        [np.where(neighbour_labels == c, rank, k).min(axis=1) for c in classes], axis=1
    )
    winner = np.argmax(counts - first / (k + 1), axis=1)
    rows = np.arange(neighbour_labels.shape[0])
    return np.asarray(classes, dtype=object)[winner], counts[rows, winner] / k


def _logreg_vote(
    x_ref: np.ndarray, y_ref: np.ndarray, x_query: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Most probable class and its probability from a logistic regression on the reference."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(x_ref, y_ref)
    proba = model.predict_proba(x_query)
    winner = np.argmax(proba, axis=1)
    classes = model.classes_.astype(object)
    return classes[winner], proba[np.arange(proba.shape[0]), winner]


def transfer_metrics(
    true_labels: ArrayLike, predicted: ArrayLike, *, reference_classes: Sequence[str]
) -> dict[str, Any]:
    """Score a transfer against the query's known labels (JSON-safe dict).

    Keys:
    - `n_cells`, `n_labelled` (query cells with a true label), `n_scored` (labelled cells whose
      label is a reference class);
    - `accuracy`, `macro_f1`, `f1` (per reference class present in the scored cells): over the
      scored cells, with `UNASSIGNED` counting as wrong; None when no cell can be scored;
    - `unassigned_rate`: share of all query cells left unassigned (unlabelled ones included);
    - `unassigned_rate_by_label` and `n_by_label`: per true label, including labels absent from
      the reference (e.g. "Neg.cell", where a high rate is the desired outcome).
    Cells with a missing true label only enter `n_cells` and `unassigned_rate`.
    """
    truth, labelled = clean_labels(true_labels)
    truth = truth.astype(object)  # plain str values, so the dict keys below are JSON-safe
    guess = clean_labels(predicted)[0].astype(object)
    if truth.size != guess.size:
        raise InputError(
            f"{truth.size} true labels for {guess.size} predictions",
            where="transfer_metrics",
            fix="pass the query's labels and predictions in the same cell order",
        )
    known = set(map(str, reference_classes))
    scored = labelled & np.isin(truth, list(known))
    y_true, y_pred = truth[scored], guess[scored]
    present = sorted(set(y_true))
    per_class = (
        f1_score(y_true, y_pred, labels=present, average=None, zero_division=0)
        if present
        else np.array([])
    )
    labels = sorted(set(truth[labelled]))
    unassigned = guess == UNASSIGNED
    return {
        "n_cells": int(truth.size),
        "n_labelled": int(labelled.sum()),
        "n_scored": int(scored.sum()),
        "accuracy": float(np.mean(y_true == y_pred)) if present else None,
        "macro_f1": float(per_class.mean()) if present else None,
        "f1": {c: float(f) for c, f in zip(present, per_class, strict=True)},
        "unassigned_rate": float(unassigned.mean()) if truth.size else None,
        "unassigned_rate_by_label": {
            label: float(unassigned[labelled & (truth == label)].mean()) for label in labels
        },
        "n_by_label": {label: int((labelled & (truth == label)).sum()) for label in labels},
    }
