"""Study orchestration: prepare data once, run Optuna trials, track them, register the best."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd

from melvae import track
from melvae.data.backed import subset
from melvae.data.datasets import Dataset, file_record, load_dataset, load_with_fallback
from melvae.data.validate import (
    validate_batches,
    validate_expression,
    validate_labels,
    validate_split_batches,
)
from melvae.errors import InputError
from melvae.evaluate import BATCH_METRICS, BIO_METRICS
from melvae.model import MelVAE
from melvae.preprocess import fit_preprocessor, split_cells
from melvae.register import Registration, load_model, model_name, register_and_promote
from melvae.study import workers
from melvae.study.baselines import comparison_table, margins_over_best, run_baselines
from melvae.study.config import OBJECTIVE_METRICS, StudyConfig
from melvae.study.fresh_tables import create_mlflow_tables
from melvae.study.identity import check_identity, stored_selection
from melvae.study.objective import SPLITS, Objective, PreparedData, study_params
from melvae.study.progress import trial_progress
from melvae.study.pruning import CURVE_ATTR, epoch_pruner
from melvae.study.recovery import end_runs_of_dead_workers, requeue_when_stopped, worker_id
from melvae.study.report import champion_line, log_report, study_report
from melvae.study.scoring import FINAL_METRICS, SplitScores
from melvae.study.selection import SelectionRule, completed_with_model, select_champion
from melvae.study.storage import (
    HEARTBEAT_SECONDS,
    check_storage_url,
    check_tracking_uri,
    first_time_lock,
    open_storage,
    redact_url,
)
from melvae.train import NonFiniteLossError

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
_SEEDED_ATTR = "seed_trials_enqueued"
# Stored when the study is created, read by `best` and `promote` rather than guessed from its
# name: the dataset it runs on (its objectives and selection rule: `identity.stored_selection`).
DATASET_ATTR = "dataset_key"
CHAMPION_TEST_ATTR = "champion_test_metrics"
CHAMPION_ATTR = "champion"  # a study user attribute: the champion in one line


def prepare_data(
    config: StudyConfig,
    *,
    data_path: Path | None = None,
    base_url: str | None = None,
    dataset: Dataset | None = None,
    backed: bool = False,
) -> PreparedData:
    """read → validate → split → fit preprocessing on the training split only; data too small
    for the study's models are refused (`check_data_fits`). `backed`: leave the X of the .h5ad
    file at `data_path` on disk (`melvae.data.backed`)."""
    fallback_reason = None
    if dataset is None and data_path is not None:
        dataset = load_dataset(str(data_path), backed=backed)
    elif dataset is None:
        dataset, fallback_reason = load_with_fallback(
            config.dataset, config.fallback, base_url=base_url
        )
    if fallback_reason is not None:
        _announce_fallback(config, dataset, fallback_reason)
    adata = dataset.adata
    source = dataset.description
    validate_expression(
        adata,
        source=source,
        require_nonnegative=bool(config.transforms() & {"log1p", "counts"}),
    )
    label_key = validate_labels(
        adata,
        config.label_key or dataset.label_key,
        source=source,
        required=config.label_key is not None,
    )
    # Views, not copies: each split is an index into the one matrix read from disk, and its
    # rows are only materialised where a step reads them (one split at a time).
    if label_key is not None and adata.obs[label_key].isna().any():
        adata = subset(adata, adata.obs[label_key].notna().to_numpy())
    batch_key = validate_batches(
        adata, config.batch_key, source=source, label_key=label_key, known=dataset.batch_key
    )
    p = config.preprocess
    splits = split_cells(
        adata,
        label_key,
        val_fraction=p.val_fraction,
        test_fraction=p.test_fraction,
        seed=p.seed,
    )
    train = subset(adata, splits["train"])
    others = config.transforms() - {p.transform}
    data = PreparedData(
        dataset_key=dataset.key,
        description=dataset.description,
        fallback_reason=fallback_reason,
        label_key=label_key,
        train=train,
        val=subset(adata, splits["val"]),
        test=subset(adata, splits["test"]),
        preprocessor=fit_preprocessor(train, config.preprocess),
        preprocessors={t: fit_preprocessor(train, config.preprocess_for(t)) for t in others},
        batch_key=batch_key,
        source_file=file_record(dataset.path) if dataset.path is not None else None,
    )
    if batch_key is not None:
        validate_split_batches({s: data.batches(s) for s in SPLITS}, source=source)
    check_data_fits(config, data)
    return data


def check_data_fits(config: StudyConfig, data: PreparedData) -> None:
    """Refuse data with fewer genes than the largest latent size; warn loudly, with the numbers,
    when the training split is smaller than the largest batch (every epoch is then one batch)."""
    n_genes, latent = len(data.preprocessor.genes), config.largest("latent_dim")
    if n_genes < latent:
        raise InputError(
            f"the data keep {n_genes} genes after preprocessing, fewer than the largest latent "
            f"size {latent}: the latent space would be larger than the data it encodes",
            where=f"{config.path} [model]/[search] latent_dim, data {data.description}",
            fix=f"keep latent_dim at most {n_genes}, or use data with more genes",
        )
    n_cells, batch = data.train.n_obs, config.largest("batch_size")
    if n_cells < batch:
        print(
            f"melvae: WARNING: the training split has {n_cells} cells, fewer than the largest "
            f"batch_size {batch}: such trials train on one batch of {n_cells} cells per epoch",
            file=sys.stderr,
        )


def _announce_fallback(config: StudyConfig, dataset: Dataset, reason: str) -> None:
    banner = "!" * 78
    print(
        f"{banner}\nmelvae: dataset {config.dataset!r} is unavailable ({reason}).\n"
        f"melvae: FALLING BACK to {dataset.key!r}: {dataset.description}\n"
        f"melvae: results go to study {config.study_name(dataset.key)!r}; "
        f"they are not results on {config.dataset!r}.\n{banner}",
        file=sys.stderr,
    )


def create_study(
    config: StudyConfig, dataset_key: str, storage: str, *, heartbeat: int = HEARTBEAT_SECONDS
) -> optuna.Study:
    """Create (or load) the study and enqueue the seed trials exactly once in its lifetime.

    Safe for many workers starting at once on a fresh database: creation is serialised.
    """
    sampler, pruner = _sampler(config), _pruner(config)  # bad settings fail before any write
    with first_time_lock(storage):
        rdb = open_storage(storage, heartbeat=heartbeat)
        return _create_study(config, dataset_key, rdb, sampler, pruner)


def _create_study(
    config: StudyConfig,
    dataset_key: str,
    storage: optuna.storages.BaseStorage,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
) -> optuna.Study:
    study = optuna.create_study(
        study_name=config.study_name(dataset_key),
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        directions=config.directions,
        load_if_exists=True,
    )
    check_identity(study, config, where=redact_url(str(getattr(storage, "url", "storage"))))
    if not study.metric_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(config.objectives))
    if not study.user_attrs.get(_SEEDED_ATTR):
        for params in config.seed_trials:
            searched = {name: value for name, value in params.items() if _is_searched(config, name)}
            study.enqueue_trial(searched, user_attrs={"seed_trial": True}, skip_if_exists=True)
        study.set_user_attr(_SEEDED_ATTR, True)
    if DATASET_ATTR not in study.user_attrs:
        study.set_user_attr(DATASET_ATTR, dataset_key)
    return study


def create_experiment(study_name: str, tracking_uri: str | None) -> tuple[str, str]:
    """Point MLflow at its backend and make sure the study's experiment exists there.

    Returns (tracking URI, experiment id). Serialised like `create_study`: MLflow's first-time
    schema setup on a fresh database races too.
    """
    uri = track.use_backend(tracking_uri)
    with first_time_lock(uri):
        create_mlflow_tables(uri)  # a fresh SQLite file: without a disk flush per statement
        return uri, track.ensure_experiment(study_name, uri)


def _is_searched(config: StudyConfig, name: str) -> bool:
    return any(param.name == name for param in config.search)


def _sampler(config: StudyConfig, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The study file's sampler, seeded for the study's worker `worker` (`workers.worker_seed`)."""
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    table = dict(config.sampler)
    if "seed" in table:
        table["seed"] = workers.worker_seed(table["seed"], worker)
    return _build(samplers, table, "tpe", f"{config.path} [sampler]")


