"""The one declaration of every hyperparameter a trial sets: name, type, default, valid range,
and the object that consumes it.

Everything else reads this table: the study file's `[model]`, `[train]` and `[search.*]` checks
(`melvae.study.config`), the search space and the trial-to-model mapping
(`melvae.study.objective`), `MelVAE.fit`'s keywords and docstring, `VAEModule`'s checks and a
saved model's `melvae.json` (a key missing from an older file takes its default here). Adding a
searchable hyperparameter means one `Param` below plus its implementation in its consumer.

Consumers:
- `"module"`: the torch module (`melvae.module.VAEModule`), stored in `melvae.json`;
- `"train"`: the optimisation settings (`melvae.train.TrainConfig`, whose defaults are these);
- `"pair"`: `transform_likelihood`, a preprocessing transform and the decoder likelihood it feeds
  (study files set it as `[preprocess] transform` and `[model] likelihood`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from melvae.errors import InputError

Consumer = Literal["module", "train", "pair"]


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its type, default and valid values, and who consumes it.

    Parameters
    ----------
    name
        The key in study files, trial parameters, `MelVAE.fit` and `melvae.json`.
    kind
        `int`, `float` or `str`. An `int` must be a true integer (never `1.0` or `True`); a
        `float` accepts integers too.
    consumer
        `"module"`, `"train"` or `"pair"` (see the module docstring).
    doc
        One line for docstrings and error messages.
    default
        The value used where nothing sets it.
    low, high
        Inclusive bounds (None: unbounded); `high_open=True` / `low_open=True` exclude them.
    choices
        For a `str`: the allowed values.
    needs_batch_key
        A value other than the default needs a batch key (a study refuses it without one).
    needs_label_key
        A value other than the default needs cell-type labels (a study refuses it without).

    Examples
    --------
    >>> PARAMS["dropout"].check(0.1, where="[model] dropout")
    >>> PARAMS["dropout"].describe()
    'float in [0, 1)'
    """

    name: str
    kind: type
    consumer: Consumer
    doc: str
    default: Any = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    needs_batch_key: bool = False
    needs_label_key: bool = False

    def describe(self) -> str:
        """The valid values in words, e.g. "int >= 1", "float in [0, 1)", "one of relu, gelu"."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        kind = self.kind.__name__
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {_num(self.low)}"
        return kind

    def valid(self, value: Any) -> bool:
        """Whether `value` has this parameter's type and lies in its range or choices."""
        if isinstance(value, bool) or not isinstance(value, _accepted(self.kind)):
            return False
        if self.kind is str:
            return not self.choices or value in self.choices
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (
            self.high is not None and (value > self.high or (self.high_open and value == self.high))
        )

    def check(self, value: Any, *, where: str) -> None:
        """Raise an InputError naming this parameter unless `value` is valid."""
        if not self.valid(value):
            raise InputError(
                f"{self.name} = {value!r} is not valid: it must be {self.describe()}",
                where=where,
                fix=f"give {self.name} ({self.doc}) a value that is {self.describe()}",
            )


def _accepted(kind: type) -> type | tuple[type, ...]:
    return (int, float) if kind is float else kind


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


