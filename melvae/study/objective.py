"""The Optuna objective: one trial trains a VAE, evaluates it, and tracks it as an MLflow run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import optuna

from melvae import track
from melvae.evaluate import evaluate_latent
from melvae.model import MelVAE
from melvae.plot import loss_curves, tsne_embedding
from melvae.preprocess import Preprocessor
from melvae.register import log_trial_model
from melvae.study.config import StudyConfig
from melvae.train import NonFiniteLossError

FINAL_METRICS = (
    "silhouette",
    "davies_bouldin",
    "knn_accuracy",
    "knn_macro_f1",
    "ari",
    "nmi",
    "recon_corr",
)


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

    def labels(self, split: str) -> np.ndarray | None:
        if self.label_key is None:
            return None
        return getattr(self, split).obs[self.label_key].to_numpy()


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


def evaluate_model(model: MelVAE, data: PreparedData, split: str = "val") -> dict[str, float]:
    """Final metrics of a trained model on one held-out split (k-NN fitted on the train latent)."""
    cells = getattr(data, split)
    x, x_hat = model.reconstruct(cells)
    return evaluate_latent(
        train_latent=model.encode(data.train),
        train_labels=data.labels("train"),
        val_latent=model.encode(cells),
        val_labels=data.labels(split),
        val_x=x,
        val_x_hat=x_hat,
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

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest_params(trial, self.config)
        if self.epochs_cap is not None:
            params["epochs"] = min(params["epochs"], self.epochs_cap)
        tags = {"study": self.study_name, "dataset": self.data.dataset_key}
        with track.trial_run(self.experiment_id, trial_number=trial.number, tags=tags) as run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
            track.log_params(self._run_params(params))
            try:
                model = self._fit(trial, params)
            except NonFiniteLossError as exc:
                trial.set_user_attr("fail_reason", str(exc))
                raise
            metrics = evaluate_model(model, self.data)
            metrics["best_epoch"] = float(model.history.best_epoch)
            metrics["best_val_loss"] = float(model.history.val_loss[model.history.best_epoch])
            track.log_metrics(metrics)
            track.log_figure(loss_curves(model.history), "plots/loss.png")
            track.log_figure(
                tsne_embedding(
                    model.encode(self.data.val),
                    self.data.labels("val"),
                    title=f"trial {trial.number}: validation latent (t-SNE)",
                ),
                "plots/tsne.png",
            )
            model_uri = log_trial_model(model, self.data.val)
            trial.set_user_attr("model_uri", model_uri)
            for name, value in metrics.items():
                trial.set_user_attr(name, value)
        if self.config.objective == "val_loss":
            return metrics["best_val_loss"]
        return metrics[self.config.objective]

    def _fit(self, trial: optuna.Trial, params: dict[str, Any]) -> MelVAE:
        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            track.log_metrics(metrics, step=epoch)
            trial.report(metrics["val_loss"], epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", epoch)
                raise optuna.TrialPruned(f"val_loss {metrics['val_loss']:.4g} at epoch {epoch}")

        train_config = dataclasses.replace(
            self.config.train,
            epochs=params["epochs"],
            batch_size=params["batch_size"],
            learning_rate=params["learning_rate"],
            kl_weight=params["kl_weight"],
        )
        return MelVAE.fit(
            self.data.train,
            self.data.val,
            preprocess=self.data.preprocessor,
            hidden_dim=params["hidden_dim"],
            latent_dim=params["latent_dim"],
            likelihood=self.config.likelihood,
            train=train_config,
            label_key=self.data.label_key,
            on_epoch=on_epoch,
            progress=self.progress,
        )

    def _run_params(self, params: dict[str, Any]) -> dict[str, Any]:
        preprocess = {
            f"preprocess.{key}": value
            for key, value in dataclasses.asdict(self.config.preprocess).items()
        }
        train = {
            f"train.{key}": value
            for key, value in dataclasses.asdict(self.config.train).items()
            if key not in params
        }
        return {
            **params,
            **preprocess,
            **train,
            "likelihood": self.config.likelihood,
            "dataset": self.data.dataset_key,
            "label_key": self.data.label_key,
            "n_genes": len(self.data.preprocessor.genes),
            "objective": self.config.objective,
        }
