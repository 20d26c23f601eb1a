"""Many machines on existing engines: Optuna on PostgreSQL, a real `mlflow server` (PostgreSQL
backend store, artifact root), four workers started at once without `create`, one of them
killed with SIGKILL mid-trial; then the Optuna storage and the MLflow store are read directly."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
import sqlalchemy

from tests.conftest import process_group
from tests.workers import (
    QUICK,
    STUDY,
    assert_champion_is_a_completed_trial,
    client_for,
    kill_worker_of,
    output,
    running_trial,
    start_worker,
    wait_until_stale,
)

State = optuna.trial.TrialState


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """`mlflow server` on a free loopback port, runs in PostgreSQL, artifacts under tmp_path."""
    store = postgres.database("mlflow").replace("postgresql://", "postgresql+psycopg://")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store]
    command += ["--artifacts-destination", str(tmp_path / "artifacts")]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = (tmp_path / "mlflow-server.log").open("w")
    url = f"http://127.0.0.1:{port}"
    with process_group(command, stdout=log, stderr=subprocess.STDOUT) as server:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "mlflow-server.log").read_text()
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(1)
        yield url, store


@pytest.mark.slow
def test_four_workers_on_postgres_and_an_mlflow_server_survive_a_killed_worker(
    tmp_path, postgres, mlflow_server
):
    storage = postgres.database("optuna")
    tracking, store = mlflow_server
    backends = ["--storage", storage, "--tracking-uri", tracking, *QUICK]
    workers = [
        start_worker(tmp_path, *backends, "--n-trials", "1", name=f"worker-{i}") for i in range(4)
    ]
    number, run_id = running_trial(storage)
    pid = kill_worker_of(run_id, tracking)
    wait_until_stale()
    # A worker that starts later (another machine joining) fails the silent trial and runs it
    # again (the survivors' trials started before it fell silent for long enough).
    workers.append(start_worker(tmp_path, *backends, "--n-trials", "1", name="next"))
    names = {w.pid: f"worker-{i}" for i, w in enumerate(workers[:4])} | {workers[4].pid: "next"}
    codes = {names[w.pid]: w.wait(timeout=600) for w in workers}
    assert codes.pop(names[pid]) == -signal.SIGKILL
    for name, code in codes.items():
        assert code == 0, output(tmp_path, name)[-3000:]
        assert "Traceback" not in output(tmp_path, name)

    trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    # The study's shared budget: all four workers' trials (the killed one's is run again, by a
    # survivor or the next worker) and the next one's.
    requested = 4 + 1
    finished = [t for t in trials if t.state in (State.COMPLETE, State.PRUNED)]
    assert len(finished) == requested, "every pledged trial ran, the killed worker's too"
    assert trials[number].state == State.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == number]
    assert [t.state for t in retries] == [State.COMPLETE]
    assert retries[0].params == trials[number].params
    assert not [t for t in trials if t.state in (State.RUNNING, State.WAITING)]
    seeds = [t for t in trials if t.user_attrs.get("seed_trial") and t.state == State.COMPLETE]
    assert len({t.params["latent_dim"] for t in seeds}) == len(seeds) == 3

    # The MLflow store itself (the server's PostgreSQL database): every run ended.
    engine = sqlalchemy.create_engine(store, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as db:
        by_status = "SELECT status, count(*) FROM runs GROUP BY status"
        statuses = dict(db.execute(sqlalchemy.text(by_status)).all())
        baseline_runs = "SELECT run_uuid FROM tags WHERE key = 'baseline'"
        not_baselines = f"SELECT status, count(*) FROM runs WHERE run_uuid NOT IN ({baseline_runs})"
        study_statuses = dict(db.execute(sqlalchemy.text(f"{not_baselines} GROUP BY status")).all())
        champions = "SELECT name, version FROM registered_model_aliases WHERE alias = 'champion'"
        aliases = db.execute(sqlalchemy.text(champions)).all()
    engine.dispose()
    assert "RUNNING" not in statuses
    assert study_statuses == {"FINISHED": requested + 4, "FAILED": 2}, (
        "trials, 4 parents; dead trial + parent"
    )
    assert len(aliases) == 1

    client = client_for(tracking)
    dead = client.get_run(run_id)
    assert dead.info.status == "FAILED"
    assert "stopped sending heartbeats" in dead.data.tags["failure_reason"]
    champion = client.get_model_version_by_alias("melvae-pbmc68k_reduced", "champion")
    assert client.get_run(champion.run_id).info.status == "FINISHED"
    assert_champion_is_a_completed_trial(champion, trials)
    assert list((tmp_path / "artifacts").rglob("MLmodel")), "models went to the artifact root"
    print(
        f"\nmany machines: 4 workers x 1 trial + 1 next worker x 1, one SIGKILLed mid-trial: "
        f"{len(trials)} trials in storage, "
        + ", ".join(f"{s.name} {sum(t.state == s for t in trials)}" for s in State)
        + f"; retried {len(retries)}; MLflow runs {statuses}"
    )