_TRAIN = "train"
_MODULE = "module"
PARAMS: dict[str, Param] = {
    p.name: p
    for p in (
        Param("hidden_dim", int, _MODULE, "width of each hidden layer", 128, low=1),
        Param("latent_dim", int, _MODULE, "size of the latent space", 10, low=1),
        Param("n_layers", int, _MODULE, "hidden layers on each side (1 = original)", 1, low=1),
        Param(
            "dropout", float, _MODULE, "dropout after each hidden layer", 0.0, 0, 1, high_open=True
        ),
        Param(
            "norm",
            str,
            _MODULE,
            "normalisation of hidden layers",
            "none",
            choices=("none", "batch", "layer"),
        ),
        Param(
            "activation",
            str,
            _MODULE,
            "activation of hidden layers (relu = original)",
            "relu",
            choices=("relu", "gelu", "elu"),
        ),
        Param(
            "batch_conditioning",
            str,
            _MODULE,
            "where a batch covariate enters: the decoder only (cells of unseen batches encode) "
            "or the encoder too; unused without a batch key",
            "decoder",
            choices=("decoder", "encoder_decoder"),
        ),
        Param(
            "batch_adversary_weight",
            float,
            _MODULE,
            "weight of an adversarial batch classifier on the latent that the encoder is trained "
            "to defeat (0 = none; needs a batch key; changes gradients, not the loss values)",
            0.0,
            low=0,
            needs_batch_key=True,
        ),
        Param(
            "batch_adversary_conditioning",
            str,
            _MODULE,
            "what the batch adversary reads besides the latent: nothing, or each training cell's "
            'cell-type label, so it removes the batch only within cell types ("label" needs a '
            "batch key and labels; unused at weight 0)",
            "none",
            choices=("none", "label"),
            needs_batch_key=True,
            needs_label_key=True,
        ),
        Param(
            "batch_adversary_learning_rate_scale",
            float,
            _MODULE,
            "the batch adversary's learning rate as a multiple of learning_rate (1 = the "
            "shared rate; needs a batch key; unused at weight 0)",
            1.0,
            low=0,
            low_open=True,
            needs_batch_key=True,
        ),
        Param(
            "label_classifier_weight",
            float,
            _MODULE,
            "weight of a training-only linear cell-type classifier on the latent that the "
            "encoder is trained to help (0 = none; needs a batch key and labels; changes "
            "gradients, not the loss values)",
            0.0,
            low=0,
            needs_batch_key=True,
            needs_label_key=True,
        ),
        Param(
            "batch_mmd_weight",
            float,
            _MODULE,
            "weight of a maximum mean discrepancy on the latent between each batch's cells and "
            "the other batches' cells of the same cell type (0 = none; needs a batch key and "
            "labels; changes gradients, not the loss values)",
            0.0,
            low=0,
            needs_batch_key=True,
            needs_label_key=True,
        ),
        Param("learning_rate", float, _TRAIN, "Adam's learning rate", 1e-3, low=0, low_open=True),
        Param("epochs", int, _TRAIN, "most epochs to train", 100, low=1),
        Param("batch_size", int, _TRAIN, "cells per minibatch", 32, low=1),
        Param("kl_weight", float, _TRAIN, "weight of the KL term (1 = the ELBO)", 1.0, low=0),
        Param("kl_warmup_epochs", int, _TRAIN, "epochs the KL weight ramps in over", 0, low=0),
        Param(
            "transform_likelihood",
            str,
            "pair",
            'preprocessing transform and decoder likelihood, "transform/likelihood"',
        ),
    )
}


def names(consumer: Consumer) -> tuple[str, ...]:
    """The parameters `consumer` takes, in declaration order.

    Examples
    --------
    >>> names("train")
    ('learning_rate', 'epochs', 'batch_size', 'kl_weight', 'kl_warmup_epochs')
    """
    return tuple(name for name, p in PARAMS.items() if p.consumer == consumer)


def select(values: Mapping[str, Any], consumer: Consumer) -> dict[str, Any]:
    """The entries of `values` that `consumer` takes."""
    return {name: values[name] for name in names(consumer) if name in values}


def module_values(values: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Every module parameter: checked values from `values`, defaults for the rest.

    Raises an InputError for an unknown key or an invalid value, naming it and `where`.

    Examples
    --------
    >>> module_values({"hidden_dim": 64}, where="example")["activation"]
    'relu'
    """
    unknown = sorted(set(values) - set(names(_MODULE)))
    if unknown:
        raise InputError(
            f"unknown model parameter(s) {', '.join(unknown)}",
            where=where,
            fix=f"use only {', '.join(names(_MODULE))}",
        )
    checked = {name: values.get(name, PARAMS[name].default) for name in names(_MODULE)}
    for name, value in checked.items():
        PARAMS[name].check(value, where=f"{where} {name}")
    return checked


def numpydoc(consumer: Consumer, indent: str = "") -> str:
    """numpydoc "Parameters" entries for `consumer`'s parameters: type, default, valid values."""
    lines = []
    for name in names(consumer):
        p = PARAMS[name]
        lines.append(f"{indent}{name} : {p.kind.__name__}, default {p.default!r}")
        lines.append(f"{indent}    {p.doc}; {p.describe()}.")
    return "\n".join(lines)
