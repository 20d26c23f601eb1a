"""Many workers on one study: how `run` spends the cores, each worker's sampler seed, the shared
trial budget, and `run --workers N` (N worker processes on this machine).

- **The choice** (`choose`, a pure function used by `run --workers auto` and the Python API): a
  small model gains nothing from a second torch thread (README, "A million cells"), so the cores
  run trials in parallel, one thread each; a large one gets the threads of one process.
- **Seeds**: every process that samples takes the next worker index of the study (kept in the
  study, under its lock) and samples with `worker_seed(study seed, index)`: worker 0 with the
  study's own seed, so a seeded study stays reproducible per worker, and no two workers (nor a
  resumed run) draw the same trials.
- **The budget**: `run --n-trials N` pledges N trials to the study (`pledge`); every worker runs
  trials until the study has as many as pledged in all (`optimize_within_budget`), so the trials a
  killed worker did not run are run by the others, and the count never overshoots.
- **The workers** (`crew`, started by `melvae.tune(..., workers=N)` and so by `run --workers
  N`): the caller is worker 0 and runs its share of the trials in-process, on the data it
  prepared, while N - 1 processes `python -m melvae.study run --job FILE` run the rest; they
  read the data and the study from one job file (`write_job`), so an AnnData in a notebook's
  memory or a study given as a dict reach them too. They are started before the caller reads
  the data, so their imports overlap its preparation; each then waits on its stdin for its
  sampler index (`Crew.go`, sent once the job file is written), importing meanwhile what its
  first trial needs (`melvae.study.warmup`), and exits without touching anything if the caller
  dismisses it, is refused or dies first (`wait_for_go`). When the trials are done, one of them
  (the job's registrar) registers the champion while worker 0 scores it on test, runs the
  baselines and writes the report (`write_registration`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

import numpy as np
import optuna

from melvae.register import Registration
from melvae.study.config import StudyConfig
from melvae.study.objective import PreparedData
from melvae.study.recovery import process_alive, stop_if_terminated, terminate
from melvae.study.storage import first_time_lock
from melvae.study.warmup import warm_up

# A model whose two gene-facing layers hold at least this many weights trains in one process
# with all the threads: the original study's 17,994 genes x hidden 256 (9.2 M) gets ~1.4x from
# a second thread, while 2,000 genes x 512 (2 M) and smaller gain nothing (bench/epoch_speed.py).
LARGE_MODEL_WEIGHTS = 4_000_000
# A worker process costs about one trial to start (imports, reading and preprocessing the data),
# so parallel workers only pay when each gets at least this many trials.
MIN_TRIALS_PER_WORKER = 4
# Study attributes: worker indices handed out so far, and the trials pledged in all.
WORKERS_ATTR = "sampler_workers"
BUDGET_ATTR = "trial_budget"
# The pledge of a run given a timeout and no trial count: only the timeout ends it.
UNTIL_TIMEOUT = 2**31 - 1
# How often a worker whose share is done looks whether the others' trials have ended. Worker 0
# runs the summary (baselines, registration, report) only once they have: polling every 5 s
# left it idle for up to 5 s whenever another worker's trial ended last. A poll is one query.
WAIT_SECONDS = 0.5
# A run's private folder for its job file, and the file in it naming the run's process.
JOB_PREFIX = "melvae-workers-"
OWNER_FILE = "owner.pid"
REGISTRATION_FILE = "registration.json"
_State = optuna.trial.TrialState
_COUNTED = (_State.COMPLETE, _State.PRUNED, _State.RUNNING)


@dataclass(frozen=True)
class Plan:
    """How one `run` spends the machine: `workers` processes of `threads` torch threads each."""

    workers: int
    threads: int
    reason: str

    def describe(self) -> str:
        """One line for the user, e.g. "2 workers x 1 thread (small model: ...)"."""
        workers = f"{self.workers} worker{'s' if self.workers > 1 else ''}"
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        return f"{workers} x {threads} ({self.reason})"


def choose(cores: int, n_trials: int, gene_weights: int) -> Plan:
    """How to run `n_trials` trials on `cores` cores, for a study whose largest model has
    `gene_weights` weights in its two gene-facing layers (2 x genes x widest hidden layer).

    Parameters
    ----------
    cores
        CPU cores this process may use (`cores()`).
    n_trials
        Trials this run will start.
    gene_weights
        Weights of the largest model's encoder input and decoder output layers.

    Returns
    -------
    Plan
        One process with every thread for a large model (>= LARGE_MODEL_WEIGHTS), or for too few
        trials to pay for starting more processes (MIN_TRIALS_PER_WORKER each); otherwise as many
        single-threaded workers as cores (at most one per MIN_TRIALS_PER_WORKER trials), each
        given cores / workers threads.
    """
    cores = max(1, cores)
    if gene_weights >= LARGE_MODEL_WEIGHTS:
        size = f"{gene_weights / 1e6:.1f} M gene-layer weights"
        return Plan(1, cores, f"large model, {size}: threads pay")
    workers = min(cores, n_trials // MIN_TRIALS_PER_WORKER)
    if workers <= 1:
        return Plan(1, cores, f"{n_trials} trials, too few for parallel workers")
    return Plan(workers, cores // workers, "small model: parallel trials pay, threads do not")


def gene_weights(config: StudyConfig, n_genes: int) -> int:
    """Weights of the two gene-facing layers (encoder input, decoder output) of the study's
    largest model on `n_genes` genes: 2 x genes x the widest hidden layer it may try."""
    return 2 * n_genes * int(config.largest("hidden_dim"))


def worker_seed(study_seed: int | None, index: int) -> int | None:
    """The sampler seed of the study's worker `index`: the study's seed itself for worker 0, an
    independent one derived from (seed, index) for the others; None (unseeded) stays None."""
    if study_seed is None or index == 0:
        return study_seed
    return int(np.random.SeedSequence([study_seed, index]).generate_state(1)[0])


def claim_workers(study: optuna.Study, storage: str, count: int = 1) -> int:
    """Take the study's next `count` worker indices (atomically across processes and machines);
    return the first."""
    with first_time_lock(storage):
        first = int(study.user_attrs.get(WORKERS_ATTR, 0))
        study.set_user_attr(WORKERS_ATTR, first + count)
    return first


def counted(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """Trials that use up the budget: finished, running, and failed ones not being run again
    (a trial failed by a dead or stopped worker is queued again and counts once, as its retry)."""
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    retried |= {t.user_attrs.get("requeued_from") for t in trials}
    return sum(
        t.state in _COUNTED or (t.state == _State.FAIL and t.number not in retried) for t in trials
    )


def pledge(study: optuna.Study, storage: str, n_trials: int) -> int:
    """Add `n_trials` to the study's budget; return the new total. A budget a dead worker left
    unfinished is kept, and completed by whichever worker runs next."""
    with first_time_lock(storage):
        spent = counted(study.get_trials(deepcopy=False))
        total = max(int(study.user_attrs.get(BUDGET_ATTR, 0)), spent) + n_trials
        study.set_user_attr(BUDGET_ATTR, total)
    return total


def withdraw(study: optuna.Study, storage: str, n_trials: int) -> None:
    """Take back `n_trials` of the budget (never below the trials already spent)."""
    with first_time_lock(storage):
        spent = counted(study.get_trials(deepcopy=False))
        total = int(study.user_attrs.get(BUDGET_ATTR, 0)) - n_trials
        study.set_user_attr(BUDGET_ATTR, max(total, spent))


def optimize_within_budget(
    study: optuna.Study,
    storage: str,
    objective: Callable[[optuna.Trial], Any],
    *,
    timeout: float | None,
    poll_seconds: float,
    pledged: int = 0,
    **optimize: Any,
) -> int:
    """Run trials one at a time until the study holds its budget (`pledge`); return how many
    this process ran.

    The count and the trial's creation happen under the study's lock, so many workers never
    start more trials than pledged. When the budget is taken but other workers' trials still
    run, this worker waits (polling every `poll_seconds`) and, if one of them goes silent (its
    worker died), fails it, so that its queued retry is run here. Ended before the budget is
    spent (Ctrl-C, SIGTERM, `timeout`), it withdraws what it `pledged` and did not run.
    `optimize` goes to `study.optimize` (catch, callbacks).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    ran, done = 0, False
    try:
        while deadline is None or time.monotonic() < deadline:
            stop_if_terminated()
            lock = contextlib.ExitStack()
            lock.enter_context(first_time_lock(storage))
            try:
                trials = study.get_trials(deepcopy=False)
                if counted(trials) >= int(study.user_attrs.get(BUDGET_ATTR, 0)):
                    lock.close()
                    done = not any(t.state == _State.RUNNING for t in trials)
                    if done:
                        break
                    _wait_for_others(study, storage, poll_seconds)
                    continue

                def started(trial: optuna.Trial, lock: contextlib.ExitStack = lock) -> Any:
                    lock.close()  # the trial exists (RUNNING): others may count it now
                    return objective(trial)

                study.optimize(started, n_trials=1, **optimize)
                ran += 1
            finally:
                lock.close()
    finally:
        if pledged and not done:  # stopped, timed out or crashed: take back what it left
            withdraw(study, storage, pledged - ran)
    return ran


