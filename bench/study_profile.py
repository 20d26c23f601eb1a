"""Where a whole study's wall time goes: the default study split by part, and its timeline.

Default: runs `melvae.study.runner.run_study` on the default study file in a fresh temporary
folder, offline (so on the PBMC fallback, as everywhere here without GEO), in one process, with
the study's functions wrapped by timers. Each part's time is its own (exclusive): a part called
inside another, e.g. MLflow logging inside the baselines, counts only for itself, so the parts
add up to the wall time and "other" is what no timer covers (Optuna's storage, pruning,
building models, the run's own bookkeeping). Rendering a figure to PNG counts as "plots", also
when MLflow does it while logging the figure (the study report's figures count as the report).

`--timeline` runs `python -m melvae.study run` as users do (its default `--workers auto`), in a
fresh folder, offline, and prints where its wall time went on the critical path, read back from
the MLflow runs it left: the serial start (imports, data, study, tables), each worker's trials
(busy, and when it started and stopped), the tail, and the serial end (champion on test,
baselines, registration, report, exit).

    python bench/study_profile.py [--n-trials 20] [--epochs N] [--threads 1]
    python bench/study_profile.py --timeline [--n-trials 20] [--epochs N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# Each part: the functions whose (exclusive) time it is, as module:attribute (or
# module:Class.method) where they are looked up when called.
PARTS: dict[str, tuple[str, ...]] = {
    "data: read, validate, preprocess": ("melvae.study.runner:prepare_data",),
    "creating study + MLflow tables": (
        "melvae.study.runner:create_study",
        "melvae.study.runner:create_experiment",
    ),
    "training (epochs' training passes)": ("melvae.train:_train_epoch",),
    "validation loss (per epoch)": ("melvae.train:_loss_per_cell",),
    "final metrics (validation split)": ("melvae.study.scoring:SplitScores.final",),
    "bio_score": ("melvae.study.scoring:SplitScores.bio",),
    "t-SNE": ("melvae.plot:tsne_coordinates",),
    "plots (figures: build, render PNG)": (
        "melvae.study.objective:loss_curves",
        "melvae.study.objective:tsne_embedding",
        "matplotlib.figure:Figure.savefig",
    ),
    "study report": ("melvae.study.runner:report_step", "melvae.study.report:_png"),
    "MLflow logging": (
        "melvae.track:log_metrics",
        "melvae.track:log_params",
        "melvae.track:log_tags",
        "melvae.track:log_figure",
        "melvae.track:log_file",
        "melvae.track:trial_run",
        "melvae.track:top_level_run",
        "melvae.study.objective:log_trial_model",
    ),
    "baselines, champion on test": (
        "melvae.study.runner:baselines_step",
        "melvae.study.runner:score_on_test_step",
    ),
    "registration": ("melvae.study.runner:promote_best", "melvae.study.runner:load_model"),
}


class Clock:
    """Exclusive time per part: entering a part pauses the part it was called from."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self._stack: list[tuple[str, float]] = []

    def enter(self, part: str) -> None:
        if self._stack and self._stack[-1][0] == "study report":
            part = "study report"  # its figures' rendering is the report's
        now = time.perf_counter()
        if self._stack:
            outer, since = self._stack[-1]
            self.seconds[outer] += now - since
        self._stack.append((part, now))

    def leave(self) -> None:
        now = time.perf_counter()
        part, since = self._stack.pop()
        self.seconds[part] += now - since
        if self._stack:
            self._stack[-1] = (self._stack[-1][0], now)

    def timed(self, part: str, function: Callable) -> Callable:
        """`function`, timed as `part`."""

        @functools.wraps(function)
        def call(*args, **kwargs):
            self.enter(part)
            try:
                result = function(*args, **kwargs)
            finally:
                self.leave()
            return result

        return call

    def timed_context(self, part: str, function: Callable) -> Callable:
        """A context-manager `function`, timed while entering and exiting (not its body)."""

        @contextlib.contextmanager
        @functools.wraps(function)
        def manager(*args, **kwargs) -> Iterator:
            self.enter(part)
            try:
                context = function(*args, **kwargs)
                value = context.__enter__()
            finally:
                self.leave()
            try:
                yield value
            except BaseException:
                self.enter(part)
                try:
                    if not context.__exit__(*sys.exc_info()):
                        raise
                finally:
                    self.leave()
            else:
                self.enter(part)
                try:
                    context.__exit__(None, None, None)
                finally:
                    self.leave()

        return manager


def instrument(clock: Clock) -> None:
    """Replace every function named in PARTS by its timed version."""
    for part, names in PARTS.items():
        for name in names:
            module_name, path = name.split(":")
            owner = importlib.import_module(module_name)
            *outer, attribute = path.split(".")
            for step in outer:
                owner = getattr(owner, step)
            function = getattr(owner, attribute)
            contexts = ("trial_run", "top_level_run")
            wrap = clock.timed_context if attribute in contexts else clock.timed
            setattr(owner, attribute, wrap(part, function))


