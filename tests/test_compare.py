"""What people see of a study: MLflow's runs table and compare view, the study report, the
terminal summary and optuna-dashboard, read back from real servers over their HTTP APIs."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib
import optuna
import pandas as pd
import pytest

from melvae import track
from melvae.study.__main__ import main
from melvae.study.config import load_study_config
from melvae.study.progress import column_format
from tests.conftest import process_group
from tests.test_study import STUDY, _free_port, _offline, _wait_until_up

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """An offline default study of three 2-epoch trials (the documented experiments)."""
    workdir = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _offline(monkeypatch, workdir)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["run", "--n-trials", "3", "--epochs", "2", "--quiet"])
        assert code == 0, err.getvalue()[-3000:]
        yield {
            "workdir": workdir,
            "stdout": out.getvalue(),
            "stderr": err.getvalue(),
            "storage": f"sqlite:///{workdir}/mlruns/optuna.db",
            "tracking": f"sqlite:///{workdir}/mlruns/mlflow.db",
        }


@pytest.fixture(scope="module")
def mlflow_server(small_study):
    """`mlflow server` on the study's tracking database; yields its base URL."""
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri"]
    command += [small_study["tracking"], "--host", "127.0.0.1", "--port", str(port)]
    with process_group(
        command,
        cwd=small_study["workdir"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as server:
        base = f"http://127.0.0.1:{port}"
        _wait_until_up(f"{base}/health", server, seconds=180)
        yield base


def _get(base: str, path: str, **query: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def _runs(base: str) -> tuple[str, list[dict]]:
    experiment = _get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=STUDY)
    experiment = experiment["experiment"]
    body = json.dumps({"experiment_ids": [experiment["experiment_id"]], "max_results": 1000})
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/runs/search",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return experiment, json.loads(response.read())["runs"]


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _role(runs: list[dict], role: str) -> list[dict]:
    return [r for r in runs if _tags(r).get(track.ROLE) == role]


def _root_files(base: str, run_id: str) -> set[str]:
    """What the compare view lists for a run: the files at the top of its artifacts."""
    listing = _get(base, "/api/2.0/mlflow/artifacts/list", run_id=run_id)
    return {f["path"] for f in listing.get("files", []) if not f["is_dir"]}


def test_compare_view_of_three_trials_has_tsne_and_loss_in_common(mlflow_server):
    _, runs = _runs(mlflow_server)
    trials = _role(runs, track.TRIAL_ROLE)
    assert len(trials) == 3
    common = set.intersection(*(_root_files(mlflow_server, r["info"]["run_id"]) for r in trials))
    assert {track.TSNE_FILE, track.LOSS_FILE} <= common
    with urllib.request.urlopen(
        f"{mlflow_server}/get-artifact?path={track.TSNE_FILE}"
        f"&run_uuid={trials[0]['info']['run_id']}",
        timeout=60,
    ) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"


def test_runs_are_named_by_their_settings_and_carry_few_params(mlflow_server):
    experiment, runs = _runs(mlflow_server)
    config = load_study_config()
    trials = _role(runs, track.TRIAL_ROLE)
    for run in trials:
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        name = run["info"]["run_name"]
        expected = f"h{params['hidden_dim']}x{params['n_layers']} z{params['latent_dim']}"
        assert re.fullmatch(rf"trial-\d+ {expected} lr\d\.\de-0\d", name), name
        # What a trial varies, not what every trial shares (that is on the parent).
        assert "preprocess.n_top_genes" not in params and "train.seed" not in params
        assert len(params) <= len(config.fixed_params()) + len(config.search) + 3
    baselines = _role(runs, track.BASELINE_ROLE)
    assert baselines and all(r["info"]["run_name"].startswith("baseline-") for r in baselines)
    (parent,) = _role(runs, track.PARENT_ROLE)
    parent_params = {p["key"] for p in parent["data"]["params"]}
    assert {"preprocess.n_top_genes", "preprocess.seed", "train.seed"} <= parent_params
    tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags[f"mlflow.sharedViewState.{track.VIEW_KEY}"])
    assert view["orderByKey"] == "metrics.`bio_score`"
    logged = {m["key"] for r in trials for m in r["data"]["metrics"]}
    logged |= {p["key"] for r in trials for p in r["data"]["params"]}
    shown = {re.sub(r"^\w+\.`(.*)`$", r"\1", c) for c in view["selectedColumns"]}
    assert shown - {"Duration", track.ROLE} <= logged  # every column it shows exists


def test_report_is_on_the_parent_run_with_one_panel_per_completed_trial(mlflow_server, small_study):
    _, runs = _runs(mlflow_server)
    (parent,) = _role(runs, track.PARENT_ROLE)
    run_id = parent["info"]["run_id"]
    assert {track.REPORT_FILE, track.REPORT_FIGURE} <= _root_files(mlflow_server, run_id)
    url = f"{mlflow_server}/get-artifact?path={track.REPORT_FILE}&run_uuid={run_id}"
    with urllib.request.urlopen(url, timeout=60) as response:
        page = response.read().decode()
    study = optuna.load_study(study_name=STUDY, storage=small_study["storage"])
    completed = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    panels = re.findall(r'<figure[^>]*data-trial="(\d+)"', page)
    assert sorted(map(int, panels)) == sorted(t.number for t in completed)
    champion = int(_tags(parent)["best_trial"])
    assert re.search(rf'<figure class="champion" data-trial="{champion}">', page)
    headings = ["Pareto front", "optimisation history: val_loss", "Champion vs baselines"]
    headings += ["optimisation history: bio_score", "margin (champion - best baseline)"]
    for heading in headings:
        assert heading in page
    assert 'src="http' not in page  # self-contained: every image inline
    assert "Champion" in _tags(parent)["mlflow.note.content"]


def test_report_command_writes_the_same_page_and_never_replaces_it(small_study, monkeypatch):
    _offline(monkeypatch, small_study["workdir"])
    out = small_study["workdir"] / "study-report.html"
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        style = dict(matplotlib.rcParams)
        assert main(["report", "--out", str(out)]) == 0
        assert dict(matplotlib.rcParams) == style  # Optuna's plots' ggplot style stays in them
    page = out.read_text()
    assert len(re.findall(r"<figure[^>]*data-trial=", page)) == 3
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    before = out.stat().st_mtime_ns
    assert main(["report", "--out", str(out)]) == 2
    assert out.stat().st_mtime_ns == before


def test_summary_shows_epochs_run_in_one_format_per_column_and_one_fallback_notice(small_study):
    stdout = small_study["stdout"]
    header, *rows = [line for line in stdout.splitlines() if "COMPLETE" in line or "state" in line]
    columns = header.split()
    table = pd.DataFrame([row.split()[1:] for row in rows], columns=columns)
    assert set(table["epochs"]) == {"2"}  # `--epochs 2`, not the sampled 100 or 200
    assert all(re.fullmatch(r"\d+\.\d", v) for v in table["val_loss"])
    assert all(re.fullmatch(r"\d\.\d{3}", v) for v in table["bio_score"])
    assert all(re.fullmatch(r"\d\.\de-0\d", v) for v in table["learning_rate"])
    assert small_study["stderr"].count("FALLING BACK") == 1


def test_column_format_is_one_format_per_column():
    assert column_format("val_loss", pd.Series([513.47, 7.0]))(7.0) == "7.0"
    assert column_format("bio_score", pd.Series([0.2, 0.25]))(0.2) == "0.200"
    assert column_format("epochs", pd.Series([2.0, float("nan")]))(float("nan")) == ""
    assert column_format("epochs", pd.Series([2.0, 5.0]))(5.0) == "5"
    assert column_format("learning_rate", pd.Series([1e-4]))(1.9e-3) == "1.9e-03"
    assert column_format("seconds", pd.Series([8.2, 3.61]))(3.61) == "3.6"


def test_optuna_dashboard_reads_both_objectives_and_the_champion(small_study):
    pytest.importorskip("optuna_dashboard")
    port = _free_port()
    command = [str(Path(sys.executable).parent / "optuna-dashboard"), small_study["storage"]]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with process_group(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as dashboard:
        base = f"http://127.0.0.1:{port}"
        _wait_until_up(f"{base}/api/meta", dashboard, seconds=120)
        studies = _get(base, "/api/studies")["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == STUDY]
        assert summary["directions"] == ["minimize", "maximize"]
        detail = _get(base, f"/api/studies/{summary['study_id']}", after="0")
    study = optuna.load_study(study_name=STUDY, storage=small_study["storage"])
    assert detail["objective_names"] == ["val_loss", "bio_score"]
    read = {t["number"]: t["values"] for t in detail["trials"]}
    assert sorted(read) == [t.number for t in study.trials]
    for trial in study.trials:
        assert read[trial.number] == pytest.approx(trial.values)
    attrs = {a["key"]: a["value"] for a in detail["user_attrs"]}
    champion = int(re.match(r"trial (\d+)", attrs["champion"]).group(1))
    assert champion in {t["number"] for t in detail["best_trials"]}