def _pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    if config.multi_objective:
        # Optuna cannot prune these; the trials prune themselves (melvae.study.pruning). Built
        # here too so a bad [pruner] table fails before anything is written.
        epoch_pruner(config.pruner, multi_objective=True, where=f"{config.path} [pruner]")
        return optuna.pruners.NopPruner()
    pruners = {
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "none": optuna.pruners.NopPruner,
    }
    return _build(pruners, config.pruner, "median", f"{config.path} [pruner]")


def _build(choices: dict[str, type], table: dict, default: str, where: str):
    """Instantiate the `type = ...` named in a study-file table with its other keys as options."""
    options = dict(table)
    kind = options.pop("type", default)
    if kind not in choices:
        raise InputError(
            f"unknown type {kind!r}", where=where, fix=f"use one of {', '.join(choices)}"
        )
    try:
        return choices[kind](**options)
    except TypeError as exc:
        raise InputError(f"bad option: {exc}", where=where, fix="see Optuna's docs") from None


@dataclass(frozen=True)
class StudyOutcome:
    """What one `run` left behind: the study, its experiment, its champion and the registry's
    verdict."""

    study: optuna.Study
    experiment_id: str
    parent_run_id: str
    registration: Registration | None
    seconds: float
    # The study as it ran (a study of unlabelled data selects on fit alone).
    config: StudyConfig
    # The trial the selection rule picked and its model; None if no trial completed.
    champion_trial: optuna.trial.FrozenTrial | None = None
    champion: MelVAE | None = None
    # Champion vs baselines on the held-out test metrics, with the margin row; None if no
    # trial completed.
    comparison: pd.DataFrame | None = None


