"""The study report: one self-contained HTML page (and a PNG of its main figure) per study.

What a person judges a study by, on one page: every completed trial's t-SNE in a grid ordered by
the selection score and labelled with its settings and scores (the main figure, also saved as a
PNG); the Pareto front with the champion and the baselines marked; optimisation history and
parameter importance for each objective; and the champion vs baselines table on the held-out
test split. `run` rewrites it on its parent run at the end (`log_report`, artifacts
`report.html` and `report.png`); `python -m melvae.study report` writes the same page for any
study (`write_report`). Everything it shows is read back from Optuna storage and MLflow, so the
page is the same whoever builds it.
"""

from __future__ import annotations

import base64
import html
import io
import math
import tempfile
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.image
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure

from melvae import track
from melvae.errors import InputError
from melvae.register import quiet_mlflow
from melvae.study.baselines import LOWER_IS_BETTER
from melvae.study.config import OBJECTIVE_METRICS, StudyConfig
from melvae.study.pruning import CURVE_ATTR
from melvae.study.selection import completed_with_model, pareto_front

_GRID_COLUMNS = 4
# The grid's caption lines (7 pt) hold this many characters within a panel's 4.2 inches; the
# space a panel's title (name and two caption lines) and the figure's title take above it.
_CAPTION_CHARACTERS = 70
_TITLE_INCHES = 0.45
_SUPTITLE_INCHES = 0.35
_LEGACY_TSNE = "plots/tsne.png"  # where melvae logged the t-SNE before it moved to the root


@dataclass(frozen=True)
class Panel:
    """One completed trial in the grid: its t-SNE image (PNG bytes) and caption."""

    trial: int
    title: str
    caption: str
    png: bytes | None
    champion: bool


@dataclass(frozen=True)
class Report:
    """The page and its main figure, ready to write or log."""

    html: str
    figure_png: bytes
    panels: tuple[Panel, ...]
    note: str  # a few lines of Markdown for the parent run's description


def _format(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _ranked(
    trials: Sequence[optuna.trial.FrozenTrial], config: StudyConfig
) -> list[optuna.trial.FrozenTrial]:
    """Trials best first by the selection score (the rule's ranked metric)."""
    metric = config.selection.ranked_metric(config.objectives)
    sign = -1 if OBJECTIVE_METRICS[metric] == "maximize" else 1

    def key(trial: optuna.trial.FrozenTrial) -> tuple[float, int]:
        if metric in config.objectives:
            value = trial.values[config.objectives.index(metric)]
        else:
            value = trial.user_attrs.get(metric, math.nan)
        return (sign * value if math.isfinite(value) else math.inf, trial.number)

    return sorted(trials, key=key)


def _panels(
    trials: Sequence[optuna.trial.FrozenTrial],
    config: StudyConfig,
    champion: optuna.trial.FrozenTrial | None,
) -> list[Panel]:
    panels = []
    with tempfile.TemporaryDirectory() as tmp, quiet_mlflow():
        for trial in _ranked(trials, config):
            scores = ", ".join(
                f"{name} {_format(value)}"
                for name, value in zip(config.objectives, trial.values, strict=True)
            )
            epochs = len(trial.user_attrs.get(CURVE_ATTR, ())) or trial.params.get("epochs")
            is_champion = champion is not None and trial.number == champion.number
            settings = track.describe_settings(trial.params)
            panels.append(
                Panel(
                    trial=trial.number,
                    title=f"trial {trial.number}" + (" (champion)" if is_champion else ""),
                    caption=f"{settings}, {epochs} epochs run; {scores}",
                    png=_trial_tsne(trial.user_attrs.get("mlflow_run_id"), Path(tmp)),
                    champion=is_champion,
                )
            )
    return panels


def _trial_tsne(run_id: str | None, folder: Path) -> bytes | None:
    """The trial run's t-SNE PNG, or None if the run or its figure is gone."""
    if run_id is None:
        return None
    for name in (track.TSNE_FILE, _LEGACY_TSNE):
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=name, dst_path=str(folder / run_id)
            )
        except (mlflow.exceptions.MlflowException, OSError):
            continue
        return Path(path).read_bytes()
    return None


