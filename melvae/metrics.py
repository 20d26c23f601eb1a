"""Latent-space and reconstruction metrics: one pure function per metric, arrays in, float out.

In the style of scib-metrics. Cells whose label is missing (NaN / None / pd.NA) are left out of
every label metric, so partly annotated data can still be scored on the cells that are annotated.
A metric that is undefined for its input (e.g. fewer than two classes) raises
`MetricUndefinedError` rather than returning a misleading number; `melvae.evaluate` catches it and
omits that metric.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    davies_bouldin_score,
    f1_score,
    normalized_mutual_info_score,
    silhouette_samples,
    silhouette_score,
)
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from melvae.errors import InputError


class MetricUndefinedError(InputError):
    """The metric has no meaningful value for this input (e.g. only one class is labelled)."""


def clean_labels(labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels as strings, mask of cells that have a label); NaN/None/pd.NA are missing.

    Strings make labels from different sources comparable (train vs validation, categorical vs
    object columns).
    """
    values = np.asarray(labels, dtype=object)
    if values.ndim != 1:
        raise InputError(
            f"labels must be one-dimensional, got shape {values.shape}",
            where="labels",
            fix="pass one label per cell, e.g. adata.obs['cell_type']",
        )
    present = ~pd.isna(values)
    return values.astype(str), present


def _require_finite(x: np.ndarray, *, what: str, where: str) -> None:
    if not np.isfinite(x).all():
        raise InputError(
            f"{what} contains NaN or infinite values",
            where=where,
            fix="NaN outputs mean the model diverged: retrain with a lower learning rate",
        )


