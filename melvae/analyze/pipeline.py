"""Analyse a registered model: transfer cell types, interpret latent dimensions, enrich pathways.

`analyze(...)` is the Python API behind `python -m melvae.analyze`. It reads the model and the
cells, computes everything, writes the output folder in one move (a failure leaves no partial
folder) and logs the same files to MLflow as one run linked to the model version it used.
"""

from __future__ import annotations

import functools
import json
import logging
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException

from melvae import track
from melvae.analyze import plot as analysis_plots
from melvae.analyze.enrichment import enrich_table
from melvae.analyze.genesets import load_libraries
from melvae.analyze.interpret import (
    decoder_response,
    dimension_ends,
    dimension_names,
    latent_correlation,
    top_genes,
)
from melvae.analyze.output import check_destination, write_folder
from melvae.analyze.report import render_report
from melvae.analyze.transfer import UNASSIGNED, transfer_labels, transfer_metrics
from melvae.analyze.variance import covariate_shares
from melvae.data.datasets import CATALOGUE, load_dataset, load_recorded_file
from melvae.data.validate import validate_expression, warn_outside_training_range
from melvae.errors import InputError
from melvae.faultpoint import stop_point
from melvae.model import MelVAE
from melvae.plot import tsne_coordinates
from melvae.preprocess import split_cells
from melvae.register import load_model, model_name
from melvae.study.config import DEFAULT_STUDY, load_study_config
from melvae.study.recovery import end_runs_of_dead_workers, worker_id
from melvae.study.storage import check_tracking_uri, sqlite_file_missing

log = logging.getLogger(__name__)

LABEL_COLUMN = "melvae_label"
CONFIDENCE_COLUMN = "melvae_confidence"
DEFAULT_GENESETS = ("reactome", "kegg")
_SCIBET_QUERY = {"gse115978_reference": "gse115978_query"}


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: registry name/version and the trial run that trained it."""

    uri: str
    name: str | None
    version: str | None
    trial_run_id: str | None
    experiment_id: str | None


@dataclass(frozen=True)
class AnalysisResult:
    """What `analyze` produced: the output folder, transfer metrics and the MLflow run."""

    out: Path
    transfer_metrics: dict[str, Any] | None
    enrichment: pd.DataFrame
    latent_genes: pd.DataFrame
    reference: ad.AnnData
    query: ad.AnnData
    run_id: str | None


def default_model_uri(study_file: Path = DEFAULT_STUDY) -> str:
    """The default study's champion: on its dataset if registered, else on its fallback."""
    config = load_study_config(study_file)
    client = mlflow.MlflowClient()
    for key in (config.dataset, config.fallback):
        if key is None:
            continue
        try:
            client.get_model_version_by_alias(model_name(key), "champion")
        except MlflowException:
            continue
        return f"models:/{model_name(key)}@champion"
    raise InputError(
        "the default study has no champion model yet",
        where=f"tracking backend {mlflow.get_tracking_uri()}",
        fix="run `python -m melvae.study run` first, or pass --model URI",
    )


def resolve_source(uri: str) -> ModelSource:
    """Registry metadata of `models:/name@alias` or `models:/name/version` (empty otherwise)."""
    client = mlflow.MlflowClient()
    target = uri.removeprefix("models:/")
    name = version = None
    try:
        if "@" in target:
            name, alias = target.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif target.count("/") == 1:
            name, number = target.split("/")
            version = client.get_model_version(name, number)
    except MlflowException:
        version = None
    if version is None:
        return ModelSource(uri, name, None, None, None)
    run_id = version.tags.get("run_id") or version.run_id
    run = client.get_run(run_id) if run_id else None
    return ModelSource(
        uri=uri,
        name=name,
        version=str(version.version),
        trial_run_id=run_id,
        experiment_id=run.info.experiment_id if run else None,
    )


