"""Study definitions: a TOML file (the default ships as `melvae/studies/default.toml`) or a dict,
parsed into typed, validated settings."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from melvae import params
from melvae.errors import InputError
from melvae.likelihoods import LIKELIHOODS, check_pair
from melvae.params import PARAMS
from melvae.preprocess import PreprocessConfig
from melvae.study.selection import RULE_OBJECTIVES, RULES, SelectionRule
from melvae.train import TrainConfig

# Inside the package, so an installed wheel finds it (the top-level studies/ holds examples).
DEFAULT_STUDY = Path(__file__).resolve().parents[1] / "studies" / "default.toml"
TRIAL_KEYS = tuple(PARAMS)
# Pruner options that count trials or epochs: whole numbers >= this.
PRUNER_COUNTS = {"n_startup_trials": 0, "n_warmup_steps": 0, "interval_steps": 1, "n_min_trials": 1}
OBJECTIVE_METRICS = {
    "val_loss": "minimize",
    "bio_score": "maximize",
    "silhouette": "maximize",
    "knn_accuracy": "maximize",
    "knn_macro_f1": "maximize",
    "ari": "maximize",
    "nmi": "maximize",
    "recon_corr": "maximize",
    "davies_bouldin": "minimize",
    # With a batch key only: batch mixing (scib-metrics' aggregate) and the overall score.
    "batch_score": "maximize",
    "integration_score": "maximize",
}
BATCH_OBJECTIVES = ("batch_score", "integration_score")


@dataclass(frozen=True)
class SearchParam:
    """One dimension of the search space, as Optuna's `suggest_*` takes it."""

    name: str
    kind: Literal["categorical", "int", "float"]
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False

    def contains(self, value: Any) -> bool:
        """Whether an enqueued value lies inside this dimension (Optuna rejects it otherwise)."""
        if self.kind == "categorical":
            return value in self.choices
        return self.low <= value <= self.high


