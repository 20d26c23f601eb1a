"""The Optuna study: `python -m melvae.study run`, or `melvae.tune` from Python.

Examples
--------
>>> from melvae.study import load_study_config
>>> load_study_config().objectives
('val_loss', 'bio_score')
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Public name -> its module, imported lazily (the CLI's `--help` stays fast).
_LAZY = {
    "DEFAULT_STUDY": "melvae.study.config",
    "StudyConfig": "melvae.study.config",
    "load_study_config": "melvae.study.config",
    "study_config_from_dict": "melvae.study.config",
    "StudyOutcome": "melvae.study.runner",
    "run_study": "melvae.study.runner",
}
__all__ = [
    "DEFAULT_STUDY",
    "StudyConfig",
    "StudyOutcome",
    "load_study_config",
    "run_study",
    "study_config_from_dict",
]

if TYPE_CHECKING:
    from melvae.study.config import (
        DEFAULT_STUDY,
        StudyConfig,
        load_study_config,
        study_config_from_dict,
    )
    from melvae.study.runner import StudyOutcome, run_study


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'melvae.study' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({name for name in globals() if name.startswith("__")} | set(__all__))
