"""Champion selection: the declared rule that picks one trial from a study's completed trials.

A single-objective study's champion is its best trial (rule `objective`). A study that optimises
model fit and cell-type structure together (`[objective] metrics = ["val_loss", "bio_score"]`)
has a Pareto front instead of a best trial; rule `bio_within_loss` picks from that front the
trial with the highest bio_score among those whose validation loss is within `loss_tolerance`
(relative) of the front's best loss: the best cell-type structure among models that fit the
data (almost) as well as the best-fitting one.

A study with a batch key can add batch mixing as a third objective (`batch_score`, scib-metrics'
batch-correction aggregate); rule `integration_within_loss` then picks, among the front's trials
within the same loss tolerance, the highest `integration_score` = 0.6 × bio_score + 0.4 ×
batch_score (scib-metrics' overall score): cell-type structure first, patients mixed second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

RULES = ("objective", "bio_within_loss", "integration_within_loss")
# scib-metrics' overall score: bio conservation and batch correction weighted 0.6 / 0.4.
BIO_WEIGHT, BATCH_WEIGHT = 0.6, 0.4
# The objectives each Pareto rule reads (a study's metrics must include them).
RULE_OBJECTIVES = {
    "bio_within_loss": ("val_loss", "bio_score"),
    "integration_within_loss": ("val_loss", "bio_score", "batch_score"),
}


def integration_score(bio_score: float, batch_score: float) -> float:
    """scib-metrics' overall score, 0.6 × bio_score + 0.4 × batch_score, in [0, 1].

    Examples
    --------
    >>> round(integration_score(0.5, 1.0), 6)
    0.7
    """
    return BIO_WEIGHT * bio_score + BATCH_WEIGHT * batch_score


def integration_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """`{"integration_score": ...}` where `metrics` hold both bio_score and batch_score (a
    study with a batch key), else nothing."""
    if "bio_score" not in metrics or "batch_score" not in metrics:
        return {}
    return {"integration_score": integration_score(metrics["bio_score"], metrics["batch_score"])}


@dataclass(frozen=True)
class SelectionRule:
    """How the champion is chosen; written in the study file's `[selection]` table."""

    rule: str = "objective"
    loss_tolerance: float = 0.02

    def describe(self, objectives: Sequence[str] = ("val_loss",)) -> str:
        """One line for `best`, the run summary and the registry tag."""
        within = (
            "on the Pareto front among trials whose val_loss is within "
            f"{self.loss_tolerance:.1%} of the front's lowest val_loss"
        )
        if self.rule == "bio_within_loss":
            return f"highest bio_score {within}"
        if self.rule == "integration_within_loss":
            return (
                f"highest integration_score = {BIO_WEIGHT} x bio_score + {BATCH_WEIGHT} x "
                f"batch_score (scib's overall score) {within}"
            )
        return f"best {objectives[0]}"

    def ranked_metric(self, objectives: Sequence[str]) -> str:
        """The metric the champion is ranked by (what the registry compares across runs)."""
        return {"bio_within_loss": "bio_score", "integration_within_loss": "integration_score"}.get(
            self.rule, objectives[0]
        )


def _better_or_equal(a: float, b: float, direction: str) -> bool:
    return a <= b if direction == "minimize" else a >= b


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """Whether values `a` are at least as good as `b` everywhere and differ somewhere."""
    at_least = all(_better_or_equal(x, y, d) for x, y, d in zip(a, b, directions, strict=True))
    return at_least and tuple(a) != tuple(b)


def pareto_front(trials: Sequence[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    """The trials no other trial dominates, in trial order."""
    return [
        t
        for t in trials
        if not any(dominates(o.values, t.values, directions) for o in trials if o is not t)
    ]


def select_champion(
    trials: Sequence[FrozenTrial],
    rule: SelectionRule,
    objectives: Sequence[str],
    directions: Sequence[str],
) -> FrozenTrial | None:
    """Apply `rule` to completed trials (each with one value per objective); None if empty."""
    if not trials:
        return None
    if rule.rule == "objective":
        sign = 1 if directions[0] == "minimize" else -1
        return min(trials, key=lambda t: (sign * t.values[0], t.number))
    front = pareto_front(trials, directions)
    loss = objectives.index("val_loss")
    bio = objectives.index("bio_score")
    best_loss = min(t.values[loss] for t in front)
    limit = best_loss + rule.loss_tolerance * abs(best_loss)
    within = [t for t in front if t.values[loss] <= limit]
    if rule.rule == "integration_within_loss":
        batch = objectives.index("batch_score")
        return max(
            within, key=lambda t: (integration_score(t.values[bio], t.values[batch]), -t.number)
        )
    return max(within, key=lambda t: (t.values[bio], -t.number))


def completed_with_model(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials that logged a model: the candidates for champion."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if "model_uri" in t.user_attrs
    ]
