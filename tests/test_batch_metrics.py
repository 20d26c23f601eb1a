"""Batch-correction metrics against hand-computed examples, edge cases and the real T cells."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from sklearn.decomposition import PCA

from melvae import metrics
from melvae.errors import InputError
from melvae.evaluate import BATCH_METRICS, batch_correction
from melvae.metrics import MetricUndefinedError


def test_batch_asw_matches_hand_computed_silhouettes():
    # One cell type on a line: batch A at 0 and 1, batch B at 10 and 11. Every cell is 1 from
    # its batch mate; its mean distance to the other batch is 10.5 (outer cells) or 9.5 (inner),
    # so its silhouette is 9.5 / 10.5 or 8.5 / 9.5.
    latent = np.array([[0.0], [1.0], [10.0], [11.0]])
    batches = np.array(["A", "A", "B", "B"])
    labels = np.array(["T"] * 4)
    expected = 1 - np.mean([9.5 / 10.5, 8.5 / 9.5])
    assert metrics.batch_asw(latent, labels, batches) == pytest.approx(expected)
    # A second cell type holding one batch only is left out, as in scib: same value.
    latent2 = np.vstack([latent, [[50.0], [51.0]]])
    assert metrics.batch_asw(
        latent2, np.array([*labels, "B", "B"]), np.array([*batches, "A", "A"])
    ) == pytest.approx(expected)


def test_ilisi_matches_hand_computed_neighbourhoods():
    # Two points, four identical cells each (batches A, A, B, B at both): every cell's 3
    # neighbours are the other cells of its point at distance 0, so the kernel weighs them
    # equally. For every cell that is one of its own batch and two of the other: shares 1/3,
    # 2/3, Simpson index 1/9 + 4/9 = 5/9, LISI 9/5, scaled (9/5 - 1) / (2 - 1) = 0.8.
    latent = np.array([[0.0]] * 4 + [[100.0]] * 4)
    batches = np.array(["A", "A", "B", "B"] * 2)
    assert metrics.lisi(latent, batches, k=3) == pytest.approx(np.full(8, 9 / 5))
    assert metrics.ilisi(latent, batches, k=3) == pytest.approx(0.8)
    # One batch per point: LISI 1, iLISI 0.
    assert metrics.ilisi(latent, np.array(["A"] * 4 + ["B"] * 4), k=3) == pytest.approx(0.0)


def test_lisi_kernel_has_the_requested_perplexity():
    distances = np.sort(np.random.default_rng(0).gamma(2.0, size=(50, 30)), axis=1)
    weights = metrics._neighbour_probabilities(distances, perplexity=10)
    entropy = -(weights * np.log(weights)).sum(axis=1)
    assert entropy == pytest.approx(np.full(50, np.log(10)), abs=1e-4)
    assert weights.sum(axis=1) == pytest.approx(np.ones(50))


def test_graph_connectivity_matches_hand_computed_components():
    # Type X sits in two far-apart triangles (one per batch), type Y in one triangle. With k = 3
    # (each cell and its two nearest) every triangle is a strongly connected component of its
    # own: X's largest component holds 3 of its 6 cells, Y's all 3. Mean of 0.5 and 1.
    triangle = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    latent = np.vstack(
        [triangle, triangle + np.array([100.0, 0.0]), triangle + np.array([50.0, 50.0])]
    )
    labels = np.array(["X"] * 6 + ["Y"] * 3)
    assert metrics.graph_connectivity(latent, labels, k=3) == pytest.approx(0.75)
    assert metrics.graph_connectivity(latent[:3], labels[:3], k=3) == pytest.approx(1.0)


def test_batch_score_is_the_mean():
    value = metrics.batch_score(batch_asw=0.9, ilisi=0.3, graph_connectivity=0.6)
    assert value == pytest.approx(0.6)


def test_mixed_batches_score_higher_than_separated_ones():
    rng = np.random.default_rng(0)
    types = np.repeat(["T", "B"], 100)
    centre = np.where(types == "T", 0.0, 30.0)[:, None]
    batches = np.tile(["p1", "p2"], 100)
    mixed = centre + rng.normal(size=(200, 3))
    split = mixed + np.where(batches == "p1", 0.0, 10.0)[:, None]
    for metric in (
        lambda x: metrics.batch_asw(x, types, batches),
        lambda x: metrics.ilisi(x, batches),
        lambda x: metrics.graph_connectivity(x, types),
    ):
        assert metric(mixed) > metric(split)
    assert metrics.ilisi(mixed, batches) > 0.85
    assert metrics.ilisi(split, batches) < 0.05
    assert metrics.batch_asw(mixed, types, batches) > 0.9


def test_one_batch_is_undefined():
    latent = np.random.default_rng(0).normal(size=(10, 2))
    labels = np.array(["T", "B"] * 5)
    with pytest.raises(MetricUndefinedError, match="1 batch"):
        metrics.ilisi(latent, ["p1"] * 10)
    with pytest.raises(MetricUndefinedError, match="1 batch"):
        metrics.batch_asw(latent, labels, ["p1"] * 10)


def test_no_cell_type_with_two_batches_is_undefined():
    latent = np.random.default_rng(0).normal(size=(6, 2))
    with pytest.raises(MetricUndefinedError, match="no cell type"):
        metrics.batch_asw(latent, ["T", "T", "T", "B", "B", "B"], ["p1"] * 3 + ["p2"] * 3)


def test_nan_latent_and_mismatched_lengths_are_clear_errors():
    latent = np.random.default_rng(0).normal(size=(6, 2))
    latent[2, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        metrics.ilisi(latent, ["p1", "p2"] * 3)
    with pytest.raises(InputError, match="5 batches"):
        metrics.ilisi(np.zeros((6, 2)), ["p1", "p2", "p1", "p2", "p1"])
    with pytest.raises(InputError, match="labels"):
        metrics.batch_asw(np.zeros((6, 2)), ["T"] * 5, ["p1", "p2"] * 3)


def test_cells_without_a_batch_are_left_out():
    latent = np.array([[0.0]] * 4 + [[100.0]] * 4 + [[50.0]])
    batches = np.array(["A", "A", "B", "B"] * 2 + [np.nan], dtype=object)
    assert metrics.ilisi(latent, batches, k=3) == pytest.approx(0.8)


def test_batch_correction_names_and_skips():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(60, 3))
    labels = np.repeat(["T", "B"], 30)
    batches = np.tile(["p1", "p2", "p3"], 20)
    scores = batch_correction(latent, labels, batches)
    assert tuple(scores) == BATCH_METRICS
    assert scores["batch_score"] == pytest.approx(
        np.mean([scores["batch_asw"], scores["ilisi"], scores["graph_connectivity"]])
    )
    assert all(0 <= value <= 1 for value in scores.values())
    assert batch_correction(latent, labels, ["p1"] * 60) == {}
    # Without labels only iLISI is defined: no aggregate score from part of it.
    assert batch_correction(latent, None, batches) == {"ilisi": scores["ilisi"]}


def test_patients_of_the_real_t_cells_mix_better_in_a_shuffled_space(shared_data: Path):
    # On the real subset, PCA keeps patient structure (the issue measured 38 % own-patient
    # neighbours); shuffling the patients over cells removes it, so iLISI must rise.
    adata = ad.read_h5ad(shared_data / "sadefeldman2018_gse120575_tcells_subset.h5ad")
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    latent = PCA(n_components=10, random_state=0).fit_transform(x)  # values are log-scale already
    patients = adata.obs["sample"].to_numpy()
    shuffled = np.random.default_rng(0).permutation(patients)
    observed = metrics.ilisi(latent, patients)
    assert observed < metrics.ilisi(latent, shuffled) - 0.1
    assert 0 <= observed <= 1
