"""What a waiting worker process does before its job comes: import what its first trial needs.

A worker (`workers.crew`) starts before its caller reads the data and waits on its stdin for
its sampler index (`workers.wait_for_go`). The imports of `python -m melvae.study` end seconds
before that index comes, and its first trial then imported, on the critical path, the modules
none of those imports reach: MLflow's SQL tracking store (SQLAlchemy's models, alembic),
Optuna's tables, GitPython (MLflow's run context) and matplotlib's Agg canvas. The worker
imports them while it waits (`warm_up`), so that its first trial starts sooner after worker
0's: from its index to the end of its first trial, 4.46 s wall / 1.63 s CPU before, 2.90 s /
1.14 s so (bench/study_overheads.py, "worker" row, load 7.4).

Importing writes nothing a user keeps (no store is opened, no file is made), so a worker that
is dismissed or refused after its warm-up still ends having written nothing.
"""

from __future__ import annotations

import contextlib
import importlib

# The modules of a first trial that `python -m melvae.study`'s own imports do not load, each at
# least 0.1 s to import under a 2-core machine's load; a name this version of a library lacks
# is skipped (the trial then imports whatever that library has instead).
FIRST_TRIAL_MODULES = (
    "mlflow.store.tracking.sqlalchemy_store",
    "optuna.storages._rdb.models",
    "git",
    "matplotlib.backends.backend_agg",
)


def warm_up(modules: tuple[str, ...] = FIRST_TRIAL_MODULES) -> list[str]:
    """Import `modules` (those a worker's first trial needs, `FIRST_TRIAL_MODULES`); return the
    ones imported. Opens no store and writes no file."""
    imported = []
    for name in modules:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
            imported.append(name)
    return imported