def run_study(
    config: StudyConfig,
    *,
    storage: str = DEFAULT_STORAGE,
    tracking_uri: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    epochs_cap: int | None = None,
    data_path: Path | None = None,
    dataset: Dataset | None = None,
    base_url: str | None = None,
    progress: bool = True,
    heartbeat: int = HEARTBEAT_SECONDS,
    data: PreparedData | None = None,
    worker_index: int | None = None,
    summarise: bool = True,
    register: bool = True,
) -> StudyOutcome:
    """Run (or resume) a study end to end and register its best model.

    All input is read and validated before anything is written to MLflow or Optuna storage.
    Many workers may run it at once on the same storage and tracking backend: `n_trials` is
    added to the study's shared budget and trials run until the study holds it
    (`workers.optimize_within_budget`). `data` skips preparing it again; `worker_index` given
    (by `run --workers N`) means the caller pledged the budget and claimed that sampler index;
    `summarise=False` leaves the champion's test scores, baselines and registration to it;
    `register=False` only the registration (`run --workers N` has a worker process do it).
    """
    started = time.perf_counter()
    check_storage_url(storage)
    check_tracking_uri(track.resolve_tracking_uri(tracking_uri))
    if data is None:
        data = prepare_data(config, data_path=data_path, base_url=base_url, dataset=dataset)
    config = config_for_data(config, data, announce=summarise)
    study = create_study(config, data.dataset_key, storage, heartbeat=heartbeat)
    tracking_uri, experiment_id = create_experiment(study.study_name, tracking_uri)
    end_runs_of_dead_workers(experiment_id)
    tags = {"study": study.study_name, "dataset": data.dataset_key, track.ROLE: track.PARENT_ROLE}
    tags["worker"] = worker_id()
    if data.fallback_reason is not None:
        tags |= {"dataset_fallback": "true", "fallback_reason": data.fallback_reason}
    run_name = time.strftime("run-%Y%m%d-%H%M%S")
    with track.top_level_run(experiment_id, run_name=run_name, tags=tags) as parent_id:
        track.log_params(_data_params(config, data, storage))
        if config.path.is_file():  # a study given as a dict has its settings in the params
            track.log_file(config.path, "study")
        objective = Objective(
            config,
            data,
            experiment_id,
            study_name=study.study_name,
            epochs_cap=epochs_cap,
            progress=progress,
        )
        n_trials = n_trials if n_trials is not None else config.n_trials
        pledged = 0
        if worker_index is None:  # a run of its own: its trials join the study's shared budget
            worker_index = workers.claim_workers(study, storage)
            pledged = workers.UNTIL_TIMEOUT if n_trials is None else n_trials
            workers.pledge(study, storage, pledged)
        study.sampler = _sampler(config, worker_index)
        champion = functools.partial(best_complete_trial, config=config)
        with trial_progress(n_trials, champion=champion, enabled=progress) as show_progress:
            workers.optimize_within_budget(
                study,
                storage,
                requeue_when_stopped(objective),
                timeout=timeout if timeout is not None else config.timeout,
                poll_seconds=min(heartbeat, workers.WAIT_SECONDS),
                pledged=pledged,
                catch=(NonFiniteLossError,),
                callbacks=[show_progress],
            )
        registration = comparison = best = champion = None
        if summarise:
            # The steps after the trials, by name: select -> score on test -> baselines ->
            # register -> report.
            best, champion = select_champion_step(study, config, tracking_uri)
            if best is not None:
                test_metrics = score_on_test_step(study, best, champion, data)
                comparison = baselines_step(
                    config, data, best, test_metrics, study, tracking_uri, experiment_id, epochs_cap
                )
                if register:
                    registration = promote_best(study, config, data.dataset_key)
                report_step(study, config, best, parent_id)
    return StudyOutcome(
        study=study,
        experiment_id=experiment_id,
        parent_run_id=parent_id,
        registration=registration,
        seconds=time.perf_counter() - started,
        config=config,
        champion_trial=best,
        champion=champion,
        comparison=comparison,
    )


