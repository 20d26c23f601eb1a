"""The Python API: a whole study from a notebook on an in-memory AnnData, and its champion
loaded back in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import melvae
from melvae import tuning
from melvae.errors import InputError
from melvae.model import MelVAE
from melvae.study.__main__ import main as study_main
from melvae.study.config import DEFAULT_STUDY
from melvae.study.identity import stored_selection
from melvae.study.selection import SelectionRule
from melvae.track import PARENT_ROLE

LOAD_AND_ENCODE = """
import json, sys
import anndata as ad, numpy as np, pandas as pd
import melvae
model = melvae.load_model(sys.argv[1], tracking_uri=sys.argv[2])
cells = ad.AnnData(np.linspace(0, 3, 2 * len(model.genes), dtype=np.float32).reshape(2, -1),
                   var=pd.DataFrame(index=model.genes))
print(json.dumps({"latent": model.encode(cells).tolist(), "origin": model.origin}))
"""


def _cells(n_cells: int = 150, n_genes: int = 60) -> ad.AnnData:
    """Counts of three cell types, each with its own block of expressed genes."""
    rng = np.random.default_rng(0)
    types = np.array(["T", "B", "NK"])[np.arange(n_cells) % 3]
    rates = np.full((n_cells, n_genes), 0.5)
    for i, name in enumerate(("T", "B", "NK")):
        rates[types == name, i * 20 : (i + 1) * 20] = 4.0
    return ad.AnnData(
        rng.poisson(rates).astype(np.float32),
        obs=pd.DataFrame({"cell_type": types}, index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]),
    )


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    cwd = Path.cwd()
    os.chdir(folder)  # a stray default path would land here, never in the checkout
    try:
        adata = _cells()
        tracking = f"sqlite:///{folder}/mlflow.db"
        result = melvae.tune(
            adata,
            n_trials=2,
            epochs=2,
            storage=f"sqlite:///{folder}/optuna.db",
            tracking_uri=tracking,
            label_key="cell_type",
            name="toy",
            threads=1,
            progress=False,
        )
        yield {"result": result, "adata": adata, "tracking": tracking, "folder": folder}
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_a_whole_study_runs_from_python_on_an_in_memory_anndata(tuned):
    result, adata = tuned["result"], tuned["adata"]
    assert isinstance(result, melvae.TuneResult)
    assert result.study.study_name == "melanoma-vae-toy"
    # Two trials ran; the third documented experiment waits in the queue for the next call.
    assert list(result.trials["state"]) == ["COMPLETE", "COMPLETE", "WAITING"]
    assert {"val_loss", "bio_score", "hidden_dim", "latent_dim"} <= set(result.trials.columns)
    assert isinstance(result.champion, MelVAE)
    assert result.champion_trial.number in result.trials.index
    latent = result.champion.encode(adata)
    assert latent.shape == (adata.n_obs, result.champion_trial.params["latent_dim"])
    assert result.comparison.index[0] == "champion"
    assert "margin (champion - best baseline)" in result.comparison.index
    assert "test_knn_accuracy" in result.comparison.columns
    assert result.registration.promoted
    # Stored, not guessed: the study keeps its objectives, rule and dataset; the model its origin.
    attrs = result.study.user_attrs
    assert stored_selection(result.study) == (
        ("val_loss", "bio_score"),
        SelectionRule("bio_within_loss", 0.02),
    )
    assert attrs["identity"]["objectives"] == ["val_loss", "bio_score"], "stored once, there"
    assert "objectives" not in attrs and "selection" not in attrs
    assert attrs["dataset_key"] == "toy"
    origin = result.champion.origin
    assert origin["dataset"] == "toy" and origin["label_key"] == "cell_type"
    assert origin["split"] == {"seed": 0, "val_fraction": 0.15, "test_fraction": 0.15}
    assert origin["preprocess"]["transform"] == "minmax"
    import mlflow

    run = mlflow.MlflowClient(tuned["tracking"]).get_run(result.parent_run_id)
    assert run.info.status == "FINISHED"
    # Only what the call was pointed at (and the locks beside the databases): no mlruns/ here.
    written = {p.name for p in tuned["folder"].iterdir()}
    assert written == {
        "artifacts",
        "mlflow.db",
        "mlflow.db.lock",
        "mlflow.db.promote.lock",
        "optuna.db",
        "optuna.db.lock",
    }


@pytest.mark.slow
def test_the_champion_loads_in_a_new_process(tuned):
    result = tuned["result"]
    uri = f"models:/{result.registration.name}@champion"
    out = subprocess.run(
        [sys.executable, "-c", LOAD_AND_ENCODE, uri, tuned["tracking"]],
        capture_output=True,
        text=True,
        check=True,
        cwd=tuned["folder"],
        env={**os.environ, "PYTHONPATH": str(Path(melvae.__file__).parents[1])},
    )
    genes = result.champion.genes
    cells = ad.AnnData(
        np.linspace(0, 3, 2 * len(genes), dtype=np.float32).reshape(2, -1),
        var=pd.DataFrame(index=genes),
    )
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert np.allclose(loaded["latent"], result.champion.encode(cells))
    assert loaded["origin"] == result.champion.origin


def test_public_names_are_visible_to_dir_and_documented():
    assert {"MelVAE", "load_model", "tune", "TuneResult"} <= set(dir(melvae))
    for name in ("MelVAE", "load_model", "tune", "TuneResult"):
        assert "Examples" in getattr(melvae, name).__doc__ or name == "load_model"
    assert "activation : str, default 'relu'" in MelVAE.fit.__doc__
    assert "dropout : float, default 0.0" in MelVAE.fit.__doc__


@pytest.mark.slow
def test_tune_on_an_in_memory_anndata_is_worker_0_of_its_processes(tmp_path, monkeypatch, capfd):
    handoff = tmp_path / "tmp"
    handoff.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(handoff))  # where the job file goes
    monkeypatch.chdir(tmp_path)
    # The worker process registers the champion while this one runs the baselines.
    monkeypatch.setattr(tuning, "promote_best", _not_here)
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    study = tomllib.loads(DEFAULT_STUDY.read_text()) | {"name": "dict-study"}
    result = melvae.tune(
        _cells(),  # the data and the study exist only in this process's memory: the workers
        study,  # get them from the job file
        label_key="cell_type",
        n_trials=4,
        epochs=2,
        storage=f"sqlite:///{tmp_path}/optuna.db",
        tracking_uri=tracking,
        workers=2,
        threads=1,
        name="toy",
        progress=False,
    )
    assert "melvae: 2 workers x 1 thread (--workers; --threads)" in capfd.readouterr().err
    assert result.plan.workers == 2 and result.worker_exit_code == 0
    assert result.study.study_name == "dict-study-toy"
    assert (result.trials["state"] == "COMPLETE").sum() == 4
    assert result.champion_trial.number in result.trials.index
    assert result.comparison.index[0] == "champion"
    import mlflow

    client = mlflow.MlflowClient(tracking)
    experiment = client.get_experiment_by_name("dict-study-toy")
    runs = client.search_runs([experiment.experiment_id], f"tags.role = '{PARENT_ROLE}'")
    pids = {run.data.tags["worker"].rsplit(":", 1)[1] for run in runs}
    assert len(runs) == 2 and str(os.getpid()) in pids and len(pids) == 2, "this one + 1 process"
    here = f"tags.`mlflow.parentRunId` = '{result.parent_run_id}' and tags.role = 'trial'"
    assert client.search_runs([experiment.experiment_id], here), "worker 0 ran trials here"
    assert list(handoff.iterdir()) == [], "the job file is removed when the workers end"
    (version,) = client.search_model_versions("name = 'melvae-toy'")
    assert result.registration.version == str(version.version) and result.registration.promoted
    assert version.tags["run_id"] == result.champion_trial.user_attrs["mlflow_run_id"]


def _not_here(*args, **kwargs):
    raise AssertionError("worker 0 registered the champion itself")


@pytest.mark.slow
def test_best_reads_the_objectives_and_rule_the_study_stored_not_the_file_given(
    tuned, tmp_path, capsys
):
    other = tmp_path / "other.toml"  # same name, another rule and one objective
    text = DEFAULT_STUDY.read_text()
    for old, new in (
        ('metrics = ["val_loss", "bio_score"]', 'metrics = ["val_loss"]'),
        ('rule = "bio_within_loss"', 'rule = "objective"'),
    ):
        assert old in text
        text = text.replace(old, new)
    other.write_text(text)
    folder = tuned["folder"]
    stores = ["--storage", f"sqlite:///{folder}/optuna.db", "--tracking-uri", tuned["tracking"]]
    assert study_main(["best", "--study", str(other), "--dataset", "toy", *stores]) == 0
    out = capsys.readouterr().out
    assert f"champion trial {tuned['result'].champion_trial.number}" in out
    assert "chosen by: highest bio_score on the Pareto front" in out
    assert "bio_score = " in out


@pytest.mark.parametrize("option", [{"workers": 0}, {"workers": "4"}, {"threads": True}])
def test_a_bad_worker_or_thread_count_is_refused_before_anything_is_written(
    option, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    name = next(iter(option))
    with pytest.raises(InputError, match=rf"{name} = .* is not a whole number >= 1"):
        melvae.tune(_cells(), storage=f"sqlite:///{tmp_path}/optuna.db", progress=False, **option)
    assert list(tmp_path.iterdir()) == []
