"""One self-contained HTML page: figures embedded as PNG and the top tables inline."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0 1.5rem; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } img { max-width: 100%; border: 1px solid #eee; }
.genes { font-family: ui-monospace, monospace; font-size: .8rem; }
"""


def figure_data_uri(figure: Figure) -> str:
    """A figure as a base64 PNG data URI, so the page needs no side files."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(frame: pd.DataFrame, *, index: bool = True) -> str:
    return frame.to_html(index=index, float_format=lambda v: f"{v:.3g}", border=0, escape=True)


def _transfer_section(metrics: Mapping[str, Any] | None) -> str:
    if metrics is None:
        return "<p>The query has no labels: only predictions were made (see transfer.tsv).</p>"
    headline = pd.DataFrame(
        {
            "accuracy": [metrics["accuracy"]],
            "macro F1": [metrics["macro_f1"]],
            "unassigned rate": [metrics["unassigned_rate"]],
            "cells scored": [metrics["n_scored"]],
        }
    )
    per_label = pd.DataFrame(
        {
            "cells": pd.Series(metrics["n_by_label"]),
            "F1": pd.Series(metrics["f1"], dtype=float),
            "unassigned rate": pd.Series(metrics["unassigned_rate_by_label"]),
        }
    )
    return _table(headline, index=False) + _table(per_label)


def _top_genes_section(top_genes: Mapping[str, Mapping[str, list[str]]], n: int = 15) -> str:
    rows = pd.DataFrame(
        {
            way: {dim: ", ".join(ends[way][:n]) for dim, ends in top_genes.items()}
            for way in ("up", "down")
        }
    )
    return rows.to_html(border=0, classes="genes", escape=True)


def _covariates_section(shares: pd.DataFrame | None) -> str:
    if shares is None:
        return ""
    return f"""<h2>Patient and cell type in the latent space</h2>
<p>Share of each dimension's variance (and of the whole embedding's) that each covariate explains
on its own: the R² of a one-way ANOVA. A dimension high on the patient column carries the
patient, not the cell state; the two overlap where patients differ in cell-type make-up. The
t-SNE figure colours the cells by patient next to cell type.</p>
{_table(shares)}"""


def render_report(
    *,
    title: str,
    summary: Mapping[str, Any],
    transfer: Mapping[str, Any] | None,
    figures: Mapping[str, Figure],
    top_genes: Mapping[str, Mapping[str, list[str]]],
    dimension_ends: pd.DataFrame,
    enrichment: pd.DataFrame,
    n_terms: int = 30,
    covariates: pd.DataFrame | None = None,
) -> str:
    """The analysis as one HTML page: summary, transfer, latent genes, patient vs cell type
    (`covariates`, from `melvae.analyze.variance.covariate_shares`; left out when None),
    enrichment, pictures."""
    images = "".join(
        f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' "
        f"src='{figure_data_uri(figure)}'>"
        for name, figure in figures.items()
    )
    leading = enrichment.sort_values("fdr").head(n_terms) if not enrichment.empty else enrichment
    if not leading.empty:  # the full gene lists are in enrichment.tsv
        leading = leading.assign(genes=leading["genes"].str.split(",").str[:8].str.join(", "))
    summary_table = pd.DataFrame({"value": {k: str(v) for k, v in summary.items()}})
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
{_table(summary_table)}
<h2>Cell-type transfer</h2>
{_transfer_section(transfer)}
<h2>What each latent dimension carries</h2>
<p>Genes whose decoded expression rises (up) or falls (down) most as the dimension increases.</p>
{_top_genes_section(top_genes)}
<p>Cell-type composition at the low and high ends of each dimension:</p>
{_table(dimension_ends)}
{_covariates_section(covariates)}
<h2>Pathway enrichment (leading {n_terms} terms by FDR)</h2>
{_table(leading, index=False) if not leading.empty else "<p>No term was tested.</p>"}
<h2>Figures</h2>
{images}
</body></html>
"""
