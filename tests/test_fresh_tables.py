"""MLflow's tables in a fresh SQLite file, created without a flush per statement: the very schema
MLflow makes itself, a file MLflow's own store then opens as it is, later connections on SQLite's
defaults, and an existing file left alone."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from melvae.faultpoint import ENV as STOP_AT
from melvae.study.fresh_tables import create_mlflow_tables


def _schema(path: Path) -> tuple[list[tuple], list[tuple]]:
    """Every table, index and trigger with its SQL, and alembic's revision. Each statement is
    taken as its set of lines (columns, constraints): the order in which MLflow's migrations
    write a table's CHECK constraints changes from one process to the next, MLflow's own too."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        objects = db.execute("select type, name, sql from sqlite_master order by type, name")
        statements = [
            (kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
            for kind, name, sql in objects
        ]
        return statements, db.execute("select * from alembic_version").fetchall()


def _created_in_a_fresh_process(code: str, path: Path) -> None:
    """Run `code` (which creates the file `sys.argv[1]`) in a new Python: MLflow's migrations
    write the runs table's CHECK constraints in another order when they run a second time in
    one process, so each file is made as a `run` makes it, first in its process."""
    path.parent.mkdir()
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=300)


def test_a_fresh_file_gets_mlflows_own_schema_and_mlflow_opens_it_as_is(tmp_path, caplog):
    ours, theirs = tmp_path / "ours" / "mlflow.db", tmp_path / "theirs" / "mlflow.db"
    _created_in_a_fresh_process(
        "import sys; from melvae.study.fresh_tables import create_mlflow_tables as create; "
        "assert create(f'sqlite:///{sys.argv[1]}')",
        ours,
    )
    _created_in_a_fresh_process(
        "import sys; from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as S; "
        "S(f'sqlite:///{sys.argv[1]}', sys.argv[1] + '.artifacts').engine.dispose()",
        theirs,
    )
    assert _schema(ours) == _schema(theirs), "the same tables, indexes and revision, verbatim"
    with caplog.at_level(logging.INFO, logger="mlflow.store.db.utils"):
        store = SqlAlchemyStore(f"sqlite:///{ours}", str(tmp_path / "artifacts"))
    assert "Creating initial MLflow database tables" not in caplog.text, "no second creation"
    assert [e.name for e in store.search_experiments()] == ["Default"]
    store.engine.dispose()
    with contextlib.closing(sqlite3.connect(ours)) as db:  # no journal mode stored in the file
        assert db.execute("pragma journal_mode").fetchone() == ("delete",)
    assert sorted(p.name for p in ours.parent.iterdir()) == ["mlflow.db"], "no journal left"


def test_an_existing_file_and_other_backends_are_left_to_mlflow(tmp_path):
    existing = tmp_path / "mlflow.db"
    existing.write_bytes(b"")
    assert not create_mlflow_tables(f"sqlite:///{existing}")
    assert existing.read_bytes() == b""
    assert not create_mlflow_tables("sqlite:///:memory:")
    assert not create_mlflow_tables("postgresql+psycopg://nobody@127.0.0.1:1/none")


def test_a_creation_killed_before_its_rename_leaves_no_database_and_the_next_one_succeeds(tmp_path):
    """SIGKILL after the tables are built in their hidden file: no half-made mlflow.db for the
    next run to trip on, and the next creation replaces the leftover."""
    target = tmp_path / "mlruns" / "mlflow.db"
    target.parent.mkdir()
    code = "import sys; from melvae.study.fresh_tables import create_mlflow_tables; "
    code += "create_mlflow_tables(sys.argv[1])"
    killed = subprocess.run(
        [sys.executable, "-c", code, f"sqlite:///{target}"],
        env={**os.environ, STOP_AT: "mlflow tables built, not yet in place"},
        timeout=300,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    assert not target.exists(), "nothing in place"
    (leftover,) = target.parent.iterdir()
    assert leftover.name.startswith(".mlflow.db.creating-"), leftover.name
    assert create_mlflow_tables(f"sqlite:///{target}")
    assert sorted(p.name for p in target.parent.iterdir()) == ["mlflow.db"], "leftover replaced"
    store = SqlAlchemyStore(f"sqlite:///{target}", str(tmp_path / "artifacts"))
    assert [e.name for e in store.search_experiments()] == ["Default"]
    store.engine.dispose()
