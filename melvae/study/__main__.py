"""Command line: `python -m melvae.study {run,create,best,promote,report,ui}`. Thin: parses and
prints."""

from __future__ import annotations

import argparse
import gc
import logging
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import mlflow
import optuna
import torch

from melvae import track
from melvae.device import DEVICES
from melvae.errors import InputError
from melvae.study.config import DEFAULT_STUDY, StudyConfig, load_study_config
from melvae.study.progress import format_trials
from melvae.study.recovery import stop_cleanly_on_sigterm
from melvae.study.runner import (
    CHAMPION_TEST_ATTR,
    DEFAULT_STORAGE,
    best_complete_trial,
    create_experiment,
    create_study,
    dataset_key,
    effective_config,
    prepare_data,
    promote_best,
)
from melvae.study.storage import (
    HEARTBEAT_SECONDS,
    check_storage_url,
    check_tracking_uri,
    redact_url,
    sqlite_file_missing,
)
from melvae.tuning import TuneResult, run_worker, tune

BACKED_HELP = (
    "leave the .h5ad file's X on disk and read cells a window at a time (files larger than "
    "memory; a training epoch visits them in a block-shuffled order)"
)


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch starts its intra-op threads, which inherit it: training flushes subnormal
    # floats on its own thread only (melvae.train._subnormals_flushed), a large model's threads too.
    torch.set_flush_denormal(True)
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except InputError as exc:
        print(f"melvae: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print("melvae: interrupted; finished trials are kept and `run` resumes", file=sys.stderr)
        return getattr(exc, "exit_code", 130)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m melvae.study", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        sub.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study TOML file")
        sub.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL")
        sub.add_argument("--tracking-uri", help="MLflow tracking URI (default mlruns/mlflow.db)")
        return sub

    run = command("run", _run, "run or resume a study, then register its best model")
    run.add_argument(
        "--n-trials", type=_positive(int), help="trials to run now (default: the study's)"
    )
    run.add_argument("--timeout", type=_positive(float), help="stop starting trials after S s")
    run.add_argument("--epochs", type=_positive(int), help="cap every trial's epochs (quick runs)")
    run.add_argument("--data", type=Path, help="train on this .h5ad/.csv instead")
    run.add_argument("--backed", action="store_true", help=BACKED_HELP)
    run.add_argument(
        "--batch-key",
        help="obs column naming each cell's batch (patient, sample): condition the model on it "
        "(overrides [data] batch_key)",
    )
    run.add_argument("--quiet", action="store_true", help="no per-epoch progress bars")
    run.add_argument(
        "--threads",
        type=_positive(int),
        help="torch CPU threads (default: torch's); give each of W workers on one machine "
        "cores/W, or they slow each other down many times over",
    )
    run.add_argument(
        "--device",
        choices=DEVICES,
        help="where trials train, encode and evaluate: auto (CUDA when present, the default), "
        "cpu or cuda; overrides [train] device",
    )
    run.add_argument(
        "--workers",
        type=_workers,
        default="auto",
        help="N worker processes here share the study's trials and the cores; auto (the "
        "default): parallel single-thread trials for a small model, threads for a large one "
        "(printed)",
    )
    # Set by `tune` for each worker process it starts: the job file (its sampler index comes on
    # its stdin once the job is written, `workers.Crew.go`).
    run.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    run.add_argument(
        "--heartbeat",
        type=_positive(int),
        default=HEARTBEAT_SECONDS,
        help="seconds between a worker's heartbeats; a trial whose worker is silent for three "
        f"beats is failed and run again (default {HEARTBEAT_SECONDS})",
    )
    create = command(
        "create", _create, "create the study and experiment once, before parallel workers start"
    )
    create.add_argument("--data", type=Path, help="the .h5ad/.csv the workers will use")
    create.add_argument("--backed", action="store_true", help=BACKED_HELP)
    create.add_argument("--batch-key", help="the batch column the workers will use")
    for name, handler, text in (
        ("best", _best, "print the best trial and its MLflow run"),
        ("promote", _promote, "register the best trial; champion only if it beats the holder"),
    ):
        sub = command(name, handler, text)
        sub.add_argument("--dataset", help="dataset key (default: the study's dataset/fallback)")
    report = command(
        "report", _report, "write the study report (HTML page and its main figure as PNG)"
    )
    report.add_argument("--dataset", help="dataset key (default: the study's dataset/fallback)")
    report.add_argument(
        "--out", type=Path, help="HTML file to write (default <study>-report.html; never replaced)"
    )
    ui = command("ui", _ui, "start the MLflow UI on 127.0.0.1 and print the study's page")
    ui.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    ui.add_argument("--dataset", help="dataset key (default: the study's dataset/fallback)")
    return parser


