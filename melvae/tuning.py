"""The Python API of a study: `melvae.tune(adata)` runs one and returns its results.

`python -m melvae.study run` is a thin layer over `tune`: everything it does (device, threads,
data from memory, a file or a named dataset; a study file, a dict or the default) is here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import optuna
import pandas as pd

from melvae.data.datasets import Dataset
from melvae.errors import InputError
from melvae.model import MelVAE
from melvae.register import Registration
from melvae.study.config import (
    DEFAULT_STUDY,
    StudyConfig,
    load_study_config,
    study_config_from_dict,
)
from melvae.study.objective import PreparedData
from melvae.study.runner import DEFAULT_STORAGE, run_study, trials_table
from melvae.study.storage import HEARTBEAT_SECONDS

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
    label_key: str | None = None,
    batch_key: str | None = None,
    name: str = "anndata",
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
        torch CPU threads (default: torch's). Give each of several processes on one machine
        a share of the cores.
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
    """
    config = study_config(study)
    if device is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=device))
    if threads is not None:
        import torch

        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InputError(
                f"threads = {threads!r} is not a whole number >= 1",
                where="melvae.tune(threads=...)",
                fix="give threads a positive integer, or None for torch's default",
            )
        torch.set_num_threads(threads)
    if batch_key is not None:
        config = config.with_batch_key(batch_key)
    data_path, dataset, prepared = None, None, None
    if isinstance(data, PreparedData):
        prepared = data
        if prepared.batch_key != config.batch_key:
            raise InputError(
                f"the prepared data have batch_key {prepared.batch_key!r}, the study "
                f"{config.batch_key!r}",
                where="melvae.tune(data=PreparedData, batch_key=...)",
                fix="prepare the data with the study's config (runner.prepare_data), or pass "
                "the batch_key the data were prepared with",
            )
    elif isinstance(data, ad.AnnData):
        dataset = Dataset(
            name,
            data,
            label_key or config.label_key,
            f"in-memory AnnData ({data.n_obs} cells x {data.n_vars} genes)",
        )
    elif data is not None:
        data_path = Path(data)
    outcome = run_study(
        config,
        storage=storage,
        tracking_uri=tracking_uri,
        n_trials=n_trials,
        timeout=timeout,
        epochs_cap=epochs,
        data_path=data_path,
        dataset=dataset,
        data=prepared,
        progress=progress,
        heartbeat=heartbeat,
    )
    return TuneResult(
        champion=outcome.champion,
        champion_trial=outcome.champion_trial,
        trials=trials_table(outcome.study),
        comparison=outcome.comparison,
        study=outcome.study,
        parent_run_id=outcome.parent_run_id,
        registration=outcome.registration,
        config=outcome.config,
        seconds=outcome.seconds,
    )


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
