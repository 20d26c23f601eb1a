"""A study's identity: the objectives, selection rule, search space and batch key it was created
with.

Stored once in the Optuna study (a user attribute) when the study is created; every later `run`
compares its study file with it before writing anything, so two different study files that
share a `name` can never interleave their trials in one study, and `best`, `promote` and the
report read the objectives and rule the study optimises for from it (`stored_selection`), not
from whatever study file they are given.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import optuna

from melvae.errors import InputError
from melvae.study.config import StudyConfig
from melvae.study.selection import SelectionRule

IDENTITY_ATTR = "identity"


def study_identity(config: StudyConfig) -> dict[str, Any]:
    """What makes trials of one study comparable, in JSON-safe form."""
    identity = {
        "objectives": list(config.objectives),
        "directions": list(config.directions),
        "selection_rule": dataclasses.asdict(config.selection),
        "search_space": {param.name: _plain(param) for param in config.search},
        "batch_key": config.batch_key,
    }
    return json.loads(json.dumps(identity, default=repr))


def check_identity(study: optuna.Study, config: StudyConfig, *, where: str) -> None:
    """Raise InputError if `config` disagrees with the study's stored identity.

    A study created before identities were stored adopts this file's identity if its
    directions agree, one whose rule was stored as a sentence if the rest agrees. `where`: the
    storage (redacted), for the message.
    """
    wanted = study_identity(config)
    stored = study.user_attrs.get(IDENTITY_ATTR)
    if stored is None:
        stored = {"directions": [d.name.lower() for d in study.directions]}
    elif stored.get("selection_rule") == config.selection.describe(config.objectives):
        stored = {**stored, "selection_rule": wanted["selection_rule"]}  # an older melvae's form
    if stored != study.user_attrs.get(IDENTITY_ATTR) and all(
        stored[key] == wanted.get(key) for key in stored
    ):
        study.set_user_attr(IDENTITY_ATTR, wanted)
        return
    differing = sorted(key for key in wanted if stored.get(key) != wanted[key])
    if not differing:
        return
    details = "; ".join(
        f"{key}: stored {_short(stored.get(key))}, file {_short(wanted[key])}" for key in differing
    )
    raise InputError(
        f"study {study.study_name!r} was created with other settings than {config.path} asks "
        f"for ({details})",
        where=f"{config.path} (name = {config.name!r}) and the study in {where}",
        fix="give this study file another `name` to start a new study, or restore the "
        "settings the study was created with to resume it",
    )


def stored_selection(study: optuna.Study) -> tuple[tuple[str, ...], SelectionRule] | None:
    """The objectives and selection rule `study` was created with (its identity); None for a
    study created before they were stored.

    Examples
    --------
    >>> stored_selection(study)  # doctest: +SKIP
    (('val_loss', 'bio_score'), SelectionRule(rule='bio_within_loss', loss_tolerance=0.02))
    """
    identity = study.user_attrs.get(IDENTITY_ATTR) or {}
    if not isinstance(identity.get("selection_rule"), dict):
        return None
    return tuple(identity["objectives"]), SelectionRule(**identity["selection_rule"])


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: v for k, v in dataclasses.asdict(value).items() if k != "name"}
    return value


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."
