"""The per-trial and end-of-study costs that are not training, before and after, side by side.

Each row times one thing two ways in this one process, back to back: as melvae did it before
(the figure with the constrained layout engine, which makes saving draw it twice; a trial's
bio_score in the native pools' default threads) and as it does now (fixed margins; the pools
held to the worker's one thread, `melvae.tuning._threads`), and prints the ratio. The bio_score
row runs beside a process spinning on another core, as a trial runs beside the other worker's
(`--no-busy`: on an idle machine), and says whether both ways gave the same values. The user
attributes row sets a trial's end-of-trial attributes (its model URI, 18 metrics, its curve) on
a SQLite study file in the current folder's file system: one `set_user_attr` (one commit) each,
as before, and all in one transaction (`melvae.study.storage.set_user_attrs`), as now.

The worker warm-up row starts fresh worker-like processes by turns, each importing what
`python -m melvae.study` imports, reading a job file, then timing from the moment its index
would come to the end of its first trial (1 epoch, on a study whose tables exist): without
warming up while it waited, as before, and after `melvae.study.warmup.warm_up`, as now.

The MLflow tables row creates MLflow's tables in fresh SQLite files by turns, as MLflow does
(a disk flush per statement) and as `run` now does (`melvae.study.fresh_tables`), each followed
by MLflow opening its store on the file.

    python bench/study_overheads.py [--repeats 3] [--no-busy] [--no-worker]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(function: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Mean wall and CPU seconds of `function` over `repeats` calls, after one warm-up call."""
    function()
    wall, cpu = time.perf_counter(), _cpu()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - wall) / repeats, (_cpu() - cpu) / repeats


def _save(figure) -> int:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return len(buffer.getvalue())


def _history(epochs: int = 150) -> SimpleNamespace:
    """A loss history shaped like a default-study trial's (wide reconstruction, narrow KL)."""
    e = np.arange(1, epochs + 1)
    recon = list(2000 * np.exp(-e / 10) + 300)
    kl = list(20 - 5 * np.exp(-e / 30))
    total = [r + k for r, k in zip(recon, kl, strict=True)]
    return SimpleNamespace(
        train_loss=total, val_loss=total, train_recon=recon, train_kl=kl, val_recon=recon,
        val_kl=kl, best_epoch=epochs - 20,
    )  # fmt: skip


def _with_engine(figure):
    figure.set_layout_engine("constrained")
    return figure


def figures(repeats: int) -> list[tuple[str, float, float, float, float]]:
    from melvae.plot import loss_curves, tsne_embedding
    from melvae.study import report

    history = _history()
    rows = [
        (
            "loss figure (one per trial), save s",
            *_timed(lambda: _save(_with_engine(loss_curves(history))), repeats),
            *_timed(lambda: _save(loss_curves(history)), repeats),
        )
    ]
    rng = np.random.default_rng(0)
    labels = rng.choice(["B", "T.CD4", "T.CD8", "NK", "Macrophage"], 105)
    panels = []
    for number in range(14):  # the default study's completed trials
        latent = rng.normal(size=(105, 8)) + 3 * (labels[:, None] == "B")
        buffer = io.BytesIO()
        tsne_embedding(latent, labels, title=f"trial {number}").savefig(buffer, format="png")
        caption = "hidden 512 × 2, latent 12, lr 3.1e-03, 200 epochs run; val_loss 303.7, bio 0.66"
        panels.append(report.Panel(number, f"trial {number}", caption, buffer.getvalue(), False))
    rows.append(
        (
            "report t-SNE grid (14 trials), build+save s",
            *_timed(lambda: report._png(_with_engine(report.tsne_grid(panels))), repeats),
            *_timed(lambda: report._png(report.tsne_grid(panels), laid_out=True), repeats),
        )
    )
    return rows


def bio_score(repeats: int, busy: bool) -> tuple[str, float, float, float, float]:
    """A trial's bio_score (k-means, silhouette, k-NN) of 600 cells in 10 cell types, in the
    pools' default threads and in one, beside a spinning process unless not `busy`."""
    from threadpoolctl import threadpool_limits

    from melvae.evaluate import bio_conservation

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 60).astype(str)
    latent = rng.normal(size=(600, 10)) + 2 * (labels[:, None] == np.arange(10).astype(str))
    spin = [sys.executable, "-c", "while True: pass"]
    spinner = subprocess.Popen(spin) if busy else None
    try:
        default = bio_conservation(latent, labels)
        before = _timed(lambda: bio_conservation(latent, labels), repeats)
        with threadpool_limits(limits=1):
            same = bio_conservation(latent, labels) == default
            after = _timed(lambda: bio_conservation(latent, labels), repeats)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    beside = ", busy core" if busy else ""
    return (f"bio_score, 600 cells{beside} (same: {same})", *before, *after)


