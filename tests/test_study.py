"""End to end: `melvae.study run` → Optuna trials → MLflow runs → registry → load_model."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch

import melvae
from melvae import track
from melvae.errors import InputError
from melvae.study.__main__ import main
from melvae.study.config import DEFAULT_STUDY, load_study_config
from melvae.study.runner import best_complete_trial, run_study
from melvae.study.scoring import FINAL_METRICS
from melvae.train import METRIC_NAMES, NonFiniteLossError
from tests.conftest import process_group
from tests.test_config import SEED_TRIALS

EPOCH_METRICS = set(METRIC_NAMES)  # per-epoch losses and epoch timings
STUDY = "melanoma-vae-pbmc68k_reduced"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{_free_port()}/geo/"


def _offline(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    """A working directory of its own, a private cache, and a GEO that cannot be reached."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MELVAE_DATA_DIR", str(workdir / "cache"))
    monkeypatch.setenv("MELVAE_GEO_URL", _closed_port_url())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """One offline default study of four 3-epoch trials, run through the CLI, then resumed."""
    workdir = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _offline(monkeypatch, workdir)
        storage = f"sqlite:///{workdir}/mlruns/optuna.db"
        first = main(["run", "--n-trials", "4", "--epochs", "3", "--quiet"])
        trials_after_first = len(optuna.load_study(study_name=STUDY, storage=storage).trials)
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            resumed = main(["run", "--n-trials", "1", "--epochs", "3", "--quiet"])
        yield {
            "workdir": workdir,
            "exit_codes": (first, resumed),
            "trials_after_first": trials_after_first,
            "stdout": summary.getvalue(),
            "study": optuna.load_study(study_name=STUDY, storage=storage),
        }


@pytest.fixture
def tracked(finished_study, monkeypatch):
    """The finished study's folder as working directory and its MLflow backend as current."""
    _offline(monkeypatch, finished_study["workdir"])
    track.use_backend()
    return finished_study


def _runs(experiment_name: str) -> pd.DataFrame:
    experiment = mlflow.get_experiment_by_name(experiment_name)
    return mlflow.search_runs([experiment.experiment_id], output_format="pandas")


def _champion(study: optuna.Study) -> optuna.trial.FrozenTrial:
    return best_complete_trial(study, load_study_config())


def test_study_runs_offline_on_the_announced_fallback(tracked):
    assert tracked["exit_codes"] == (0, 0)
    assert f"champion: trial {_champion(tracked['study']).number}," in tracked["stdout"]
    assert "chosen by: highest bio_score on the Pareto front" in tracked["stdout"]
    runs = _runs(STUDY)
    parents = runs[runs["tags.role"] == "study-run"]
    assert len(parents) == 2
    assert set(parents["tags.dataset_fallback"]) == {"true"}
    assert parents["tags.fallback_reason"].str.len().min() > 0
    assert set(parents["params.requested_dataset"]) == {"gse115978_reference"}


def test_seed_trials_come_first_exactly_and_are_not_repeated_on_resume(tracked):
    study = tracked["study"]
    assert tracked["trials_after_first"] == 4
    assert len(study.trials) == 5
    assert len(study.directions) == 2  # the default study is multi-objective
    for trial, expected in zip(study.trials[:3], SEED_TRIALS, strict=True):
        assert trial.params == expected
        assert trial.user_attrs["seed_trial"] is True
    assert not any(t.user_attrs.get("seed_trial") for t in study.trials[3:])


def test_every_trial_is_a_nested_mlflow_run_with_curves_metrics_and_plots(tracked):
    runs = _runs(STUDY)
    trials = runs[runs["tags.mlflow.runName"].str.startswith("trial-")]
    numbers = trials["tags.mlflow.runName"].str.extract(r"^trial-(\d+) ", expand=False)
    assert sorted(numbers.astype(int)) == list(range(5))
    assert trials["tags.mlflow.parentRunId"].notna().all()
    client = mlflow.MlflowClient()
    for _, run in trials.iterrows():
        assert run["status"] == "FINISHED"
        history = client.get_metric_history(run["run_id"], "val_loss")
        assert [m.step for m in history] == [0, 1, 2]
        assert {
            col.removeprefix("metrics.") for col in run.index if pd.notna(run[col])
        } >= EPOCH_METRICS | set(FINAL_METRICS) | {"bio_score"}
        assert -1 <= run["metrics.silhouette"] <= 1
        assert 0 <= run["metrics.knn_accuracy"] <= 1
        assert run["params.hidden_dim"] in {"64", "128", "256", "512"}
        assert run["params.preprocess.transform"] == "minmax"
        artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
        assert {"loss.png", "tsne.png"} <= artifacts
    parent = runs[runs["tags.role"] == "study-run"].iloc[0]
    assert {"metrics.objective", "metrics.test_silhouette", "metrics.test_knn_accuracy"} <= set(
        runs.columns
    )
    parent_files = {a.path for a in client.list_artifacts(parent["run_id"])}
    assert {"report.html", "report.png"} <= parent_files


