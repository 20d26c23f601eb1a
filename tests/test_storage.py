from __future__ import annotations

import sqlite3
import subprocess
import sys

import optuna

from melvae.study.storage import open_storage

WRITE_AND_DIE = """
import os, sys, optuna
from melvae.study.storage import open_storage
study = optuna.create_study(study_name="s", storage=open_storage(sys.argv[1]))
trial = study.ask()
for i in range(30):
    trial.set_user_attr(f"metric_{i}", float(i))
os.kill(os.getpid(), 9)  # no clean shutdown: the write-ahead log is left as it is
"""


def test_a_sqlite_study_file_keeps_every_commit_of_a_killed_process(tmp_path):
    """The study file is in write-ahead-log mode, synced at checkpoints only (one commit per
    user attribute costs no disk sync), and what a SIGKILLed writer committed is all there."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    done = subprocess.run([sys.executable, "-c", WRITE_AND_DIE, url], check=False)
    assert done.returncode == -9
    assert (tmp_path / "optuna.db-wal").exists()  # the commits are still in the log
    with sqlite3.connect(tmp_path / "optuna.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    storage = open_storage(url)
    study = optuna.load_study(study_name="s", storage=storage)
    [trial] = study.get_trials(deepcopy=False)
    assert trial.user_attrs == {f"metric_{i}": float(i) for i in range(30)}
    connection = storage.engine.raw_connection()
    try:
        assert connection.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    finally:
        connection.close()
