"""Crash recovery: a dead worker's trial is failed, its MLflow runs closed, and the trial retried;
a stopped worker (Ctrl-C, SIGTERM) ends its runs KILLED, queues its trial again, exits non-zero."""

from __future__ import annotations

import logging
import os
import signal
import socket
import warnings
from collections.abc import Callable
from types import FrameType

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from melvae import track

log = logging.getLogger(__name__)

# A trial whose worker dies is run again at most this many times (then it stays FAILED).
MAX_RETRIES = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every run on the stack ends KILLED on the way out."""

    exit_code = 128 + signal.SIGTERM


def stop_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (a scheduler or `kill` stopping the worker) into an orderly interrupt, and
    keep an interrupt's traceback out of Optuna's "trial failed" line: stopping is no crash."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    logging.getLogger("optuna.study._optimize").addFilter(_drop_interrupt_traceback)


def _drop_interrupt_traceback(record: logging.LogRecord) -> bool:
    if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
        record.exc_info = None
    return True


def worker_id() -> str:
    """host:pid of this worker, recorded on its MLflow runs so a trial can be traced to it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def requeue_when_stopped(
    objective: Callable[[optuna.Trial], float],
) -> Callable[[optuna.Trial], float]:
    """The objective, but a trial stopped by Ctrl-C/SIGTERM is queued to run again with the same
    parameters when the study resumes (a stop is not the trial's fault; seeds are not lost)."""

    def run(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except KeyboardInterrupt:
            trial.study.enqueue_trial(
                trial.params, user_attrs={**trial.user_attrs, "requeued_from": trial.number}
            )
            raise

    return run


def on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat-stale trial (its worker died): retry it and end its MLflow runs FAILED.

    Optuna calls this in the worker that found the trial stale, after marking it FAILED.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)
    run_id = trial.user_attrs.get("mlflow_run_id")
    log.warning(
        "trial %d of study %r stopped sending heartbeats (its worker died): marked FAILED and "
        "queued again; found by %s",
        trial.number,
        study.study_name,
        worker_id(),
    )
    if run_id is not None:
        track.end_abandoned_run(
            run_id,
            reason=f"worker stopped sending heartbeats during trial {trial.number} "
            f"(killed or lost); failed by {worker_id()}",
        )