def tsne_grid(panels: Sequence[Panel]) -> Figure:
    """The main figure: the trials' t-SNEs in a grid, best selection score first."""
    columns = min(_GRID_COLUMNS, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    # Fixed margins, no layout engine: with one, saving draws the grid twice (it was 1.1 s of
    # the report's 2.8 s; bench/study_overheads.py). Each panel is 4.2 x 3.6 inches, its three
    # title lines above it.
    width, height = 4.2 * columns, 3.6 * rows
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(
        left=0.1 / width,
        right=1 - 0.1 / width,
        bottom=0.1 / height,
        top=1 - (_SUPTITLE_INCHES + _TITLE_INCHES) / height,
        wspace=0.05,
        hspace=_TITLE_INCHES / (3.6 - _TITLE_INCHES),
    )
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, panel in zip(axes, panels, strict=False):
        if panel.png is not None:
            ax.imshow(matplotlib.image.imread(io.BytesIO(panel.png), format="png"))
        else:
            ax.text(0.5, 0.5, "t-SNE not logged", ha="center", va="center")
        colour = "tab:red" if panel.champion else "black"
        caption = "\n".join(textwrap.wrap(panel.caption, _CAPTION_CHARACTERS))
        ax.set_title(f"{panel.title}\n{caption}", fontsize=7, color=colour)
    if not panels:
        axes[0].text(0.5, 0.5, "no completed trial yet", ha="center", va="center")
    fig.suptitle("completed trials, best selection score first", y=1 - 0.08 / height, va="top")
    return fig


def pareto_figure(
    trials: Sequence[optuna.trial.FrozenTrial],
    config: StudyConfig,
    champion: optuna.trial.FrozenTrial | None,
    baselines: pd.DataFrame,
) -> Figure:
    """The first two objectives of every completed trial, the front joined, the champion starred
    and each baseline's score on the second objective as a dashed line (PCA has no ELBO)."""
    x_name, y_name = config.objectives[:2]
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.add_subplot()
    values = np.array([t.values[:2] for t in trials], dtype=float).reshape(-1, 2)
    ax.scatter(values[:, 0], values[:, 1], color="0.6", s=25, label="trial")
    front = sorted(pareto_front(trials, config.directions), key=lambda t: t.values[0])
    if front:
        points = np.array([t.values[:2] for t in front], dtype=float)
        ax.plot(points[:, 0], points[:, 1], "o-", color="tab:blue", label="Pareto front")
    for trial in trials:
        ax.annotate(str(trial.number), trial.values[:2], fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    if champion is not None:
        ax.scatter(*champion.values[:2], marker="*", s=300, color="tab:red", zorder=5,
                   label=f"champion (trial {champion.number})")  # fmt: skip
    metric = f"metrics.{y_name}"
    if metric in baselines.columns:
        for (name, value), colour in zip(
            baselines[metric].dropna().items(), ("tab:green", "tab:purple", "tab:brown",
                                                 "tab:olive", "tab:cyan", "tab:pink"),
            strict=False,
        ):  # fmt: skip
            ax.axhline(value, linestyle="--", linewidth=1, color=colour, label=f"baseline {name}")
    ax.set_xlabel(f"{x_name} ({OBJECTIVE_METRICS[x_name]})")
    ax.set_ylabel(f"{y_name} ({OBJECTIVE_METRICS[y_name]})")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    ax.set_title("Pareto front")
    return fig


def _study_figures(study: optuna.Study, config: StudyConfig) -> list[tuple[str, Figure]]:
    """Optimisation history and parameter importance for each objective."""
    from optuna.visualization import matplotlib as optuna_plots

    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    distinct = len({tuple(sorted(t.params.items())) for t in complete})
    figures = []
    with warnings.catch_warnings():  # Optuna flags its matplotlib backend as experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # ... and says its importances are for a low target, which the sign below ensures.
        warnings.filterwarnings("ignore", "PedAnovaImportanceEvaluator computes", UserWarning)
        for i, name in enumerate(config.objectives):
            history = optuna_plots.plot_optimization_history(
                study, target=lambda t, i=i: t.values[i], target_name=name
            ).figure
            figures.append((f"optimisation history: {name}", history))
            if distinct >= 2:
                # Optuna's evaluator ranks parameters by how they lower the target.
                sign = -1.0 if OBJECTIVE_METRICS[name] == "maximize" else 1.0
                importance = optuna_plots.plot_param_importances(
                    study, target=lambda t, i=i, s=sign: s * t.values[i], target_name=name
                ).figure
                figures.append((f"parameter importance for {name}", importance))
    return figures


def _png(figure: Figure, *, laid_out: bool = False) -> bytes:
    """The figure as PNG bytes. A figure laid out by its own engine (constrained) or by fixed
    margins (`laid_out`, the t-SNE grid) is saved as laid out; others (Optuna's) with
    `bbox_inches="tight"`, which renders them twice."""
    buffer = io.BytesIO()
    fixed = laid_out or figure.get_layout_engine() is not None
    figure.savefig(buffer, format="png", dpi=110, bbox_inches=None if fixed else "tight")
    plt.close(figure)
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def baseline_runs(parent_run_id: str | None) -> pd.DataFrame:
    """The baseline runs nested under `parent_run_id`, indexed by baseline name."""
    if parent_run_id is None:
        return pd.DataFrame()
    experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
    runs = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.baseline = 'true'",
        output_format="pandas",
    )
    if runs.empty:
        return runs
    names = runs["tags.mlflow.runName"].str.removeprefix("baseline-")
    return runs.set_index(names).sort_index()


def comparison(parent_run_id: str | None, baselines: pd.DataFrame) -> pd.DataFrame:
    """Champion (the parent's test_* metrics), each baseline, and the margin row."""
    if parent_run_id is None or baselines.empty:
        return pd.DataFrame()
    metrics = mlflow.get_run(parent_run_id).data.metrics
    names = sorted(k for k in metrics if k.startswith("test_"))
    rows = {"champion": {n: metrics[n] for n in names}}
    for name, run in baselines.iterrows():
        rows[name] = {n: run.get(f"metrics.{n}", math.nan) for n in names}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.loc["margin (champion - best baseline)"] = {
        n: metrics.get(f"margin_{n}", math.nan) for n in names
    }
    return table


def latest_parent_run(experiment_id: str) -> str | None:
    """The most recent `run` of this experiment that chose a champion."""
    runs = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.{track.ROLE} = '{track.PARENT_ROLE}' and tags.best_trial LIKE '%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="pandas",
    )
    return None if runs.empty else str(runs["run_id"].iloc[0])


