"""A study's identity: the objectives, selection rule, search space and batch key it was created
with.

Stored in the Optuna study (a user attribute) when the study is created; every later `run`
compares its study file with it before writing anything, so two different study files that
share a `name` can never interleave their trials in one study.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import optuna

from melvae.errors import InputError
from melvae.study.config import StudyConfig

IDENTITY_ATTR = "identity"


def study_identity(config: StudyConfig) -> dict[str, Any]:
    """What makes trials of one study comparable, in JSON-safe form."""
    identity = {
        "objectives": list(config.objectives),
        "directions": list(config.directions),
        "selection_rule": config.selection.describe(config.objectives),
        "search_space": {param.name: _plain(param) for param in config.search},
        "batch_key": config.batch_key,
    }
    return json.loads(json.dumps(identity, default=repr))


def check_identity(study: optuna.Study, config: StudyConfig, *, where: str) -> None:
    """Raise InputError if `config` disagrees with the study's stored identity.

    A study created before identities were stored adopts this file's identity if its number
    of objectives agrees. `where`: the storage (redacted), for the message.
    """
    wanted = study_identity(config)
    stored = study.user_attrs.get(IDENTITY_ATTR)
    if stored is None:
        stored = {"directions": [d.name.lower() for d in study.directions]}
        if stored["directions"] == wanted["directions"]:
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


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: v for k, v in dataclasses.asdict(value).items() if k != "name"}
    return value


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."