@dataclass(frozen=True)
class StudyConfig:
    """Everything one study needs: data, preprocessing, model, training, search and budget."""

    name: str
    path: Path
    dataset: str
    fallback: str | None
    label_key: str | None
    preprocess: PreprocessConfig
    likelihood: str
    # The module's parameters (melvae.params, consumer "module"), defaults filled in.
    architecture: dict[str, Any]
    train: TrainConfig
    search: tuple[SearchParam, ...]
    seed_trials: tuple[dict[str, Any], ...]
    sampler: dict[str, Any] = field(default_factory=dict)
    pruner: dict[str, Any] = field(default_factory=dict)
    n_trials: int | None = 20
    timeout: float | None = None
    objectives: tuple[str, ...] = ("val_loss",)
    selection: SelectionRule = field(default_factory=SelectionRule)
    # The obs column naming each cell's batch (patient, sample); None: no batch covariate.
    batch_key: str | None = None
    # What replaces `objectives` and the selection rule when a batch key is set
    # ([objective] batch_metrics, [selection] batch_rule); None: they stay.
    batch_objectives: tuple[str, ...] | None = None
    batch_rule: str | None = None
    # `[batch_search.*]`: dimensions added to `search` when a batch key is set (seed trials take
    # their fixed values there); without a batch key they are not used.
    batch_search: tuple[SearchParam, ...] = ()

    @property
    def objective(self) -> str:
        """The primary objective: the one a single-objective study optimises."""
        return self.objectives[0]

    @property
    def direction(self) -> str:
        return OBJECTIVE_METRICS[self.objective]

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVE_METRICS[name] for name in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def pairs(self) -> list[str]:
        """Every "transform/likelihood" pair a trial of this study may use."""
        pairs = [self.fixed_params()["transform_likelihood"]]
        return pairs + [
            c for p in self.search if p.name == "transform_likelihood" for c in p.choices
        ]

    def transforms(self) -> set[str]:
        """Every preprocessing transform a trial of this study may use."""
        return {split_pair(pair)[0] for pair in self.pairs()}

    def preprocess_for(self, transform: str) -> PreprocessConfig:
        """The study's preprocessing with `transform` (a searched transform/likelihood pair's)."""
        p = self.preprocess
        return replace(p, transform=transform, scale=p.scale and transform == "log1p")

    def with_batch_key(self, batch_key: str) -> StudyConfig:
        """This study conditioned on the batch column `batch_key`, with the objectives and
        selection rule it declares for a batch key (`batch_metrics`, `batch_rule`), and its
        `[batch_search.*]` dimensions added to the search space (each seed trial that does not
        set one takes its fixed value, so the seed trials stay the documented experiments)."""
        rule = self.batch_rule or self.selection.rule
        searched = {param.name for param in self.search}
        added = tuple(param for param in self.batch_search if param.name not in searched)
        fixed = self.fixed_params()
        return replace(
            self,
            batch_key=batch_key,
            objectives=self.batch_objectives or self.objectives,
            selection=replace(self.selection, rule=rule),
            search=self.search + added,
            seed_trials=tuple(
                {**trial, **{p.name: fixed[p.name] for p in added if p.name not in trial}}
                for trial in self.seed_trials
            ),
        )

    def without_label_search(self) -> StudyConfig:
        """This study without the `[batch_search.*]` dimensions that need cell-type labels
        (declared `needs_label_key`): for data without labels, which they cannot use."""
        dropped = {p.name for p in self.batch_search if PARAMS[p.name].needs_label_key}
        return replace(
            self,
            search=tuple(p for p in self.search if p.name not in dropped),
            seed_trials=tuple(
                {k: v for k, v in trial.items() if k not in dropped} for trial in self.seed_trials
            ),
        )

    def needs_batch_key(self) -> list[str]:
        """What in this study needs a batch key: batch objectives, and parameters declared
        `needs_batch_key` that are searched or fixed away from their default."""
        needs = [name for name in self.objectives if name in BATCH_OBJECTIVES]
        return needs + self._changed_params("needs_batch_key")

    def needs_label_key(self) -> list[str]:
        """The parameters declared `needs_label_key` that this study searches or fixes away
        from their default: it needs cell-type labels for them."""
        return self._changed_params("needs_label_key")

    def _changed_params(self, flag: str) -> list[str]:
        """Parameters declared with `flag` that are searched or fixed away from their default."""
        fixed, searched = self.fixed_params(), {param.name for param in self.search}
        return [
            name
            for name, p in PARAMS.items()
            if getattr(p, flag) and (fixed.get(name, p.default) != p.default or name in searched)
        ]

    def fit_only(self) -> StudyConfig:
        """This study without its label objectives: for data that have no cell-type labels."""
        return replace(self, objectives=("val_loss",), selection=SelectionRule(rule="objective"))

    def fixed_params(self) -> dict[str, Any]:
        """Trial parameters used where the search space does not vary them."""
        return {
            **self.architecture,
            **{name: getattr(self.train, name) for name in params.names("train")},
            "transform_likelihood": f"{self.preprocess.transform}/{self.likelihood}",
        }

    def largest(self, name: str) -> Any:
        """The largest value a trial of this study may give the numeric parameter `name`."""
        values = [self.fixed_params()[name]]
        for param in self.search:
            if param.name == name:
                values = list(param.choices) if param.kind == "categorical" else [param.high]
        return max(values)

    def study_name(self, dataset_key: str) -> str:
        """Study (and MLflow experiment) name: carries the dataset so results never mix."""
        return f"{self.name}-{dataset_key}"


