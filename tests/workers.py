"""Helpers for tests that run real `python -m melvae.study run` worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import sqlalchemy

from melvae.study.storage import GRACE_BEATS
from tests.test_study import _closed_port_url

STUDY = "melanoma-vae-pbmc68k_reduced"
HEARTBEAT = 3
QUICK = ["--epochs", "1", "--quiet", "--threads", "1", "--heartbeat", str(HEARTBEAT)]


def worker_env(workdir: Path) -> dict[str, str]:
    """Offline (GEO unreachable, so the PBMC fallback), a private cache, no inherited MLflow URI."""
    env = {
        **os.environ,
        "MELVAE_DATA_DIR": str(workdir / "cache"),
        "MELVAE_GEO_URL": _closed_port_url(),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start_worker(workdir: Path, *args: str, name: str) -> subprocess.Popen:
    """`python -m melvae.study run ARGS` in `workdir`; its output goes to workdir/NAME.log."""
    log = (workdir / f"{name}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "melvae.study", "run", *args],
        cwd=workdir,
        env=worker_env(workdir),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def output(workdir: Path, name: str) -> str:
    return (workdir / f"{name}.log").read_text()


def running_trial(
    storage: str, *, exclude: set[int] = frozenset(), timeout: float = 300
) -> tuple[int, str]:
    """Wait until a trial (not in `exclude`) RUNS and has its MLflow run; return (trial number,
    MLflow run id).

    Reads Optuna's tables directly: opening the storage through Optuna while workers create it
    would itself take part in the schema race under test.
    """
    engine = sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool)
    query = sqlalchemy.text(
        "SELECT t.number, a.value_json FROM trials t JOIN trial_user_attributes a "
        "ON a.trial_id = t.trial_id WHERE t.state = 'RUNNING' AND a.key = 'mlflow_run_id' "
        "ORDER BY t.number"
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                with engine.connect() as connection:
                    rows = connection.execute(query).all()
            except sqlalchemy.exc.SQLAlchemyError:
                rows = []  # tables not created yet
            for number, run_id in rows:
                if number not in exclude:
                    return int(number), json.loads(run_id)
            time.sleep(0.5)
    finally:
        engine.dispose()
    raise AssertionError(f"no trial started within {timeout} s")


def client_for(uri: str) -> mlflow.MlflowClient:
    """A client reading runs and the registry from `uri`, whatever MLflow's global URIs are."""
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def worker_pid_of(run_id: str, tracking_uri: str) -> int:
    """The pid of the worker process that runs this trial run (its parent run's `worker` tag)."""
    client = client_for(tracking_uri)
    parent = client.get_run(client.get_run(run_id).data.tags["mlflow.parentRunId"])
    return int(parent.data.tags["worker"].rsplit(":", 1)[1])


def kill_worker_of(run_id: str, tracking_uri: str, signum: int = signal.SIGKILL) -> int:
    """Signal the worker process that runs this trial run; return its pid."""
    pid = worker_pid_of(run_id, tracking_uri)
    os.kill(pid, signum)
    return pid


def wait_until_stale() -> None:
    """Let a dead worker's trial go past its grace period (GRACE_BEATS silent heartbeats), so the
    next worker to start a trial must find it stale."""
    time.sleep(GRACE_BEATS * HEARTBEAT + 1)


def runs_by_status(tracking_uri: str) -> dict[str, list[mlflow.entities.Run]]:
    """Every MLflow run of the study's experiment, grouped by status."""
    client = client_for(tracking_uri)
    experiment = client.get_experiment_by_name(STUDY)
    groups: dict[str, list[mlflow.entities.Run]] = {}
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        groups.setdefault(run.info.status, []).append(run)
    return groups


def assert_champion_is_a_completed_trial(champion, trials) -> None:
    """The registry's champion is a COMPLETE trial's model, ranked by that trial's bio_score
    (the default study's selection rule ranks champions across runs on bio_score)."""
    by_run = {t.user_attrs.get("mlflow_run_id"): t for t in trials}
    trial = by_run[champion.run_id]
    assert trial.state.name == "COMPLETE"
    assert champion.tags["objective"] == "bio_score"
    assert float(champion.tags["objective_value"]) == trial.user_attrs["bio_score"]
