"""MelVAE: fit, encode by gene name, save/load, no leakage from held-out cells, real data."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.neighbors import KNeighborsClassifier

import melvae.model
from melvae.errors import InputError
from melvae.faultpoint import ENV as STOP_AT
from melvae.model import MelVAE
from melvae.preprocess import PreprocessConfig, split_cells
from melvae.train import TrainConfig

SMALL = {"hidden_dim": 32, "latent_dim": 4, "progress": False}


@pytest.fixture(scope="module")
def splits(pbmc: ad.AnnData) -> dict[str, ad.AnnData]:
    index = split_cells(pbmc, "bulk_labels", val_fraction=0.15, test_fraction=0.15, seed=0)
    return {name: pbmc[cells].copy() for name, cells in index.items()}


@pytest.fixture(scope="module")
def model(splits: dict[str, ad.AnnData]) -> MelVAE:
    return MelVAE.fit(
        splits["train"],
        splits["val"],
        preprocess=PreprocessConfig(n_top_genes=300),
        train=TrainConfig(epochs=3),
        label_key="bulk_labels",
        **SMALL,
    )


def test_fit_gives_a_model_that_encodes_decodes_and_reconstructs(
    model: MelVAE, splits: dict[str, ad.AnnData]
) -> None:
    test = splits["test"]
    latent = model.encode(test)
    assert latent.shape == (test.n_obs, 4) and np.isfinite(latent).all()
    assert np.array_equal(model.embed(test.copy()).obsm["X_melvae"], latent)
    decoded = model.decode(latent)
    assert decoded.shape == (test.n_obs, 300) and decoded.min() >= 0 and decoded.max() <= 1
    x, x_hat = model.reconstruct(test)
    assert x.shape == x_hat.shape == (test.n_obs, 300) and not sp.issparse(x)
    assert model.label_names == sorted(splits["train"].obs["bulk_labels"].astype(str).unique())
    assert len(model.history.val_loss) == 3
    assert model.hyperparameters["training"]["epochs"] == 3


def test_same_seed_gives_the_same_model(splits: dict[str, ad.AnnData]) -> None:
    def fit(seed: int) -> np.ndarray:
        config = PreprocessConfig(n_top_genes=100)
        fitted = MelVAE.fit(
            splits["train"],
            splits["val"],
            preprocess=config,
            train=TrainConfig(epochs=1, seed=seed),
            **SMALL,
        )
        return fitted.encode(splits["test"])

    assert np.array_equal(fit(0), fit(0))
    assert not np.array_equal(fit(0), fit(1))


def test_held_out_cells_do_not_influence_preprocessing_or_training(
    splits: dict[str, ad.AnnData],
) -> None:
    """Leakage check at the model level: only the training cells shape the fitted model."""
    val = splits["val"]
    rng = np.random.default_rng(0)
    wild = ad.AnnData(
        X=sp.csr_matrix(rng.exponential(50.0, size=val.shape).astype(np.float32)),
        obs=val.obs,
        var=val.var,
    )
    kwargs = {"preprocess": PreprocessConfig(n_top_genes=200), "train": TrainConfig(epochs=1)}
    a = MelVAE.fit(splits["train"], val, **kwargs, **SMALL)
    b = MelVAE.fit(splits["train"], wild, **kwargs, **SMALL)
    assert a.preprocessor.to_dict() == b.preprocessor.to_dict()
    assert np.array_equal(a.encode(splits["test"]), b.encode(splits["test"]))


def test_save_and_load_give_identical_encodings(
    model: MelVAE, splits: dict[str, ad.AnnData], tmp_path: Path
) -> None:
    target = model.save(tmp_path / "model")
    loaded = MelVAE.load(target)
    assert np.array_equal(loaded.encode(splits["test"]), model.encode(splits["test"]))
    assert loaded.genes == model.genes and loaded.label_names == model.label_names
    assert loaded.hyperparameters == model.hyperparameters and loaded.history == model.history
    model.save(target)  # replacing a saved model is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_is_atomic_and_refuses_foreign_directories(
    model: MelVAE, splits: dict[str, ad.AnnData], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = model.save(tmp_path / "model")
    before = (target / melvae.model.MODEL_FILE).read_bytes()

    def crash(obj: object, path: Path) -> None:
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save(target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / melvae.model.MODEL_FILE).read_bytes() == before
    assert np.array_equal(MelVAE.load(target).encode(splits["test"]), model.encode(splits["test"]))

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a saved melvae model"):
        model.save(foreign)
    with pytest.raises(InputError, match="cannot read a saved melvae model"):
        MelVAE.load(tmp_path / "nothing-here")

    (target / "my-notes.txt").write_text("mine")  # a model folder a user added a file to
    with pytest.raises(InputError, match=r"also holds my-notes\.txt"):
        model.save(target)
    assert (target / "my-notes.txt").read_text() == "mine"
    assert (target / melvae.model.MODEL_FILE).read_bytes() == before


SAVE_AGAIN = """
import sys
from melvae.model import MelVAE
MelVAE.load(sys.argv[1]).save(sys.argv[1])
"""


def test_a_save_killed_mid_swap_loses_nothing_the_next_save_puts_it_back(
    model: MelVAE, splits: dict[str, ad.AnnData], tmp_path: Path
) -> None:
    target = model.save(tmp_path / "model")
    env = {**os.environ, STOP_AT: "folder-swapping", "PYTHONPATH": str(Path(__file__).parents[1])}
    saving = subprocess.Popen([sys.executable, "-c", SAVE_AGAIN, str(target)], env=env)
    assert saving.wait(timeout=120) == -signal.SIGKILL
    assert not target.exists(), "killed between moving the old model aside and the new in"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f".model.{kind}-{saving.pid}" for kind in ("retired", "staging")]
    model.save(target)  # the old one put back first, then replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert np.array_equal(MelVAE.load(target).encode(splits["test"]), model.encode(splits["test"]))


def test_encode_aligns_genes_by_name(
    model: MelVAE, splits: dict[str, ad.AnnData], caplog: pytest.LogCaptureFixture
) -> None:
    test = splits["test"]
    expected = model.encode(test)
    shuffled = test[:, np.random.default_rng(0).permutation(test.n_vars)]
    assert np.array_equal(model.encode(shuffled), expected)

    dropped = model.genes[:30]
    partial = test[:, ~test.var_names.isin(dropped)]
    zeroed = test.copy()
    dense = zeroed.X.toarray()
    dense[:, zeroed.var_names.get_indexer(dropped)] = 0
    zeroed.X = dense
    with caplog.at_level(logging.WARNING, logger="melvae.model"):
        latent = model.encode(partial)
    assert "30 of the model's 300 genes are missing" in caplog.text
    assert np.allclose(latent, model.encode(zeroed), atol=1e-6)

    with pytest.raises(InputError, match="of the model's 300 genes were found"):
        model.encode(test[:, ~test.var_names.isin(model.genes[:200])])


def test_likelihood_must_suit_the_transform(splits: dict[str, ad.AnnData]) -> None:
    with pytest.raises(InputError, match="bernoulli decoder cannot model 'log1p'"):
        MelVAE.fit(
            splits["train"],
            splits["val"],
            preprocess=PreprocessConfig(transform="log1p"),
            likelihood="bernoulli",
            **SMALL,
        )


def test_negative_binomial_on_counts_decodes_at_the_training_library_size() -> None:
    rng = np.random.default_rng(0)
    rates = rng.gamma(2.0, 1.0, size=(2, 40))
    counts = rng.poisson(rates[rng.integers(0, 2, 120)] * 3).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    adata.var_names = [f"g{i}" for i in range(40)]
    fitted = MelVAE.fit(
        adata[:100],
        adata[100:],
        preprocess=PreprocessConfig(n_top_genes=None, transform="counts"),
        likelihood="negative_binomial",
        train=TrainConfig(epochs=2),
        **SMALL,
    )
    expected_size = np.median(counts[:100][:, counts[:100].sum(axis=0) > 0].sum(axis=1))
    assert fitted.library_size == pytest.approx(expected_size)
    decoded = fitted.decode(fitted.encode(adata[100:]))
    assert np.allclose(decoded.sum(axis=1), expected_size, rtol=1e-4)
    assert np.allclose(fitted.decode(np.zeros((1, 4)), library_size=10).sum(), 10, rtol=1e-4)


def test_gaussian_on_scaled_log1p_trains(splits: dict[str, ad.AnnData]) -> None:
    fitted = MelVAE.fit(
        splits["train"],
        splits["val"],
        preprocess=PreprocessConfig(n_top_genes=100, transform="log1p", scale=True),
        likelihood="gaussian",
        train=TrainConfig(epochs=2),
        **SMALL,
    )
    assert np.isfinite(fitted.history.val_loss).all()


def test_latent_separates_melanoma_t_cell_states(shared_data: Path) -> None:
    """Real melanoma T cells (Sade-Feldman 2018): held-out cell types are predictable from the
    latent space by k-NN well above the majority-class rate."""
    path = shared_data / "sadefeldman2018_gse120575_tcells_subset.h5ad"
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    adata = ad.read_h5ad(path)
    index = split_cells(adata, "cell_type", val_fraction=0.15, test_fraction=0.25, seed=0)
    train, val, test = (adata[index[k]] for k in ("train", "val", "test"))
    fitted = MelVAE.fit(
        train,
        val,
        preprocess=PreprocessConfig(n_top_genes=1000),
        hidden_dim=128,
        latent_dim=10,
        train=TrainConfig(epochs=20),
        label_key="cell_type",
        progress=False,
    )
    knn = KNeighborsClassifier(n_neighbors=15).fit(fitted.encode(train), train.obs["cell_type"])
    accuracy = knn.score(fitted.encode(test), test.obs["cell_type"])
    majority = test.obs["cell_type"].value_counts(normalize=True).max()
    assert accuracy > majority + 0.15, (accuracy, majority)