# A worker-like process: its imports and job as a worker has them while it waits, then (timed)
# what follows its index: its first trial, after a warm-up while it waited or without one.
_FIRST_TRIAL = """
import resource, sys, time
import torch
import melvae.study.__main__
from melvae.study import warmup, workers
from melvae.study.runner import run_study
torch.set_num_threads(1)
job = workers.read_job(sys.argv[1])
if sys.argv[2] == "warm":
    warmup.warm_up()
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
wall, used = time.perf_counter(), cpu()
run_study(job.config, data=job.data, n_trials=1, epochs_cap=1, progress=False, summarise=False)
print(time.perf_counter() - wall, cpu() - used)
"""


def worker_warm_up(repeats: int) -> tuple[str, float, float, float, float]:
    """A worker's first trial after its index came, without and with `warm_up` while it
    waited: fresh processes by turns (after one that creates the tables), mean wall and CPU."""
    from melvae.study import workers
    from melvae.study.config import load_study_config
    from melvae.study.runner import prepare_data

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # GEO unreachable: the offline PBMC fallback
        os.environ["MELVAE_GEO_URL"] = f"http://127.0.0.1:{closed.getsockname()[1]}"
        os.environ["MELVAE_DATA_DIR"] = str(Path(tmp) / "cache")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        root = str(Path(__file__).resolve().parents[1])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        config = load_study_config()
        job = workers.write_job(workers.Job(config, prepare_data(config), {}), Path(tmp))

        def first_trial(way: str) -> tuple[float, float]:
            done = subprocess.run(
                [sys.executable, "-c", _FIRST_TRIAL, str(job), way],
                cwd=tmp, env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            wall, cpu = done.stdout.split()[-2:]
            return float(wall), float(cpu)

        first_trial("cold")  # creates the study and the MLflow tables, as worker 0 does
        times = {"cold": [], "warm": []}
        for _ in range(repeats):
            for way in times:
                times[way].append(first_trial(way))
    cold, warm = (np.mean(times[way], axis=0) for way in ("cold", "warm"))
    return ("worker: index -> first trial done, s", *cold, *warm)


def user_attrs(repeats: int) -> tuple[str, float, float, float, float]:
    """A default-study trial's end-of-trial user attributes on a fresh SQLite study file, set
    one by one and in one transaction (a new trial for every call)."""
    import optuna

    from melvae.study.storage import open_storage, set_user_attrs

    attrs: dict[str, object] = {"model_uri": "runs:/0123456789abcdef/model"}
    attrs |= {f"metric_{i}": 0.5 + i for i in range(18)}
    attrs["val_loss_curve"] = [300.0 + e for e in range(150)]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(dir=".") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna: heartbeats are for `optimize`
        study = optuna.create_study(storage=open_storage(f"sqlite:///{folder}/optuna.db"))

        def one_by_one() -> None:
            trial = study.ask()
            for key, value in attrs.items():
                trial.set_user_attr(key, value)

        before = _timed(one_by_one, repeats)
        after = _timed(lambda: set_user_attrs(study.ask(), attrs), repeats)
    return (f"a trial's {len(attrs)} user attributes, SQLite", *before, *after)


def mlflow_tables(repeats: int) -> tuple[str, float, float, float, float]:
    """MLflow's store opened on a fresh SQLite file: creating its tables itself, and after
    `create_mlflow_tables`; by turns, mean wall and CPU."""
    import logging

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from melvae.study.fresh_tables import create_mlflow_tables

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(repeats + 1):  # the first pair imports and warms up, untimed
            for ours in (False, True):
                uri = f"sqlite:///{tmp}/{attempt}-{ours}.db"
                wall, cpu = time.perf_counter(), _cpu()
                if ours:
                    create_mlflow_tables(uri)
                SqlAlchemyStore(uri, f"{tmp}/artifacts").engine.dispose()
                if attempt:
                    times[ours].append((time.perf_counter() - wall, _cpu() - cpu))
    before, after = (np.mean(times[ours], axis=0) for ours in (False, True))
    return ("MLflow tables, fresh SQLite file, s", *before, *after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-busy", dest="busy", action="store_false")
    parser.add_argument("--no-worker", dest="worker", action="store_false")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = [*figures(args.repeats), bio_score(args.repeats, args.busy), user_attrs(args.repeats)]
    rows += [worker_warm_up(args.repeats)] if args.worker else []
    rows += [mlflow_tables(args.repeats)]
    print(f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end; wall (CPU)")
    print(f"{'':46s}{'before':>16s}{'after':>16s}{'after/before':>16s}")
    for name, wall0, cpu0, wall1, cpu1 in rows:
        ratio = f"{wall1 / wall0:.2f} ({cpu1 / cpu0:.2f})"
        print(f"{name:46s}{wall0:>8.3f} ({cpu0:.3f}){wall1:>8.3f} ({cpu1:.3f}){ratio:>16s}")


if __name__ == "__main__":
    main()
