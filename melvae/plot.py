"""Matplotlib figures for a trained model: loss curves and a t-SNE of the latent space.

Functions return `matplotlib.figure.Figure` objects built without pyplot, so no backend or global
figure state is involved; callers save or log them (`fig.savefig`, `mlflow.log_figure`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter
from numpy.typing import ArrayLike
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from melvae.errors import InputError
from melvae.metrics import clean_labels
from melvae.subsample import stratified_subsample

UNLABELLED = "(no label)"
# Threads of the OpenMP and BLAS pools while t-SNE runs (see `tsne_coordinates`).
TSNE_THREADS = 1


class LossHistory(Protocol):
    """What `loss_curves` reads from a training history (e.g. `melvae.train.History`).

    The lists hold one value per epoch; `best_epoch` indexes them (0-based).
    """

    train_loss: Sequence[float]
    val_loss: Sequence[float]
    train_recon: Sequence[float]
    train_kl: Sequence[float]
    val_recon: Sequence[float]
    val_kl: Sequence[float]
    best_epoch: int


def _log_scale_if_wide(ax: Axes, values: np.ndarray) -> None:
    """Use a log y axis when positive values span more than a factor of 5, so the late epochs that
    decide early stopping are not flattened by the first ones."""
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 5:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter())  # plain numbers, not powers of ten
        ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.4)))


# The loss figure's panel margins (fractions of its 12 × 3.6 inches); the legend sits above.
_LOSS_MARGINS = {"left": 0.075, "right": 0.99, "bottom": 0.14, "top": 0.8, "wspace": 0.34}


def loss_curves(history: LossHistory) -> Figure:
    """Train and validation loss per epoch in three panels (total, reconstruction, KL), with the
    best (restored) epoch marked, to judge convergence and over-fitting at a glance."""
    panels = [
        ("total loss", history.train_loss, history.val_loss),
        ("reconstruction loss", history.train_recon, history.val_recon),
        ("KL divergence", history.train_kl, history.val_kl),
    ]
    if not len(history.train_loss):
        raise InputError(
            "the training history has no epochs",
            where="loss_curves",
            fix="train for at least one epoch before plotting",
        )
    best = history.best_epoch + 1  # epochs are shown 1-based
    # Fixed margins rather than a layout engine: with one, saving draws the figure twice, and
    # this figure (one per trial) took 0.45 s to save that way, 0.2 s so (bench/study_overheads).
    # They leave room for 6-character tick labels beside each panel's y label.
    fig = Figure(figsize=(12, 3.6))
    fig.subplots_adjust(**_LOSS_MARGINS)
    axes = fig.subplots(1, 3, sharex=True)
    for ax, (name, train, val) in zip(axes, panels, strict=True):
        train_v = np.asarray(train, dtype=float)
        val_v = np.asarray(val, dtype=float)
        ax.plot(np.arange(1, train_v.size + 1), train_v, color="tab:blue", label="train")
        ax.plot(np.arange(1, val_v.size + 1), val_v, color="tab:orange", label="validation")
        ax.axvline(best, color="0.4", linestyle="--", linewidth=1, label=f"best epoch ({best})")
        _log_scale_if_wide(ax, np.concatenate([train_v, val_v]))
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{name} per cell")
        ax.grid(alpha=0.3)
    fig.legend(handles=axes[0].lines, loc="upper center", ncols=3, frameon=False)
    return fig


def tsne_coordinates(latent: ArrayLike, *, seed: int = 0) -> np.ndarray:
    """2-D t-SNE coordinates (cells × 2) of a latent matrix; deterministic for a seed.

    Perplexity is 30, capped below n_cells / 3 so small sets still embed. It runs in one thread
    (`TSNE_THREADS`): a study's t-SNE of its validation cells took 0.5 s wall in one thread and
    2.4-8.5 s in OpenMP's default two on this 2-core machine shared with other jobs (105 cells),
    and `run` already spends the cores on parallel trials.
    """
    x = np.asarray(latent, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or not np.isfinite(x).all():
        raise InputError(
            f"t-SNE needs a finite cells × dimensions matrix of 2 or more cells, got {x.shape}",
            where="tsne_coordinates",
            fix="pass the latent means of at least two cells (NaN means the model diverged)",
        )
    perplexity = min(30.0, max(1.0, (x.shape[0] - 1) / 3))
    init = "pca" if min(x.shape) >= 2 else "random"  # PCA init needs two components
    tsne = TSNE(n_components=2, perplexity=perplexity, init=init, random_state=seed)
    with threadpool_limits(limits=TSNE_THREADS):
        return tsne.fit_transform(x)


def palette(n: int) -> list:
    """n distinct colours without grey (grey marks unlabelled cells): tab20's nine dark colours
    (= tab10), then its nine light ones, then evenly spaced turbo beyond 18 classes."""
    tab20 = colormaps["tab20"]
    colours = [tab20(i) for i in [*range(0, 20, 2), *range(1, 20, 2)] if i not in (14, 15)]
    if n <= len(colours):
        return colours[:n]
    return [colormaps["turbo"](v) for v in np.linspace(0.05, 0.95, n)]


def tsne_embedding(
    latent: ArrayLike,
    labels: ArrayLike | None,
    *,
    title: str,
    max_cells: int = 3000,
    seed: int = 0,
) -> Figure:
    """t-SNE scatter of the latent space coloured by cell type, to see whether types separate.

    Above max_cells a stratified subsample is drawn (every type keeps its share). Cells with a
    missing label are drawn in grey as "(no label)"; labels None gives a single colour.
    """
    x = np.asarray(latent, dtype=np.float64)
    if labels is None:
        names = np.full(x.shape[0], "cells", dtype=object)
    else:
        names, present = clean_labels(labels)
        names = np.where(present, names, UNLABELLED).astype(object)
        if names.size != x.shape[0]:
            raise InputError(
                f"{names.size} labels for a latent with {x.shape[0]} cells",
                where="tsne_embedding",
                fix="pass one label per cell, in the latent's row order",
            )
    if max_cells < 2:
        raise InputError(
            f"max_cells must be at least 2, got {max_cells}",
            where="tsne_embedding",
            fix="pass max_cells >= 2",
        )
    keep = stratified_subsample(names, max_cells, seed)
    coords = tsne_coordinates(x[keep], seed=seed)
    names = names[keep]

    classes, counts = np.unique(names, return_counts=True)
    typed = [c for c in classes if c != UNLABELLED]
    colours = dict(zip(typed, palette(len(typed)), strict=True))
    colours[UNLABELLED] = (0.75, 0.75, 0.75, 1.0)

    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    # random drawing order so no type hides under another; unlabelled cells go underneath
    order = np.random.default_rng(seed).permutation(names.size)
    order = order[np.argsort(names[order] != UNLABELLED, kind="stable")]
    size = float(np.clip(3000 / names.size, 2, 20))
    ax.scatter(
        coords[order, 0],
        coords[order, 1],
        c=[colours[n] for n in names[order]],
        s=size,
        linewidths=0,
        alpha=0.8,
        rasterized=True,
    )
    shown = f" ({names.size} of {x.shape[0]} cells)" if names.size < x.shape[0] else ""
    ax.set_title(title + shown)
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_xticks([])
    ax.set_yticks([])
    if labels is not None:
        count = dict(zip(classes, counts, strict=True))
        handles = [
            Line2D([], [], marker="o", linestyle="", color=colours[c], label=f"{c} ({count[c]})")
            for c in [*typed, UNLABELLED]
            if c in count
        ]
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.01, 1),
            frameon=False,
            title="cell type (cells shown)",
            ncols=1 if len(handles) <= 25 else 2,
        )
    return fig