def default_cells(model: MelVAE, uri: str) -> tuple[ad.AnnData, ad.AnnData, str | None]:
    """The model's own data, as its stored origin (`melvae.json`) names them: its training
    split as reference, its held-out test split as query.

    For GSE115978 the query is the SciBet-style query set (immune + Neg.cell).
    """
    origin = model.origin
    if not origin:
        raise InputError(
            f"the model {uri} does not say which data trained it (it has no stored origin: it "
            "was saved by an older melvae, or by MelVAE.save outside a study)",
            where=f"{uri}: melvae.json, key 'origin'",
            fix="pass --reference and --query files, or analyse a model of a study run by "
            "this melvae",
        )
    key, label_key = origin["dataset"], origin["label_key"]
    if key in _SCIBET_QUERY:
        return load_dataset(key).adata, load_dataset(_SCIBET_QUERY[key]).adata, label_key
    if key in CATALOGUE:
        adata = load_dataset(key).adata
    elif origin.get("file"):
        where, fix = f"{uri}: melvae.json, origin.file", "pass --reference and --query files"
        adata = load_recorded_file(origin["file"], where=where, fix=fix).adata
    else:
        raise InputError(
            f"the model {uri} was trained on {key!r}, which is not a dataset melvae can load "
            "again (an in-memory AnnData, or a file the model does not name)",
            where=f"{uri}: melvae.json, origin.dataset",
            fix=f"pass --reference and --query files, or use one of {', '.join(CATALOGUE)}",
        )
    if label_key is not None:
        adata = adata[adata.obs[label_key].notna()].copy()
    splits = split_cells(adata, label_key, **origin["split"])
    return adata[splits["train"]].copy(), adata[splits["test"]].copy(), label_key


def _read_cells(path: Path | None) -> tuple[ad.AnnData, str | None] | None:
    if path is None:
        return None
    dataset = load_dataset(str(path))
    return dataset.adata, dataset.label_key


def marker_genes(
    expression: np.ndarray, groups: np.ndarray, genes: Sequence[str], *, n: int = 100
) -> dict[str, list[str]]:
    """Top up-regulated genes of each group against all other cells (Welch t statistic).

    Groups with fewer than 3 cells and `UNASSIGNED` cells get no markers (the rest still
    count as background for the others). Numpy only: scanpy's numba kernels leave OpenMP
    threads spinning that slow later torch work on small machines.
    """
    expression = np.asarray(expression, dtype=np.float64)
    groups = np.asarray(groups).astype(str)
    markers: dict[str, list[str]] = {}
    for group in sorted(set(groups) - {UNASSIGNED}):
        inside = groups == group
        if inside.sum() < 3 or (~inside).sum() < 3:
            continue
        a, b = expression[inside], expression[~inside]
        spread = np.sqrt(a.var(axis=0, ddof=1) / len(a) + b.var(axis=0, ddof=1) / len(b))
        t = (a.mean(axis=0) - b.mean(axis=0)) / np.where(spread > 0, spread, np.inf)
        order = np.argsort(-t)[:n]
        markers[group] = [genes[i] for i in order if t[i] > 0]
    return markers


