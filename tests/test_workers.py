"""How `run` spends the cores, each worker's own sampler seed, and the study's shared budget:
4 real workers on one fresh SQLite folder, one of them killed with SIGKILL mid-trial; the job
folder a run killed with SIGKILL leaves, removed by the next; the worker processes started
before the data, gone with nothing written when their run is refused or dies first."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from melvae.faultpoint import ENV as STOP_AT
from melvae.register import Registration
from melvae.study import workers
from melvae.study.config import load_study_config
from melvae.study.runner import _sampler
from melvae.study.storage import GRACE_BEATS, first_time_lock, open_storage
from tests.test_study import _quick_config
from tests.workers import (
    QUICK,
    STUDY,
    kill_worker_of,
    output,
    running_trial,
    start_worker,
    worker_env,
    worker_pid_of,
)

State = optuna.trial.TrialState


def test_small_models_run_parallel_single_thread_trials_and_large_ones_get_the_threads():
    small = workers.gene_weights(load_study_config(), 2000)  # default study: 2,000 genes x 512
    assert small == 2 * 2000 * 512
    assert workers.choose(2, 20, small) == workers.Plan(2, 1, workers.choose(2, 20, small).reason)
    assert workers.choose(16, 20, small).workers == 5, "at least 4 trials per worker"
    assert workers.choose(16, 20, small).threads == 3
    large = 2 * 17994 * 256
    assert (workers.choose(2, 20, large).workers, workers.choose(2, 20, large).threads) == (1, 2)
    assert (workers.choose(2, 4, small).workers, workers.choose(2, 4, small).threads) == (1, 2)
    assert workers.choose(1, 20, small).workers == 1
    assert "2 workers x 1 thread" in workers.choose(2, 20, small).describe()


def test_each_worker_samples_with_its_own_seed_derived_from_the_studys():
    assert workers.worker_seed(0, 0) == 0, "worker 0 keeps the study's seed"
    seeds = [workers.worker_seed(0, i) for i in range(8)]
    assert len(set(seeds)) == 8
    assert seeds == [workers.worker_seed(0, i) for i in range(8)], "reproducible per worker"
    assert workers.worker_seed(1, 3) != workers.worker_seed(0, 3)
    assert workers.worker_seed(None, 3) is None
    config = load_study_config()
    draws = [
        [optuna.create_study(sampler=_sampler(config, index)).ask().suggest_float("x", 0, 1)]
        for index in (2, 2, 3)
    ]
    assert draws[0] == draws[1] != draws[2]


def _trial(number: int, state: State, **system_attrs: int) -> optuna.trial.FrozenTrial:
    value = 1.0 if state == State.COMPLETE else None
    trial = optuna.trial.create_trial(state=state, value=value, system_attrs=system_attrs)
    trial.number = number
    return trial


def test_the_budget_counts_a_failed_trial_once_as_its_retry():
    trials = [
        _trial(0, State.COMPLETE),
        _trial(1, State.FAIL),  # a dead worker's trial, queued again as trial 3
        _trial(2, State.FAIL),  # diverged: spent, not retried
        _trial(3, State.RUNNING, failed_trial=1),
        _trial(4, State.WAITING),
        _trial(5, State.PRUNED),
    ]
    assert workers.counted(trials) == 4


def test_worker_0_takes_the_registrars_registration_only_for_the_champion_it_chose(tmp_path):
    assert workers.read_registration(tmp_path, trial=3) is None, "none left: worker 0 registers"
    done = Registration("melvae-x", "2", promoted=True, previous_champion="1")
    workers.write_registration(done, 3, tmp_path)
    assert workers.read_registration(tmp_path, trial=3) == done
    assert workers.read_registration(tmp_path, trial=4) is None, "another champion: register it"


def test_pledges_add_up_and_a_withdrawal_never_drops_below_what_was_spent(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=storage)
    assert workers.pledge(study, storage, 5) == 5
    assert workers.pledge(study, storage, 3) == 8
    study.add_trial(optuna.trial.create_trial(value=1.0))
    workers.withdraw(study, storage, 10)
    assert study.user_attrs[workers.BUDGET_ATTR] == 1
    assert [workers.claim_workers(study, storage, n) for n in (1, 4, 1)] == [0, 1, 5]


def test_a_waiting_worker_fails_a_dead_workers_trial_only_under_the_study_lock(tmp_path):
    """Two workers waiting for the last trials both failed a dead worker's trial and queued it
    twice (SQLite has no row locks; CI saw the second retry left WAITING): the check waits for
    the study's lock, which every trial's creation, and Optuna's check within it, holds too."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=open_storage(url, heartbeat=1))
    dead = study.ask()
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(GRACE_BEATS * 1 + 0.5)  # silent past its grace period
    waiting = threading.Thread(target=workers._wait_for_others, args=(study, url, 0))
    with first_time_lock(url):  # another worker creating its trial
        waiting.start()
        waiting.join(timeout=2)
        assert waiting.is_alive(), "the check went ahead without the lock"
        assert study.trials[0].state == optuna.trial.TrialState.RUNNING
    waiting.join(timeout=30)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]