def _wait_for_others(study: optuna.Study, storage: str, seconds: float) -> None:
    """Sleep, then fail (and so queue again) any trial whose worker stopped beating.

    Under the study's lock, as Optuna's own check at the start of each trial runs here: SQLite
    has no row locks, so two workers checking at once both saw a dead worker's trial RUNNING,
    both failed it and queued it twice, and the second retry was left WAITING (seen in CI)."""
    time.sleep(seconds)
    with first_time_lock(storage), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def cores() -> int:
    """CPU cores this process may use (respects taskset/cgroup affinity)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Job:
    """What every worker of one run shares: the study as it runs, its prepared data (split and
    preprocessed once, by the caller) and the run's settings (keyword arguments of
    `melvae.study.runner.run_study`: storage, tracking_uri, timeout, epochs_cap, progress,
    heartbeat).

    Workers are processes: they get it as a file (`write_job`), so data that exist only in the
    caller's memory (an AnnData in a notebook, a study given as a dict) reach them unchanged.
    """

    config: StudyConfig
    data: PreparedData
    run: dict[str, Any]
    # The worker index that registers the champion once the trials are done, while worker 0
    # scores it on test, runs the baselines and writes the report (`write_registration`);
    # None: worker 0 registers it.
    registrar: int | None = None


def job_path(folder: Path) -> Path:
    """Where `write_job` writes the job in the run's private `folder` (`job_folder`)."""
    return folder / "job.pickle"