def analyze(
    model_uri: str | None = None,
    *,
    reference: Path | None = None,
    query: Path | None = None,
    label_key: str | None = None,
    genesets: Sequence[str] = DEFAULT_GENESETS,
    out: Path = Path("analysis"),
    overwrite: bool = False,
    tracking_uri: str | None = None,
    method: str = "knn",
    threshold: float = 0.5,
    n_genes: int = 100,
    log_to_mlflow: bool = True,
    batch_key: str | None = None,
) -> AnalysisResult:
    """Run the whole analysis; see the module docstring. Returns what it wrote.

    Everything that can be checked is checked before computing: the tracking URI, the output
    folder (`overwrite` replaces only a previous melvae analysis), the model, the cells. Only
    reads the tracking backend: without a database there a local model folder is analysed and
    nothing is logged; a registered model is an error. `batch_key` names the reference's
    patient (batch) column (default: the model's own batch key, if it has one): the report then
    says how much of each latent dimension is patient and how much cell type
    (`covariate_shares.tsv`), and the t-SNE is coloured by patient too.
    """
    resolved = track.resolve_tracking_uri(tracking_uri)
    check_tracking_uri(resolved)
    check_destination(out, overwrite=overwrite, protected=_tracking_folder(resolved))
    has_backend = not sqlite_file_missing(resolved)
    local_model = model_uri is not None and urllib.parse.urlsplit(model_uri).scheme in ("", "file")
    if not has_backend and not local_model:
        raise InputError(
            f"there is no tracking database at {resolved}, so no registered model to analyse",
            where="--tracking-uri (default sqlite:///mlruns/mlflow.db)",
            fix="run from the folder where `python -m melvae.study run` ran, pass "
            "--tracking-uri, or --model with a folder written by MelVAE.save",
        )
    if not has_backend and log_to_mlflow:
        log.info("no tracking database at %s: the analysis is not logged to MLflow", resolved)
        log_to_mlflow = False
    if has_backend:
        track.use_backend(tracking_uri)
    uri = model_uri or default_model_uri()
    model = load_model(uri, tracking_uri=tracking_uri)
    source = resolve_source(uri) if has_backend else ModelSource(uri, None, None, None, None)
    libraries = load_libraries(list(genesets))
    ref_cells, query_cells, key = _cells(model, uri, reference, query, label_key)
    for role, cells, path in (("reference", ref_cells, reference), ("query", query_cells, query)):
        check_cells(model, cells, source=str(path) if path else f"the model's own {role} cells")
    batch_key = batch_key or model.batch_key
    patients = None if batch_key is None else _batches(ref_cells, batch_key)

    ref_latent = model.embed(ref_cells).obsm["X_melvae"]
    query_latent = model.embed(query_cells).obsm["X_melvae"]
    ref_labels = ref_cells.obs.get(key)
    if ref_labels is None:
        raise InputError(
            f"the reference has no label column {key!r}",
            where="reference cells",
            fix="pass --label-key naming the reference's cell-type column",
        )
    transfer = transfer_labels(
        ref_latent,
        ref_labels.to_numpy(),
        query_latent,
        method=method,
        threshold=threshold,
        query_names=list(query_cells.obs_names),
    )
    query_cells.obs[LABEL_COLUMN] = pd.Categorical(transfer.table["predicted"])
    query_cells.obs[CONFIDENCE_COLUMN] = transfer.table["confidence"].to_numpy()
    query_labels = query_cells.obs.get(key)
    metrics = None
    if query_labels is None:
        log.warning("the query has no %r column: transfer metrics are skipped", key)
    else:
        metrics = transfer_metrics(
            query_labels.to_numpy(), transfer.table["predicted"], reference_classes=transfer.classes
        )

    response = decoder_response(model, ref_cells)
    ref_x, _ = model.reconstruct(ref_cells)
    correlation = latent_correlation(ref_latent, ref_x, model.genes)
    tops = top_genes(response, n=n_genes)
    queries = {f"{dim}:{way}": genes for dim, ends in tops.items() for way, genes in ends.items()}
    query_x, _ = model.reconstruct(query_cells)
    markers = marker_genes(
        query_x, query_cells.obs[LABEL_COLUMN].to_numpy(), model.genes, n=n_genes
    )
    queries |= {f"{group}:markers": genes for group, genes in markers.items()}
    enrichment = enrich_table(queries, libraries, model.genes)
    ends = dimension_ends(ref_latent, ref_labels.to_numpy())
    shares = None
    if patients is not None:
        shares = covariate_shares(
            ref_latent, {"patient": patients, "cell type": ref_labels.to_numpy()}
        )

    figures = _figures(
        ref_cells, query_cells, key, transfer.classes, response, enrichment, batch_key
    )
    if shares is not None:
        figures["covariate_shares.png"] = analysis_plots.variance_bars(shares)
    tables = {
        "transfer.tsv": transfer.table,
        "latent_genes.tsv": _latent_genes_table(response, correlation),
        "enrichment.tsv": enrichment,
        "dimension_ends.tsv": ends,
    } | ({} if shares is None else {"covariate_shares.tsv": shares})
    summary = {
        "model": uri,
        "model_version": source.version,
        "trained_by_run": source.trial_run_id,
        "reference_cells": ref_cells.n_obs,
        "query_cells": query_cells.n_obs,
        "genes": len(model.genes),
        "latent_dimensions": ref_latent.shape[1],
        "gene_set_libraries": ", ".join(lib.name for lib in libraries),
    }
    html = render_report(
        title=f"melvae analysis of {uri}",
        summary=summary,
        transfer=metrics,
        figures=figures,
        top_genes=tops,
        dimension_ends=ends,
        enrichment=enrichment,
        covariates=shares,
    )
    write_folder(
        out,
        functools.partial(_write_files, tables=tables, metrics=metrics, figures=figures, html=html),
        manifest={"written_by": "melvae.analyze", "model": uri, "model_version": source.version},
    )
    run_id = _log_run(out, source, metrics) if log_to_mlflow else None
    return AnalysisResult(
        out=out,
        transfer_metrics=metrics,
        enrichment=enrichment,
        latent_genes=response,
        reference=ref_cells,
        query=query_cells,
        run_id=run_id,
    )