def offline(folder: Path) -> None:
    """GEO unreachable (a closed local port), a private cache, MLflow in the folder."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["MELVAE_GEO_URL"] = f"http://127.0.0.1:{port}"
    os.environ["MELVAE_DATA_DIR"] = str(folder / "cache")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(folder)


def _runs(database: Path) -> list[dict]:
    """Every MLflow run in `database`: start, end (s since the epoch), name and tags."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        tags: dict[str, dict[str, str]] = {}
        for run_id, key, value in db.execute("select run_uuid, key, value from tags"):
            tags.setdefault(run_id, {})[key] = value
        rows = db.execute("select run_uuid, name, start_time, end_time from runs").fetchall()
        versions = db.execute("select creation_time from model_versions").fetchall()
    runs = [
        {"id": i, "name": n, "start": s / 1e3, "end": (e or s) / 1e3, "tags": tags.get(i, {})}
        for i, n, s, e in rows
    ]
    runs += [
        {"name": "model version", "start": t / 1e3, "end": t / 1e3, "tags": {}} for (t,) in versions
    ]
    return runs


def timeline(n_trials: int | None, epochs: int | None) -> None:
    """Run `python -m melvae.study run` in a fresh folder, offline; print its critical path."""
    command = [sys.executable, "-m", "melvae.study", "run", "--quiet"]
    command += ["--n-trials", str(n_trials)] if n_trials else []
    command += ["--epochs", str(epochs)] if epochs else []
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        offline(folder)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        load = os.getloadavg()[0]
        started = time.time()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        ended = time.time()
        if done.returncode != 0:
            sys.exit(f"the study failed ({done.returncode}):\n{done.stderr[-3000:]}")
        runs = _runs(folder / "mlruns" / "mlflow.db")
    plan = next(line for line in done.stderr.splitlines() if " x " in line and "worker" in line)
    at = {
        key: [r for r in runs if r["tags"].get("role") == key]
        for key in ("study-run", "trial", "baseline")
    }
    parents = sorted(at["study-run"], key=lambda r: r["start"])
    trials = at["trial"]
    first, last = min(r["start"] for r in trials), max(r["end"] for r in trials)
    rows: list[tuple[str, float, float]] = [
        ("start: imports, data, study, MLflow tables", started, first)
    ]
    begins = []
    for index, parent in enumerate(parents):
        mine = [r for r in trials if r["tags"].get("mlflow.parentRunId") == parent["id"]]
        if not mine:
            continue
        busy = sum(r["end"] - r["start"] for r in mine)
        begin, end = min(r["start"] for r in mine), max(r["end"] for r in mine)
        label = f"worker {index}: {len(mine)} trials, busy {busy:.1f} s"
        rows.append((label, begin, end))
        begins.append((index, begin))
    rows += [
        (f"worker {index}'s first trial after worker 0's", begins[0][1], begin)
        for index, begin in begins[1:]
    ]
    rows.append(("all trials", first, last))
    baselines = at["baseline"]
    if baselines:
        rows.append(("end: champion on test", last, min(r["start"] for r in baselines)))
        rows.append(
            ("end: baselines", min(r["start"] for r in baselines), max(r["end"] for r in baselines))
        )
    versions = [r for r in runs if r["name"] == "model version"]
    if versions:
        rows.append(("end: registration (last trial -> version made)", last, versions[0]["start"]))
    rows.append(
        (
            "end: report, parent run ended",
            max(r["end"] for r in baselines) if baselines else last,
            parents[0]["end"],
        )
    )
    rows.append(("end: summary printed, processes exit", parents[0]["end"], ended))
    print(
        f"default study, `python -m melvae.study run` in a fresh folder ({plan.strip()}); "
        f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    )
    print(f"{'phase':52s}{'from s':>8s}{'to s':>8s}{'wall s':>8s}")
    for label, begin, end in rows:
        print(f"{label:52s}{begin - started:8.1f}{end - started:8.1f}{end - begin:8.1f}")
    print(f"{'whole run':52s}{0:8.1f}{ended - started:8.1f}{ended - started:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=None, help="default: the study's (20)")
    parser.add_argument("--epochs", type=int, default=None, help="cap every trial's epochs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--timeline", action="store_true", help="run the CLI as users do; print its critical path"
    )
    args = parser.parse_args()
    if args.timeline:
        timeline(args.n_trials, args.epochs)
        return

    import torch

    from melvae.study.config import load_study_config
    from melvae.study.runner import run_study

    torch.set_num_threads(args.threads)
    clock = Clock()
    instrument(clock)
    config = load_study_config()
    with tempfile.TemporaryDirectory() as tmp:
        offline(Path(tmp))
        load = os.getloadavg()[0]
        started = time.perf_counter()
        outcome = run_study(config, n_trials=args.n_trials, epochs_cap=args.epochs, progress=False)
        wall = time.perf_counter() - started
    states: dict[str, int] = {}
    for trial in outcome.study.trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    print(
        f"default study, one process, torch {torch.__version__}, {args.threads} thread(s); "
        f"{len(outcome.study.trials)} trials ({', '.join(f'{n} {s}' for s, n in states.items())})"
        f"; load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    )
    print(f"{'part':38s}{'wall s':>9s}{'share':>8s}")
    for part, seconds in clock.seconds.items():
        print(f"{part:38s}{seconds:9.1f}{seconds / wall:8.1%}")
    other = wall - sum(clock.seconds.values())
    print(f"{'other (Optuna storage, pruning, ...)':38s}{other:9.1f}{other / wall:8.1%}")
    print(f"{'whole study':38s}{wall:9.1f}{1:8.1%}")


if __name__ == "__main__":
    main()