@pytest.mark.slow
def test_four_workers_share_one_budget_never_repeat_a_trial_and_survive_a_kill(tmp_path):
    requested = 8
    parent = start_worker(
        tmp_path, "--workers", "4", "--n-trials", str(requested), *QUICK, "--epochs", "2", name="w"
    )
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    tracking = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    exclude = {0, 1, 2}
    while True:  # a trial of a worker process, not of the parent (worker 0, which summarises)
        number, run_id = running_trial(storage, exclude=exclude)
        if worker_pid_of(run_id, tracking) != parent.pid:
            break
        exclude.add(number)
    killed = kill_worker_of(run_id, tracking)
    assert parent.wait(timeout=600) == 0, output(tmp_path, "w")[-3000:]
    log = output(tmp_path, "w")
    assert "melvae: 4 workers x 1 thread" in log
    assert "a worker ended with exit code -9" in log and "Traceback" not in log

    trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    finished = [t for t in trials if t.state in (State.COMPLETE, State.PRUNED)]
    assert len(finished) == requested, "the others ran what the killed worker did not"
    assert not [t for t in trials if t.state in (State.RUNNING, State.WAITING)]
    assert trials[number].state == State.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == number]
    assert len(retries) == 1 and retries[0].params == trials[number].params
    sampled = [
        tuple(sorted(t.params.items()))
        for t in finished
        if not t.user_attrs.get("seed_trial") and "failed_trial" not in t.system_attrs
    ]
    assert len(set(sampled)) == len(sampled), "no worker repeats another's trial"
    seeds = {t.params["latent_dim"] for t in finished if t.user_attrs.get("seed_trial")}
    assert seeds == {2, 10, 5}
    print(
        f"\n4 workers, {requested} trials, worker {killed} killed in trial {number}: "
        f"{len(finished)} finished, {len(sampled)} sampled, {len(set(sampled))} distinct"
    )