def load_study_config(path: Path | str = DEFAULT_STUDY) -> StudyConfig:
    """Read and validate a study TOML file; every mistake is an InputError naming the key.

    Examples
    --------
    >>> load_study_config().objectives
    ('val_loss', 'bio_score')
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            "study file not found",
            where=str(path),
            fix=f"pass --study with a path to a TOML file (see {DEFAULT_STUDY})",
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(
            f"study file is not valid TOML: {exc}", where=str(path), fix="fix the TOML syntax"
        ) from None
    return study_config_from_dict(raw, path)


def study_config_from_dict(raw: dict[str, Any], path: Path | str = "<study dict>") -> StudyConfig:
    """Validate a study given as a dict laid out like a study file (`tomllib.loads` of one).

    Parameters
    ----------
    raw
        The study's tables, e.g. ``{"name": "mine", "data": {"dataset": "pbmc68k_reduced"},
        "search": {...}}``.
    path
        Where it came from, named in error messages (a file, or a label for a dict).

    Returns
    -------
    StudyConfig
        The checked settings; every mistake is an InputError naming its key.

    Examples
    --------
    >>> import tomllib
    >>> raw = tomllib.loads(DEFAULT_STUDY.read_text())
    >>> raw["budget"]["n_trials"] = 5
    >>> study_config_from_dict(raw).n_trials
    5
    """
    path = Path(path)
    reader = _Section(raw, str(path))
    data = reader.section("data")
    model = reader.section("model")
    budget = reader.section("budget")
    objective = reader.section("objective")
    selection = reader.section("selection")
    config = StudyConfig(
        name=reader.get("name", str),
        path=path,
        dataset=data.get("dataset", str),
        fallback=data.get("fallback", str, None),
        label_key=data.get("label_key", str, None),
        preprocess=_dataclass_from(PreprocessConfig, reader.section("preprocess")),
        likelihood=model.get("likelihood", str, "bernoulli"),
        architecture=params.module_values(
            {name: model.get(name, object) for name in params.names("module") if name in model},
            where=model.where,
        ),
        train=_dataclass_from(TrainConfig, reader.section("train")),
        search=tuple(_search_param(name, spec, reader) for name, spec in reader.table("search")),
        batch_search=tuple(
            _search_param(name, spec, reader, "batch_search")
            for name, spec in reader.table("batch_search")
        ),
        seed_trials=tuple(reader.list_of_tables("seed_trials")),
        sampler=dict(reader.section("sampler").values),
        pruner=dict(reader.section("pruner").values),
        n_trials=budget.get("n_trials", int, 20),
        timeout=budget.get("timeout", (int, float), None),
        objectives=_objectives(objective),
        selection=SelectionRule(
            rule=selection.get("rule", str, "objective"),
            loss_tolerance=selection.get("loss_tolerance", (int, float), 0.02),
        ),
        batch_objectives=_objectives(objective, "batch_metrics"),
        batch_rule=selection.get("batch_rule", str, None),
    )
    batch_key = data.get("batch_key", str, None)
    for section in (data, model, budget, objective, selection):
        section.reject_unknown()
    reader.reject_unknown()
    _check_budget_and_ranges(config)
    _check_consistency(config)
    return config if batch_key is None else config.with_batch_key(batch_key)


def _check_budget_and_ranges(config: StudyConfig) -> None:
    """Budgets > 0 and pruner counts whole numbers in range, each with its key named."""
    where = str(config.path)
    for key, value in (("n_trials", config.n_trials), ("timeout", config.timeout)):
        if value is not None and value <= 0:
            raise InputError(
                f"{key} = {value} runs nothing: it must be > 0",
                where=f"{where} [budget] {key}",
                fix=f"give a positive {key}, or remove it for the default",
            )
    for key, low in PRUNER_COUNTS.items():
        value = config.pruner.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(
                f"{key} = {value!r} is not valid: it must be a whole number >= {low}",
                where=f"{where} [pruner] {key}",
                fix=f"give {key} an integer >= {low}",
            )


def split_pair(pair: str) -> tuple[str, str]:
    """ "minmax/bernoulli" -> ("minmax", "bernoulli"): a transform and the likelihood it feeds."""
    transform, _, likelihood = str(pair).partition("/")
    return transform, likelihood


def _objectives(section: _Section, batch_key: str | None = None) -> tuple[str, ...] | None:
    """`metric = "x"` (one objective) or `metrics = ["x", "y"]` (a Pareto front), not both.

    With `batch_key` (e.g. "batch_metrics"): that list, the objectives of the study with a
    batch key, or None where it is not set.
    """
    if batch_key is not None:
        several = section.get(batch_key, list, None)
        if several is not None and (not several or len(set(several)) != len(several)):
            raise InputError(
                f"{batch_key} must be distinct and non-empty, got {several!r}",
                where=section.where,
                fix=f'e.g. {batch_key} = ["val_loss", "bio_score", "batch_score"]',
            )
        return None if several is None else tuple(several)
    single = section.get("metric", str, None)
    several = section.get("metrics", list, None)
    if single is not None and several is not None:
        raise InputError(
            "both metric and metrics are set",
            where=section.where,
            fix='keep one: metric = "val_loss" or metrics = ["val_loss", "bio_score"]',
        )
    if several is not None:
        if not several or len(set(several)) != len(several):
            raise InputError(
                f"metrics must be distinct and non-empty, got {several!r}",
                where=section.where,
                fix='e.g. metrics = ["val_loss", "bio_score"]',
            )
        return tuple(several)
    return (single or "val_loss",)


def _check_selection(config: StudyConfig) -> None:
    where = f"{config.path} [selection]"
    rule = config.selection
    pairs = [("rule", rule.rule, "metrics", config.objectives)]
    if config.batch_rule is not None or config.batch_objectives is not None:
        batch_rule = config.batch_rule or rule.rule
        pairs.append(
            (
                "batch_rule",
                batch_rule,
                "batch_metrics",
                config.batch_objectives or config.objectives,
            )
        )
    for key, name, metrics_key, objectives in pairs:
        if name not in RULES:
            raise InputError(
                f"unknown selection rule {key} = {name!r}",
                where=where,
                fix=f"use one of {', '.join(RULES)}",
            )
        needed = RULE_OBJECTIVES.get(name, ())
        if objectives[: len(needed)] != needed:
            raise InputError(
                f"{key} {name} needs {metrics_key} = {list(needed)}, got {list(objectives)}",
                where=where,
                fix=f'set [objective] {metrics_key} = {list(needed)}, or {key} = "objective"',
            )
    if not rule.loss_tolerance >= 0:
        raise InputError(
            f"loss_tolerance must be >= 0, got {rule.loss_tolerance}",
            where=where,
            fix="give a relative tolerance such as 0.02 (2 %)",
        )


def _check_batch_search(config: StudyConfig) -> None:
    """`[batch_search.*]` dimensions are not also in `[search]`, and hold the fixed value the
    seed trials take there."""
    searched = {param.name for param in config.search}
    fixed = config.fixed_params()
    for param in config.batch_search:
        where = f"{config.path} [batch_search.{param.name}]"
        if param.name in searched:
            raise InputError(
                f"{param.name} is searched in both [search] and [batch_search]",
                where=where,
                fix="keep one: [batch_search] searches it only with a batch key",
            )
        if config.seed_trials and not param.contains(fixed[param.name]):
            raise InputError(
                f"the seed trials run with {param.name} = {fixed[param.name]!r}, which lies "
                "outside this dimension",
                where=where,
                fix=f"include {fixed[param.name]!r} in it",
            )


def _check_architecture(config: StudyConfig) -> None:
    where = str(config.path)
    conditioning = {config.architecture["batch_conditioning"]} | {
        c for p in config.search if p.name == "batch_conditioning" for c in p.choices
    }
    if conditioning != {"decoder"}:
        raise InputError(
            'a study\'s models condition the decoder only (batch_conditioning = "decoder"): '
            "its registered model is served from gene columns alone, and a conditioned "
            "encoder would need each cell's batch there",
            where=f"{where} [model]/[search] batch_conditioning",
            fix='remove batch_conditioning (or set it to "decoder"); MelVAE.fit takes '
            '"encoder_decoder" for a model of your own',
        )
    for pair in config.pairs():
        transform, likelihood = split_pair(pair)
        check_pair(
            likelihood,
            transform,
            where=f"{where} [search.transform_likelihood] or [preprocess]/[model]: {pair!r}",
        )


def _check_consistency(config: StudyConfig) -> None:
    where = str(config.path)
    if config.likelihood not in LIKELIHOODS:
        raise InputError(
            f"unknown likelihood {config.likelihood!r}",
            where=f"{where} [model] likelihood",
            fix=f"use one of {', '.join(LIKELIHOODS)}",
        )
    for name in config.objectives + (config.batch_objectives or ()):
        if name in OBJECTIVE_METRICS:
            continue
        raise InputError(
            f"unknown objective metric {name!r}",
            where=f"{where} [objective] metric",
            fix=f"use one of {', '.join(OBJECTIVE_METRICS)}",
        )
    _check_selection(config)
    _check_architecture(config)
    _check_batch_search(config)
    searched = {param.name: param for param in config.search}
    fixed = config.fixed_params()
    for index, trial in enumerate(config.seed_trials):
        place = f"{where} [[seed_trials]] #{index + 1}"
        for key, value in trial.items():
            if key in PARAMS:
                PARAMS[key].check(value, where=f"{place} {key}")
            if key in searched:
                if not searched[key].contains(value):
                    raise InputError(
                        f"seed trial value {key}={value!r} lies outside the search space",
                        where=place,
                        fix=f"widen [search.{key}] so that it includes {value!r}",
                    )
            elif key in fixed:
                if fixed[key] != value:
                    raise InputError(
                        f"seed trial sets {key}={value!r} but {key} is neither searched nor "
                        f"equal to its fixed value {fixed[key]!r}",
                        where=place,
                        fix=f"add [search.{key}] or set {key} = {value!r} in [model]/[train]",
                    )
            else:
                raise InputError(
                    f"unknown seed-trial parameter {key!r}",
                    where=place,
                    fix=f"use only {', '.join(TRIAL_KEYS)}",
                )
        missing = [p for p in searched if p not in trial]
        if missing:
            raise InputError(
                f"seed trial does not set searched parameter(s) {', '.join(missing)}",
                where=place,
                fix="give every searched parameter a value so the trial is reproduced exactly",
            )


def _search_param(name: str, spec: Any, reader: _Section, table: str = "search") -> SearchParam:
    """One `[search.<name>]` (or `[batch_search.<name>]`) table, every value checked against the
    parameter's declaration."""
    where = f"{reader.where} [{table}.{name}]"
    if name not in PARAMS:
        raise InputError(
            f"cannot search {name!r}", where=where, fix=f"search only {', '.join(TRIAL_KEYS)}"
        )
    declared = PARAMS[name]
    section = _Section(spec, where)
    kind = section.get("type", str)
    if kind == "categorical":
        param = SearchParam(name, "categorical", choices=tuple(section.get("choices", list)))
        if not param.choices:
            raise InputError("choices is empty", where=where, fix="list at least one value")
        bounds = param.choices
    elif kind in ("int", "float"):
        if kind != declared.kind.__name__:
            raise InputError(
                f"{name} takes {declared.kind.__name__} values, so it cannot be a {kind} range",
                where=where,
                fix='use type = "categorical" with choices'
                + ("" if declared.kind is str else f' or type = "{declared.kind.__name__}"'),
            )
        number = int if kind == "int" else (int, float)
        param = SearchParam(
            name,
            kind,
            low=section.get("low", number),
            high=section.get("high", number),
            log=section.get("log", bool, False),
        )
        if param.low > param.high:
            raise InputError(
                f"low = {param.low} is above high = {param.high}",
                where=where,
                fix="swap them, or set low <= high",
            )
        if param.log and param.low <= 0:
            raise InputError(
                f"a log-scale range needs low > 0, got {param.low}",
                where=where,
                fix="raise low above 0, or set log = false",
            )
        bounds = (param.low, param.high)
    else:
        raise InputError(
            f"unknown search type {kind!r}", where=where, fix="use categorical, int or float"
        )
    section.reject_unknown()
    for value in bounds:
        declared.check(value, where=where)
    return param