def write_job(job: Job, folder: Path) -> Path:
    """Write `job` into `folder` atomically (a worker never reads half a file); return its path.

    `folder` is the caller's private temporary folder (`job_folder`), removed when the workers
    have ended.
    """
    path = job_path(folder)
    partial = path.with_suffix(".partial")
    with partial.open("wb") as out:
        pickle.dump(job, out, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(partial, path)
    return path


def read_job(path: Path) -> Job:
    """The job `write_job` wrote (this machine's own temporary file, written by the same code)."""
    with Path(path).open("rb") as source:
        return pickle.load(source)


def write_registration(registration: Registration, trial: int, folder: Path) -> None:
    """Leave what registering the champion (trial `trial`) did in the run's job folder, for
    worker 0 (`read_registration`); written atomically."""
    path = folder / REGISTRATION_FILE
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"trial": trial, **dataclasses.asdict(registration)}))
    os.replace(partial, path)


def read_registration(folder: Path, trial: int) -> Registration | None:
    """What the registrar worker's registration of champion `trial` did; None if it left none
    (it died, or found no champion) or registered another trial: worker 0 then registers."""
    try:
        written = json.loads((folder / REGISTRATION_FILE).read_text())
    except FileNotFoundError:
        return None
    if written.pop("trial") != trial:
        return None
    return Registration(**written)


@contextlib.contextmanager
def job_folder() -> Iterator[Path]:
    """A private temporary folder for one run's job file, named `melvae-workers-*` and holding
    the owner's pid (`OWNER_FILE`); removed on the way out. A run killed with SIGKILL cannot
    remove its own: `melvae.tune` removes those of dead owners (`remove_orphaned_job_folders`)
    when it starts."""
    with tempfile.TemporaryDirectory(prefix=JOB_PREFIX) as folder:
        (Path(folder) / OWNER_FILE).write_text(str(os.getpid()))
        yield Path(folder)


