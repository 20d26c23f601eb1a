"""Crash recovery: a dead worker's trial is failed, its MLflow runs closed, and the trial retried;
a stopped worker (Ctrl-C, SIGTERM) ends its runs KILLED, queues its trial again, exits non-zero."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from melvae import track

log = logging.getLogger(__name__)

# A trial whose worker dies is run again at most this many times (then it stays FAILED).
MAX_RETRIES = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every run on the stack ends KILLED on the way out."""

    exit_code = 128 + signal.SIGTERM


# Set when SIGTERM arrives, cleared when a trial has been stopped by it. A signal handled while
# Python runs a finalizer or a weakref callback (SQLAlchemy's, during a garbage collection)
# has its exception printed as "Exception ignored" and dropped, and the trial would train on:
# `stop_if_terminated` raises it again at the next safe point.
_terminated = threading.Event()


def terminate() -> NoReturn:
    """Stop this process's work on SIGTERM: raise `Terminated` now, and again at the next
    `stop_if_terminated` should this one be lost."""
    _terminated.set()
    raise Terminated()


def stop_if_terminated() -> None:
    """Raise `Terminated` if a SIGTERM came whose exception was lost (see `_terminated`);
    called between epochs and between trials."""
    if _terminated.is_set():
        raise Terminated()


def stop_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (a scheduler or `kill` stopping the worker) into an orderly interrupt, and
    keep an interrupt's traceback out of Optuna's "trial failed" line: stopping is no crash."""

    def handler(signum: int, frame: FrameType | None) -> None:
        terminate()

    signal.signal(signal.SIGTERM, handler)
    logging.getLogger("optuna.study._optimize").addFilter(_drop_interrupt_traceback)
    if not getattr(sys.unraisablehook, "after_sigterm", False):  # once per process
        sys.unraisablehook = _unraisable_after_sigterm(sys.unraisablehook)


def _unraisable_after_sigterm(
    default: Callable[[Any], object],
) -> Callable[[Any], object]:
    """Python's hook for an exception a finalizer or weakref callback could not raise, made to
    print one line instead of a traceback once SIGTERM has come: then the lost exception is our
    `Terminated` (raised again by `stop_if_terminated`), or what it broke in the callback it
    interrupted (SQLAlchemy's identity map asserting on a half-done cleanup): the stop, no crash."""

    def hook(unraisable: Any) -> object:
        if not _terminated.is_set():
            return default(unraisable)
        error = type(unraisable.exc_value).__name__
        print(
            f"Exception ignored in {unraisable.object!r}: {error} (stopping on SIGTERM)",
            file=sys.stderr,
        )
        return None

    hook.after_sigterm = True  # type: ignore[attr-defined]
    return hook


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
            _terminated.clear()  # delivered: this trial is stopped
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


def end_runs_of_dead_workers(experiment_id: str) -> list[str]:
    """End FAILED (with a reason) the runs a dead melvae process of this machine left RUNNING.

    Parent, analysis and other top-level runs carry the `worker` tag (host:pid); when that
    process no longer exists, the run and every run nested under it that is still RUNNING
    (baselines) are ended, unless one of those is a trial run: the heartbeat check handles
    those, as it does for processes on other machines, which cannot be checked from here.
    Returns the ended runs' ids.
    """
    host = socket.gethostname()
    running = track.running_runs(experiment_id)
    # A dead worker's run with a trial still running is the heartbeat check's (it fails and
    # retries the trial, then ends both runs): left to it here.
    in_trial = {
        run.data.tags.get("mlflow.parentRunId")
        for run in running
        if "trial_number" in run.data.tags
    }
    dead: dict[str, str] = {}
    for run in running:
        worker_host, _, pid = run.data.tags.get("worker", "").rpartition(":")
        alive = not pid.isdigit() or process_alive(int(pid))
        if worker_host == host and not alive and run.info.run_id not in in_trial:
            dead[run.info.run_id] = run.data.tags["worker"]
    ended = []
    for run in running:
        run_id = run.info.run_id
        owner = dead.get(run_id) or dead.get(run.data.tags.get("mlflow.parentRunId", ""))
        if owner is None:
            continue
        track.fail_run(
            run_id,
            reason=f"its process {owner} ended without closing it (killed or crashed); "
            f"failed by {worker_id()}",
        )
        ended.append(run_id)
    if ended:
        log.warning("ended %d run(s) left RUNNING by dead processes: %s", len(ended), ended)
    return ended


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"