def _positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a number > 0 (argparse reports anything else and exits 2)."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _workers(text: str) -> int | str:
    """An argparse type: "auto" or a number of workers > 0."""
    return text if text == "auto" else _positive(int)(text)


def _run(args: argparse.Namespace) -> int:
    stop_cleanly_on_sigterm()
    if args.job is not None:  # one of the worker processes `tune` starts
        run_worker(args.job, threads=args.threads)
        return 0
    result = tune(
        args.data,
        load_study_config(args.study),
        n_trials=args.n_trials,
        timeout=args.timeout,
        epochs=args.epochs,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        device=args.device,
        threads=args.threads,
        workers=args.workers,
        batch_key=args.batch_key,
        backed=args.backed,
        progress=not args.quiet,
        heartbeat=args.heartbeat,
    )
    summary, code = _summary(result), result.worker_exit_code
    return summary if code < 0 else summary or code


def _summary(result: TuneResult) -> int:
    """Print what the run left: the trials, the champion and its margins, the registry verdict."""
    print(f"\nstudy {result.study.study_name!r}: {len(result.study.trials)} trials in storage")
    print(format_trials(result.trials))
    config, best = result.config, result.champion_trial
    if best is not None:
        values = ", ".join(
            f"{n} = {v:.6g}" for n, v in zip(config.objectives, best.values, strict=True)
        )
        print(f"champion: trial {best.number}, {values}")
        print(f"  chosen by: {config.selection.describe(config.objectives)}")
    if result.comparison is not None:
        print("\nheld-out test metrics, champion vs baselines (positive margin: champion better):")
        print(result.comparison.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"this run took {result.seconds:.0f} s (MLflow parent run {result.parent_run_id})")
    reg = result.registration
    if reg is None:
        print("no completed trial: nothing registered")
        return 1
    verdict = "is now @champion" if reg.promoted else "did not beat the @champion"
    if reg.refused:
        verdict = f"left out of the @champion comparison: {reg.refused}"
    print(f"registered {reg.name} version {reg.version}: {verdict}")
    print(f"load it: melvae.load_model('models:/{reg.name}@champion')")
    print("browse it: python -m melvae.study ui")
    return 0


def _with_batch_key(config: StudyConfig, batch_key: str | None) -> StudyConfig:
    """The study with `--batch-key` (when given) as its `[data] batch_key`."""
    return config if batch_key is None else config.with_batch_key(batch_key)


def _create(args: argparse.Namespace) -> int:
    config = _with_batch_key(load_study_config(args.study), args.batch_key)
    check_storage_url(args.storage)
    check_tracking_uri(track.resolve_tracking_uri(args.tracking_uri))
    data = prepare_data(config, data_path=args.data, backed=args.backed)
    study = create_study(config, data.dataset_key, args.storage)
    uri, experiment_id = create_experiment(study.study_name, args.tracking_uri)
    shown = redact_url(args.storage)
    print(f"study {study.study_name!r} ready in {shown} ({len(study.trials)} trials)")
    print(f"MLflow experiment {experiment_id} ready in {uri}")
    return 0


