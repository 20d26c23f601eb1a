"""The Optuna objective: one trial trains a VAE, scores it (`melvae.study.scoring`), and tracks
it as an MLflow run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import optuna

from melvae import track
from melvae.adversary import adversary_metrics
from melvae.data.backed import reopenable, reopened
from melvae.device import resolve_device
from melvae.model import MelVAE
from melvae.params import select
from melvae.plot import loss_curves, tsne_embedding
from melvae.preprocess import Preprocessor
from melvae.register import log_trial_model
from melvae.study.config import StudyConfig, split_pair
from melvae.study.pruning import CURVE_ATTR, epoch_pruner
from melvae.study.recovery import stop_if_terminated
from melvae.study.scoring import EVAL_MAX_CELLS, SplitScores, metric_batches
from melvae.study.selection import integration_metrics
from melvae.study.storage import set_user_attrs
from melvae.train import EpochCallback, NonFiniteLossError

# The epoch budget a trial trained with (after `run --epochs`), so baselines can reuse it.
EPOCHS_ATTR = "epochs_budget"
SPLITS = ("train", "val", "test")  # PreparedData's splits of the cells


@dataclass(frozen=True)
class PreparedData:
    """The study's data after read → validate → preprocess: shared by every trial."""

    dataset_key: str
    description: str
    fallback_reason: str | None
    label_key: str | None
    train: ad.AnnData
    val: ad.AnnData
    test: ad.AnnData
    preprocessor: Preprocessor
    # Preprocessors of the other transforms the search may pair with a likelihood.
    preprocessors: dict[str, Preprocessor] = field(default_factory=dict)
    # The obs column naming each cell's batch (validated), None without a batch covariate.
    batch_key: str | None = None
    # The file the cells were read from (`datasets.file_record`: path and sha256), so a model
    # can name it in its origin; None for a named dataset or an in-memory AnnData.
    source_file: dict[str, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """What a worker process gets (`workers.Job`): splits of a backed file travel as the
        file's name and their rows, reopened there (an open HDF5 file does not pickle)."""
        return {**self.__dict__, **{s: reopenable(getattr(self, s)) for s in SPLITS}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        opened: dict[str, ad.AnnData] = {}
        self.__dict__.update({**state, **{s: reopened(state[s], opened) for s in SPLITS}})

    def preprocessor_for(self, transform: str) -> Preprocessor:
        """The training-split preprocessing for `transform`."""
        if transform == self.preprocessor.transform:
            return self.preprocessor
        return self.preprocessors[transform]

    def labels(self, split: str) -> np.ndarray | None:
        if self.label_key is None:
            return None
        return getattr(self, split).obs[self.label_key].to_numpy()

    def batches(self, split: str) -> np.ndarray | None:
        """Each cell's batch name (str) in `split` ("train", "val" or "test"); None without a
        batch key."""
        if self.batch_key is None:
            return None
        return getattr(self, split).obs[self.batch_key].astype(str).to_numpy()


def suggest_params(trial: optuna.Trial, config: StudyConfig) -> dict[str, Any]:
    """The trial's hyperparameters: searched ones from Optuna, the rest fixed by the study."""
    params = config.fixed_params()
    for param in config.search:
        if param.kind == "categorical":
            params[param.name] = trial.suggest_categorical(param.name, list(param.choices))
        elif param.kind == "int":
            params[param.name] = trial.suggest_int(
                param.name, int(param.low), int(param.high), log=param.log
            )
        else:
            params[param.name] = trial.suggest_float(
                param.name, float(param.low), float(param.high), log=param.log
            )
    return params


def fit_with_params(
    config: StudyConfig,
    data: PreparedData,
    values: dict[str, Any],
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
) -> MelVAE:
    """Train one model with a trial's parameters (searched and fixed) on the study's split."""
    train_config = dataclasses.replace(config.train, **select(values, "train"))
    transform, likelihood = split_pair(values["transform_likelihood"])
    return MelVAE.fit(
        data.train,
        data.val,
        preprocess=data.preprocessor_for(transform),
        likelihood=likelihood,
        train=train_config,
        label_key=data.label_key,
        batch_key=data.batch_key,
        on_epoch=on_epoch,
        progress=progress,
        origin={
            "dataset": data.dataset_key,
            "label_key": data.label_key,
            "batch_key": data.batch_key,
            "file": data.source_file,
            "split": {
                "seed": config.preprocess.seed,
                "val_fraction": config.preprocess.val_fraction,
                "test_fraction": config.preprocess.test_fraction,
            },
            "preprocess": dataclasses.asdict(config.preprocess_for(transform)),
        },
        **select(values, "module"),
    )


class Objective:
    """Callable for `study.optimize`; returns the study's objective on the validation split."""

    def __init__(
        self,
        config: StudyConfig,
        data: PreparedData,
        experiment_id: str,
        *,
        study_name: str,
        epochs_cap: int | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.data = data
        self.experiment_id = experiment_id
        self.study_name = study_name
        self.epochs_cap = epochs_cap
        self.progress = progress
        self.pruning = epoch_pruner(
            config.pruner, multi_objective=config.multi_objective, where=f"{config.path} [pruner]"
        )

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        params = suggest_params(trial, self.config)
        if self.epochs_cap is not None:
            params["epochs"] = min(params["epochs"], self.epochs_cap)
        tags = {"study": self.study_name, "dataset": self.data.dataset_key}
        with track.trial_run(
            self.experiment_id, trial_number=trial.number, tags=tags, settings=params
        ) as run_id:
            set_user_attrs(trial, {"mlflow_run_id": run_id, EPOCHS_ATTR: params["epochs"]})
            track.log_params(self._run_params(params))
            try:
                model = self._fit(trial, params)
            except NonFiniteLossError as exc:
                trial.set_user_attr("fail_reason", str(exc))
                raise
            scores = SplitScores(model, self.data)  # each split encoded once
            metrics = scores.final("val")
            metrics["best_epoch"] = float(model.history.best_epoch)
            metrics["best_val_loss"] = float(model.history.val_loss[model.history.best_epoch])
            metrics |= scores.bio() | scores.batch("val")
            metrics |= integration_metrics(metrics)
            metrics |= adversary_metrics(
                model,
                scores.latent("val"),
                metric_batches(self.data, "val"),
                labels=scores.cells("val")[1],
            )
            track.log_metrics(metrics)
            track.log_figure(loss_curves(model.history), track.LOSS_FILE)
            track.log_figure(
                tsne_embedding(
                    scores.latent("val"),
                    scores.cells("val")[1],
                    title=f"trial {trial.number}: validation latent (t-SNE)",
                ),
                track.TSNE_FILE,
            )
            model_uri = log_trial_model(model, self.data.val)
            set_user_attrs(
                trial, {"model_uri": model_uri, **metrics, CURVE_ATTR: model.history.val_loss}
            )
            stop_if_terminated()  # a stop that arrived while it was scored stops it too
        metrics["val_loss"] = metrics["best_val_loss"]
        values = [metrics[name] for name in self.config.objectives]
        return values if self.config.multi_objective else values[0]

    def _fit(self, trial: optuna.Trial, params: dict[str, Any]) -> MelVAE:
        curves = track.EpochMetrics()

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            stop_if_terminated()
            curves.log(metrics, step=epoch)
            self.pruning.check(trial, epoch, metrics["val_loss"])

        try:
            return fit_with_params(self.config, self.data, params, on_epoch, self.progress)
        finally:
            curves.flush()

    def _run_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """What tells this trial apart: its hyperparameters and device. What every trial shares
        (data, preprocessing, the rest of training) is on the parent run (`study_params`)."""
        transform, likelihood = split_pair(params["transform_likelihood"])
        return {
            **params,
            "likelihood": likelihood,
            "preprocess.transform": transform,
            "device": str(resolve_device(self.config.train.device)),
        }


def study_params(config: StudyConfig) -> dict[str, Any]:
    """Settings every trial of a `run` shares, for its parent run: preprocessing, the training
    settings no trial varies, the objectives and the evaluation bound."""
    preprocess = {
        f"preprocess.{key}": value for key, value in dataclasses.asdict(config.preprocess).items()
    }
    of_trials = set(config.fixed_params()) | {param.name for param in config.search}
    train = {
        f"train.{key}": value
        for key, value in dataclasses.asdict(config.train).items()
        if key not in of_trials
    }
    return {
        **preprocess,
        **train,
        "objective": ",".join(config.objectives),
        "eval_max_cells": EVAL_MAX_CELLS,
    }
