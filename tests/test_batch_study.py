"""Studies with and without a batch key (issue 15), end to end on real cells: a study with
`--batch-key` resumes and registers its champion by the integration rule; a study without one
runs exactly the trials it ran before the batch covariate existed."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import mlflow
import optuna
import pytest

import melvae
from melvae import track
from melvae.study.__main__ import main
from melvae.study.config import load_study_config
from melvae.study.identity import IDENTITY_ATTR
from melvae.study.runner import run_study
from tests.test_study import _offline, _quick_config

SUBSET = "sadefeldman2018_gse120575_tcells_subset"
QUICK = {"n_top_genes = 2000": "n_top_genes = 500"}


@pytest.mark.slow
def test_a_study_with_a_batch_key_resumes_and_registers_by_the_integration_rule(
    tmp_path, monkeypatch, shared_data
):
    cells = shared_data / f"{SUBSET}.h5ad"
    if not cells.exists():
        pytest.skip(f"{cells} is absent")
    _offline(monkeypatch, tmp_path)
    argv = ["--study", str(_quick_config(tmp_path, **QUICK)), "--data", str(cells)]
    argv += ["--batch-key", "sample", "--epochs", "2", "--quiet"]
    assert main(["run", *argv, "--n-trials", "2"]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", *argv, "--n-trials", "1"]) == 0
    assert "chosen by: highest integration_score = 0.6 x bio_score + 0.4 x batch_score" in (
        out.getvalue()
    )
    study = optuna.load_study(
        study_name=f"melanoma-vae-{SUBSET}", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db"
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert study.user_attrs[IDENTITY_ATTR]["batch_key"] == "sample"
    assert study.metric_names == ["val_loss", "bio_score", "batch_score"]
    for trial in study.trials:
        assert 0 <= trial.values[2] <= 1
        expected = 0.6 * trial.values[1] + 0.4 * trial.values[2]
        assert trial.user_attrs["integration_score"] == pytest.approx(expected)
    track.use_backend()
    version = mlflow.MlflowClient().get_model_version_by_alias(f"melvae-{SUBSET}", "champion")
    assert version.tags["selection_rule"].startswith("highest integration_score")
    assert version.tags["objective"] == "integration_score"
    champion = melvae.load_model(f"models:/melvae-{SUBSET}@champion")
    assert champion.batch_key == "sample" and champion.origin["batch_key"] == "sample"
    assert len(champion.batch_names) == 19
    # `best` reads the rule the study was created with, without --batch-key.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["best", "--study", argv[1], "--dataset", SUBSET]) == 0
    assert "highest integration_score" in out.getvalue()


def _trials(workdir: Path, data: Path, monkeypatch) -> list[tuple[dict, list[float]]]:
    _offline(monkeypatch, workdir)
    config = load_study_config(_quick_config(workdir, **QUICK))
    outcome = run_study(
        config, data_path=data, n_trials=2, epochs_cap=2, progress=False, summarise=False
    )
    return [(t.params, t.values) for t in outcome.study.trials if t.state.name == "COMPLETE"]


@pytest.mark.slow
def test_a_study_without_a_batch_key_runs_the_same_trials_whatever_batch_column_the_data_hold(
    tmp_path, monkeypatch, pbmc
):
    cells = pbmc[:300].copy()
    plain = tmp_path / "plain" / "cells.h5ad"
    plain.parent.mkdir()
    cells.write_h5ad(plain)
    cells.obs["sample"] = [f"donor{i % 3}" for i in range(cells.n_obs)]
    with_column = tmp_path / "with_column" / "cells.h5ad"
    with_column.parent.mkdir()
    cells.write_h5ad(with_column)
    before = _trials(plain.parent, plain, monkeypatch)
    after = _trials(with_column.parent, with_column, monkeypatch)
    assert len(before) == 2 and [len(values) for _, values in before] == [2, 2]
    assert after == before
