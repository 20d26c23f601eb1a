"""Crashes on the SQLite default, with real worker processes: two start at once on a fresh folder,
one is killed (SIGKILL) mid-trial and one stopped (SIGTERM) mid-trial; the next worker recovers."""

from __future__ import annotations

import signal
import subprocess
import sys

import optuna
import pytest

from tests.workers import (
    QUICK,
    STUDY,
    assert_champion_is_a_completed_trial,
    client_for,
    kill_worker_of,
    output,
    running_trial,
    runs_by_status,
    start_worker,
    wait_until_stale,
    worker_env,
)

State = optuna.trial.TrialState


@pytest.fixture(scope="module")
def crashes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("crashes")
    storage = f"sqlite:///{workdir}/mlruns/optuna.db"
    tracking = f"sqlite:///{workdir}/mlruns/mlflow.db"

    first = start_worker(workdir, "--n-trials", "3", *QUICK, name="first")
    second = start_worker(workdir, "--n-trials", "3", *QUICK, name="second")
    killed_trial, killed_run = running_trial(storage)
    killed_pid = kill_worker_of(killed_run, tracking)
    stopped_trial, stopped_run = running_trial(storage, exclude={killed_trial})
    stopped_pid = kill_worker_of(stopped_run, tracking, signal.SIGTERM)
    workers = {first.pid: (first, "first"), second.pid: (second, "second")}
    killed, _ = workers[killed_pid]
    stopped, stopped_name = workers[stopped_pid]
    killed_code, stopped_code = killed.wait(timeout=60), stopped.wait(timeout=120)

    # The next worker finds the silent trial stale, fails it, and runs it again, and runs the
    # stopped one again.
    wait_until_stale()
    following = start_worker(workdir, "--n-trials", "3", *QUICK, name="next")
    following_code = following.wait(timeout=600)
    return {
        "workdir": workdir,
        "storage": storage,
        "tracking": tracking,
        "killed": (killed_pid != stopped_pid, killed_code, killed_trial, killed_run),
        "next": following_code,
        "stopped": (stopped_code, stopped_name, stopped_trial, stopped_run),
        "trials": optuna.load_study(study_name=STUDY, storage=storage).trials,
    }


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_retried_and_its_runs_closed(crashes):
    two_workers, code, number, run_id = crashes["killed"]
    assert two_workers and code == -signal.SIGKILL
    assert crashes["next"] == 0, output(crashes["workdir"], "next")

    trials = crashes["trials"]
    assert trials[number].state == State.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == number]
    assert len(retries) == 1
    assert retries[0].state == State.COMPLETE
    assert retries[0].params == trials[number].params
    seeds = [t for t in trials if t.user_attrs.get("seed_trial") and t.state == State.COMPLETE]
    assert len(seeds) == 3, "every documented experiment completed, the killed one included"

    client = client_for(crashes["tracking"])
    dead_run = client.get_run(run_id)
    parent = client.get_run(dead_run.data.tags["mlflow.parentRunId"])
    for run in (dead_run, parent):
        assert run.info.status == "FAILED"
        assert "stopped sending heartbeats" in run.data.tags["failure_reason"]

    champion = client.get_model_version_by_alias("melvae-pbmc68k_reduced", "champion")
    assert client.get_run(champion.run_id).info.status == "FINISHED"
    assert_champion_is_a_completed_trial(champion, trials)
    runs = runs_by_status(crashes["tracking"])
    print(
        f"\ncrash test: trials requested 3 (killed worker) + 3 (stopped one) + 3 (next), "
        f"in storage {len(trials)}: "
        + ", ".join(f"{s.name} {sum(t.state == s for t in trials)}" for s in State)
        + f"; retried {len(retries)}; MLflow runs "
        + ", ".join(f"{status} {len(group)}" for status, group in sorted(runs.items()))
    )