def test_baselines_are_runs_with_the_trials_metric_names_and_margins(tracked):
    runs = _runs(STUDY)
    baselines = runs[runs["tags.baseline"] == "true"]
    names = set(baselines["tags.mlflow.runName"])
    latent = _champion(tracked["study"]).params["latent_dim"]
    expected = {f"baseline-pca-{latent}", "baseline-pca-10"} | {
        f"baseline-experiment-{i}" for i in (1, 2, 3)
    }
    assert expected <= names  # two `run`s: each logs its own set
    # The documented experiments ran as seed trials with the same epoch budget: reloaded, not
    # trained again.
    reused = baselines.dropna(subset=["tags.reused_trial"])
    assert set(reused["tags.mlflow.runName"]) == {f"baseline-experiment-{i}" for i in (1, 2, 3)}
    assert set(reused["tags.reused_trial"]) == {"0", "1", "2"}
    trial = runs[runs["tags.trial_number"] == "0"].iloc[0]
    trial_metrics = {c for c in runs.columns if c.startswith("metrics.") and pd.notna(trial[c])}
    test_metrics = {f"metrics.test_{name}" for name in FINAL_METRICS}
    for _, baseline in baselines.iterrows():
        logged = {c for c in runs.columns if c.startswith("metrics.") and pd.notna(baseline[c])}
        assert logged >= (trial_metrics - {f"metrics.{m}" for m in EPOCH_METRICS}) - {
            "metrics.best_epoch",
            "metrics.best_val_loss",
        }
        assert logged >= test_metrics
    parent = runs[runs["tags.role"] == "study-run"].iloc[0]
    margins = {f"metrics.margin_test_{name}" for name in FINAL_METRICS}
    assert margins <= set(runs.columns)
    assert parent[sorted(margins)].notna().all()
    assert parent["tags.selection_rule"].startswith("highest bio_score")
    summary = tracked["stdout"]
    assert "champion vs baselines" in summary
    assert "margin (champion - best baseline)" in summary
    assert "pca-10" in summary and "experiment-3" in summary


def test_best_trial_is_champion_and_loads_for_embedding(tracked):
    best = _champion(tracked["study"])
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("melvae-pbmc68k_reduced", "champion")
    assert champion.tags["objective"] == "bio_score"
    assert float(champion.tags["objective_value"]) == pytest.approx(best.user_attrs["bio_score"])
    assert champion.tags["trial_number"] == str(best.number)
    assert champion.tags["selection_rule"].startswith("highest bio_score on the Pareto front")

    model = melvae.load_model("models:/melvae-pbmc68k_reduced@champion")
    from melvae.data.datasets import load_dataset

    cells = load_dataset("pbmc68k_reduced").adata[:50].copy()
    latent = model.encode(cells)
    assert latent.shape == (50, best.params["latent_dim"])
    assert np.isfinite(latent).all()
    model.embed(cells)
    np.testing.assert_allclose(cells.obsm["X_melvae"], latent)

    pyfunc = mlflow.pyfunc.load_model("models:/melvae-pbmc68k_reduced@champion")
    frame = pd.DataFrame(cells[:, model.genes].X.toarray(), columns=model.genes)
    np.testing.assert_allclose(pyfunc.predict(frame).to_numpy(), latent[:, :], rtol=1e-5)

    partial = cells[:, cells.var_names[: int(0.8 * cells.n_vars)]].copy()
    assert model.encode(partial).shape == latent.shape
    with pytest.raises(InputError, match="genes were found in the input"):
        model.encode(cells[:, cells.var_names[:10]].copy())


def test_best_and_promote_commands_report_the_champion(tracked, capsys):
    assert main(["best"]) == 0
    out = capsys.readouterr().out
    assert f"champion trial {_champion(tracked['study']).number}" in out
    assert "chosen by: highest bio_score" in out
    assert "held-out test metrics (never used for selection)" in out
    assert "test_knn_macro_f1" in out
    assert "MLflow run:" in out
    assert main(["promote"]) == 0
    assert "not better than @champion" in capsys.readouterr().out