def latent_and_groups(
    latent: ArrayLike, groups: ArrayLike, *, what: str, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The latent as float64, the cells' group names (`clean_labels`) and which cells have one,
    after checking there is one group value per latent row and the latent is finite.

    `what` names the group values in the error ("batches", "group values"); `where` the caller.
    """
    x = np.asarray(latent, dtype=np.float64)
    names, present = clean_labels(groups)
    if x.ndim != 2 or x.shape[0] != names.shape[0]:
        raise InputError(
            f"latent has shape {x.shape} but {names.shape[0]} {what} were given",
            where=where,
            fix=f"pass a cells × dimensions latent and one of the {what} per cell, in order",
        )
    _require_finite(x, what="latent", where=where)
    return x, names, present


def _labelled(latent: ArrayLike, labels: ArrayLike, *, role: str) -> tuple[np.ndarray, np.ndarray]:
    """Latent rows and string labels of the cells that have a label, after shape/finite checks."""
    x, names, present = latent_and_groups(latent, labels, what="labels", where=f"{role} latent")
    return x[present], names[present]


def _require_classes(labels: np.ndarray, *, role: str) -> None:
    """Raise MetricUndefinedError unless at least two distinct labels are present."""
    classes = np.unique(labels)
    if classes.size < 2:
        found = f"only {str(classes[0])!r}" if classes.size else "no labelled cells"
        raise MetricUndefinedError(
            f"{role} labels have {classes.size} distinct class(es) ({found}); 2 or more are needed",
            where=role,
            fix="use a label column with several cell types, or skip label metrics",
        )


def _clustered(latent: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Labelled cells for a cluster-quality metric, which needs at least two classes."""
    x, y = _labelled(latent, labels, role="cell")
    _require_classes(y, role="cell")
    return x, y


def silhouette(latent: ArrayLike, labels: ArrayLike) -> float:
    """Raw silhouette width in [-1, 1] of the labels in the latent space (euclidean); higher is
    better separated."""
    x, y = _clustered(latent, labels)
    if np.unique(y).size >= y.size:
        raise MetricUndefinedError(
            f"every one of the {y.size} labelled cells has its own label",
            where="silhouette",
            fix="silhouette needs at least one class with two or more cells",
        )
    return float(silhouette_score(x, y, metric="euclidean"))


def davies_bouldin(latent: ArrayLike, labels: ArrayLike) -> float:
    """Davies-Bouldin index of the labels in the latent space (≥ 0); lower is better separated."""
    x, y = _clustered(latent, labels)
    return float(davies_bouldin_score(x, y))


def _knn_predict(
    train_latent: ArrayLike,
    train_labels: ArrayLike,
    test_latent: ArrayLike,
    test_labels: ArrayLike,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) test labels from a k-NN classifier fitted on the training latent."""
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}", where="k-NN", fix="pass k >= 1")
    x_train, y_train = _labelled(train_latent, train_labels, role="training")
    x_test, y_test = _labelled(test_latent, test_labels, role="test")
    _require_classes(y_train, role="training")
    if y_test.size == 0:
        raise MetricUndefinedError(
            "no test cell has a label",
            where="test",
            fix="pass labelled test cells, or skip label metrics",
        )
    if x_train.shape[1] != x_test.shape[1]:
        raise InputError(
            f"training latent has {x_train.shape[1]} dimensions, test latent {x_test.shape[1]}",
            where="k-NN",
            fix="encode both sets with the same model",
        )
    knn = KNeighborsClassifier(n_neighbors=min(k, y_train.size)).fit(x_train, y_train)
    return y_test, knn.predict(x_test)


def knn_accuracy(
    train_latent: ArrayLike,
    train_labels: ArrayLike,
    test_latent: ArrayLike,
    test_labels: ArrayLike,
    *,
    k: int = 15,
) -> float:
    """Accuracy of a k-NN classifier fitted on the training latent, scored on the test latent.

    k is capped at the number of labelled training cells. Test cells of a class absent from
    training count as errors.
    """
    y_true, y_pred = _knn_predict(train_latent, train_labels, test_latent, test_labels, k)
    return float(np.mean(y_true == y_pred))


def knn_macro_f1(
    train_latent: ArrayLike,
    train_labels: ArrayLike,
    test_latent: ArrayLike,
    test_labels: ArrayLike,
    *,
    k: int = 15,
) -> float:
    """Macro-averaged F1 of the k-NN classifier of `knn_accuracy`, so rare cell types weigh as
    much as common ones.

    Averaged over the classes present in the test labels; a class never predicted scores 0.
    """
    y_true, y_pred = _knn_predict(train_latent, train_labels, test_latent, test_labels, k)
    return float(
        f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)
    )


def _kmeans_clusters(
    latent: ArrayLike, labels: ArrayLike, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, k-means cluster ids) with k = number of distinct labels."""
    x, y = _clustered(latent, labels)
    kmeans = KMeans(n_clusters=np.unique(y).size, n_init=10, random_state=seed)
    return y, kmeans.fit_predict(x)


def kmeans_ari(latent: ArrayLike, labels: ArrayLike, *, seed: int = 0) -> float:
    """Adjusted Rand index between k-means clusters (k = number of labels) and the labels; ~0 for
    unrelated, 1 for identical partitions."""
    y, clusters = _kmeans_clusters(latent, labels, seed)
    return float(adjusted_rand_score(y, clusters))


def kmeans_nmi(latent: ArrayLike, labels: ArrayLike, *, seed: int = 0) -> float:
    """Normalised mutual information (arithmetic mean) between k-means clusters (k = number of
    labels) and the labels, in [0, 1]."""
    y, clusters = _kmeans_clusters(latent, labels, seed)
    return float(normalized_mutual_info_score(y, clusters))


def kmeans_agreement(latent: ArrayLike, labels: ArrayLike, *, seed: int = 0) -> tuple[float, float]:
    """(ARI, NMI) of `kmeans_ari` and `kmeans_nmi` from one k-means run (k-means is the slow
    part, so a caller needing both clusters once)."""
    y, clusters = _kmeans_clusters(latent, labels, seed)
    return float(adjusted_rand_score(y, clusters)), float(normalized_mutual_info_score(y, clusters))


def _dense(x: ArrayLike | sparse.spmatrix | sparse.sparray) -> np.ndarray:
    return np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)