def study_report(
    study: optuna.Study,
    config: StudyConfig,
    champion: optuna.trial.FrozenTrial | None,
    *,
    parent_run_id: str | None,
) -> Report:
    """Build the report of `study` from its storage and the MLflow runs of `parent_run_id`
    (the `run` whose baselines and test metrics it shows; None: trials only)."""
    trials = completed_with_model(study)
    baselines = baseline_runs(parent_run_id)
    panels = _panels(trials, config, champion)
    grid_png = _png(tsne_grid(panels), laid_out=True)
    figures = []
    if config.multi_objective and trials:
        figures.append(("Pareto front", _png(pareto_figure(trials, config, champion, baselines))))
    if trials:
        with matplotlib.rc_context():  # Optuna's plots set the ggplot style process-wide
            figures += [(title, _png(figure)) for title, figure in _study_figures(study, config)]
    table = comparison(parent_run_id, baselines)
    page = _page(study, config, champion, panels, figures, table)
    return Report(
        html=page,
        figure_png=grid_png,
        panels=tuple(panels),
        note=_note(config, champion, table),
    )


def champion_line(config: StudyConfig, champion: optuna.trial.FrozenTrial) -> str:
    """`trial 4 (hidden 64 × 2, latent 5, lr 1.9e-03): val_loss 302.9, bio_score 0.648`."""
    values = ", ".join(
        f"{n} {_format(v)}" for n, v in zip(config.objectives, champion.values, strict=True)
    )
    return f"trial {champion.number} ({track.describe_settings(champion.params)}): {values}"