def test_unknown_model_uri_is_a_clear_error(tracked):
    with pytest.raises(InputError, match="could not be loaded"):
        melvae.load_model("models:/melvae-nothing@champion")


def test_every_completed_trial_reloads_and_the_champion_loads_without_pickle(tracked):
    study = tracked["study"]
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        model = melvae.load_model(trial.user_attrs["model_uri"])
        assert model.hyperparameters["latent_dim"] == trial.params["latent_dim"]
    champion_uri = "models:/melvae-pbmc68k_reduced@champion"
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("melvae-pbmc68k_reduced", "champion")
    assert version.run_id == _champion(study).user_attrs["mlflow_run_id"]
    files = Path(
        mlflow.artifacts.download_artifacts(champion_uri, dst_path=str(tracked["workdir"]))
    )
    assert not list(files.rglob("*.pkl")), "the registered model must not be pickled"
    flavor = mlflow.models.Model.load(str(files)).flavors["python_function"]
    assert Path(flavor["model_code_path"]).name == "served_model.py"
    champion = melvae.load_model(champion_uri)
    example = json.loads((files / "input_example.json").read_text())
    assert example["columns"] == champion.genes
    assert len(example["data"]) == 3
    trained = melvae.load_model(_champion(study).user_attrs["model_uri"]).module.state_dict()
    for name, weights in champion.module.state_dict().items():
        assert torch.equal(weights, trained[name]), name