def _refuse_needing(names: list[str], need: str, *, where: str, fix: str) -> None:
    """Raise the InputError for study settings `names` that need what the data lack."""
    raise InputError(f"{', '.join(names)} need(s) {need}", where=where, fix=fix)


def config_for_data(config: StudyConfig, data: PreparedData, *, announce: bool) -> StudyConfig:
    """The study as these data allow it: without labels it selects on fit alone (said loudly
    when `announce`); an objective that needs labels the data lack is an InputError."""
    if data.label_key is None and config.multi_objective and config.objective == "val_loss":
        config = config.fit_only()
        if announce:
            print(
                "melvae: the data have no cell-type labels, so this study selects on model fit "
                "ONLY (objective val_loss); label metrics and baselines' label scores are "
                "skipped",
                file=sys.stderr,
            )
    needs_batches = config.needs_batch_key()
    if data.batch_key is None and needs_batches:
        _refuse_needing(
            needs_batches,
            "batches (batch objectives measure their mixing, batch_adversary_weight removes "
            "them), and the study has no batch key",
            where=f"{config.path} [objective] / [model] / [search] / [data] batch_key",
            fix="set [data] batch_key (or run --batch-key) to the column naming each cell's "
            "patient or sample, or leave these objectives out",
        )
    if data.label_key is None:
        config = config.without_label_search()
    needs_labels = config.needs_label_key()
    if data.label_key is None and needs_labels:
        _refuse_needing(
            needs_labels,
            "cell-type labels (to remove the batch within cell types, or to keep cell types "
            "apart), and the data have none",
            where=f"{config.path} [model] / [search] / [data] label_key",
            fix="set [data] label_key to the cell-type column, or leave these parameters at "
            "their defaults",
        )
    if data.label_key is None and config.objective not in ("val_loss", "recon_corr"):
        raise InputError(
            f"objective {config.objective!r} needs cell-type labels and the data has none",
            where=f"{config.path} [objective] metric",
            fix='use metric = "val_loss", or give data with a label column',
        )
    return config