def _note(
    config: StudyConfig, champion: optuna.trial.FrozenTrial | None, table: pd.DataFrame
) -> str:
    if champion is None:
        return "No trial completed in this run."
    lines = [
        f"**Champion**: {champion_line(config, champion)}",
        f"chosen by: {config.selection.describe(config.objectives)}.",
    ]
    if not table.empty:
        margins = table.iloc[-1].dropna()
        lines.append(
            "Margin over the best baseline on the test split (positive: champion better): "
            + ", ".join(f"{n} {v:+.3f}" for n, v in margins.items())
        )
    lines.append(f"The study report, every trial's t-SNE side by side: `{track.REPORT_FILE}`.")
    return "\n\n".join(lines)


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 1em; }
figure { margin: 0; border: 1px solid #ddd; padding: 0.5em; }
figure.champion { border: 3px solid #d62728; }
figure img, .figures img { max-width: 100%; }
figcaption { font-size: 0.85em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
"""


def _page(
    study: optuna.Study,
    config: StudyConfig,
    champion: optuna.trial.FrozenTrial | None,
    panels: Sequence[Panel],
    figures: Sequence[tuple[str, bytes]],
    table: pd.DataFrame,
) -> str:
    name = html.escape(study.study_name)
    rule = html.escape(config.selection.describe(config.objectives))
    if champion is None:
        summary = "<p>No trial has completed yet.</p>"
    else:
        line = html.escape(champion_line(config, champion))
        summary = f"<p><b>Champion</b>: {line}; chosen by: {rule}.</p>"
    cells = []
    for panel in panels:
        image = _img(panel.png, panel.title) if panel.png else "<p>t-SNE not logged</p>"
        css = ' class="champion"' if panel.champion else ""
        cells.append(
            f'<figure{css} data-trial="{panel.trial}">{image}<figcaption><b>'
            f"{html.escape(panel.title)}</b>: {html.escape(panel.caption)}</figcaption></figure>"
        )
    plots = "".join(f"<h3>{html.escape(t)}</h3>{_img(png, t)}" for t, png in figures)
    if table.empty:
        comparison_html = "<p>No baselines were scored for this run.</p>"
    else:
        comparison_html = table.to_html(float_format=lambda v: f"{v:.3f}", na_rep="")
    lower = ", ".join(sorted(f"test_{m}" for m in LOWER_IS_BETTER))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>melvae study report: {name}</title>
<style>{_STYLE}</style></head><body>
<h1>Study {name}</h1>
{summary}
<p>{len(panels)} completed trials of {len(study.trials)} in storage.</p>
<h2>Latent spaces (t-SNE of the validation cells), best selection score first</h2>
<div class="grid">{"".join(cells)}</div>
<h2>Champion vs baselines, held-out test split</h2>
<p>Positive margin: the champion is better ({lower}: lower is better, the margin is signed so).</p>
{comparison_html}
<h2>The search</h2>
<div class="figures">{plots}</div>
</body></html>
"""


def log_report(report: Report) -> None:
    """Put the report on the active (parent) run at the artifact root, replacing its own copy,
    and its summary in the run's description."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / track.REPORT_FILE).write_text(report.html, encoding="utf-8")
        (folder / track.REPORT_FIGURE).write_bytes(report.figure_png)
        track.log_file(folder / track.REPORT_FILE)
        track.log_file(folder / track.REPORT_FIGURE)
    track.log_tags({track.NOTE_TAG: report.note})


def write_report(report: Report, path: Path) -> tuple[Path, Path]:
    """Write the page to `path` and its main figure beside it (`<stem>.png`); refuses to replace
    either file. Returns both paths."""
    figure = path.with_suffix(".png")
    for target in (path, figure):
        if target.exists():
            raise InputError(
                f"{target} already exists",
                where=str(target),
                fix="pass another --out, or move the old report away",
            )
    if not path.parent.is_dir():
        raise InputError(
            f"folder {path.parent} does not exist", where=str(path), fix="create it first"
        )
    path.write_text(report.html, encoding="utf-8")
    figure.write_bytes(report.figure_png)
    return path, figure