# A dataclass field's annotation -> the TOML types its value may have.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "int | None": int,
    "float": (int, float),
    "bool": bool,
    "str": str,
}


def _dataclass_from(cls: type, section: _Section) -> Any:
    """`cls(**section)`, each value type-checked first and declared parameters range-checked."""
    names = {f.name for f in fields(cls)}
    unknown = set(section.values) - names
    if unknown:
        raise InputError(
            f"unknown setting(s) {', '.join(sorted(unknown))}",
            where=section.where,
            fix=f"use only {', '.join(sorted(names))}",
        )
    for f in fields(cls):
        if f.name not in section.values:
            continue
        value = section.values[f.name]
        if f.name in PARAMS:
            PARAMS[f.name].check(value, where=f"{section.where} {f.name}")
        kind = _FIELD_TYPES.get(str(f.type))
        if kind is not None and (
            not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)
        ):
            raise InputError(
                f"{f.name} = {value!r} has the wrong type ({type(value).__name__})",
                where=f"{section.where} {f.name}",
                fix=f"give {f.name} a value of type {f.type}",
            )
    try:
        return cls(**section.values)
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc), where=section.where, fix="correct the value") from None


_MISSING = object()


class _Section:
    """A TOML table read key by key, so unknown keys and wrong types are reported precisely."""

    def __init__(self, values: Any, where: str) -> None:
        if not isinstance(values, dict):
            raise InputError("expected a table", where=where, fix=f"see {DEFAULT_STUDY}")
        self.values = values
        self.where = where
        self.seen: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        self.seen.add(key)
        if key not in self.values:
            if default is _MISSING:
                raise InputError(
                    f"missing setting {key!r}", where=self.where, fix=f"add {key} = ..."
                )
            return default
        value = self.values[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise InputError(
                f"setting {key!r} has the wrong type ({type(value).__name__})",
                where=self.where,
                fix=f"give {key} a value of type {kind}",
            )
        return value

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def section(self, key: str) -> _Section:
        return _Section(self.get(key, dict, {}), f"{self.where} [{key}]")

    def table(self, key: str) -> list[tuple[str, Any]]:
        return list(self.get(key, dict, {}).items())

    def list_of_tables(self, key: str) -> list[dict[str, Any]]:
        return list(self.get(key, list, []))

    def reject_unknown(self) -> None:
        unknown = set(self.values) - self.seen
        if unknown:
            raise InputError(
                f"unknown setting(s) {', '.join(sorted(unknown))}",
                where=self.where,
                fix=f"remove them or check their spelling against {DEFAULT_STUDY}",
            )
