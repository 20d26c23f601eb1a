"""One progress bar across a run's trials: trial i/N, the best value so far, elapsed time.

An Optuna callback, shown on a terminal as tqdm's other bars are. The per-epoch bar of the
running trial (melvae.train) takes the line below it and disappears when the trial ends, so the
terminal shows two live lines, not one per trial. While the bar is shown Optuna's own "Trial i
finished" log lines are held back: the bar and the final table say the same.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import optuna
import pandas as pd
from tqdm.auto import tqdm

Champion = Callable[[optuna.Study], optuna.trial.FrozenTrial | None]


class TrialProgress:
    """Optuna callback advancing the trial bar after every finished trial (any state).

    `champion` picks the best trial so far by the study's own selection rule, so the bar agrees
    with what `run` will register, multi-objective studies included.
    """

    def __init__(self, bar: tqdm, champion: Champion) -> None:
        self.bar = bar
        self.champion = champion

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        best = self.champion(study)
        shown = "none yet" if best is None else _describe(best, study.metric_names)
        self.bar.set_postfix_str(f"last: {trial.state.name.lower()}, best: {shown}", refresh=False)
        self.bar.update(1)


def _describe(trial: optuna.trial.FrozenTrial, names: list[str] | None) -> str:
    names = names or ["value"] * len(trial.values)
    values = ", ".join(f"{n} {v:.4g}" for n, v in zip(names, trial.values, strict=True))
    return f"trial {trial.number} ({values})"


@contextlib.contextmanager
def trial_progress(
    n_trials: int | None, *, champion: Champion, enabled: bool = True
) -> Iterator[TrialProgress]:
    """The callback for `study.optimize(callbacks=[...])`, its bar shown for this block only."""
    bar = tqdm(
        total=n_trials, desc="trials", unit="trial", position=0, disable=None if enabled else True
    )
    verbosity = optuna.logging.get_verbosity()
    if not bar.disable:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield TrialProgress(bar, champion)
    finally:
        optuna.logging.set_verbosity(verbosity)
        bar.close()


# Columns printed in scientific notation (values that span orders of magnitude), and with one
# decimal (wall time).
_SCIENTIFIC = {"learning_rate"}
_ONE_DECIMAL = {"seconds"}


def column_format(name: str, values: pd.Series) -> Callable[[object], str]:
    """One number format for a whole column of the trials table: integers as integers, the
    learning rate as 1.9e-03, seconds and values of 100 or more with one decimal, the rest with
    three; missing values blank."""
    numbers = pd.to_numeric(values, errors="coerce").astype(float)
    finite = numbers[np.isfinite(numbers)]
    if name in _SCIENTIFIC:
        pattern = "{:.1e}"
    elif finite.empty or (finite == finite.round()).all():
        pattern = "{:.0f}"
    elif name in _ONE_DECIMAL or finite.abs().max() >= 100:
        pattern = "{:.1f}"
    else:
        pattern = "{:.3f}"

    def show(value: object) -> str:
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            return "" if math.isnan(float(value)) else pattern.format(float(value))
        return "" if value is None else str(value)

    return show


def format_trials(table: pd.DataFrame) -> str:
    """The trials table as text, every numeric column in one format (`column_format`)."""
    formatters = {
        name: column_format(name, table[name])
        for name in table.columns
        if pd.api.types.is_numeric_dtype(table[name]) or table[name].dtype == object
    }
    return table.to_string(formatters=formatters)
