"""Study files: the shipped default is valid and mistakes are reported with where and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from melvae.errors import InputError
from melvae.study.config import DEFAULT_STUDY, load_study_config

# The original architecture: one plain hidden layer each side, no KL warm-up.
ORIGINAL_ARCHITECTURE = {"n_layers": 1, "dropout": 0.0, "norm": "none", "kl_warmup_epochs": 0}
DOCUMENTED_EXPERIMENTS = [
    {"hidden_dim": 128, "latent_dim": 2, "learning_rate": 1e-4, "epochs": 200, "batch_size": 32},
    {"hidden_dim": 128, "latent_dim": 10, "learning_rate": 1e-4, "epochs": 100, "batch_size": 32},
    {"hidden_dim": 256, "latent_dim": 5, "learning_rate": 1e-3, "epochs": 100, "batch_size": 32},
]
SEED_TRIALS = [experiment | ORIGINAL_ARCHITECTURE for experiment in DOCUMENTED_EXPERIMENTS]
# The default file's pruner lines as it writes them, whatever their values, for the tests that
# edit them.
_FILE = load_study_config(DEFAULT_STUDY)
WARMUP_LINE = f"n_warmup_steps = {_FILE.pruner['n_warmup_steps']}"
STARTUP_LINE = f"n_startup_trials = {_FILE.pruner['n_startup_trials']}"


def test_default_study_seeds_the_three_documented_experiments_exactly():
    config = load_study_config(DEFAULT_STUDY)
    assert [dict(trial) for trial in config.seed_trials] == SEED_TRIALS
    assert {p.name for p in config.search} >= {"hidden_dim", "latent_dim", "learning_rate"}
    # Unsearched settings are the original ones, so the seeds reproduce the original models.
    fixed = config.fixed_params()
    assert fixed["transform_likelihood"] == "minmax/bernoulli"
    assert fixed["kl_weight"] == 1.0
    assert config.fallback == "pbmc68k_reduced"
    assert config.dataset == "gse115978_reference"
    assert config.objectives == ("val_loss", "bio_score")
    assert config.directions == ["minimize", "maximize"]
    assert config.selection.rule == "bio_within_loss"
    assert config.study_name("pbmc68k_reduced") == "melanoma-vae-pbmc68k_reduced"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(DEFAULT_STUDY.read_text() + "\n" + text)
    return path


@pytest.mark.parametrize(
    ("addition", "message"),
    [
        ("[surprise]\nvalue = 1", "unknown setting(s) surprise"),
        (
            "[[seed_trials]]\nhidden_dim = 1000\nlatent_dim = 2\nlearning_rate = 1e-3\n"
            "epochs = 100",
            "outside the search space",
        ),
        (
            "[[seed_trials]]\nhidden_dim = 128\nlatent_dim = 2\nlearning_rate = 1e-3\n"
            "epochs = 100\nbatch_size = 64\nkl_weight = 0.5",
            "neither searched nor equal",
        ),
        ("[[seed_trials]]\nhidden_dim = 128", "does not set searched parameter"),
    ],
)
def test_mistakes_in_a_study_file_name_the_place(tmp_path, addition, message):
    with pytest.raises(InputError) as error:
        load_study_config(_write(tmp_path, addition))
    assert message in str(error.value)
    assert str(tmp_path / "study.toml") in error.value.where


def test_wrong_values_are_rejected_with_a_fix(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(DEFAULT_STUDY.read_text().replace('"bernoulli"', '"poisson"'))
    with pytest.raises(InputError, match="unknown likelihood 'poisson'") as error:
        load_study_config(path)
    assert "negative_binomial" in error.value.fix

    path.write_text(DEFAULT_STUDY.read_text().replace("seed = 0\n\n[model]", "sed = 0\n\n[model]"))
    with pytest.raises(InputError, match="sed"):
        load_study_config(path)


def test_missing_or_broken_study_file(tmp_path):
    with pytest.raises(InputError, match="study file not found"):
        load_study_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(InputError, match="not valid TOML"):
        load_study_config(broken)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('type = "tpe"', 'type = "cmaes"', "unknown type 'cmaes'"),
        (WARMUP_LINE, "n_warmup_epochs = 5", "unknown pruner option"),
        ('type = "median"', 'type = "hyperband"', "cannot prune a multi-objective study"),
        ('metrics = ["val_loss", "bio_score"]', 'metric = "bio_score"', "unknown type 'vibes'"),
    ],
)
def test_unknown_sampler_or_pruner_settings_are_named(tmp_path, old, new, message):
    from melvae.study.runner import create_study

    path = tmp_path / "study.toml"
    text = DEFAULT_STUDY.read_text()
    assert old in text
    text = text.replace(old, new)
    if "vibes" in message:  # a single-objective study: Optuna's own pruners, checked by Optuna
        text = text.replace('rule = "bio_within_loss"', 'rule = "objective"')
        text = text.replace('type = "median"', 'type = "vibes"')
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        create_study(load_study_config(path), "x", f"sqlite:///{tmp_path}/optuna.db")


def test_the_original_single_objective_study_stays_available(tmp_path):
    path = tmp_path / "study.toml"
    text = DEFAULT_STUDY.read_text()
    path.write_text(
        text.replace('metrics = ["val_loss", "bio_score"]', 'metric = "val_loss"').replace(
            'rule = "bio_within_loss"', 'rule = "objective"'
        )
    )
    config = load_study_config(path)
    assert config.objectives == ("val_loss",)
    assert not config.multi_objective
    assert config.selection.describe(config.objectives) == "best val_loss"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('metrics = ["val_loss", "bio_score"]', 'metric = "val_loss"', "needs metrics"),
        ("loss_tolerance = 0.02", "loss_tolerance = 0.02\nrules = 1", "unknown setting(s) rules"),
        ('rule = "bio_within_loss"', 'rule = "vibes"', "unknown selection rule"),
        ("loss_tolerance = 0.02", "loss_tolerance = -1", "loss_tolerance must be >= 0"),
        ('metrics = ["val_loss"', 'metric = "val_loss"\nmetrics = ["val_loss"', "both metric"),
        (
            'choices = ["none", "layer"]',
            'choices = ["none", "layer"]\n[search.transform_likelihood]\ntype = "categorical"\n'
            'choices = ["minmax/bernoulli", "log1p/bernoulli"]',
            "bernoulli decoder cannot model 'log1p'",
        ),
    ],
)
def test_objective_and_selection_mistakes_are_named(tmp_path, old, new, message):
    path = tmp_path / "study.toml"
    # The first occurrence: `metrics = [...` is also the end of `batch_metrics = [...`.
    path.write_text(DEFAULT_STUDY.read_text().replace(old, new, 1))
    with pytest.raises(InputError) as error:
        load_study_config(path)
    assert message in str(error.value)


# Every value is checked when the file is read (melvae.params declares types and ranges): a
# wrong one never reaches a trial. (old text, new text, the key the error must name)
LOAD_TIME_MISTAKES = {
    "float batch size": ("batch_size = 32\nepochs", "batch_size = 32.5\nepochs", "batch_size"),
    "fixed dropout 1": ("[model]\n", "[model]\ndropout = 1.0\n", "[model] dropout"),
    "fixed hidden 0": ("[model]\n", "[model]\nhidden_dim = 0\n", "[model] hidden_dim"),
    "fixed norm": ("[model]\n", '[model]\nnorm = "group"\n', "[model] norm"),
    "negative warm-up": ("kl_warmup_epochs = 0\nearly", "kl_warmup_epochs = -1\nearly", "warmup"),
    "fractional seed": ("seed = 0\n\n[search", "seed = 0.5\n\n[search", "[train] seed"),
    "searched dropout 1.5": ("choices = [0.0, 0.1, 0.2]", "choices = [0.0, 1.5]", "dropout"),
    "fractional size choice": ("choices = [64, 128,", "choices = [64.5, 128,", "hidden_dim"),
    "fractional int range": ("low = 2\nhigh = 32", "low = 2.5\nhigh = 32", "latent_dim"),
    "float range of an int": (
        '"int"\nlow = 2\nhigh = 32',
        '"float"\nlow = 2\nhigh = 32',
        "latent_dim",
    ),
    "string size": ("choices = [32, 64, 128]", 'choices = ["32", 64]', "batch_size"),
    "unknown norm choice": ('choices = ["none", "layer"]', 'choices = ["none", "x"]', "norm"),
    "negative warm-up steps": (WARMUP_LINE, "n_warmup_steps = -1", "n_warmup_steps"),
    "fractional startup": (STARTUP_LINE, "n_startup_trials = 2.5", "n_startup_trials"),
    "fractional seed trial": ("latent_dim = 10\nlearning", "latent_dim = 10.0\nlearning", "latent"),
}


@pytest.mark.parametrize("case", LOAD_TIME_MISTAKES)
def test_every_value_is_checked_at_load_time_with_its_key(tmp_path, case):
    old, new, key = LOAD_TIME_MISTAKES[case]
    text = DEFAULT_STUDY.read_text()
    assert old in text
    path = tmp_path / "study.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(InputError) as error:
        load_study_config(path)
    assert "TOML" not in error.value.what
    assert key in error.value.where
    assert str(path) in error.value.where


def test_the_activation_is_searchable_and_defaults_to_the_original_relu(tmp_path):
    assert load_study_config(DEFAULT_STUDY).fixed_params()["activation"] == "relu"
    search = '[search.activation]\ntype = "categorical"\nchoices = ["relu", "gelu", "elu"]\n'
    seeds = (
        'norm = "none"\nkl_warmup_epochs = 0',
        'norm = "none"\nkl_warmup_epochs = 0\nactivation = "relu"',
    )
    path = tmp_path / "study.toml"
    path.write_text(DEFAULT_STUDY.read_text().replace(*seeds) + search)
    assert ("relu", "gelu", "elu") in [p.choices for p in load_study_config(path).search]
    path.write_text(path.read_text().replace('"elu"]', '"tanh"]'))
    with pytest.raises(InputError, match="activation = 'tanh' is not valid"):
        load_study_config(path)


@pytest.mark.parametrize("example", sorted((Path(__file__).parents[1] / "studies").glob("*.toml")))
def test_the_example_studies_are_valid(example):
    assert load_study_config(example).name.startswith("melanoma-vae-")
