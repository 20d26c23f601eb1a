from __future__ import annotations

import logging

import numpy as np
import pytest

from melvae import metrics
from melvae.evaluate import evaluate_latent

ALL = ["silhouette", "davies_bouldin", "knn_accuracy", "knn_macro_f1", "ari", "nmi", "recon_corr"]


def split_blobs(seed: int = 0):
    """Train and validation latents of three separated clusters, plus a validation input and a
    noisy reconstruction of it."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])

    def cells(n_per_class: int) -> tuple[np.ndarray, np.ndarray]:
        latent = np.concatenate([c + rng.normal(size=(n_per_class, 3)) for c in centres])
        return latent, np.repeat(np.array(["T", "B", "NK"], dtype=object), n_per_class)

    train_latent, train_labels = cells(30)
    val_latent, val_labels = cells(10)
    val_x = rng.random((30, 25))
    val_x_hat = val_x + rng.normal(scale=0.1, size=val_x.shape)
    return {
        "train_latent": train_latent,
        "train_labels": train_labels,
        "val_latent": val_latent,
        "val_labels": val_labels,
        "val_x": val_x,
        "val_x_hat": val_x_hat,
    }


def test_all_metrics_reported_and_match_the_pure_functions():
    data = split_blobs()
    result = evaluate_latent(**data, seed=3)
    assert list(result) == ALL
    assert all(isinstance(v, float) for v in result.values())
    val = (data["val_latent"], data["val_labels"])
    knn = (data["train_latent"], data["train_labels"], *val)
    assert result["silhouette"] == metrics.silhouette(*val)
    assert result["knn_macro_f1"] == metrics.knn_macro_f1(*knn)
    assert result["ari"] == metrics.kmeans_ari(*val, seed=3)
    assert result["recon_corr"] == metrics.recon_corr(data["val_x"], data["val_x_hat"])
    assert result["knn_accuracy"] > 0.9


def test_no_labels_gives_reconstruction_only(caplog):
    data = split_blobs()
    with caplog.at_level(logging.WARNING, logger="melvae.evaluate"):
        result = evaluate_latent(**{**data, "train_labels": None, "val_labels": None})
    assert list(result) == ["recon_corr"]
    assert "label metrics are skipped" in caplog.text


def test_no_training_labels_skips_only_knn():
    data = split_blobs()
    result = evaluate_latent(**{**data, "train_labels": None})
    assert list(result) == ["silhouette", "davies_bouldin", "ari", "nmi", "recon_corr"]


def test_single_class_omits_label_metrics_with_one_warning(caplog):
    data = split_blobs()
    one_class = np.array(["T"] * 30, dtype=object)
    with caplog.at_level(logging.WARNING, logger="melvae.evaluate"):
        result = evaluate_latent(**{**data, "val_labels": one_class})
    # k-NN is still defined: the training labels have three classes
    assert list(result) == ["knn_accuracy", "knn_macro_f1", "recon_corr"]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipped")]
    assert skipped == [
        "Skipped silhouette, davies_bouldin, ari, nmi: cell labels have 1 distinct class(es) "
        "(only 'T'); 2 or more are needed"
    ]


def test_cells_with_missing_labels_are_excluded():
    data = split_blobs()
    labels = data["val_labels"].copy()
    labels[::4] = None
    kept = np.flatnonzero([v is not None for v in labels])
    result = evaluate_latent(**{**data, "val_labels": labels})
    subset = evaluate_latent(
        **{**data, "val_latent": data["val_latent"][kept], "val_labels": labels[kept]}
    )
    for name in ALL[:-1]:
        assert result[name] == pytest.approx(subset[name]), name
