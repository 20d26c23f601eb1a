"""Pruning on the per-epoch validation loss, for single- and multi-objective studies alike.

Optuna prunes through `trial.report` / `trial.should_prune`, which it refuses in multi-objective
studies. A study that selects on fit and cell-type structure still wants poor trials stopped
early, so for it `CurveMedianPruner` applies Optuna's median rule itself: each completed trial
leaves its validation-loss curve in its user attributes, and a running trial is stopped when its
best loss so far is worse than the median of the completed trials' losses at the same epoch.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, Protocol

import optuna

from melvae.errors import InputError

CURVE_ATTR = "val_loss_curve"


class EpochPruner(Protocol):
    """Called after every epoch; raises optuna.TrialPruned to stop the trial."""

    def check(self, trial: optuna.Trial, epoch: int, val_loss: float) -> None: ...


class OptunaPruning:
    """Single-objective studies: report to Optuna and let the study's own pruner decide."""

    def check(self, trial: optuna.Trial, epoch: int, val_loss: float) -> None:
        trial.report(val_loss, epoch)
        if trial.should_prune():
            _prune(trial, epoch, val_loss)


class NoPruning:
    """Multi-objective studies with `[pruner] type = "none"`."""

    def check(self, trial: optuna.Trial, epoch: int, val_loss: float) -> None:
        """Never prunes."""


def worse_than_median(best_so_far: float, others_at_epoch: Sequence[float]) -> bool:
    """The median rule (minimising): prune when the trial's best is above the others' median."""
    return bool(others_at_epoch) and best_so_far > statistics.median(others_at_epoch)


class CurveMedianPruner:
    """The median rule over the loss curves that completed trials left in the study.

    `group_by` names parameters whose values make losses incomparable (e.g. the
    transform/likelihood pair): a trial is compared only with trials sharing those values.
    """

    def __init__(
        self, *, n_startup_trials: int = 5, n_warmup_steps: int = 0, group_by: Sequence[str] = ()
    ) -> None:
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps
        self.group_by = tuple(group_by)
        self._curves: dict[int, list[list[float]]] = {}  # trial number -> peers' curves
        self._best: dict[int, float] = {}

    def check(self, trial: optuna.Trial, epoch: int, val_loss: float) -> None:
        best = min(val_loss, self._best.get(trial.number, float("inf")))
        self._best[trial.number] = best
        if epoch < self.n_warmup_steps:
            return
        if trial.number not in self._curves:  # read the finished trials once per trial
            self._curves = {trial.number: self._peer_curves(trial)}
        curves = self._curves[trial.number]
        if len(curves) < self.n_startup_trials:
            return
        others = [curve[epoch] for curve in curves if len(curve) > epoch]
        if worse_than_median(best, others):
            _prune(trial, epoch, val_loss)

    def _peer_curves(self, trial: optuna.Trial) -> list[list[float]]:
        complete = trial.study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)
        )
        return [
            t.user_attrs[CURVE_ATTR]
            for t in complete
            if CURVE_ATTR in t.user_attrs
            and all(t.params.get(key) == trial.params.get(key) for key in self.group_by)
        ]


def _prune(trial: optuna.Trial, epoch: int, val_loss: float) -> None:
    trial.set_user_attr("pruned_at_epoch", epoch)
    raise optuna.TrialPruned(f"val_loss {val_loss:.4g} at epoch {epoch}")


def epoch_pruner(table: dict[str, Any], *, multi_objective: bool, where: str) -> EpochPruner:
    """The pruning a study's `[pruner]` table asks for, in a form both kinds of study accept."""
    if not multi_objective:
        return OptunaPruning()
    options = dict(table)
    kind = options.pop("type", "median")
    if kind == "none":
        return NoPruning()
    if kind != "median":
        raise InputError(
            f"pruner {kind!r} cannot prune a multi-objective study",
            where=where,
            fix='use type = "median" or "none" (Optuna prunes only single-objective studies)',
        )
    allowed = {"n_startup_trials", "n_warmup_steps"}
    if set(options) - allowed:
        raise InputError(
            f"unknown pruner option(s) {', '.join(sorted(set(options) - allowed))}",
            where=where,
            fix=f"a multi-objective median pruner takes only {', '.join(sorted(allowed))}",
        )
    return CurveMedianPruner(**options, group_by=("transform_likelihood",))
