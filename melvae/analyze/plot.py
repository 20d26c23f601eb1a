"""Figures for the downstream analysis: transfer confusion matrix, latent-gene heatmap,
enrichment dot plot and t-SNE panels.

Like `melvae.plot`, every function returns a `matplotlib.figure.Figure` built without pyplot (no
global state, nothing shown); callers save or log it. t-SNE coordinates come from
`melvae.plot.tsne_coordinates`, and categorical colours from the same palette as
`melvae.plot.tsne_embedding`, so a cell type keeps its colour across figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from numpy.typing import ArrayLike

from melvae.analyze.transfer import UNASSIGNED
from melvae.errors import InputError
from melvae.metrics import clean_labels
from melvae.plot import UNLABELLED, palette

ENRICHMENT_COLUMNS = ("query", "library", "term", "overlap", "p", "fdr")
SIGNIFICANT = 0.05
COLOUR_CAP = 10.0  # -log10 FDR at which the dot plot's colour scale saturates
UNASSIGNED_COLOUR = (0.55, 0.55, 0.55, 1.0)
UNLABELLED_COLOUR = (0.82, 0.82, 0.82, 1.0)


def confusion_matrix(true: ArrayLike, predicted: ArrayLike, *, classes: Sequence[str]) -> Figure:
    """Row-normalised confusion matrix of a label transfer, with the cell counts written in.

    Rows are the query's true labels: the reference `classes` present in the query, then labels
    the reference lacks (e.g. "Neg.cell", below a line) whose ideal column is `UNASSIGNED`.
    Columns are the reference classes plus `UNASSIGNED`. Query cells without a true label are
    left out.
    """
    truth, labelled = clean_labels(true)
    guess, _ = clean_labels(predicted)
    if truth.size != guess.size:
        raise InputError(
            f"{truth.size} true labels for {guess.size} predictions",
            where="confusion_matrix",
            fix="pass the query's labels and predictions in the same cell order",
        )
    columns = [*map(str, classes), UNASSIGNED]
    unknown = sorted(set(guess) - set(columns))
    if unknown:
        raise InputError(
            f"predictions {unknown[:3]} are neither reference classes nor {UNASSIGNED!r}",
            where="confusion_matrix(classes=...)",
            fix="pass the classes the predictions were made with (TransferResult.classes)",
        )
    truth, guess = truth[labelled], guess[labelled]
    if truth.size == 0:
        raise InputError(
            "no query cell has a true label",
            where="confusion_matrix(true=...)",
            fix="pass the query's cell-type labels",
        )
    present = set(truth)
    rows = [c for c in columns[:-1] if c in present]
    novel = sorted(present - set(rows))
    rows += novel
    counts = np.zeros((len(rows), len(columns)), dtype=int)
    row_of = {r: i for i, r in enumerate(rows)}
    column_of = {c: j for j, c in enumerate(columns)}
    np.add.at(counts, ([row_of[t] for t in truth], [column_of[g] for g in guess]), 1)
    fractions = counts / counts.sum(axis=1, keepdims=True)

    width = 2.6 + 0.62 * len(columns)
    height = 1.9 + 0.42 * len(rows)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i, j in zip(*np.nonzero(counts), strict=True):
        ax.text(
            j,
            i,
            str(counts[i, j]),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if fractions[i, j] > 0.55 else "black",
        )
    ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(
        range(len(rows)), [f"{r} ({n})" for r, n in zip(rows, counts.sum(1), strict=True)]
    )
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label (query cells)")
    ax.axvline(len(columns) - 1.5, color="0.3", linewidth=1)
    if novel:
        ax.axhline(len(rows) - len(novel) - 0.5, color="0.3", linewidth=1)
    ax.set_title("Label transfer: share of each true label's cells (counts written in)")
    fig.colorbar(image, ax=ax, label="fraction of row", shrink=0.8)
    return fig


def latent_gene_heatmap(
    table: pd.DataFrame, *, n: int = 10, value_label: str = "decoder response"
) -> Figure:
    """Heatmap of the genes each latent dimension moves most, against all dimensions.

    For every dimension (column of a genes × dimensions table such as `decoder_response` or
    `latent_correlation`) its `n` genes with the largest absolute value are shown as a block,
    its own column outlined; a gene picked by several dimensions appears in each of their
    blocks. Colours are centred at 0 (red: the gene rises with the dimension, blue: it falls),
    so a block shows both what its dimension carries and whether other dimensions share it.
    """
    if n < 1:
        raise InputError(
            f"n must be at least 1, got {n}", where="latent_gene_heatmap", fix="pass n >= 1"
        )
    if table.empty or table.shape[1] == 0:
        raise InputError(
            "the genes × dimensions table is empty",
            where="latent_gene_heatmap(table=...)",
            fix="pass the output of decoder_response or latent_correlation",
        )
    genes: list[str] = []
    blocks: list[tuple[str, int, int]] = []  # (dimension, first row, rows)
    for dimension in table.columns:
        ranked = table[dimension].dropna().abs().sort_values(ascending=False, kind="stable")
        picked = list(ranked.index[:n])
        blocks.append((str(dimension), len(genes), len(picked)))
        genes += picked
    values = table.loc[genes].to_numpy(dtype=float)
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    limit = limit if limit > 0 else 1.0

    fig = Figure(
        figsize=(2.8 + 0.5 * table.shape[1], 1.4 + 0.16 * len(genes)), layout="constrained"
    )
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto"
    )
    ax.set_xticks(range(table.shape[1]), list(map(str, table.columns)))
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(genes)), genes, fontsize=7)
    for column, (dimension, first, size) in enumerate(blocks):
        if first:
            ax.axhline(first - 0.5, color="0.2", linewidth=0.8)
        if size:
            # Outline the block's own column: these are the genes chosen for this dimension.
            ax.add_patch(
                Rectangle(
                    (column - 0.5, first - 0.5),
                    1,
                    size,
                    fill=False,
                    edgecolor="black",
                    linewidth=1.2,
                )
            )
            ax.text(
                table.shape[1] - 0.4,
                first + (size - 1) / 2,
                f" {dimension}",
                va="center",
                ha="left",
                fontsize=8,
                fontweight="bold",
            )
    ax.set_xlabel("latent dimension")
    ax.set_title(f"Top {n} genes per dimension (by |{value_label}|)", fontsize=10)
    fig.colorbar(image, ax=ax, label=value_label, shrink=min(1.0, 12 / max(len(genes), 1)))
    return fig


def enrichment_dotplot(enrichment_df: pd.DataFrame, *, n_terms: int = 20) -> Figure:
    """Dot plot of the most significant gene-set terms across queries (e.g. "z3:up").

    Input: the table of `melvae.analyze.enrichment.enrich_table`. Terms are picked in turns, each
    query in order adding its next most significant term (FDR < 0.05), so one dimension's
    dozens of near-identical terms (e.g. ribosome and translation) cannot crowd out the others;
    free places go to the lowest-FDR terms left. Terms are grouped by the query that picked
    them. x = query, y = term, dot size = genes in the overlap, colour = -log10 FDR, black
    ring = FDR < 0.05.
    """
    missing = [c for c in ENRICHMENT_COLUMNS if c not in enrichment_df.columns]
    if missing:
        raise InputError(
            f"the enrichment table lacks the columns {missing}",
            where="enrichment_dotplot(enrichment_df=...)",
            fix="pass the output of melvae.analyze.enrichment.enrich_table",
        )
    if n_terms < 1:
        raise InputError(
            f"n_terms must be at least 1, got {n_terms}",
            where="enrichment_dotplot",
            fix="pass n_terms >= 1",
        )
    if enrichment_df.empty:
        fig = Figure(figsize=(6, 2), layout="constrained")
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "No gene set overlaps any query.", ha="center", va="center")
        return fig

    df = enrichment_df.copy()
    several = df["library"].nunique() > 1
    df["label"] = [
        _term_label(term, library if several else None)
        for term, library in zip(df["term"], df["library"], strict=True)
    ]
    df["query"] = df["query"].astype(str)
    queries = sorted(df["query"].unique(), key=_query_order)
    df["x"] = df["query"].map({q: i for i, q in enumerate(queries)})
    owner = _pick_terms(df.sort_values(["fdr", "p", "label"]), queries, n_terms)
    terms = list(owner)
    shown = df[df["label"].isin(terms)].copy()
    shown["y"] = shown["label"].map({t: i for i, t in enumerate(terms)})
    shown["owner"] = shown["label"].map(owner)
    used = sorted(shown["x"].unique())
    shown["x"] = shown["x"].map({x: i for i, x in enumerate(used)})
    score = -np.log10(np.clip(shown["fdr"].to_numpy(dtype=float), 1e-300, 1))
    # Capped so that a few huge ribosome-like scores do not wash out every other colour.
    vmax = float(np.clip(score.max(), -np.log10(SIGNIFICANT), COLOUR_CAP))

    fig = Figure(
        figsize=(4.5 + 0.1 * max(map(len, terms)) + 0.45 * len(used), 1.6 + 0.3 * len(terms)),
        layout="constrained",
    )
    ax = fig.add_subplot()
    overlap = shown["overlap"].to_numpy(dtype=float)
    size_of = _dot_sizes(overlap.max())
    points = ax.scatter(
        shown["x"],
        shown["y"],
        s=size_of(overlap),
        c=score,
        cmap="YlGnBu",
        norm=Normalize(vmin=0, vmax=vmax),
        edgecolors=np.where(shown["fdr"] < SIGNIFICANT, "black", "none"),
        linewidths=0.9,
        zorder=3,
    )
    ax.set_xticks(range(len(used)), [queries[x] for x in used], rotation=45, ha="right")
    ax.set_yticks(range(len(terms)), terms, fontsize=8)
    ax.set_xlim(-0.6, len(used) - 0.4)
    ax.set_ylim(len(terms) - 0.5, -0.5)
    ax.grid(color="0.92", zorder=0)
    ax.set_xlabel("query (latent dimension: direction)")
    ax.set_title(
        f"{len(terms)} most significant gene-set terms, taken in turns per query", fontsize=10
    )
    fig.colorbar(
        points,
        ax=ax,
        label="-log10 FDR",
        shrink=min(1.0, 8 / len(terms) + 0.3),
        extend="max" if score.max() > vmax else "neither",
    )
    owners = list(shown.drop_duplicates("label").sort_values("y")["owner"])
    for y in range(1, len(owners)):
        if owners[y] != owners[y - 1]:
            ax.axhline(y - 0.5, color="0.75", linewidth=0.8, zorder=1)
    ticks = _size_ticks(int(overlap.max()))
    handles = [
        Line2D([], [], marker="o", linestyle="", color="0.5", markersize=np.sqrt(size_of(t)))
        for t in ticks
    ]
    handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="white", color="black"))
    ax.legend(
        handles,
        [*(str(t) for t in ticks), "FDR < 0.05"],
        title="genes in overlap",
        loc="upper left",
        bbox_to_anchor=(1.02, 0.0),
        frameon=False,
        fontsize=8,
        title_fontsize=8,
    )
    return fig


def _pick_terms(ranked: pd.DataFrame, queries: list[str], n_terms: int) -> dict[str, str]:
    """Term label -> the query that picked it (see `enrichment_dotplot`), in display order.

    `ranked` holds one row per (query, term), most significant first.
    """
    significant = ranked[ranked["fdr"] < SIGNIFICANT]
    queues = {q: list(significant.loc[significant["query"] == q, "label"]) for q in queries}
    owner: dict[str, str] = {}
    while len(owner) < n_terms and any(queues.values()):
        for query in queries:
            queue = queues[query]
            while queue and queue[0] in owner:
                queue.pop(0)
            if queue and len(owner) < n_terms:
                owner[queue.pop(0)] = query
    for label, query in zip(ranked["label"], ranked["query"], strict=True):
        if len(owner) >= n_terms:
            break
        owner.setdefault(label, query)
    position = {q: i for i, q in enumerate(queries)}
    ordered = sorted(owner, key=lambda label: position[owner[label]])  # stable: keeps pick order
    return {label: owner[label] for label in ordered}


def _term_label(term: str, library: str | None, width: int = 60) -> str:
    text = term if len(term) <= width else term[: width - 1] + "…"
    return text if library is None else f"{text} [{library.split('_')[0]}]"


def _query_order(query: str) -> tuple:
    """Sort "z2:up" before "z2:down" before "z10:up"; other names alphabetically after."""
    dimension, _, direction = query.partition(":")
    if dimension[:1] == "z" and dimension[1:].isdigit():
        return (0, int(dimension[1:]), {"up": 0, "down": 1}.get(direction, 2), direction)
    return (1, 0, 0, query)


def _dot_sizes(largest: float):
    """Marker area (points²) for an overlap count: area proportional to the count."""
    scale = 260.0 / max(largest, 1.0)
    return lambda count: 12.0 + scale * np.asarray(count, dtype=float)


def _size_ticks(largest: int) -> list[int]:
    ticks = sorted({max(1, round(largest * f)) for f in (0.25, 0.5, 1.0)})
    return ticks


def tsne_panels(coords: ArrayLike, *, colour_by: Mapping[str, ArrayLike]) -> Figure:
    """Side-by-side t-SNE scatters of the same cells, one panel per colouring.

    `coords` is cells × 2 (from `melvae.plot.tsne_coordinates`). Each `colour_by` entry (title →
    one value per cell) is drawn as categories when it holds strings, categoricals or booleans
    (e.g. true label, prediction), sharing one colour per category across panels, with
    `UNASSIGNED` in grey and missing values in light grey; and as a continuous colour map when
    numeric (e.g. a latent dimension): diverging around 0 when values take both signs,
    sequential otherwise.
    """
    xy = np.asarray(coords, dtype=float)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise InputError(
            f"coords must be cells × 2, got shape {xy.shape}",
            where="tsne_panels(coords=...)",
            fix="pass melvae.plot.tsne_coordinates(latent)",
        )
    if not colour_by:
        raise InputError(
            "no colouring given",
            where="tsne_panels(colour_by=...)",
            fix="pass e.g. {'true label': labels, 'z0': latent[:, 0]}",
        )
    panels = {}
    for title, values in colour_by.items():
        series = pd.Series(np.asarray(values, dtype=object) if _is_categorical(values) else values)
        if len(series) != xy.shape[0]:
            raise InputError(
                f"colouring {title!r} has {len(series)} values for {xy.shape[0]} cells",
                where="tsne_panels(colour_by=...)",
                fix="pass one value per cell, in the order of coords",
            )
        panels[title] = series
    categorical = {t for t, v in panels.items() if _is_categorical(v)}
    categories = sorted(
        {str(c) for t in categorical for c in panels[t].dropna().unique()} - {UNASSIGNED}
    )
    colours = dict(zip(categories, palette(len(categories)), strict=True))
    colours[UNASSIGNED] = UNASSIGNED_COLOUR
    colours[UNLABELLED] = UNLABELLED_COLOUR

    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.6 * ncols, 4.0 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    order = np.random.default_rng(0).permutation(xy.shape[0])  # no group hides under another
    size = float(np.clip(2500 / max(xy.shape[0], 1), 2, 25))
    for ax, (title, values) in zip(axes, panels.items(), strict=False):
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        if title in categorical:
            names = values.astype(object).where(values.notna(), UNLABELLED).astype(str).to_numpy()
            ax.scatter(
                *xy[order].T,
                c=[colours[n] for n in names[order]],
                s=size,
                linewidths=0,
                rasterized=True,
            )
            present, counts = np.unique(names, return_counts=True)
            count = dict(zip(present, counts, strict=True))
            shown = [c for c in [*categories, UNASSIGNED, UNLABELLED] if c in count]
            handles = [
                Line2D(
                    [], [], marker="o", linestyle="", color=colours[c], label=f"{c} ({count[c]})"
                )
                for c in shown
            ]
            ax.legend(
                handles=handles,
                loc="upper center",
                bbox_to_anchor=(0.5, -0.02),
                ncols=2 if len(handles) > 4 else 1,
                frameon=False,
                fontsize=7,
            )
        else:
            v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
            low, high = np.nanpercentile(v, [1, 99]) if np.isfinite(v).any() else (0.0, 1.0)
            if low < 0 < high:
                limit = max(-low, high)
                norm, cmap = TwoSlopeNorm(0.0, -limit, limit), "RdBu_r"
            else:
                norm, cmap = Normalize(low, high if high > low else low + 1), "viridis"
            points = ax.scatter(
                *xy[order].T,
                c=v[order],
                cmap=cmap,
                norm=norm,
                s=size,
                linewidths=0,
                plotnonfinite=True,
                rasterized=True,
            )
            below = bool(np.nanmin(v) < norm.vmin) if np.isfinite(v).any() else False
            above = bool(np.nanmax(v) > norm.vmax) if np.isfinite(v).any() else False
            extend = {(True, True): "both", (True, False): "min", (False, True): "max"}
            fig.colorbar(points, ax=ax, shrink=0.8, extend=extend.get((below, above), "neither"))
    for ax in axes[len(panels) :]:
        ax.axis("off")
    return fig


def _is_categorical(values: ArrayLike) -> bool:
    series = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values))
    dtype = series.dtype
    return not pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)


def variance_bars(shares: pd.DataFrame) -> Figure:
    """Grouped bars: for each latent dimension and the whole embedding (rows of
    `melvae.analyze.variance.covariate_shares`), the share of variance each covariate (columns,
    e.g. patient and cell type) explains on its own."""
    if shares.empty:
        raise InputError(
            "the shares table is empty",
            where="variance_bars(shares=...)",
            fix="pass the output of covariate_shares",
        )
    n_rows, n_cols = shares.shape
    width = 0.8 / n_cols
    fig = Figure(figsize=(2.5 + 0.45 * n_rows * n_cols, 3.2), layout="constrained")
    ax = fig.add_subplot()
    colours = palette(n_cols)
    for j, (name, values) in enumerate(shares.items()):
        positions = np.arange(n_rows) + (j - (n_cols - 1) / 2) * width
        ax.bar(positions, values.to_numpy(dtype=float), width, label=str(name), color=colours[j])
    ax.set_xticks(np.arange(n_rows), list(map(str, shares.index)), rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("variance explained (R²)")
    ax.set_title("Share of each latent dimension explained by each covariate", fontsize=10)
    ax.legend(frameon=False)
    return fig
