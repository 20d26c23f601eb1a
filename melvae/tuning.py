"""The Python API of a study: `melvae.tune(adata)` runs one and returns its results.

`python -m melvae.study run` is a thin layer over `tune`: everything it does (device, threads,
worker processes, data from memory, a file or a named dataset; a study file, a dict or the
default) is here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import optuna
import pandas as pd
from threadpoolctl import threadpool_limits

from melvae import track
from melvae.data.datasets import Dataset
from melvae.errors import InputError
from melvae.faultpoint import stop_point
from melvae.model import MelVAE
from melvae.register import Registration
from melvae.study import workers as workers_
from melvae.study.config import (
    DEFAULT_STUDY,
    StudyConfig,
    load_study_config,
    study_config_from_dict,
)
from melvae.study.objective import PreparedData
from melvae.study.runner import (
    DEFAULT_STORAGE,
    StudyOutcome,
    best_complete_trial,
    config_for_data,
    create_study,
    prepare_data,
    promote_best,
    run_study,
    trials_table,
)
from melvae.study.storage import HEARTBEAT_SECONDS, check_storage_url, check_tracking_uri

StudyLike = StudyConfig | Mapping[str, Any] | str | os.PathLike[str] | None
DataLike = ad.AnnData | PreparedData | str | os.PathLike[str] | None


@dataclass(frozen=True)
class TuneResult:
    """What `tune` gives back.

    Parameters
    ----------
    champion
        The model the study's selection rule picked (None if no trial completed).
    champion_trial
        Its Optuna trial (params, values, user attributes).
    trials
        One row per trial of the study: state, objectives, parameters, key metrics.
    comparison
        Champion vs baselines on the held-out test split, with the margin row (None if no
        trial completed).
    study
        The Optuna study (all trials, also those of earlier runs).
    parent_run_id
        The MLflow run of this call; the trials are its nested runs.
    registration
        The registered model version and whether it became `@champion`.
    config
        The study settings as they ran.
    seconds
        Wall time of the call.
    plan
        How the call spent the machine: worker processes x torch threads, and why.
    worker_exit_code
        The worst exit code of the worker processes (0: all ended well, or none were started;
        negative: killed by that signal). Their finished trials count either way.

    Examples
    --------
    >>> result = melvae.tune(adata, n_trials=5)  # doctest: +SKIP
    >>> result.champion.embed(adata).obsm["X_melvae"].shape  # doctest: +SKIP
    (700, 5)
    >>> result.comparison.loc["margin (champion - best baseline)"]  # doctest: +SKIP
    """

    champion: MelVAE | None
    champion_trial: optuna.trial.FrozenTrial | None
    trials: pd.DataFrame
    comparison: pd.DataFrame | None
    study: optuna.Study
    parent_run_id: str
    registration: Registration | None
    config: StudyConfig
    seconds: float
    plan: workers_.Plan
    worker_exit_code: int = 0


def tune(
    data: DataLike = None,
    study: StudyLike = None,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    epochs: int | None = None,
    storage: str = DEFAULT_STORAGE,
    tracking_uri: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    workers: int | str = "auto",
    label_key: str | None = None,
    batch_key: str | None = None,
    name: str = "anndata",
    backed: bool = False,
    progress: bool = True,
    heartbeat: int = HEARTBEAT_SECONDS,
) -> TuneResult:
    """Run (or resume) a study: trials, champion, held-out test scores, baselines, registry.

    Parameters
    ----------
    data
        An in-memory AnnData (cells x genes), the path of an .h5ad/.csv file, a named dataset
        (e.g. "pbmc68k_reduced"), None for the study's own dataset (with its fallback), or
        data a study already split and preprocessed (`melvae.study.runner.prepare_data`).
    study
        None for the default study (shipped inside the package), the path of a study TOML file,
        a dict laid out like one (`tomllib.loads` of a file), or a StudyConfig.
    n_trials, timeout
        Trials to run now and seconds after which no new trial starts (default: the study's).
    epochs
        Cap every trial's epochs (quick runs).
    storage
        Optuna storage URL (default `sqlite:///mlruns/optuna.db` in the current folder).
    tracking_uri
        MLflow tracking URI (default `mlruns/mlflow.db` in the current folder).
    device
        "auto", "cpu" or "cuda"; overrides the study's `[train] device`.
    threads
        torch CPU threads of each process (default: the plan's, see `workers`). Give each of
        several processes on one machine a share of the cores.
    workers
        Worker processes on this machine that share the study's trials and the cores (each
        reads the data prepared here once, from a temporary file removed afterwards); "auto"
        (the default, as `run`): parallel single-thread trials for a small model, threads for a
        large one (`melvae.study.workers.choose`). The plan is printed.
    label_key
        The obs column of cell-type labels of an in-memory AnnData (default: the study's
        `[data] label_key`); without one the study selects on fit alone.
    batch_key
        The obs column naming each cell's batch (patient, sample), overriding the study's
        `[data] batch_key`: the model is conditioned on it, and the study takes the objectives
        and rule it declares for a batch key. Default: the study's (none: no batch covariate).
    name
        The dataset key of an in-memory AnnData: the study and registered model are named
        after it (`<study>-<name>`, `melvae-<name>`).
    backed
        Leave the X of an .h5ad file given by path on disk (anndata's backed mode): cells are
        read a window at a time to train, encode and score (`melvae.data.backed`), for files
        larger than memory. An AnnData opened backed (`anndata.read_h5ad(path, backed="r")`)
        streams without it.
    progress
        Show progress bars.
    heartbeat
        Seconds between the worker's heartbeats (a silent trial is failed and run again).

    Returns
    -------
    TuneResult
        Champion model, trials table, champion-vs-baselines table, Optuna study, MLflow parent
        run id and registry verdict.

    Examples
    --------
    >>> import scanpy as sc, melvae  # doctest: +SKIP
    >>> result = melvae.tune(sc.datasets.pbmc68k_reduced(), n_trials=5, epochs=20,
    ...                      label_key="bulk_labels", name="pbmc")  # doctest: +SKIP
    >>> result.trials[["state", "val_loss", "bio_score"]]  # doctest: +SKIP
    >>> result.champion.encode(new_cells)  # doctest: +SKIP
    >>> melvae.tune(adata, n_trials=8, workers=2).plan.describe()  # doctest: +SKIP
    '2 workers x 1 thread (--workers)'
    """
    started = time.perf_counter()
    config = study_config(study)
    if device is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=device))
    if batch_key is not None:
        config = config.with_batch_key(batch_key)
    _check_count(threads, "threads", "None for torch's default")
    if workers != "auto":
        _check_count(workers, "workers", '"auto" to choose from the model size and cores')
    check_storage_url(storage)
    check_tracking_uri(track.resolve_tracking_uri(tracking_uri))
    workers_.remove_orphaned_job_folders(Path(tempfile.gettempdir()))  # of runs killed -9
    budget = n_trials or config.n_trials or workers_.UNTIL_TIMEOUT
    # The worker processes the plan may want are started first, so that their imports overlap
    # reading and preparing the data here; dismissed if the data make it one process.
    most = plan_workers(workers, config, None, budget, threads=threads)
    run = {
        "storage": storage,
        "tracking_uri": tracking_uri,
        "timeout": timeout,
        "epochs_cap": epochs,
        "progress": progress,
        "heartbeat": heartbeat,
    }
    with (
        workers_.job_folder() as folder,
        workers_.crew(
            workers_.job_path(folder), workers=most.workers - 1, threads=most.threads
        ) as crew,
    ):
        stop_point("workers started")  # tests: the caller dies before the job exists
        prepared = _prepared(data, config, label_key=label_key, name=name, backed=backed)
        plan = plan_workers(workers, config, prepared, budget, threads=threads)
        print(f"melvae: {plan.describe()}", file=sys.stderr, flush=True)
        if plan.workers > 1:
            job = workers_.Job(config, prepared, run)
            outcome = start_workers(job, plan, budget, n_trials=n_trials, crew=crew, folder=folder)
        else:
            crew.dismiss()
            with _threads(plan.threads):
                outcome = run_study(config, n_trials=n_trials, data=prepared, **run)
    if crew.code != 0:
        print(f"melvae: a worker ended with exit code {crew.code}", file=sys.stderr)
    return TuneResult(
        champion=outcome.champion,
        champion_trial=outcome.champion_trial,
        trials=trials_table(outcome.study),
        comparison=outcome.comparison,
        study=outcome.study,
        parent_run_id=outcome.parent_run_id,
        registration=outcome.registration,
        config=outcome.config,
        seconds=time.perf_counter() - started,
        plan=plan,
        worker_exit_code=crew.code,
    )


def plan_workers(
    workers: int | str,
    config: StudyConfig,
    data: PreparedData | None,
    n_trials: int,
    *,
    threads: int | None = None,
) -> workers_.Plan:
    """How a run spends this machine: "auto" (`workers.choose` for the study's largest model on
    these data) or `workers` processes sharing the cores; `threads` given overrides the threads
    per process. Without `data` (not read yet): the plan of a small model, the most processes
    any data may get, with the same threads each.

    Examples
    --------
    >>> plan_workers("auto", config, data, 20).describe()  # doctest: +SKIP
    '2 workers x 1 thread (small model: parallel trials pay, threads do not)'
    """
    cores = workers_.cores()
    if workers == "auto":
        genes = 0 if data is None else len(data.preprocessor.genes)
        plan = workers_.choose(cores, n_trials, workers_.gene_weights(config, genes))
    else:
        count = min(int(workers), n_trials)
        plan = workers_.Plan(count, max(1, cores // count), "--workers")
    if threads is not None:
        plan = dataclasses.replace(plan, threads=threads, reason=f"{plan.reason}; --threads")
    return plan


def start_workers(
    job: workers_.Job,
    plan: workers_.Plan,
    budget: int,
    *,
    n_trials: int | None,
    crew: workers_.Crew,
    folder: Path,
) -> StudyOutcome:
    """Run the study as worker 0 of `plan.workers`: create it, pledge `budget` and claim the
    sampler indices, write `job` into the run's private `folder` and send the `plan.workers - 1`
    waiting processes of `crew` their indices, run this process's share of the trials on the
    data it prepared, then the summary once the budget is spent (the first process registers the
    champion meanwhile, `run_worker`); return the outcome. A stop (Ctrl-C, SIGTERM, passed on to
    the processes) takes the unrun pledge back and raises. `n_trials` (None: the study's) is what
    the progress bar counts."""
    config = config_for_data(job.config, job.data, announce=False)
    storage = job.run["storage"]
    study = create_study(config, job.data.dataset_key, storage, heartbeat=job.run["heartbeat"])
    first = workers_.claim_workers(study, storage, plan.workers)
    workers_.pledge(study, storage, budget)
    if job.run.get("timeout") is None and job.config.timeout is None:
        # All trials end before anyone summarises, so every process sees the same champion; a
        # timeout may end them apart, and worker 0 then registers the one it chose.
        job = dataclasses.replace(job, registrar=first + 1)
    try:
        workers_.write_job(job, folder)
        crew.go(first + 1)
        with _threads(plan.threads):
            outcome = run_study(
                job.config,
                n_trials=n_trials,
                data=job.data,
                worker_index=first,
                register=False,
                **job.run,
            )
        crew.wait()
        return _registered(outcome, folder, job.data.dataset_key)
    except KeyboardInterrupt:  # the processes queued their trials again for the next run
        crew.wait()
        workers_.withdraw(study, storage, budget)
        raise


def _registered(outcome: StudyOutcome, folder: Path, dataset_key: str) -> StudyOutcome:
    """The outcome with the champion's registration: the registrar worker's, or (it died, or
    saw another champion) done here."""
    best = outcome.champion_trial
    if best is None:
        return outcome
    registration = workers_.read_registration(folder, best.number)
    if registration is None:
        registration = promote_best(outcome.study, outcome.config, dataset_key)
    return dataclasses.replace(outcome, registration=registration)


def run_worker(job: Path, *, threads: int) -> None:
    """One worker process started by `tune` before it read the data: wait for the job
    (`workers.wait_for_go`; none: return), then run trials of the job's study with the sampler
    index it was sent on `threads` torch threads until the study's budget is spent; the
    registrar (`Job.registrar`) then registers the champion while worker 0 runs the baselines."""
    index = workers_.wait_for_go(sys.stdin.buffer)
    if index is None:
        return
    work = workers_.read_job(job)
    with _threads(threads):
        outcome = run_study(
            work.config, data=work.data, worker_index=index, summarise=False, **work.run
        )
        if index != work.registrar:
            return
        best = best_complete_trial(outcome.study, outcome.config)
        registration = promote_best(outcome.study, outcome.config, work.data.dataset_key)
    if best is not None and registration is not None:
        workers_.write_registration(registration, best.number, Path(job).parent)


def _prepared(
    data: DataLike, config: StudyConfig, *, label_key: str | None, name: str, backed: bool
) -> PreparedData:
    """read -> validate -> split -> preprocess, once, whatever form the data came in."""
    if isinstance(data, PreparedData):
        if data.batch_key != config.batch_key:
            raise InputError(
                f"the prepared data have batch_key {data.batch_key!r}, the study "
                f"{config.batch_key!r}",
                where="melvae.tune(data=PreparedData, batch_key=...)",
                fix="prepare the data with the study's config (runner.prepare_data), or pass "
                "the batch_key the data were prepared with",
            )
        return data
    if isinstance(data, ad.AnnData):
        dataset = Dataset(
            name,
            data,
            label_key or config.label_key,
            f"{'backed' if data.isbacked else 'in-memory'} AnnData "
            f"({data.n_obs} cells x {data.n_vars} genes)",
        )
        return prepare_data(config, dataset=dataset)
    if backed and data is None:
        raise InputError(
            "backed=True streams an .h5ad file, but no file was given",
            where="melvae.tune(data=None, backed=True)",
            fix="pass the path of an .h5ad file as data, or drop backed",
        )
    return prepare_data(config, data_path=None if data is None else Path(data), backed=backed)


def _check_count(value: object, name: str, other: str) -> None:
    """InputError unless `value` is None or a whole number >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(
            f"{name} = {value!r} is not a whole number >= 1",
            where=f"melvae.tune({name}=...)",
            fix=f"give {name} a positive integer, or {other}",
        )


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    """torch and the native thread pools (OpenMP, BLAS: scikit-learn's k-means, numpy) use
    `threads` CPU threads inside the block; the caller's settings are restored.

    A worker of one thread keeps its k-means (the final metrics, bio_score) to one thread too:
    in OpenMP's default two, with the other core busy with another worker's trial, one k-means
    of the default study's 600 cells took 1.2-3.8 s wall against 0.13 s in one thread.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(previous)


def study_config(study: StudyLike = None) -> StudyConfig:
    """The study settings from None (the default), a TOML path, a dict or a StudyConfig.

    Examples
    --------
    >>> study_config().name
    'melanoma-vae'
    """
    if study is None:
        return load_study_config(DEFAULT_STUDY)
    if isinstance(study, StudyConfig):
        return study
    if isinstance(study, Mapping):
        return study_config_from_dict(dict(study))
    if isinstance(study, str | os.PathLike):
        return load_study_config(study)
    raise InputError(
        f"study must be None, a path, a dict or a StudyConfig, not {type(study).__name__}",
        where="melvae.tune(study=...)",
        fix="pass the path of a study TOML file or a dict laid out like one",
    )
