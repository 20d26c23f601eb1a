"""Final scores of a trained model: latent-space label metrics plus reconstruction quality."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

from melvae import metrics
from melvae.metrics import MetricUndefinedError
from melvae.subsample import stratified_subsample

logger = logging.getLogger(__name__)


def evaluate_latent(
    *,
    train_latent: ArrayLike,
    train_labels: ArrayLike | None,
    val_latent: ArrayLike,
    val_labels: ArrayLike | None,
    val_x: ArrayLike,
    val_x_hat: ArrayLike,
    seed: int = 0,
) -> dict[str, float]:
    """Score a model on the validation cells; the k-NN classifier is fitted on the training cells.

    Returns `silhouette, davies_bouldin, knn_accuracy, knn_macro_f1, ari, nmi, recon_corr`.
    Cells with a missing label are left out of the label metrics. A label metric is omitted (with
    a logged warning) when its labels are None or it is undefined, e.g. fewer than two classes,
    so unlabelled data still gets `recon_corr`.
    """
    label_metrics: dict[str, Callable[[], float]] = {}
    if val_labels is None:
        logger.warning("No validation labels: label metrics are skipped")
    else:
        label_metrics["silhouette"] = lambda: metrics.silhouette(val_latent, val_labels)
        label_metrics["davies_bouldin"] = lambda: metrics.davies_bouldin(val_latent, val_labels)
        if train_labels is None:
            logger.warning("No training labels: k-NN metrics are skipped")
        else:
            knn_args = (train_latent, train_labels, val_latent, val_labels)
            label_metrics["knn_accuracy"] = lambda: metrics.knn_accuracy(*knn_args)
            label_metrics["knn_macro_f1"] = lambda: metrics.knn_macro_f1(*knn_args)
        # One k-means run for both (it is the slow part); an undefined one raises for both.
        agreement = functools.cache(
            lambda: metrics.kmeans_agreement(val_latent, val_labels, seed=seed)
        )
        label_metrics["ari"] = lambda: agreement()[0]
        label_metrics["nmi"] = lambda: agreement()[1]

    results: dict[str, float] = {}
    skipped: dict[str, list[str]] = {}  # reason -> metric names, so each reason is logged once
    for name, compute in label_metrics.items():
        try:
            results[name] = compute()
        except MetricUndefinedError as err:
            skipped.setdefault(err.what, []).append(name)
    for reason, names in skipped.items():
        logger.warning("Skipped %s: %s", ", ".join(names), reason)

    results["recon_corr"] = metrics.recon_corr(val_x, val_x_hat)
    return results


BIO_COMPONENTS = ("silhouette", "knn_accuracy", "knn_macro_f1", "ari", "nmi")
BIO_METRICS = (*(f"bio_{name}" for name in BIO_COMPONENTS), "bio_score")


def bio_conservation(
    latent: ArrayLike, labels: ArrayLike, *, seed: int = 0, max_cells: int = 5000
) -> dict[str, float]:
    """The selection score of a latent space and its parts, on all labelled cells given.

    Meant for the training + validation cells together (the model never sees labels, so they are
    fair to score on): silhouette and k-means ARI/NMI over all of them, k-NN accuracy and macro
    F1 by repeated 5-fold cross-validation, so the score rests on hundreds of cells rather than
    on the ~100 of a validation split. Larger sets are subsampled (stratified) to `max_cells`.
    Returns `bio_<part>` for each part plus `bio_score`, their mean (see `metrics.bio_score`);
    empty when the labels leave a part undefined (e.g. one class).
    """
    keep = stratified_subsample(labels, max_cells, seed=seed)
    x, y = np.asarray(latent)[keep], np.asarray(labels, dtype=object)[keep]
    try:
        ari, nmi = metrics.kmeans_agreement(x, y, seed=seed)
        accuracy, macro_f1 = metrics.cv_knn_scores(x, y, seed=seed)
        parts = {
            "silhouette": metrics.silhouette(x, y),
            "knn_accuracy": accuracy,
            "knn_macro_f1": macro_f1,
            "ari": ari,
            "nmi": nmi,
        }
    except MetricUndefinedError as err:
        logger.warning("Skipped bio_score: %s", err.what)
        return {}
    return {f"bio_{name}": value for name, value in parts.items()} | {
        "bio_score": metrics.bio_score(**parts)
    }


BATCH_METRICS = ("batch_asw", "ilisi", "graph_connectivity", "batch_score")


def batch_correction(
    latent: ArrayLike, labels: ArrayLike | None, batches: ArrayLike
) -> dict[str, float]:
    """How well the batches (patients, samples) mix in a latent space, scib-metrics' batch
    metrics: `batch_asw`, `ilisi`, `graph_connectivity` and `batch_score`, their mean (each in
    [0, 1], higher = better mixed). Without labels only `ilisi` (which needs none); a metric
    undefined for the input is omitted, and `batch_score` is given only when all three are;
    empty with fewer than two batches."""
    names, present = metrics.clean_labels(batches)
    if np.unique(names[present]).size < 2:
        logger.warning("Skipped batch metrics: the cells come from fewer than two batches")
        return {}
    parts: dict[str, Callable[[], float]] = {"ilisi": lambda: metrics.ilisi(latent, batches)}
    if labels is not None:
        parts["batch_asw"] = lambda: metrics.batch_asw(latent, labels, batches)
        parts["graph_connectivity"] = lambda: metrics.graph_connectivity(latent, labels)
    results: dict[str, float] = {}
    for name, compute in parts.items():
        try:
            results[name] = compute()
        except MetricUndefinedError as err:
            logger.warning("Skipped %s: %s", name, err.what)
    if len(results) == 3:
        results["batch_score"] = metrics.batch_score(**results)
    return {name: results[name] for name in BATCH_METRICS if name in results}
