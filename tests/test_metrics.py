from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from melvae import metrics
from melvae.errors import InputError
from melvae.metrics import MetricUndefinedError


def blobs(n_per_class: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three tight, far-apart clusters in 5-D with their labels."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0] * 5, [20.0] * 5, [-20.0, 20.0, -20.0, 20.0, -20.0]])
    latent = np.concatenate([c + rng.normal(scale=0.5, size=(n_per_class, 5)) for c in centres])
    labels = np.repeat(np.array(["T", "B", "NK"]), n_per_class)
    return latent, labels


def shuffled(labels: np.ndarray) -> np.ndarray:
    return np.random.default_rng(1).permutation(labels)


def test_separated_clusters_score_perfectly():
    latent, labels = blobs()
    train_latent, train_labels = blobs(seed=2)
    assert metrics.silhouette(latent, labels) > 0.9
    assert metrics.davies_bouldin(latent, labels) < 0.1
    assert metrics.kmeans_ari(latent, labels) == pytest.approx(1.0)
    assert metrics.kmeans_nmi(latent, labels) == pytest.approx(1.0)
    assert metrics.knn_accuracy(train_latent, train_labels, latent, labels) == 1.0
    assert metrics.knn_macro_f1(train_latent, train_labels, latent, labels) == 1.0


def test_shuffled_labels_score_near_chance():
    latent, labels = blobs()
    train_latent, train_labels = blobs(seed=2)
    noise = shuffled(labels)
    assert abs(metrics.silhouette(latent, noise)) < 0.1
    assert metrics.davies_bouldin(latent, noise) > 5
    assert abs(metrics.kmeans_ari(latent, noise)) < 0.05
    assert metrics.kmeans_nmi(latent, noise) < 0.05
    # three balanced classes: chance accuracy is 1/3
    assert metrics.knn_accuracy(train_latent, train_labels, latent, noise) == pytest.approx(
        1 / 3, abs=0.15
    )


def test_cells_with_missing_labels_are_excluded():
    latent, labels = blobs()
    # Unlabelled cells sit in the wrong cluster: counting them would lower every score.
    stray = latent[:10] + 20.0
    all_latent = np.concatenate([latent, stray])
    for missing in (None, np.nan, pd.NA):
        with_missing = np.concatenate([labels.astype(object), [missing] * 10])
        assert metrics.silhouette(all_latent, with_missing) == metrics.silhouette(latent, labels)
        assert metrics.kmeans_ari(all_latent, with_missing) == pytest.approx(1.0)
        assert metrics.knn_accuracy(latent, labels, all_latent, with_missing) == 1.0
        assert metrics.knn_accuracy(all_latent, with_missing, latent, labels) == 1.0


def test_categorical_labels_with_nan_and_mixed_label_types():
    latent, labels = blobs()
    categorical = pd.Categorical(list(labels[:-5]) + [np.nan] * 5)
    assert metrics.davies_bouldin(latent, categorical) == metrics.davies_bouldin(
        latent[:-5], labels[:-5]
    )
    # train labels categorical, test labels a plain list: compared by value
    assert metrics.knn_accuracy(latent, pd.Categorical(labels), latent, list(labels)) == 1.0


@pytest.mark.parametrize("labels", [["T"] * 120, ["T"] + [None] * 119, [None] * 120])
def test_fewer_than_two_classes_is_undefined(labels):
    latent, _ = blobs()
    for metric in (metrics.silhouette, metrics.davies_bouldin, metrics.kmeans_ari):
        with pytest.raises(MetricUndefinedError, match="2 or more are needed"):
            metric(latent, labels)
    with pytest.raises(MetricUndefinedError, match="training labels"):
        metrics.knn_accuracy(latent, labels, latent, labels)


def test_undefined_metric_is_a_value_error():
    assert issubclass(MetricUndefinedError, ValueError)


def test_knn_needs_labelled_test_cells():
    latent, labels = blobs()
    with pytest.raises(MetricUndefinedError, match="no test cell has a label"):
        metrics.knn_macro_f1(latent, labels, latent[:5], [None] * 5)


def test_k_is_capped_at_training_size():
    latent, labels = blobs()
    train = [0, 1, 40, 41, 80]  # 5 training cells, default k=15
    capped = metrics.knn_accuracy(latent[train], labels[train], latent, labels)
    assert capped == metrics.knn_accuracy(latent[train], labels[train], latent, labels, k=5)
    # k = all 5 training cells: every test cell gets the same vote, right for one class in three
    assert capped == pytest.approx(1 / 3)


def test_macro_f1_weighs_rare_classes_and_unseen_classes_count_as_errors():
    latent, labels = blobs()
    train_latent, train_labels = latent[:80], labels[:80]  # T and B only
    # test: 40 T cells plus 2 cells of a type never seen in training (lying in the B cluster)
    test_latent = latent[:42]
    test_labels = np.array(["T"] * 40 + ["Mal"] * 2)
    acc = metrics.knn_accuracy(train_latent, train_labels, test_latent, test_labels)
    f1 = metrics.knn_macro_f1(train_latent, train_labels, test_latent, test_labels)
    assert acc == pytest.approx(40 / 42)
    # F1(T) = 1, F1(Mal) = 0; B (predicted but absent from the test labels) is not averaged in
    assert f1 == pytest.approx(0.5)


def test_kmeans_metrics_are_deterministic_for_a_seed():
    latent, labels = blobs()
    noisy = latent + np.random.default_rng(3).normal(scale=15, size=latent.shape)
    assert metrics.kmeans_ari(noisy, labels, seed=4) == metrics.kmeans_ari(noisy, labels, seed=4)
    assert metrics.kmeans_nmi(noisy, labels, seed=4) == metrics.kmeans_nmi(noisy, labels, seed=4)


def test_mismatched_or_nonfinite_latent_is_rejected():
    latent, labels = blobs()
    with pytest.raises(InputError, match="120 labels"):
        metrics.silhouette(latent[:-1], labels)
    broken = latent.copy()
    broken[3, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        metrics.kmeans_nmi(broken, labels)


def test_recon_corr_is_scale_and_offset_invariant():
    x = np.random.default_rng(0).random((30, 50))
    assert metrics.recon_corr(x, x) == pytest.approx(1.0)
    assert metrics.recon_corr(x, 3 * x + 2) == pytest.approx(1.0)
    assert metrics.recon_corr(x, -x) == pytest.approx(-1.0)


def test_recon_corr_is_the_mean_per_cell_pearson():
    rng = np.random.default_rng(0)
    x, x_hat = rng.random((20, 40)), rng.random((20, 40))
    expected = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(x, x_hat, strict=True)])
    assert metrics.recon_corr(x, x_hat) == pytest.approx(expected)


