"""Preprocessing: the split, train-only fitting (no leakage), transforms and gene alignment."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from melvae.errors import InputError
from melvae.preprocess import (
    PreprocessConfig,
    Preprocessor,
    align_genes,
    fit_preprocessor,
    normalized_dispersion,
    split_cells,
)


def _counts(n_cells: int = 60, n_genes: int = 8, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    return ad.AnnData(
        X=sp.csr_matrix(X),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )


def test_split_is_a_stratified_deterministic_partition(pbmc: ad.AnnData) -> None:
    split = split_cells(pbmc, "bulk_labels", val_fraction=0.15, test_fraction=0.15, seed=3)
    parts = np.concatenate([split["train"], split["val"], split["test"]])
    assert np.array_equal(np.sort(parts), np.arange(pbmc.n_obs))
    assert (len(split["val"]), len(split["test"])) == (105, 105)
    labels = pbmc.obs["bulk_labels"].astype(str).to_numpy()
    overall = pd.Series(labels).value_counts(normalize=True)
    for name in ("val", "test"):
        share = pd.Series(labels[split[name]]).value_counts(normalize=True)
        assert (share.reindex(overall.index, fill_value=0) - overall).abs().max() < 0.02
    again = split_cells(pbmc, "bulk_labels", val_fraction=0.15, test_fraction=0.15, seed=3)
    other = split_cells(pbmc, "bulk_labels", val_fraction=0.15, test_fraction=0.15, seed=4)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["val"], other["val"])


def test_split_keeps_a_singleton_class_in_training_and_handles_missing_labels() -> None:
    adata = _counts(n_cells=41)
    labels = ["a"] * 20 + ["b"] * 18 + [None, None] + ["rare"]
    adata.obs["label"] = pd.Categorical(labels)
    split = split_cells(adata, "label", val_fraction=0.2, test_fraction=0.2, seed=0)
    assert labels.index("rare") in split["train"]
    assert sum(len(v) for v in split.values()) == 41
    unlabelled = split_cells(adata, None, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert sorted(len(v) for v in unlabelled.values()) == [8, 8, 25]


@pytest.mark.parametrize("fractions", [(0.6, 0.5), (-0.1, 0.2), (1.0, 0.0)])
def test_split_rejects_fractions_that_leave_no_training_cells(
    fractions: tuple[float, float],
) -> None:
    with pytest.raises(InputError, match="fractions"):
        split_cells(_counts(), None, val_fraction=fractions[0], test_fraction=fractions[1])


def test_fitted_state_ignores_validation_and_test_cells(pbmc: ad.AnnData) -> None:
    """Leakage check: perturbing only held-out cells leaves genes, offsets and scales unchanged."""
    split = split_cells(pbmc, "bulk_labels", val_fraction=0.15, test_fraction=0.15, seed=0)
    config = PreprocessConfig(n_top_genes=200)
    before = fit_preprocessor(pbmc[split["train"]], config)

    held_out = np.concatenate([split["val"], split["test"]])
    X = pbmc.X.toarray()
    rng = np.random.default_rng(0)
    X[held_out] = rng.exponential(50.0, size=(len(held_out), X.shape[1]))  # every gene now varies
    perturbed = ad.AnnData(X=sp.csr_matrix(X), obs=pbmc.obs, var=pbmc.var)
    after = fit_preprocessor(perturbed[split["train"]], config)

    assert after.genes == before.genes
    assert np.array_equal(after.offset, before.offset)
    assert np.array_equal(after.scale, before.scale)
    # ... and the held-out cells, far outside the training range, are clipped into [0, 1].
    aligned, _ = align_genes(perturbed[held_out], after.genes)
    out = after.transform_matrix(aligned)
    assert out.min() >= 0 and out.max() == 1.0


def test_genes_are_selected_on_training_cells_only() -> None:
    adata = _counts(n_cells=40, n_genes=6)
    X = adata.X.toarray()
    X[:30, 0], X[30:, 0] = 0, 7  # expressed only outside the training cells
    X[:30, 1], X[30:, 1] = 3, np.arange(10) * 100  # constant in training, wild elsewhere
    adata.X = sp.csr_matrix(X)
    config = PreprocessConfig(n_top_genes=2)
    assert "g1" in fit_preprocessor(adata, config).genes  # what leaking would look like
    train = adata[:30]
    assert fit_preprocessor(train, PreprocessConfig(n_top_genes=None)).genes == [
        "g1",
        "g2",
        "g3",
        "g4",
        "g5",
    ]
    assert "g1" not in fit_preprocessor(train, config).genes


def test_hvg_keeps_exactly_n_top_genes_in_original_order(pbmc: ad.AnnData) -> None:
    fitted = fit_preprocessor(pbmc, PreprocessConfig(n_top_genes=150))
    assert len(fitted.genes) == 150
    positions = pbmc.var_names.get_indexer(fitted.genes)
    assert np.all(np.diff(positions) > 0)


def test_normalized_dispersion_ranks_variable_genes_within_a_mean_bin() -> None:
    signs = np.tile([1.0, -1.0], 10)[:, None]
    X = 5 + signs * np.array([0.5, 1.0, 2.0, 4.0, 0.0])  # same mean, rising spread, constant
    dispersion = normalized_dispersion(sp.csr_matrix(X))
    assert np.all(np.diff(dispersion[:4]) > 0) and np.isnan(dispersion[4])
    assert dispersion[:4].mean() == pytest.approx(0, abs=1e-9)
    fitted = fit_preprocessor(ad.AnnData(X=X), PreprocessConfig(n_top_genes=2))
    assert fitted.genes == ["2", "3"]


def test_minmax_maps_training_range_to_unit_interval_and_clips_new_cells() -> None:
    adata = _counts()
    fitted = fit_preprocessor(adata, PreprocessConfig(n_top_genes=None))
    out = fitted.transform_matrix(adata.X)
    assert sp.issparse(out) and out.dtype == np.float32
    dense = out.toarray()
    assert np.allclose(dense.min(axis=0), 0) and np.allclose(dense.max(axis=0), 1)
    beyond = np.asarray(adata.X.max(axis=0).toarray()) * 3 + 1
    assert np.array_equal(fitted.transform_matrix(beyond), np.ones_like(beyond))


def test_minmax_with_a_positive_training_minimum_keeps_sparse_zeros_at_zero() -> None:
    X = np.array([[2.0, 1.0], [4.0, 3.0], [6.0, 5.0]], dtype=np.float32)
    fitted = fit_preprocessor(ad.AnnData(X=X), PreprocessConfig(n_top_genes=None))
    new = sp.csr_matrix(np.array([[0.0, 3.0], [5.0, 0.0]], dtype=np.float32))
    assert np.allclose(fitted.transform_matrix(new).toarray(), [[0.0, 0.5], [0.75, 0.0]])
    assert np.allclose(fitted.transform_matrix(new.toarray()), [[0.0, 0.5], [0.75, 0.0]])


def test_log1p_scale_gives_unit_training_std_without_centring() -> None:
    adata = _counts()
    fitted = fit_preprocessor(
        adata, PreprocessConfig(n_top_genes=None, transform="log1p", scale=True)
    )
    out = fitted.transform_matrix(adata.X).toarray()
    assert fitted.offset is None
    assert np.allclose(out.std(axis=0), 1, atol=1e-5)
    assert out.min() >= 0
    assert np.allclose(out * fitted.scale, np.log1p(adata.X.toarray()), atol=1e-6)


def test_counts_transform_leaves_values_untouched() -> None:
    adata = _counts()
    fitted = fit_preprocessor(adata, PreprocessConfig(n_top_genes=None, transform="counts"))
    assert np.array_equal(fitted.transform_matrix(adata.X).toarray(), adata.X.toarray())


def test_scale_is_only_accepted_with_log1p() -> None:
    with pytest.raises(InputError, match="scale=True"):
        PreprocessConfig(transform="minmax", scale=True)


def test_preprocessor_survives_a_json_round_trip_exactly(pbmc: ad.AnnData) -> None:
    fitted = fit_preprocessor(pbmc, PreprocessConfig(n_top_genes=100))
    restored = Preprocessor.from_dict(json.loads(json.dumps(fitted.to_dict())))
    aligned, _ = align_genes(pbmc, fitted.genes)
    a, b = fitted.transform_matrix(aligned), restored.transform_matrix(aligned)
    assert restored.genes == fitted.genes and (a != b).nnz == 0


def test_align_genes_reorders_fills_missing_and_stays_sparse() -> None:
    adata = _counts(n_genes=4)
    genes = ["g3", "g0", "absent", "g1"]
    aligned, n_missing = align_genes(adata, genes)
    assert n_missing == 1 and sp.issparse(aligned)
    X = adata.X.toarray()
    expected = np.column_stack([X[:, 3], X[:, 0], np.zeros(len(X)), X[:, 1]])
    assert np.array_equal(aligned.toarray(), expected)
    dense, _ = align_genes(ad.AnnData(X=X, var=adata.var), genes)
    assert isinstance(dense, np.ndarray) and np.array_equal(dense, expected)


def test_align_genes_explains_too_little_overlap() -> None:
    adata = _counts(n_genes=4)
    with pytest.raises(InputError, match=r"only 1 of the model's 3 genes") as info:
        align_genes(adata, ["g0", "ENSG0001", "ENSG0002"])
    assert "ENSG0001" in str(info.value) and "g0" in info.value.where