def remove_orphaned_job_folders(root: Path) -> list[Path]:
    """Remove the `melvae-workers-*` folders in `root` whose owner process (`OWNER_FILE`) is
    dead; return them. A live owner's folder, one of another user's process, and one without an
    owner file yet (being created) are left alone."""
    removed = []
    for folder in root.glob(f"{JOB_PREFIX}*"):
        try:
            owner = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if process_alive(owner):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def worker_argv(job: Path, *, threads: int) -> list[str]:
    """One worker's command line: `run` on the job file, with its threads (its sampler index
    comes on its stdin once the job file is written, `Crew.go`)."""
    return [
        sys.executable,
        *("-m", "melvae.study", "run", "--job", str(job)),
        *("--threads", str(threads)),
    ]


def wait_for_go(source: BinaryIO) -> int | None:
    """In a worker process: import what its first trial needs (`warmup.warm_up`, writing
    nothing), then wait until the caller has written the job (`Crew.go`) and return this
    worker's sampler index; None if the caller dismissed it, died, or the worker was stopped
    (Ctrl-C, SIGTERM) first: it then has nothing to do and has written nothing."""
    try:
        warm_up()
        line = source.readline()
    except KeyboardInterrupt:
        return None
    return int(line) if line.strip() else None


@dataclass
class Crew:
    """The worker processes of one run, waiting for their job until `go`; `code` is their worst
    exit code once they have ended (0: all ended well, or none was sent its job; negative:
    killed by that signal)."""

    processes: list[subprocess.Popen]
    code: int = 0
    sent: bool = False

    def go(self, first_index: int) -> None:
        """The job file is written: send each worker its sampler index (`first_index` onwards),
        which starts its trials."""
        for offset, process in enumerate(self.processes):
            with contextlib.suppress(BrokenPipeError):  # it died: its exit code says so
                process.stdin.write(b"%d\n" % (first_index + offset))
                process.stdin.close()
        self.sent = True

    def wait(self) -> int:
        """Wait until every worker has ended; set `code` and return it."""
        failed = [code for code in (process.wait() for process in self.processes) if code != 0]
        self.code = failed[0] if failed and self.sent else 0
        return self.code

    def dismiss(self) -> None:
        """No job for them (the plan has no other worker, or the run failed before its job was
        written): stop the waiting workers now; they have written nothing."""
        if self.sent:
            return
        for process in self.processes:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
            process.terminate()


@contextlib.contextmanager
def crew(job: Path, *, workers: int, threads: int) -> Iterator[Crew]:
    """Start `workers` worker processes (`python -m melvae.study run --job ...` each) that import
    while the block prepares their job; the block writes `job` and calls `Crew.go`, then runs
    the caller's own share of the trials. On the way out wait for them and set `Crew.code`;
    workers never sent their job are dismissed (`Crew.dismiss`), also when the block fails.

    The caller has pledged the study's budget and claimed the indices it sends; the workers
    share that budget (none pledges more) and leave the summary (baselines, report) to the
    caller, all but the job's registrar, which registers the champion.
    Give each cores/N torch threads: N processes each using every core would slow each other
    down many times over. The workers import the same melvae as this process. SIGTERM to this
    process (from its main thread) is passed on to every worker, then to this process's own
    handler (`recovery.stop_cleanly_on_sigterm`; without one, its trial is stopped the same way).
    """
    argv = worker_argv(job, threads=threads)
    processes = [subprocess.Popen(argv, env=_env(), stdin=subprocess.PIPE) for _ in range(workers)]
    started = Crew(processes)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main_thread else None

    def forward(signum: int, frame: FrameType | None) -> None:
        for process in processes:
            process.send_signal(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # stop this process's trial too, as `run` does
            terminate()

    if in_main_thread:
        signal.signal(signal.SIGTERM, forward)
    try:
        yield started
    finally:
        # Stopped (Ctrl-C reached every worker too), crashed or done: let them end their runs.
        started.dismiss()
        try:
            started.wait()
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)


def _env() -> dict[str, str]:
    """The workers' environment: this one, with melvae's folder on PYTHONPATH unless it is an
    installed package (a checkout or a notebook's `sys.path` entry must reach the workers too)."""
    root = str(Path(__file__).resolve().parents[2])
    if root in {*site.getsitepackages(), site.getusersitepackages()}:
        return dict(os.environ)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}
