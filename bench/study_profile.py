"""Where a whole study's wall time goes: the default study, one process, split by part.

Runs `melvae.study.runner.run_study` on the default study file in a fresh temporary folder,
offline (so on the PBMC fallback, as everywhere here without GEO), with the study's functions
wrapped by timers. Each part's time is its own (exclusive): a part called inside another, e.g.
MLflow logging inside the baselines, counts only for itself, so the parts add up to the wall time
and "other" is what no timer covers (Optuna's storage, pruning, building models, the run's own
bookkeeping).

    python bench/study_profile.py [--n-trials 20] [--epochs N] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import socket
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
    "validation loss (per epoch)": ("melvae.train:evaluate_loss",),
    "final metrics (validation split)": ("melvae.study.scoring:SplitScores.final",),
    "bio_score": ("melvae.study.scoring:SplitScores.bio",),
    "t-SNE": ("melvae.plot:tsne_coordinates",),
    "plots (figures)": (
        "melvae.study.objective:loss_curves",
        "melvae.study.objective:tsne_embedding",
    ),
    "study report": ("melvae.study.runner:report_step",),
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


def _offline(folder: Path) -> None:
    """GEO unreachable (a closed local port), a private cache, MLflow in the folder."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["MELVAE_GEO_URL"] = f"http://127.0.0.1:{port}"
    os.environ["MELVAE_DATA_DIR"] = str(folder / "cache")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=None, help="default: the study's (20)")
    parser.add_argument("--epochs", type=int, default=None, help="cap every trial's epochs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from melvae.study.config import load_study_config
    from melvae.study.runner import run_study

    torch.set_num_threads(args.threads)
    clock = Clock()
    instrument(clock)
    config = load_study_config()
    with tempfile.TemporaryDirectory() as tmp:
        _offline(Path(tmp))
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