def _invoke(base: str, frame: pd.DataFrame) -> tuple[int, dict]:
    """POST cells to a served model; (HTTP status, JSON answer)."""
    body = json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split"))})
    request = urllib.request.Request(
        f"{base}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_encode_for_any_subset_of_genes(tracked):
    """README's recipe for real: the venv's `mlflow` with the venv's bin/ first on PATH (how it
    finds `uvicorn` without activation). Cells with 80 % of the genes come back as the latent
    `encode` gives them (missing genes zero); 10 % of the genes is a short HTTP 400."""
    uri = "models:/melvae-pbmc68k_reduced@champion"
    model = melvae.load_model(uri)
    from melvae.data.datasets import load_dataset

    cells = load_dataset("pbmc68k_reduced").adata[:5, model.genes].copy()
    port = _free_port()
    venv_bin = Path(sys.executable).parent
    serve = [str(venv_bin / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local"]
    with process_group(
        [*serve, "--host", "127.0.0.1", "--port", str(port)],
        cwd=tracked["workdir"],
        env=os.environ
        | {
            "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
            "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as process:
        base = f"http://127.0.0.1:{port}"
        _wait_until_up(f"{base}/ping", process, seconds=180)
        genes = model.genes[: int(0.8 * len(model.genes))]
        partial = cells[:, genes].copy()
        frame = pd.DataFrame(partial.X.toarray(), columns=genes, index=partial.obs_names)
        status, answer = _invoke(base, frame)
        assert status == 200, answer
        predictions = pd.DataFrame(answer["predictions"])
        few = frame.iloc[:, : len(model.genes) // 10]
        status, refused = _invoke(base, few)
    # The cells travel as JSON (pandas writes 10 decimals), so outputs near 0 differ by ~1e-7.
    np.testing.assert_allclose(predictions.to_numpy(), model.encode(partial), rtol=1e-5, atol=1e-6)
    assert status == 400
    assert "genes were found in the input" in refused["message"]
    assert len(refused["message"]) < 1000  # says what is wrong, does not echo the data


def _wait_until_up(url: str, process: subprocess.Popen, *, seconds: float) -> None:
    """Poll `url` until it answers 200; fail if the server process exits or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, f"the server for {url} exited"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.status == 200
                return
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer in {seconds} s"
            time.sleep(1)


def test_ui_serves_the_study_page(tracked):
    command = [sys.executable, "-m", "melvae.study", "ui"]
    with process_group(command, cwd=tracked["workdir"], stdout=subprocess.PIPE, text=True) as ui:
        first_line = ui.stdout.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+)/#/experiments/\d+/runs", first_line)
        assert url, first_line
        _wait_until_up(f"{url.group(1)}/health", ui, seconds=180)


def _quick_config(tmp_path: Path, **replacements: str) -> Path:
    text = DEFAULT_STUDY.read_text()
    for old, new in replacements.items():
        assert old in text, f"{old!r} is not in {DEFAULT_STUDY}: the test would run the file as is"
        text = text.replace(old, new)
    path = tmp_path / "quick.toml"
    path.write_text(text)
    return path


def test_a_non_finite_loss_fails_that_trial_only(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    from melvae.model import MelVAE

    real_fit = MelVAE.fit.__func__
    calls = {"n": 0}

    def flaky_fit(cls, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise NonFiniteLossError(0, "training", {"total": float("nan")})
        return real_fit(cls, *args, **kwargs)

    monkeypatch.setattr(MelVAE, "fit", classmethod(flaky_fit))
    config = load_study_config(_quick_config(tmp_path, **{'name = "melanoma-vae"': 'name = "nan"'}))
    outcome = run_study(config, n_trials=2, epochs_cap=2, progress=False)
    states = [t.state for t in outcome.study.trials[:2]]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert "nan" in outcome.study.trials[0].user_attrs["fail_reason"]
    runs = _runs("nan-pbmc68k_reduced").set_index("tags.trial_number")
    assert runs.loc["0", "status"] == "FAILED"
    assert "NonFiniteLossError" in runs.loc["0", "tags.failure_reason"]
    assert outcome.registration is not None


def test_a_pruned_trial_is_tagged_pruned(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
    single = {'metrics = ["val_loss", "bio_score"]': 'metric = "val_loss"'}
    single['rule = "bio_within_loss"'] = 'rule = "objective"'
    config = load_study_config(
        _quick_config(tmp_path, **{'name = "melanoma-vae"': 'name = "pr"'}, **single)
    )
    outcome = run_study(config, n_trials=2, epochs_cap=2, progress=False)
    assert outcome.study.trials[1].state == optuna.trial.TrialState.PRUNED
    runs = _runs("pr-pbmc68k_reduced").set_index("tags.trial_number")
    assert runs.loc["1", "tags.pruned"] == "true"
    assert runs.loc["1", "status"] == "KILLED"


def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch, tmp_path)
    bad = tmp_path / "cells.csv"
    bad.write_text(",GENE_A,GENE_B,label\ncell1,1.0,2.0,T\ncell2,1.0,nan,B\ncell3,3.0,1.0,T\n")
    assert main(["run", "--data", str(bad), "--n-trials", "1", "--epochs", "1"]) == 2
    error = capsys.readouterr().err
    assert "cells.csv" in error
    assert "what to do" in error
    assert not (tmp_path / "mlruns").exists() or not any((tmp_path / "mlruns").iterdir())


@pytest.fixture
def tcell_subset(shared_data) -> Path:
    path = shared_data / "sadefeldman2018_gse120575_tcells_subset.h5ad"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


def test_a_study_trains_on_the_real_melanoma_t_cells(tmp_path, monkeypatch, tcell_subset):
    _offline(monkeypatch, tmp_path)
    config = load_study_config(
        _quick_config(tmp_path, **{"n_top_genes = 2000": "n_top_genes = 1000"})
    )
    outcome = run_study(config, data_path=tcell_subset, n_trials=1, epochs_cap=20, progress=False)
    trial = outcome.study.trials[0]
    assert outcome.study.study_name == "melanoma-vae-sadefeldman2018_gse120575_tcells_subset"
    assert trial.params["latent_dim"] == 2
    assert 0 < trial.user_attrs["recon_corr"] <= 1
    # Eight author clusters, the largest 26 %: k-NN in the latent must beat guessing the majority.
    assert trial.user_attrs["knn_accuracy"] > 0.3


def test_unlabelled_data_run_a_fit_only_study_and_say_so(tmp_path, monkeypatch, capsys, pbmc):
    _offline(monkeypatch, tmp_path)
    cells = pbmc[:300].copy()
    cells.obs = cells.obs[[]]  # no label column at all
    path = tmp_path / "unlabelled.h5ad"
    cells.write_h5ad(path)
    code = main(["run", "--data", str(path), "--n-trials", "2", "--epochs", "2", "--quiet"])
    assert code == 0
    captured = capsys.readouterr()
    assert "selects on model fit ONLY (objective val_loss)" in captured.err
    assert "chosen by: best val_loss" in captured.out
    study = optuna.load_study(
        study_name="melanoma-vae-unlabelled", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db"
    )
    assert len(study.directions) == 1
    assert all("bio_score" not in t.user_attrs for t in study.trials)
    baselines = _runs("melanoma-vae-unlabelled").query("`tags.baseline` == 'true'")
    names = set(baselines["tags.mlflow.runName"])
    assert names >= {"baseline-pca-10"} | {f"baseline-experiment-{i}" for i in (1, 2, 3)}
    assert baselines["metrics.test_recon_corr"].notna().all()