@pytest.mark.slow
def test_sigterm_ends_the_current_trials_runs_killed_and_exits_non_zero(crashes):
    code, name, number, run_id = crashes["stopped"]
    assert code == 128 + signal.SIGTERM
    log = output(crashes["workdir"], name)
    assert "interrupted" in log
    assert "Traceback" not in log

    client = client_for(crashes["tracking"])
    trial_run = client.get_run(run_id)
    parent = client.get_run(trial_run.data.tags["mlflow.parentRunId"])
    assert trial_run.info.status == parent.info.status == "KILLED"
    assert trial_run.data.tags["interrupted"] == "true"
    trials = crashes["trials"]
    assert trials[number].state == State.FAIL
    again = [t for t in trials if t.user_attrs.get("requeued_from") == number]
    assert len(again) == 1 and again[0].state == State.COMPLETE, "the stopped trial ran again"
    assert again[0].params == trials[number].params


@pytest.mark.slow
def test_no_trial_or_run_is_left_running(crashes):
    states = {t.state for t in crashes["trials"]}
    assert not states & {State.RUNNING, State.WAITING}
    assert "RUNNING" not in runs_by_status(crashes["tracking"])


# A worker whose SIGTERM arrives while Python runs a garbage collector's callback (as it did in
# SQLAlchemy's weakref callback): the handler's exception is printed as "Exception ignored" and
# dropped. SIGUSR1 from the test arms the trap once a trial runs.
SIGTERM_IN_A_FINALIZER = """
import gc, os, signal, sys
from melvae.study.__main__ import main
armed = []
signal.signal(signal.SIGUSR1, lambda *_: armed.append(True))
def collecting(phase, info):
    if phase == "start" and armed:
        armed.clear()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the SIGTERM handler runs here, inside the collector's callback
            pass
gc.callbacks.append(collecting)
sys.exit(main(["run", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_a_sigterm_whose_exception_a_finalizer_swallowed_still_stops_the_trial(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SIGTERM_IN_A_FINALIZER)
    log = (tmp_path / "w.log").open("w")
    run = subprocess.Popen(
        [
            sys.executable,
            str(script),
            "--workers",
            "1",
            "--n-trials",
            "2",
            *QUICK,
            "--epochs",
            "300",
        ],
        cwd=tmp_path,
        env=worker_env(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    trial, _ = running_trial(storage)
    run.send_signal(signal.SIGUSR1)
    assert run.wait(timeout=300) == 143, output(tmp_path, "w")[-3000:]
    assert "Exception ignored" in output(tmp_path, "w"), "the first exception was swallowed"
    study = optuna.load_study(study_name=STUDY, storage=storage)
    states = {t.number: t.state for t in study.trials}
    assert states[trial] == State.FAIL and State.RUNNING not in states.values()
    waiting = [t.user_attrs for t in study.trials if t.state == State.WAITING]
    assert [a["requeued_from"] for a in waiting if "requeued_from" in a] == [trial]


UNRAISABLE = """
import weakref
from melvae.study import recovery
recovery.stop_cleanly_on_sigterm()
class Held: pass
def broken(ref): raise AssertionError("a cleanup half done")
first = Held(); ref = weakref.ref(first, broken); del first
recovery._terminated.set()  # as the SIGTERM handler does
second = Held(); ref2 = weakref.ref(second, broken); del second
"""


def test_after_sigterm_a_finalizers_lost_exception_is_one_line_not_a_traceback():
    """What a SIGTERM breaks inside a weakref callback (SQLAlchemy's cleanup) is the stop, not a
    crash: one line; before any SIGTERM such an exception keeps Python's full traceback."""
    done = subprocess.run(
        [sys.executable, "-c", UNRAISABLE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    before, after = done.stderr.split("Exception ignored in <function broken")
    assert "Traceback" in before and "AssertionError: a cleanup half done" in before
    assert after.strip().endswith("AssertionError (stopping on SIGTERM)")
    assert "Traceback" not in after