def _data_params(config: StudyConfig, data: PreparedData, storage: str) -> dict[str, object]:
    return {
        "study_file": str(config.path),
        "dataset": data.dataset_key,
        "dataset_description": data.description,
        "requested_dataset": config.dataset,
        "label_key": data.label_key,
        "batch_key": data.batch_key,
        "n_train": data.train.n_obs,
        "n_val": data.val.n_obs,
        "n_test": data.test.n_obs,
        "n_genes_input": data.train.n_vars,
        "n_genes_model": len(data.preprocessor.genes),
        "backed": data.train.isbacked,
        "optuna_storage": redact_url(storage),
        **study_params(config),
    }


def select_champion_step(
    study: optuna.Study, config: StudyConfig, tracking_uri: str
) -> tuple[optuna.trial.FrozenTrial | None, MelVAE | None]:
    """Pick the champion by the study's rule, give the parent run its metrics, and load its
    model; (None, None) if no trial completed."""
    best = best_complete_trial(study, config)
    if best is None:
        log.warning("no trial completed: nothing to register")
        return None, None
    track.log_tags(
        {
            "best_trial": best.number,
            "best_run_id": best.user_attrs["mlflow_run_id"],
            "selection_rule": config.selection.describe(config.objectives),
        }
    )
    track.log_metrics(
        {"objective": best.values[0]}
        | {
            f"objective_{name}": value
            for name, value in zip(config.objectives, best.values, strict=True)
        }
        | {
            name: best.user_attrs[name]
            for name in (*FINAL_METRICS, *BIO_METRICS, *BATCH_METRICS)
            if name in best.user_attrs
        }
    )
    return best, load_model(best.user_attrs["model_uri"], tracking_uri=tracking_uri)


def score_on_test_step(
    study: optuna.Study, best: optuna.trial.FrozenTrial, champion: MelVAE, data: PreparedData
) -> dict[str, float]:
    """The champion's held-out test metrics (never used for selection), on the parent run and
    in the study's user attributes."""
    metrics = SplitScores(champion, data).test()
    track.log_metrics(metrics)
    study.set_user_attr(CHAMPION_TEST_ATTR, {"trial": best.number, **metrics})
    return metrics


def baselines_step(
    config: StudyConfig,
    data: PreparedData,
    best: optuna.trial.FrozenTrial,
    champion_metrics: dict[str, float],
    study: optuna.Study,
    tracking_uri: str,
    experiment_id: str,
    epochs_cap: int | None,
) -> pd.DataFrame:
    """Score the baselines, log the champion's margins over the best, return the table."""
    baselines = run_baselines(
        config,
        data,
        best,
        experiment_id=experiment_id,
        tracking_uri=tracking_uri,
        completed=completed_with_model(study),
        epochs_cap=epochs_cap,
    )
    track.log_metrics(margins_over_best(champion_metrics, baselines))
    return comparison_table(champion_metrics, baselines)


def report_step(
    study: optuna.Study, config: StudyConfig, best: optuna.trial.FrozenTrial, parent_id: str
) -> None:
    """The champion in one line as a study user attribute (what optuna-dashboard shows), and
    the study report on the parent run."""
    study.set_user_attr(CHAMPION_ATTR, champion_line(config, best))
    log_report(study_report(study, config, best, parent_run_id=parent_id))


