"""Large data in bounded memory: nothing densifies the whole matrix, statistics are streamed,
metrics run on a bounded stratified subsample, batches are cut correctly."""

from __future__ import annotations

import subprocess

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from melvae.data.loader import batches, dense_rows
from melvae.preprocess import Preprocessor, align_genes, column_stats
from melvae.study.objective import PreparedData
from melvae.study.scoring import EVAL_MAX_CELLS, metric_cells
from melvae.subsample import stratified_subsample
from tests.memory_cap import run_capped

# A child process builds a 100,000 × 2,000 sparse matrix (0.5 % non-zero, ~12 MB), caps its own
# address space at what it then uses plus HEADROOM_MB and works on it; the matrix's dense
# float32 form (800 MB) cannot fit under the cap.
_SETUP = """
import numpy as np, scipy.sparse as sp, anndata as ad, pandas as pd, torch
from melvae.model import MelVAE
from melvae.preprocess import PreprocessConfig
from melvae.study.objective import PreparedData
from melvae.study.scoring import evaluate_model
from melvae.train import TrainConfig

rng = np.random.default_rng(0)
X = sp.random(100_000, 2_000, density=0.005, format="csr", dtype=np.float32, rng=rng)
X.data = np.ceil(X.data * 10)
labels = pd.Categorical(rng.choice(["a", "b", "c"], 100_000, p=[0.6, 0.3, 0.1]))
adata = ad.AnnData(X, obs=pd.DataFrame({"cell_type": labels}, index=map(str, range(100_000))))
adata.var_names = [f"g{i}" for i in range(2_000)]
"""

_PIPELINE = """
train, val = adata[:80_000], adata[80_000:]
model = MelVAE.fit(
    train, val, preprocess=PreprocessConfig(n_top_genes=1_000), hidden_dim=16, latent_dim=2,
    train=TrainConfig(epochs=1, batch_size=4096, device="cpu"), label_key="cell_type",
    progress=False,
)
data = PreparedData("synthetic", "synthetic", None, "cell_type", train, val, val,
                    model.preprocessor)
metrics = evaluate_model(model, data)
assert {"silhouette", "knn_accuracy", "recon_corr"} <= set(metrics), metrics
assert model.encode(val).shape == (20_000, 2)
"""

HEADROOM_MB = 600


def _run_limited(work: str) -> subprocess.CompletedProcess:
    return run_capped(_SETUP, work, headroom_mb=HEADROOM_MB)


@pytest.mark.slow
def test_fit_encode_and_evaluate_never_densify_the_whole_matrix() -> None:
    control = _run_limited("X.toarray()")
    assert control.returncode != 0 and "MemoryError" in control.stderr, "the cap does not bite"
    run = _run_limited(_PIPELINE)
    assert run.returncode == 0 and "done" in run.stdout, run.stderr[-3000:]


def _matrix(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    X = sp.random(300, 40, density=0.2, format="csr", dtype=np.float32, rng=rng)
    X.data = np.round(X.data * 20, 1)
    X.data[X.indices == 5] = 0  # a gene never expressed
    X.eliminate_zeros()
    return X


def test_streamed_column_statistics_match_dense_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    import melvae.preprocess

    monkeypatch.setattr(melvae.preprocess, "_VALUES_PER_CHUNK", 100)  # many small chunks
    X = _matrix()
    dense = X.toarray().astype(np.float64)
    for matrix in (X, dense):
        stats = column_stats(matrix)
        mean, var = stats.mean_var(ddof=1)
        np.testing.assert_allclose(mean, dense.mean(axis=0))
        np.testing.assert_allclose(var, dense.var(axis=0, ddof=1), rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(stats.min, dense.min(axis=0))  # implicit zeros count
        np.testing.assert_array_equal(stats.max, dense.max(axis=0))
        np.testing.assert_array_equal(stats.nonzero, np.count_nonzero(dense, axis=0))
        log_var = column_stats(matrix, log1p=True).mean_var()[1]
        np.testing.assert_allclose(log_var, np.log1p(dense).var(axis=0), atol=1e-12)


def test_transform_in_bounded_slices_matches_the_whole_array(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import melvae.preprocess

    X = _matrix()
    fitted = Preprocessor([f"g{i}" for i in range(40)], "log1p", scale=np.full(40, 2.0))
    whole = fitted.transform_matrix(X)
    monkeypatch.setattr(melvae.preprocess, "_VALUES_PER_CHUNK", 7)
    sliced = fitted.transform_matrix(X)
    np.testing.assert_array_equal(sliced.toarray(), whole.toarray())
    np.testing.assert_allclose(whole.toarray(), np.log1p(X.toarray()) / 2, rtol=1e-6)
    assert X.data.max() > 1  # the input was left alone


def test_align_genes_hands_back_the_same_matrix_when_genes_already_match() -> None:
    X = _matrix()
    adata = ad.AnnData(X, var=pd.DataFrame(index=[f"g{i}" for i in range(40)]))
    aligned, missing = align_genes(adata, list(adata.var_names))
    assert np.shares_memory(aligned.data, adata.X.data) and missing == 0  # no copy
    reordered, _ = align_genes(adata, [f"g{i}" for i in reversed(range(40))])
    np.testing.assert_array_equal(reordered.toarray(), X.toarray()[:, ::-1])


def test_batches_are_the_requested_rows_in_order_for_sparse_and_dense_input() -> None:
    X = _matrix()
    order = np.random.default_rng(1).permutation(300)
    for matrix in (X, X.toarray()):
        got = np.concatenate([b.numpy() for b in batches(matrix, 32, order=order)])
        np.testing.assert_array_equal(got, X.toarray()[order])
    np.testing.assert_array_equal(dense_rows(X, slice(10, 20)).numpy(), X[10:20].toarray())


def test_stratified_subsample_is_bounded_keeps_shares_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice(
        np.array(["T", "B", "NK", None], dtype=object), 20_000, p=[0.7, 0.2, 0.09, 0.01]
    )
    keep = stratified_subsample(labels, 1000, seed=3)
    assert keep.size == 1000 and np.all(np.diff(keep) > 0)
    np.testing.assert_array_equal(keep, stratified_subsample(labels, 1000, seed=3))
    assert not np.array_equal(keep, stratified_subsample(labels, 1000, seed=4))
    full = pd.Series(labels).value_counts(normalize=True, dropna=False)
    part = pd.Series(labels[keep]).value_counts(normalize=True, dropna=False)
    assert (part - full).abs().max() < 1e-3  # each label (missing too) keeps its share
    np.testing.assert_array_equal(stratified_subsample(labels[:50], 1000), np.arange(50))


def test_final_metrics_use_a_documented_bounded_subsample_of_large_splits() -> None:
    n = EVAL_MAX_CELLS * 3
    labels = pd.Categorical(np.where(np.arange(n) % 10 == 0, "rare", "common"))
    cells = ad.AnnData(
        sp.csr_matrix((n, 3), dtype=np.float32),
        obs=pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(n)]),
    )
    small = cells[:100]
    data = PreparedData(
        "d", "d", None, "cell_type", cells, cells, small, Preprocessor([], "counts")
    )
    subset, subset_labels = metric_cells(data, "val")
    assert subset.n_obs == EVAL_MAX_CELLS == 5000  # the size README and MLflow name
    assert (subset_labels == "rare").sum() == EVAL_MAX_CELLS // 10
    np.testing.assert_array_equal(subset.obs["cell_type"].to_numpy(), subset_labels)
    everything, _ = metric_cells(data, "test")
    assert everything.n_obs == 100
