"""Batch-correcting baselines (ComBat + PCA, Harmony) and batch metrics in trials and baselines,
on the real melanoma T cells with the patient as the batch."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import anndata as ad
import numpy as np
import optuna
import pytest

import melvae
from melvae.data.datasets import Dataset
from melvae.errors import InputError
from melvae.evaluate import BATCH_METRICS
from melvae.study import scoring
from melvae.study.baselines import (
    BatchCorrectedEmbedding,
    PCAEmbedding,
    baselines_for,
    metric_cells,
)
from melvae.study.config import load_study_config
from melvae.study.runner import prepare_data
from melvae.study.scoring import SplitScores

SUBSET = "sadefeldman2018_gse120575_tcells_subset.h5ad"


@pytest.fixture
def tcells(shared_data: Path) -> ad.AnnData:
    return ad.read_h5ad(shared_data / SUBSET)


@pytest.fixture
def prepared(tcells: ad.AnnData):
    config = dataclasses.replace(load_study_config(), batch_key="sample")
    dataset = Dataset("tcells", tcells, "cell_type", "melanoma T cells (shared subset)")
    return prepare_data(config, dataset=dataset)


def test_baselines_with_a_batch_key_add_combat_and_harmony():
    config = load_study_config()
    plain = [b.name for b in baselines_for(config, 5)]
    assert plain == ["pca-5", "pca-10", "experiment-1", "experiment-2", "experiment-3"]
    batched = [b.name for b in baselines_for(config, 5, batch_key="sample")]
    assert batched == [
        "pca-5",
        "pca-10",
        "combat-pca-5",
        "combat-pca-10",
        "harmony-5",
        "harmony-10",
        "experiment-1",
        "experiment-2",
        "experiment-3",
    ]


def _corrected(data, method: str) -> BatchCorrectedEmbedding:
    splits = [metric_cells(data, split)[0] for split in ("train", "val", "test")]
    training = np.arange(sum(cells.n_obs for cells in splits)) < splits[0].n_obs
    return BatchCorrectedEmbedding(
        data.preprocessor, ad.concat(splits), training, "sample", 10, method
    )


@pytest.mark.parametrize("method", ["combat-pca", "harmony"])
def test_corrections_mix_patients_better_than_pca_on_held_out_cells(prepared, method):
    train, _ = metric_cells(prepared, "train")
    pca = SplitScores(PCAEmbedding(prepared.preprocessor, train, 10), prepared)
    corrected = SplitScores(_corrected(prepared, method), prepared)
    before, after = pca.batch("test"), corrected.batch("test")
    assert tuple(after) == BATCH_METRICS
    assert after["ilisi"] > before["ilisi"]
    assert corrected.latent("test").shape == (prepared.test.n_obs, 10)
    # The cell types survive the correction: k-NN fitted on corrected training cells.
    assert corrected.final("test")["knn_accuracy"] > 0.5


def test_a_correction_encodes_only_the_cells_it_was_run_on(prepared):
    model = _corrected(prepared, "combat-pca")
    order = np.random.default_rng(0).permutation(prepared.test.n_obs)
    np.testing.assert_array_equal(
        model.encode(prepared.test[order]), model.encode(prepared.test)[order]
    )
    stranger = prepared.test[:3].copy()
    stranger.obs_names = ["new-1", "new-2", "new-3"]
    with pytest.raises(InputError, match="3 of the cells"):
        model.encode(stranger)


def test_data_without_a_batch_key_have_no_batch_metrics(tcells):
    dataset = Dataset("tcells", tcells, "cell_type", "melanoma T cells (shared subset)")
    data = prepare_data(load_study_config(), dataset=dataset)
    train, _ = metric_cells(data, "train")
    scores = SplitScores(PCAEmbedding(data.preprocessor, train, 10), data)
    assert scores.batch("val") == {}
    assert not any("batch" in name or "ilisi" in name for name in scores.test())


@pytest.mark.slow
def test_a_study_with_a_batch_key_logs_batch_metrics_for_trials_and_baselines(tcells, tmp_path):
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        result = melvae.tune(
            tcells,
            n_trials=2,
            epochs=2,
            storage=f"sqlite:///{tmp_path}/optuna.db",
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
            label_key="cell_type",
            batch_key="sample",
            name="tcells",
            threads=1,
            progress=False,
        )
    finally:
        os.chdir(cwd)
    for trial in result.study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        assert set(BATCH_METRICS) <= set(trial.user_attrs)
    table = result.comparison
    assert {"combat-pca-10", "harmony-10", "pca-10"} <= set(table.index)
    for name in BATCH_METRICS:
        assert table[f"test_{name}"].notna().all()
        assert table[f"test_{name}"].drop(table.index[-1]).between(0, 1).all()


def test_batches_follow_the_bounded_subsample_of_scored_cells(prepared, monkeypatch):
    monkeypatch.setattr(scoring, "EVAL_MAX_CELLS", 60)
    cells, _ = scoring.metric_cells(prepared, "train")
    batches = scoring.metric_batches(prepared, "train")
    assert cells.n_obs == 60 and batches.shape == (60,)
    np.testing.assert_array_equal(batches, cells.obs["sample"].astype(str).to_numpy())