def best_complete_trial(
    study: optuna.Study, config: StudyConfig | None = None
) -> optuna.trial.FrozenTrial | None:
    """The champion by the study file's selection rule among COMPLETE trials that logged a
    model (without a config: the best value of a single-objective study); None if none yet."""
    if config is None:
        objectives, directions, rule = ("value",), [study.direction.name.lower()], SelectionRule()
    else:
        config = effective_config(study, config)
        objectives, directions, rule = config.objectives, config.directions, config.selection
    return select_champion(completed_with_model(study), rule, objectives, directions)


def effective_config(study: optuna.Study, config: StudyConfig) -> StudyConfig:
    """The study file as this study ran it: its stored objectives and selection rule (a study
    of unlabelled data selects on fit alone)."""
    stored = stored_selection(study)
    if stored is not None:
        objectives, selection = stored
        return dataclasses.replace(config, objectives=objectives, selection=selection)
    # A study created before these attributes were stored: inferred from its directions.
    if len(study.directions) != len(config.objectives) and config.objective == "val_loss":
        return config.fit_only()
    return config


def dataset_key(study: optuna.Study, config: StudyConfig) -> str:
    """The dataset key the study runs on: stored at creation (older studies: from the name)."""
    return study.user_attrs.get(DATASET_ATTR) or study.study_name.removeprefix(f"{config.name}-")


def promote_best(study: optuna.Study, config: StudyConfig, dataset_key: str) -> Registration | None:
    """Register the champion; it takes the `champion` alias only if it beats the holder on the
    rule's ranked metric. The rule is recorded as a version tag."""
    config = effective_config(study, config)
    best = best_complete_trial(study, config)
    if best is None:
        return None
    ranked = config.selection.ranked_metric(config.objectives)
    value = best.values[0] if ranked == config.objective else best.user_attrs[ranked]
    return register_and_promote(
        best.user_attrs["model_uri"],
        name=model_name(dataset_key),
        objective=ranked,
        objective_value=float(value),
        direction=OBJECTIVE_METRICS[ranked],
        tags={
            "study": study.study_name,
            "trial_number": str(best.number),
            "run_id": best.user_attrs["mlflow_run_id"],
            "selection_rule": config.selection.describe(config.objectives),
        },
    )


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: state, parameters, objective, key metrics, duration."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        duration = trial.duration.total_seconds() if trial.duration else float("nan")
        row = {"trial": trial.number, "state": trial.state.name}
        row |= dict(zip(_value_names(study), trial.values or (), strict=False))
        row |= trial.params
        row["epochs"] = epochs_run(trial)
        row |= {m: trial.user_attrs.get(m) for m in ("bio_score", "knn_accuracy", "recon_corr")}
        row["seconds"] = round(duration, 1)
        row["seed"] = "yes" if trial.user_attrs.get("seed_trial") else ""
        rows.append(row)
    return pd.DataFrame(rows).set_index("trial") if rows else pd.DataFrame()


def epochs_run(trial: optuna.trial.FrozenTrial) -> int | None:
    """Epochs the trial trained (after `--epochs`, early stopping and pruning), not the sampled
    budget; None while unknown (running, failed before its first epoch)."""
    if CURVE_ATTR in trial.user_attrs:
        return len(trial.user_attrs[CURVE_ATTR])
    if "pruned_at_epoch" in trial.user_attrs:
        return int(trial.user_attrs["pruned_at_epoch"]) + 1
    if trial.intermediate_values:  # Optuna's own pruner (single-objective studies)
        return max(trial.intermediate_values) + 1
    return None


def _value_names(study: optuna.Study) -> list[str]:
    """Column names for a trial's values: the objective names a study was created with."""
    names = study.metric_names
    if names:
        return list(names)
    count = len(study.directions)
    return ["value"] if count == 1 else [f"value_{i}" for i in range(count)]