def recon_corr(x: ArrayLike, x_hat: ArrayLike) -> float:
    """Mean per-cell Pearson correlation between input and reconstruction (the original study's
    reconstruction metric); insensitive to per-cell scale and offset.

    Cells whose input or reconstruction is constant have no correlation and are skipped.
    """
    a, b = _dense(x), _dense(x_hat)
    if a.ndim != 2 or a.shape != b.shape:
        raise InputError(
            f"input has shape {a.shape} but reconstruction has shape {b.shape}",
            where="recon_corr",
            fix="pass cells × genes matrices of the same shape, in the same gene order",
        )
    _require_finite(a, what="input", where="recon_corr")
    _require_finite(b, what="reconstruction", where="recon_corr")
    varying = (np.ptp(a, axis=1) > 0) & (np.ptp(b, axis=1) > 0)
    if not varying.any():
        raise MetricUndefinedError(
            "every cell has a constant input or reconstruction",
            where="recon_corr",
            fix="check that the input is not empty and the model is trained",
        )
    a = a[varying] - a[varying].mean(axis=1, keepdims=True)
    b = b[varying] - b[varying].mean(axis=1, keepdims=True)
    r = (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return float(r.mean())


def _cv_knn_folds(
    latent: ArrayLike, labels: ArrayLike, *, k: int, n_splits: int, n_repeats: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(true, predicted) labels of each repeat of a stratified k-fold k-NN over all cells."""
    x, y = _clustered(latent, labels)
    counts = np.unique(y, return_counts=True)[1]
    splits = min(n_splits, int(counts.max()))
    if splits < 2:
        raise MetricUndefinedError(
            "every class has a single cell", where="cross-validated k-NN", fix="label more cells"
        )
    folds = RepeatedStratifiedKFold(n_splits=splits, n_repeats=n_repeats, random_state=seed)
    repeats = []
    predicted = np.empty_like(y)
    with warnings.catch_warnings():
        # Classes smaller than n_splits are allowed: they are simply absent from some folds.
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        for i, (fit, held) in enumerate(folds.split(x, y)):
            knn = KNeighborsClassifier(n_neighbors=min(k, fit.size)).fit(x[fit], y[fit])
            predicted[held] = knn.predict(x[held])
            if (i + 1) % splits == 0:
                repeats.append((y, predicted.copy()))
    return repeats


def cv_knn_scores(
    latent: ArrayLike,
    labels: ArrayLike,
    *,
    k: int = 15,
    n_splits: int = 5,
    n_repeats: int = 3,
    seed: int = 0,
) -> tuple[float, float]:
    """(accuracy, macro F1) of k-NN by repeated stratified k-fold cross-validation.

    Every labelled cell is predicted once per repeat from the others, so the scores rest on all
    cells rather than on a small validation split; each is averaged over `n_repeats` shuffles.
    Macro F1 weighs rare cell types as much as common ones.
    """
    folds = _cv_knn_folds(latent, labels, k=k, n_splits=n_splits, n_repeats=n_repeats, seed=seed)
    accuracy = np.mean([np.mean(t == p) for t, p in folds])
    macro_f1 = np.mean([f1_score(t, p, average="macro", zero_division=0) for t, p in folds])
    return float(accuracy), float(macro_f1)


def bio_score(
    *, silhouette: float, knn_accuracy: float, knn_macro_f1: float, ari: float, nmi: float
) -> float:
    """Bio-conservation score in [0, 1]: the mean of the label metrics users look at, in the
    spirit of scib-metrics, with the silhouette rescaled from [-1, 1] to [0, 1]."""
    return float(np.mean([(silhouette + 1) / 2, knn_accuracy, knn_macro_f1, ari, nmi]))


# Batch-correction metrics (scib-metrics' definitions): how well cells of different batches
# (patients, samples) mix in the latent space. Each is in [0, 1], higher = better mixed.


def _with_batches(
    latent: ArrayLike, batches: ArrayLike, labels: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Latent rows, batch names and (if given) labels of the cells that have a batch (and a
    label), after shape/finite checks; at least two batches must remain."""
    x, names, present = latent_and_groups(latent, batches, what="batches", where="batch metrics")
    types = None
    if labels is not None:
        types, labelled = clean_labels(labels)
        if types.shape != names.shape:
            raise InputError(
                f"{names.shape[0]} batches but {types.shape[0]} labels were given",
                where="batch metrics",
                fix="pass one batch and one label per cell, in the same order",
            )
        present &= labelled
        types = types[present]
    x, names = x[present], names[present]
    if np.unique(names).size < 2:
        raise MetricUndefinedError(
            f"the cells come from {np.unique(names).size} batch(es); 2 or more are needed",
            where="batch metrics",
            fix="batch metrics measure mixing between batches: use data with several batches",
        )
    return x, names, types


def _knn_graph(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices) of each cell's k nearest neighbours (at most all cells), the cell
    itself first at distance 0, as scib-metrics' neighbour search returns them."""
    if k < 2:
        raise InputError(
            f"k must be at least 1, got {k - 1}", where="batch metrics", fix="pass k >= 1"
        )
    k = min(k, x.shape[0])
    distances, indices = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    # Exact duplicates may come in any order: put each cell first among its own neighbours.
    own = indices == np.arange(x.shape[0])[:, None]
    order = np.argsort(~own, axis=1, kind="stable")
    return np.take_along_axis(distances, order, 1), np.take_along_axis(indices, order, 1)


def batch_asw(latent: ArrayLike, labels: ArrayLike, batches: ArrayLike) -> float:
    """Batch silhouette within cell types (scib's batch ASW), in [0, 1]; 1 = batches mixed.

    For each cell type with at least two batches and fewer batches than cells, the silhouette
    of every cell with respect to its batch is computed among the cells of that type (euclidean),
    turned into 1 - |silhouette|, and averaged; the result is the mean over those cell types.
    Cells missing a label or a batch are left out.
    """
    x, names, types = _with_batches(latent, batches, labels)
    per_type = []
    for cell_type in np.unique(types):
        inside = types == cell_type
        n_batches = np.unique(names[inside]).size
        if n_batches == 1 or n_batches == inside.sum():
            continue
        widths = silhouette_samples(x[inside], names[inside], metric="euclidean")
        per_type.append(np.mean(1 - np.abs(widths)))
    if not per_type:
        raise MetricUndefinedError(
            "no cell type has cells of two or more batches (and fewer batches than cells)",
            where="batch_asw",
            fix="batch ASW compares batches within a cell type: label more cells per batch",
        )
    return float(np.mean(per_type))


def _neighbour_probabilities(
    distances: np.ndarray, perplexity: float, tol: float = 1e-5, steps: int = 50
) -> np.ndarray:
    """Gaussian kernel weights over each row's neighbours, its precision found by bisection so
    that the weights' entropy is log(perplexity) (the LISI / t-SNE calibration)."""
    d = distances - distances.min(axis=1, keepdims=True)  # shift-invariant; avoids underflow
    beta = np.ones(d.shape[0])
    low = np.full(d.shape[0], -np.inf)
    high = np.full(d.shape[0], np.inf)
    target = np.log(perplexity)
    for _ in range(steps):
        weights = np.exp(-d * beta[:, None])
        total = weights.sum(axis=1)
        entropy = np.log(total) + beta * (d * weights).sum(axis=1) / total
        gap = entropy - target
        if np.all(np.abs(gap) <= tol):
            break
        up = gap > 0  # too flat: sharpen the kernel
        low = np.where(up, beta, low)
        high = np.where(up, high, beta)
        beta = np.where(
            up,
            np.where(np.isinf(high), beta * 2, (beta + high) / 2),
            np.where(np.isinf(low), beta / 2, (beta + low) / 2),
        )
    weights = np.exp(-d * beta[:, None])
    return weights / weights.sum(axis=1, keepdims=True)


def _lisi(x: np.ndarray, names: np.ndarray, k: int) -> np.ndarray:
    distances, indices = _knn_graph(x, k + 1)
    distances, indices = distances[:, 1:], indices[:, 1:]  # a cell is not its own neighbour
    weights = _neighbour_probabilities(distances, perplexity=max(indices.shape[1] // 3, 1))
    codes = np.unique(names, return_inverse=True)[1]
    shares = np.zeros((x.shape[0], codes.max() + 1))
    np.add.at(shares, (np.arange(x.shape[0])[:, None], codes[indices]), weights)
    return 1 / (shares**2).sum(axis=1)


def lisi(latent: ArrayLike, groups: ArrayLike, *, k: int = 90) -> np.ndarray:
    """Local inverse Simpson index of each cell (Korsunsky et al. 2019, Harmony's LISI): the
    effective number of groups among its k nearest neighbours (the cell itself not counted),
    weighted by a Gaussian kernel of perplexity k / 3 (30 for scib's 90 neighbours); from 1
    (one group) to the number of groups. k is capped at the number of cells - 1. Cells missing
    a group are left out (and get no value)."""
    x, names, _ = _with_batches(latent, groups)
    return _lisi(x, names, k)


def ilisi(latent: ArrayLike, batches: ArrayLike, *, k: int = 90) -> float:
    """Integration LISI scaled to [0, 1] as scib-metrics does: (median LISI of the batches - 1)
    / (number of batches - 1); 1 = every neighbourhood holds all batches equally."""
    x, names, _ = _with_batches(latent, batches)
    return float((np.median(_lisi(x, names, k)) - 1) / (np.unique(names).size - 1))


def graph_connectivity(latent: ArrayLike, labels: ArrayLike, *, k: int = 15) -> float:
    """Graph connectivity (scib), in [0, 1]: for each cell type, the share of its cells in the
    largest strongly connected component of the k-NN graph restricted to that type; the mean
    over cell types. 1 = every cell type is one connected piece (batches do not split it).
    Cells missing a label are left out."""
    x, types = _labelled(latent, labels, role="cell")
    if types.size == 0:
        raise MetricUndefinedError(
            "no cell has a label", where="graph_connectivity", fix="label the cells"
        )
    _, indices = _knn_graph(x, k)
    rows = np.repeat(np.arange(x.shape[0]), indices.shape[1])
    graph = sparse.csr_matrix(
        (np.ones(rows.size), (rows, indices.ravel())), shape=(x.shape[0],) * 2
    )
    shares = []
    for cell_type in np.unique(types):
        inside = np.flatnonzero(types == cell_type)
        _, components = connected_components(graph[inside][:, inside], connection="strong")
        shares.append(np.bincount(components).max() / inside.size)
    return float(np.mean(shares))


def batch_score(*, batch_asw: float, ilisi: float, graph_connectivity: float) -> float:
    """Batch-correction score in [0, 1]: the mean of the three batch metrics, as scib-metrics'
    aggregate; higher = batches better mixed."""
    return float(np.mean([batch_asw, ilisi, graph_connectivity]))