def _cells(
    model: MelVAE,
    uri: str,
    reference: Path | None,
    query: Path | None,
    label_key: str | None,
) -> tuple[ad.AnnData, ad.AnnData, str]:
    given_ref, given_query = _read_cells(reference), _read_cells(query)
    if given_ref is None or given_query is None:
        default_ref, default_query, default_key = default_cells(model, uri)
        given_ref = given_ref or (default_ref, default_key)
        given_query = given_query or (default_query, default_key)
    key = label_key or given_ref[1] or given_query[1]
    if key is None:
        raise InputError(
            "no cell-type label column is known for the reference",
            where="reference cells",
            fix="pass --label-key naming the reference's cell-type column",
        )
    return given_ref[0].copy(), given_query[0].copy(), key


def _batches(cells: ad.AnnData, batch_key: str) -> np.ndarray:
    """The reference's batch (patient) column, which must exist."""
    if batch_key not in cells.obs:
        raise InputError(
            f"the reference has no batch column {batch_key!r}",
            where="reference cells (--batch-key)",
            fix=f"pass --batch-key naming a column of {sorted(cells.obs.columns)[:8]}",
        )
    return cells.obs[batch_key].to_numpy()


def _latent_genes_table(response: pd.DataFrame, correlation: pd.DataFrame) -> pd.DataFrame:
    """Genes × (dimension, view): decoder response and latent–expression correlation."""
    return (
        pd.concat({"response": response, "correlation": correlation}, axis=1)
        .swaplevel(axis=1)
        .sort_index(axis=1, level=0, sort_remaining=False)
    )


