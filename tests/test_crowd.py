"""Many workers at once on a fresh folder, without `create`: plain `run`s and `run --workers`."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import optuna
import pytest

from melvae.study import workers
from melvae.study.__main__ import main
from tests.test_study import _offline
from tests.workers import QUICK, STUDY, client_for, output, runs_by_status, start_worker


def test_each_worker_gets_the_job_and_its_share_of_the_cores_its_index_comes_with_the_go():
    argv = workers.worker_argv(Path("/tmp/melvae-workers-x/job.pickle"), threads=1)
    assert argv == [
        sys.executable,
        "-m",
        "melvae.study",
        "run",
        "--job",
        "/tmp/melvae-workers-x/job.pickle",
        "--threads",
        "1",
    ]
    assert workers.wait_for_go(io.BytesIO(b"4\n")) == 4
    assert workers.wait_for_go(io.BytesIO(b"")) is None, "caller closed the pipe: no job"


@pytest.mark.slow
def test_four_workers_started_at_once_on_a_fresh_folder_need_no_create(tmp_path):
    started = {
        "workers": start_worker(tmp_path, "--workers", "2", "--n-trials", "2", *QUICK, name="w"),
        "plain-1": start_worker(tmp_path, "--n-trials", "1", *QUICK, name="plain-1"),
        "plain-2": start_worker(tmp_path, "--n-trials", "1", *QUICK, name="plain-2"),
    }
    codes = {name: process.wait(timeout=600) for name, process in started.items()}
    logs = {name: output(tmp_path, "w" if name == "workers" else name) for name in started}
    errors = [name for name, log in logs.items() if "Traceback" in log or codes[name] != 0]
    assert not errors, "\n\n".join(logs[name][-3000:] for name in errors)
    assert "melvae: 2 workers x 1 thread (--workers; --threads)" in logs["workers"]

    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    assert len(trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    seeds = [t for t in trials if t.user_attrs.get("seed_trial")]
    assert len(seeds) == 3, "each documented experiment is enqueued and run once"
    assert len({t.params["latent_dim"] for t in seeds}) == 3

    tracking = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    runs = runs_by_status(tracking)
    assert set(runs) == {"FINISHED"}
    names = [run.info.run_name for run in runs["FINISHED"]]
    assert sum(name.startswith("trial-") for name in names) == 4
    parents = sum(name.startswith("run-") for name in names)
    assert parents == 4, "one parent run per worker; --workers' own (worker 0) summarises"
    client = client_for(tracking)
    assert len(client.search_experiments(filter_string=f"name = '{STUDY}'")) == 1
    client.get_model_version_by_alias("melvae-pbmc68k_reduced", "champion")
    print(f"\ncrowd test: 4 workers x 1 trial, {len(errors)} errors")


def test_create_stays_an_explicit_step(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    assert main(["create"]) == 0
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.WAITING] * 3
    client = client_for(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert client.get_experiment_by_name(STUDY) is not None