@pytest.mark.slow
def test_a_job_folder_left_by_a_run_killed_9_is_removed_by_the_next_run_a_live_ones_kept(
    tmp_path,
):
    handoff = tmp_path / "tmp"  # the runs' temporary folder (TMPDIR)
    handoff.mkdir()
    live = handoff / f"{workers.JOB_PREFIX}live"  # another run's, still running (this process)
    live.mkdir()
    (live / workers.OWNER_FILE).write_text(str(os.getpid()))
    env = worker_env(tmp_path) | {"TMPDIR": str(handoff)}
    argv = [sys.executable, "-m", "melvae.study", "run", "--workers", "2", "--n-trials", "4"]
    with (tmp_path / "killed.log").open("w") as log:
        killed = subprocess.Popen(
            [*argv, *QUICK, "--epochs", "50"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches its worker too
        )
    deadline = time.monotonic() + 300
    while not [f for f in handoff.glob(f"{workers.JOB_PREFIX}*") if (f / "job.pickle").exists()]:
        assert killed.poll() is None and time.monotonic() < deadline, output(tmp_path, "killed")
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    left = [f for f in handoff.glob(f"{workers.JOB_PREFIX}*") if f != live]
    assert len(left) == 1 and (left[0] / workers.OWNER_FILE).read_text() == str(killed.pid)

    nxt = tmp_path / "next"  # a fresh study folder, the same TMPDIR
    nxt.mkdir()
    done = subprocess.run(
        [*argv[:4], "--workers", "1", "--n-trials", "1", *QUICK],
        cwd=nxt,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(handoff.iterdir()) == [live], "the dead run's folder is gone, the live one's kept"


@pytest.mark.slow
def test_sigterm_to_a_run_with_workers_stops_worker_0_and_the_process_and_queues_their_trials(
    tmp_path,
):
    run = start_worker(
        tmp_path, "--workers", "2", "--n-trials", "6", *QUICK, "--epochs", "200", name="w"
    )
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    first, _ = running_trial(storage)
    running_trial(storage, exclude={first})  # both workers (this one, the process) in a trial
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 143, output(tmp_path, "w")[-3000:]
    study = optuna.load_study(study_name=STUDY, storage=storage)
    assert State.RUNNING not in [t.state for t in study.trials]
    stopped = {t.number for t in study.trials if t.state == State.FAIL}
    queued = {t.user_attrs.get("requeued_from") for t in study.trials if t.state == State.WAITING}
    assert len(stopped) == 2 and stopped <= queued, "both stopped trials queued for the next run"
    assert study.user_attrs[workers.BUDGET_ATTR] == workers.counted(study.trials), "pledge back"


def _processes_naming(folder: Path) -> list[int]:
    """Live processes whose command line names `folder` (a run's workers name its job file)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # not a process, or it ended meanwhile
            continue
        if proc.name.isdigit() and str(folder).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def _refused_after_the_workers_started(tmp_path: Path, kind: str) -> list[str]:
    """`run` arguments refused only after its worker processes started: bad data, or a study
    file whose sampler is unknown (checked when the study is created)."""
    if kind == "data":
        cells = tmp_path / "cells.csv"
        rows = [f"cell{i % 5},{i % 3},{i % 4},{'TB'[i % 2]}" for i in range(12)]
        cells.write_text("\n".join([",GENE_A,GENE_B,label", *rows]) + "\n")
        return ["--data", str(cells)]
    study = _quick_config(tmp_path, **{'type = "tpe"': 'type = "nope"'})
    return ["--study", str(study)]


@pytest.mark.parametrize("kind", ["data", "study file"])
def test_a_run_refused_after_its_workers_started_exits_2_leaving_no_process_nor_file(
    tmp_path, kind
):
    handoff = tmp_path / "tmp"  # the run's temporary folder (TMPDIR): its job folder goes here
    handoff.mkdir()
    argv = [sys.executable, "-m", "melvae.study", "run", "--workers", "2", "--n-trials", "4"]
    done = subprocess.run(
        [*argv, *_refused_after_the_workers_started(tmp_path, kind), *QUICK],
        cwd=tmp_path,
        env=worker_env(tmp_path) | {"TMPDIR": str(handoff)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "melvae: error:" in done.stderr
    assert not (tmp_path / "mlruns").exists(), "nothing written to Optuna or MLflow"
    assert list(handoff.iterdir()) == [], "the job folder is gone"
    assert _processes_naming(handoff) == [], "the waiting worker ended with its run"


@pytest.mark.slow
def test_a_worker_whose_run_dies_before_the_job_exists_exits_by_itself_writing_nothing(
    tmp_path,
):
    handoff = tmp_path / "tmp"
    handoff.mkdir()
    argv = [sys.executable, "-m", "melvae.study", "run", "--workers", "2", "--n-trials", "4"]
    done = subprocess.run(
        [*argv, *QUICK],
        cwd=tmp_path,
        env=worker_env(tmp_path) | {"TMPDIR": str(handoff), STOP_AT: "workers started"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    [folder] = handoff.iterdir()  # the dead run's, removed by the next run (test above)
    assert not (folder / "job.pickle").exists()
    deadline = time.monotonic() + 120
    while _processes_naming(handoff):  # its worker: done importing, it reads the closed pipe
        assert time.monotonic() < deadline, "the orphaned worker never ended"
        time.sleep(0.2)
    assert not (tmp_path / "mlruns").exists(), "the worker wrote nothing"


# A worker's first trial, in a process that has imported what `python -m melvae.study` imports
# and read its job, as a worker has while it waits; prints the warm-up modules it had loaded
# before the trial and those loaded after.
_FIRST_TRIAL = """
import json, sys
import melvae.study.__main__
from melvae.study import warmup, workers
from melvae.study.runner import run_study
job = workers.read_job(sys.argv[1])
before = [m for m in warmup.FIRST_TRIAL_MODULES if m in sys.modules]
run_study(job.config, data=job.data, n_trials=1, epochs_cap=1, progress=False, summarise=False)
after = [m for m in warmup.FIRST_TRIAL_MODULES if m in sys.modules]
print(json.dumps([before, after]))
"""


@pytest.mark.slow
def test_the_warm_up_imports_what_a_workers_first_trial_needs_and_its_imports_lack(tmp_path):
    from melvae.study.runner import prepare_data
    from melvae.study.warmup import FIRST_TRIAL_MODULES

    env = worker_env(tmp_path)
    config = load_study_config()
    job = workers.write_job(workers.Job(config, prepare_data(config), {}), tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_TRIAL, str(job)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = json.loads(done.stdout.splitlines()[-1])
    assert before == [], "a waiting worker has not imported them without its warm-up"
    assert after == list(FIRST_TRIAL_MODULES), "its first trial imports every one of them"


def test_a_worker_dismissed_after_warming_up_exits_0_having_written_nothing(tmp_path):
    from melvae.study.warmup import FIRST_TRIAL_MODULES

    workdir = tmp_path / "work"
    workdir.mkdir()
    argv = workers.worker_argv(tmp_path / "never-written.pickle", threads=1)
    worker = subprocess.Popen(
        [argv[0], "-v", *argv[1:]],
        cwd=workdir,
        env=worker_env(tmp_path),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker.stdin.close()  # dismissed (`Crew.dismiss`): no index will come
    errors = worker.stderr.read()
    assert worker.wait(timeout=300) == 0, errors[-3000:]
    assert "Traceback" not in errors
    imported = set(re.findall(r"^import '([\w.]+)' #", errors, flags=re.MULTILINE))  # python -v
    assert set(FIRST_TRIAL_MODULES) <= imported, "it warmed up before exiting"
    assert list(workdir.iterdir()) == [], "no store, no file"