def _figures(
    ref_cells: ad.AnnData,
    query_cells: ad.AnnData,
    key: str,
    classes: list[str],
    response: pd.DataFrame,
    enrichment: pd.DataFrame,
    batch_key: str | None = None,
    max_tsne_cells: int = 3000,
) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    if key in query_cells.obs:
        figures["confusion_matrix.png"] = analysis_plots.confusion_matrix(
            query_cells.obs[key].to_numpy(),
            query_cells.obs[LABEL_COLUMN].to_numpy(),
            classes=classes,
        )
    figures["latent_genes_heatmap.png"] = analysis_plots.latent_gene_heatmap(response)
    if not enrichment.empty:
        figures["enrichment_dotplot.png"] = analysis_plots.enrichment_dotplot(enrichment)
    both = ad.concat({"reference": ref_cells, "query": query_cells}, label="set", join="inner")
    both.obs[LABEL_COLUMN] = np.concatenate(
        [np.full(ref_cells.n_obs, "(reference)"), query_cells.obs[LABEL_COLUMN].astype(str)]
    )
    if both.n_obs > max_tsne_cells:
        rng = np.random.default_rng(0)
        both = both[np.sort(rng.choice(both.n_obs, max_tsne_cells, replace=False))]
    latent = both.obsm["X_melvae"]
    coords = tsne_coordinates(latent)
    colour_by: dict[str, np.ndarray] = {
        "true label": both.obs[key].astype(str).to_numpy() if key in both.obs else None,
        "patient": both.obs[batch_key].to_numpy() if batch_key in both.obs else None,
        "reference / query": both.obs["set"].astype(str).to_numpy(),
        "prediction (query)": both.obs[LABEL_COLUMN].to_numpy(),
    }
    colour_by = {name: values for name, values in colour_by.items() if values is not None}
    colour_by |= {dim: latent[:, i] for i, dim in enumerate(dimension_names(latent.shape[1]))}
    figures["tsne.png"] = analysis_plots.tsne_panels(coords, colour_by=colour_by)
    return figures


def _write_files(
    folder: Path,
    *,
    tables: dict[str, pd.DataFrame],
    metrics: dict[str, Any] | None,
    figures: dict[str, Figure],
    html: str,
) -> None:
    """The analysis' tables, metrics, figures and report, into `folder`."""
    for name, table in tables.items():
        table.to_csv(folder / name, sep="\t")
    skipped = {"skipped": "query has no labels"}
    (folder / "transfer_metrics.json").write_text(
        json.dumps(metrics if metrics is not None else skipped, indent=2)
    )
    for name, figure in figures.items():
        figure.savefig(folder / name, dpi=120, bbox_inches="tight")
    (folder / "report.html").write_text(html)


def _tracking_folder(uri: str) -> Path | None:
    """The folder of a local SQLite tracking database (mlruns/), which --out must not touch."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).parent


def check_cells(model: MelVAE, cells: ad.AnnData, *, source: str) -> None:
    """The study's own validation on cells to analyse, plus a warning for wrong units.

    NaN, infinite or (where the model's training data had none) negative values are an
    InputError naming the file, cell and gene; values far beyond the training range warn with
    the fraction that the model's transform clips.
    """
    p = model.preprocessor
    negative_trained = (
        p.transform == "minmax" and p.offset is not None and bool(np.any(p.offset < 0))
    )
    validate_expression(cells, source=source, require_nonnegative=not negative_trained)
    if p.transform == "minmax" and p.offset is not None and p.scale is not None:
        warn_outside_training_range(
            cells, p.genes, low=p.offset, high=p.offset + p.scale, source=source
        )


def _log_run(out: Path, source: ModelSource, metrics: dict[str, Any] | None) -> str:
    """One MLflow run holding the analysis, tagged with the model version it used."""
    experiment_id = source.experiment_id or track.ensure_experiment(
        "melvae-analysis", mlflow.get_tracking_uri()
    )
    name = f"analysis-{source.name or 'model'}-v{source.version or '?'}"
    end_runs_of_dead_workers(experiment_id)
    tags = {
        "worker": worker_id(),
        "role": "analysis",
        "model_uri": source.uri,
        "model_version": source.version or "",
        "trained_by_run": source.trial_run_id or "",
    }
    with track.top_level_run(experiment_id, run_name=name, tags=tags) as run_id:
        if metrics is not None:
            track.log_metrics(
                {
                    f"transfer_{key}": value
                    for key, value in metrics.items()
                    if isinstance(value, float)
                }
            )
        track.log_folder(out)
        stop_point("analysis-logged")
        return run_id
