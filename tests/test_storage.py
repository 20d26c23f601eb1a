"""A trial's user attributes written in one storage transaction (`storage.set_user_attrs`), on a
real SQLite study file: the same attributes Optuna's own `set_user_attr` stores, one commit, all
or none."""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy

from melvae.study.storage import open_storage, set_user_attrs

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")
ATTRS = {"model_uri": "runs:/abc/model", "bio_score": 0.61, "val_loss": 302.5, "curve": [3.0, 2.5]}


def _study(tmp_path) -> tuple[optuna.Study, list[int]]:
    """A study on a fresh SQLite file, and a list that counts its storage's commits."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=open_storage(url), study_name="s")
    commits: list[int] = []
    engine = study._storage._backend.engine
    sqlalchemy.event.listen(engine, "commit", lambda connection: commits.append(1))
    return study, commits


def test_the_attributes_are_those_set_user_attr_stores_in_one_commit(tmp_path):
    study, commits = _study(tmp_path)
    one_by_one, batched = study.ask(), study.ask()
    commits.clear()
    for key, value in ATTRS.items():
        one_by_one.set_user_attr(key, value)
    assert len(commits) == len(ATTRS)
    commits.clear()
    set_user_attrs(batched, ATTRS)
    assert len(commits) == 1
    assert batched.user_attrs == ATTRS  # the live trial sees them, as after set_user_attr
    stored = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    first, second = stored.get_trials(deepcopy=False)
    assert first.user_attrs == second.user_attrs == ATTRS


def test_a_value_that_is_not_json_writes_none_of_them(tmp_path):
    study, _ = _study(tmp_path)
    trial = study.ask()
    with pytest.raises(TypeError):
        set_user_attrs(trial, {"model_uri": "runs:/abc/model", "bad": object()})
    stored = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert stored.get_trials(deepcopy=False)[0].user_attrs == {}


def test_a_finished_trial_is_refused_like_set_user_attr_refuses_it(tmp_path):
    study, _ = _study(tmp_path)
    trial = study.ask()
    study.tell(trial, 1.0)
    with pytest.raises(RuntimeError):
        trial.set_user_attr("late", 1)
    with pytest.raises(RuntimeError):
        set_user_attrs(trial, {"late": 1})


def test_a_storage_that_is_not_an_rdb_one_gets_the_same_attributes_one_by_one():
    """A study in memory (the Python API lets a user pass one) has no SQL transaction to share."""
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    trial = study.ask()
    set_user_attrs(trial, ATTRS)
    assert trial.user_attrs == ATTRS
    assert study.get_trials(deepcopy=False)[0].user_attrs == ATTRS
