"""One progress bar across a run's trials: trial i/N, the best value so far, elapsed time.

An Optuna callback, shown on a terminal as tqdm's other bars are. The per-epoch bar of the
running trial (melvae.train) takes the line below it and disappears when the trial ends, so the
terminal shows two live lines, not one per trial. While the bar is shown Optuna's own "Trial i
finished" log lines are held back: the bar and the final table say the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import optuna
from tqdm.auto import tqdm


class TrialProgress:
    """Optuna callback advancing the trial bar after every finished trial (any state)."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        try:
            best = f"{study.best_value:.4g} (trial {study.best_trial.number})"
        except ValueError:  # no trial has completed yet
            best = "none yet"
        self.bar.set_postfix_str(f"last: {trial.state.name.lower()}, best: {best}", refresh=False)
        self.bar.update(1)


@contextlib.contextmanager
def trial_progress(n_trials: int | None, *, enabled: bool = True) -> Iterator[TrialProgress]:
    """The callback for `study.optimize(callbacks=[...])`, its bar shown for this block only."""
    bar = tqdm(
        total=n_trials, desc="trials", unit="trial", position=0, disable=None if enabled else True
    )
    verbosity = optuna.logging.get_verbosity()
    if not bar.disable:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield TrialProgress(bar)
    finally:
        optuna.logging.set_verbosity(verbosity)
        bar.close()