def test_recon_corr_skips_constant_cells_and_accepts_sparse_input():
    from scipy import sparse

    x = np.random.default_rng(0).random((10, 20))
    x[0] = 0.0  # an empty cell has no correlation
    x_hat = 2 * x
    x_hat[1] = 0.5  # a constant reconstruction neither
    assert metrics.recon_corr(sparse.csr_matrix(x), x_hat) == pytest.approx(1.0)
    with pytest.raises(MetricUndefinedError):
        metrics.recon_corr(np.zeros((3, 4)), np.ones((3, 4)))


def test_recon_corr_rejects_shape_mismatch():
    with pytest.raises(InputError, match="shape"):
        metrics.recon_corr(np.ones((3, 4)), np.ones((3, 5)))


def _blobs(n_per_class: int = 40, separation: float = 8.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(["a", "b", "c"], n_per_class)
    latent = rng.normal(size=(labels.size, 4))
    latent[:, 0] += separation * (labels == "b")
    latent[:, 1] += separation * (labels == "c")
    return latent, labels


def test_cross_validated_knn_scores_every_cell_from_the_others():
    latent, labels = _blobs()
    assert metrics.cv_knn_scores(latent, labels) == (1.0, 1.0)
    rng = np.random.default_rng(1)
    shuffled = rng.permutation(labels)
    assert max(metrics.cv_knn_scores(latent, shuffled)) < 0.6  # chance is 1/3
    with pytest.raises(metrics.MetricUndefinedError):
        metrics.cv_knn_scores(latent, np.full(labels.size, "a"))


def test_bio_score_is_the_mean_of_its_parts_with_silhouette_rescaled():
    perfect = dict(silhouette=1.0, knn_accuracy=1.0, knn_macro_f1=1.0, ari=1.0, nmi=1.0)
    assert metrics.bio_score(**perfect) == 1.0
    assert metrics.bio_score(**(perfect | {"silhouette": -1.0})) == pytest.approx(0.8)


def test_kmeans_agreement_equals_the_separate_metrics():
    latent, labels = _blobs(separation=2.0)
    assert metrics.kmeans_agreement(latent, labels, seed=3) == (
        metrics.kmeans_ari(latent, labels, seed=3),
        metrics.kmeans_nmi(latent, labels, seed=3),
    )


def test_bio_conservation_is_stable_across_resampling_seeds_on_real_cells(pbmc):
    from sklearn.decomposition import PCA

    from melvae.evaluate import BIO_METRICS, bio_conservation

    x = pbmc.X.toarray() if hasattr(pbmc.X, "toarray") else np.asarray(pbmc.X)
    latent = PCA(n_components=10, random_state=0).fit_transform(x)
    labels = pbmc.obs["cell_type"].to_numpy()
    scores = [bio_conservation(latent, labels, seed=seed) for seed in range(5)]
    assert set(scores[0]) == set(BIO_METRICS)
    assert 0 < scores[0]["bio_score"] < 1
    # Resampling noise far below the differences between models it must tell apart (~0.05+).
    assert np.std([s["bio_score"] for s in scores]) < 0.01
    assert bio_conservation(latent, np.full(labels.size, "one")) == {}