def _find_study(args: argparse.Namespace, config: StudyConfig) -> optuna.Study:
    keys = [args.dataset] if args.dataset else [k for k in (config.dataset, config.fallback) if k]
    names = [config.study_name(key) for key in keys]
    check_storage_url(args.storage)
    if sqlite_file_missing(args.storage):  # only reads: never create the database here
        existing = set()
    else:
        existing = {s.study_name for s in optuna.get_all_study_summaries(args.storage)}
    for name in names:
        if name in existing:
            return optuna.load_study(study_name=name, storage=args.storage)
    raise InputError(
        f"no study named {' or '.join(map(repr, names))}",
        where=redact_url(args.storage),
        fix="run `python -m melvae.study run` first, or pass --storage/--dataset",
    )


def _best(args: argparse.Namespace) -> int:
    config = load_study_config(args.study)
    study = _find_study(args, config)
    config = effective_config(study, config)
    best = best_complete_trial(study, config)
    if best is None:
        print(f"study {study.study_name!r} has no completed trial yet")
        return 1
    print(f"study {study.study_name!r}: champion trial {best.number}")
    print(f"  chosen by: {config.selection.describe(config.objectives)}")
    for name, value in zip(config.objectives, best.values, strict=True):
        print(f"  {name} = {value:.6g}")
    for name, value in best.params.items():
        print(f"  {name} = {value}")
    for name, value in sorted(best.user_attrs.items()):
        if isinstance(value, float):
            print(f"  {name}: {value:.4g}")
    test = study.user_attrs.get(CHAMPION_TEST_ATTR, {})
    if test.get("trial") == best.number:
        print("  held-out test metrics (never used for selection):")
        for name, value in sorted(test.items()):
            if name != "trial":
                print(f"    {name}: {value:.4g}")
    print(f"  MLflow run: {best.user_attrs['mlflow_run_id']}")
    print(f"  model: {best.user_attrs['model_uri']}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    config = load_study_config(args.study)
    check_tracking_uri(track.resolve_tracking_uri(args.tracking_uri))
    track.use_backend(args.tracking_uri)
    study = _find_study(args, config)
    registration = promote_best(study, config, dataset_key(study, config))
    if registration is None:
        print("no completed trial: nothing registered")
        return 1
    state = "promoted to @champion" if registration.promoted else "not better than @champion"
    if registration.refused:
        state = f"not compared with @champion: {registration.refused}"
    print(f"{registration.name} version {registration.version}: {state}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from melvae.study import report

    config = load_study_config(args.study)
    check_tracking_uri(track.resolve_tracking_uri(args.tracking_uri))
    track.use_backend(args.tracking_uri)
    study = _find_study(args, config)
    config = effective_config(study, config)
    experiment = mlflow.get_experiment_by_name(study.study_name)
    parent = None if experiment is None else report.latest_parent_run(experiment.experiment_id)
    out = args.out or Path(f"{study.study_name}-report.html")
    built = report.study_report(
        study, config, best_complete_trial(study, config), parent_run_id=parent
    )
    page, figure = report.write_report(built, out)
    print(f"study report: {page} ({len(built.panels)} trials), main figure: {figure}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    config = load_study_config(args.study)
    check_tracking_uri(track.resolve_tracking_uri(args.tracking_uri))
    uri = track.use_backend(args.tracking_uri)
    study = _find_study(args, config)
    port = args.port or _free_port()
    base = f"http://127.0.0.1:{port}"
    experiment_id = track.ensure_experiment(study.study_name, uri)
    print(f"MLflow UI for study {study.study_name!r}: {track.experiment_url(base, experiment_id)}")
    print("Ctrl-C stops it.", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    return subprocess.call(command)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    code = main()
    # Everything is written and closed: spare the interpreter's last garbage collections of a
    # heap full of torch, MLflow and pandas objects (0.6 s of every command's exit, measured).
    gc.freeze()
    sys.exit(code)
