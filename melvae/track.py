"""MLflow tracking: the one place that writes runs, params, metrics, tags and figures."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import matplotlib.pyplot as plt
import mlflow
from matplotlib.figure import Figure
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
ARTIFACT_ROOT = Path("mlruns") / "artifacts"
_MAX_PARAM_LENGTH = 6000
# Figures every trial logs at its artifact root under the same names: MLflow's compare-runs view
# lists only files at the top of each run's artifacts, and only those the runs have in common.
TSNE_FILE = "tsne.png"
LOSS_FILE = "loss.png"
# The study report on each parent run (melvae.study.report), also at the artifact root.
REPORT_FILE = "report.html"
REPORT_FIGURE = "report.png"
# `role` tells the runs apart in the runs table and in searches: a `study run` parent, a trial,
# a baseline.
ROLE = "role"
PARENT_ROLE, TRIAL_ROLE, BASELINE_ROLE = "study-run", "trial", "baseline"
# The runs-table view stored on the experiment (the UI's "share view" format) and opened by
# `experiment_url`; `workflowType` in the URL opens the UI in model-training mode.
VIEW_KEY = "melvae-comparison"
_VIEW_TAG = "mlflow.sharedViewState."
_KIND_TAG = "mlflow.experimentKind"
NOTE_TAG = "mlflow.note.content"
# Per-epoch metrics reach the backend at most this often (and when the trial ends): one write an
# epoch was 16 % of the default study's wall time on a loaded machine (bench/study_profile.py).
EPOCH_FLUSH_SECONDS = 5.0
_MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The backend `use_backend` would pick: the given URI, $MLFLOW_TRACKING_URI, or the default."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def use_backend(tracking_uri: str | None = None) -> str:
    """Point MLflow tracking and registry at one backend; the project's SQLite file by default."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        # Absolute, so the store MLflow caches per URI never points at another folder's file.
        path = Path(uri.removeprefix("sqlite:///")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """Return the experiment id for `name`, creating it (artifacts under mlruns/) if needed."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        _tag_experiment(experiment)
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        root = Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "artifacts"
        artifact_location = root.as_uri()
    # The kind tag opens the UI on training runs rather than its GenAI trace overview; the view
    # tag is the runs table of the comparison (`experiment_url` opens it).
    try:
        return mlflow.create_experiment(
            name,
            artifact_location=artifact_location,
            tags=_experiment_tags(),
        )
    except MlflowException as exc:
        # Another worker (on another machine, against a shared server) created it first.
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return mlflow.get_experiment_by_name(name).experiment_id


def _experiment_tags() -> dict[str, str]:
    return {_KIND_TAG: "custom_model_development", _VIEW_TAG + VIEW_KEY: comparison_view()}


def _tag_experiment(experiment: mlflow.entities.Experiment) -> None:
    """Bring an experiment made by an earlier melvae up to date: kind tag, comparison view."""
    for key, value in _experiment_tags().items():
        if experiment.tags.get(key) != value:
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)


# The columns of the comparison view: what a trial was and how it scored.
_VIEW_PARAMS = ("hidden_dim", "n_layers", "latent_dim", "learning_rate", "epochs", "batch_size")
_VIEW_METRICS = ("bio_score", "best_val_loss", "knn_accuracy")
_VIEW_TAGS = (ROLE,)


def comparison_view() -> str:
    """The runs-table state (JSON) of the view `experiment_url` opens: trials and baselines,
    flat (no parent rows), best `bio_score` first, showing their scores and settings."""
    columns = [f"metrics.`{name}`" for name in _VIEW_METRICS]
    columns += [f"params.`{name}`" for name in _VIEW_PARAMS]
    columns += [f"tags.`{name}`" for name in _VIEW_TAGS]
    columns += [f"attributes.`{name}`" for name in ("Duration",)]
    return json.dumps(
        {
            "searchFilter": f"tags.{ROLE} != '{PARENT_ROLE}'",
            "orderByKey": "metrics.`bio_score`",
            "orderByAsc": False,
            "selectedColumns": columns,
            "columnOrder": columns,
        }
    )


@contextlib.contextmanager
def top_level_run(experiment_id: str, *, run_name: str, tags: Mapping[str, str]) -> Iterator[str]:
    """A run of its own: one per `study run` (trial runs nest under it) or per analysis.

    Ctrl-C or SIGTERM (KeyboardInterrupt) ends it KILLED, any other exception FAILED.
    """
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags)) as run:
        try:
            yield run.info.run_id
        except KeyboardInterrupt:
            mlflow.set_tag("interrupted", "true")
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise


def describe_settings(settings: Mapping[str, Any], *, compact: bool = False) -> str:
    """The settings that tell trials apart: hidden width × layers, latent size, learning rate.

    `hidden 64 × 2, latent 5, lr 1.9e-03`, or with `compact` `h64x2 z5 lr1.9e-03`.
    """
    parts = []
    if "hidden_dim" in settings:
        parts.append(("hidden ", "h", f"{settings['hidden_dim']}", settings.get("n_layers", 1)))
    if "latent_dim" in settings:
        parts.append(("latent ", "z", f"{settings['latent_dim']}", None))
    if "learning_rate" in settings:
        parts.append(("lr ", "lr", f"{float(settings['learning_rate']):.1e}", None))
    if compact:
        return " ".join(f"{short}{value}" + (f"x{times}" if times else "")
                        for _, short, value, times in parts)  # fmt: skip
    return ", ".join(f"{long}{value}" + (f" × {times}" if times else "")
                     for long, _, value, times in parts)  # fmt: skip


def trial_run_name(trial_number: int, settings: Mapping[str, Any]) -> str:
    """`trial-<number>` and its settings, e.g. `trial-4 h64x2 z5 lr1.9e-03`."""
    return f"trial-{trial_number} {describe_settings(settings, compact=True)}".rstrip()


@contextlib.contextmanager
def trial_run(
    experiment_id: str,
    *,
    trial_number: int,
    tags: Mapping[str, str],
    settings: Mapping[str, Any] | None = None,
) -> Iterator[str]:
    """A nested run named by `trial_run_name`; its end status mirrors how the trial ended.

    Pruned trials (optuna.TrialPruned) end KILLED and tagged `pruned`, interrupted ones (Ctrl-C,
    SIGTERM) KILLED and tagged `interrupted`; any other exception ends the run FAILED with the
    reason as a tag, then propagates so Optuna records it too.
    """
    import optuna

    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=trial_run_name(trial_number, settings or {}),
        nested=True,
        tags={**tags, ROLE: TRIAL_ROLE, "trial_number": str(trial_number)},
    )
    try:
        yield run.info.run_id
    except optuna.TrialPruned:
        mlflow.set_tags({"optuna_state": "PRUNED", "pruned": "true"})
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except KeyboardInterrupt:
        mlflow.set_tags({"optuna_state": "FAIL", "interrupted": "true"})
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as exc:
        mlflow.set_tags({"optuna_state": "FAIL", "failure_reason": f"{type(exc).__name__}: {exc}"})
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.set_tag("optuna_state", "COMPLETE")
        mlflow.end_run()


def end_abandoned_run(run_id: str, *, reason: str) -> None:
    """End a dead worker's trial run and its parent run FAILED, tagged with why, if still RUNNING.

    Called by the worker that found the trial stale, so it addresses the runs by id.
    """
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    for target in (run, _parent(client, run)):
        if target is not None and target.info.status == "RUNNING":
            client.set_tag(target.info.run_id, "failure_reason", reason)
            client.set_terminated(target.info.run_id, RunStatus.to_string(RunStatus.FAILED))


def fail_run(run_id: str, *, reason: str) -> None:
    """End one run FAILED with a `failure_reason` tag (a run its dead process left RUNNING)."""
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "failure_reason", reason)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def running_runs(experiment_id: str) -> list[mlflow.entities.Run]:
    """Every run of the experiment still marked RUNNING."""
    return mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000
    )


def _parent(client: mlflow.MlflowClient, run: mlflow.entities.Run) -> mlflow.entities.Run | None:
    parent_id = run.data.tags.get("mlflow.parentRunId")
    return None if parent_id is None else client.get_run(parent_id)


def log_params(params: Mapping[str, Any]) -> None:
    """Log parameters, stringifying values and truncating ones MLflow would reject."""
    mlflow.log_params({key: str(value)[:_MAX_PARAM_LENGTH] for key, value in params.items()})


def log_metrics(metrics: Mapping[str, float], *, step: int | None = None) -> None:
    """Log a batch of metrics in one call (one backend round trip per epoch, not per metric)."""
    mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)


class EpochMetrics:
    """Per-epoch metrics of the active run, written in batches: at most one backend write every
    `flush_seconds` while training, and whatever is left at `flush` (call it when the trial ends,
    also when it is pruned or fails). Steps and values are exactly those logged one by one."""

    def __init__(self, flush_seconds: float = EPOCH_FLUSH_SECONDS) -> None:
        self.run_id = mlflow.active_run().info.run_id
        self.flush_seconds = flush_seconds
        self._pending: list[Metric] = []
        self._flushed = time.monotonic()

    def log(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Queue one epoch's metrics; write the queue if the last write is `flush_seconds` old."""
        stamp = int(time.time() * 1000)
        self._pending += [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
        if time.monotonic() - self._flushed >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write every queued metric now."""
        client = mlflow.MlflowClient()
        for start in range(0, len(self._pending), _MAX_METRICS_PER_BATCH):
            batch = self._pending[start : start + _MAX_METRICS_PER_BATCH]
            client.log_batch(self.run_id, metrics=batch)
        self._pending = []
        self._flushed = time.monotonic()


def log_tags(tags: Mapping[str, Any]) -> None:
    mlflow.set_tags({key: str(value) for key, value in tags.items()})


def log_figure(figure: Figure, artifact_file: str) -> None:
    """Store a figure as a PNG artifact and free it."""
    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def log_file(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_folder(path: Path) -> None:
    """Every file of a folder as artifacts of the active run."""
    mlflow.log_artifacts(str(path))


def experiment_url(ui_base: str, experiment_id: str) -> str:
    """Address of an experiment's runs page in the MLflow UI, in model-training mode, on the
    comparison view (`comparison_view`)."""
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    return f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def compare_url(ui_base: str, experiment_id: str, run_ids: list[str]) -> str:
    """Address of MLflow's compare-runs view of `run_ids` (their figures side by side)."""
    runs, experiments = quote(json.dumps(run_ids)), quote(json.dumps([experiment_id]))
    query = f"runs={runs}&experiments={experiments}&workflowType=machine_learning"
    return f"{ui_base.rstrip('/')}/#/compare-runs?{query}"


@contextlib.contextmanager
def nested_run(experiment_id: str, *, run_name: str, tags: Mapping[str, str]) -> Iterator[str]:
    """A named run nested under the active one (e.g. a baseline beside the trials)."""
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, nested=True, tags=dict(tags)
    ) as run:
        yield run.info.run_id
