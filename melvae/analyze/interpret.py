"""What each latent dimension carries: the genes it moves and the cell types at its two ends.

Two views of a dimension's genes: `decoder_response` asks the decoder (how does the expected
expression change when only this dimension moves?), `latent_correlation` asks the data (which
genes' measured expression rises and falls with this dimension across cells?). They can differ:
the decoder view isolates one dimension, the correlation view also picks up genes that merely
co-vary with it through the cell types. Dimensions are named "z0", "z1", ... throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import sparse

from melvae.errors import InputError
from melvae.metrics import clean_labels

if TYPE_CHECKING:
    from melvae.model import MelVAE

ENDS: tuple[str, str] = ("low", "high")


def dimension_names(n: int) -> list[str]:
    """Column names for `n` latent dimensions: "z0", "z1", ..."""
    return [f"z{d}" for d in range(n)]


def decoder_response(
    model: MelVAE, adata: ad.AnnData, *, shift: float = 1.0, batch_size: int = 256
) -> pd.DataFrame:
    """Genes × dimensions: how the decoder's expected expression changes per unit of each dimension.

    For every cell of `adata` (encoded to its latent mean mu) and dimension d this is the central
    difference (decode(mu + shift·e_d) − decode(mu − shift·e_d)) / (2·shift), averaged over
    cells: a finite-difference Jacobian of the decoder mean, in the model's transformed
    expression units. Averaging over real cells keeps the probe where the data lie; `shift`
    around 1 matches the prior's unit scale. Positive values mean the gene rises with d.
    A model with a batch covariate decodes each cell as its own batch (`obs[batch_key]`);
    cells of batches the model never saw are left out.
    """
    if not shift > 0:
        raise InputError(
            f"shift must be positive, got {shift}",
            where="decoder_response(shift=...)",
            fix="pass a step in latent units such as 1.0",
        )
    latent = model.encode(adata)
    n_cells, n_dims = latent.shape
    if n_cells == 0:
        raise InputError(
            "no cells to probe the decoder with",
            where="decoder_response(adata=...)",
            fix="pass the reference cells (or any cells the model was trained on)",
        )
    total = np.zeros((len(model.genes), n_dims))
    groups = _decoded_as(model, adata)
    for batch, rows in groups:
        for start in range(0, rows.size, batch_size):
            mu = latent[rows[start : start + batch_size]]
            for d in range(n_dims):
                step = np.zeros(n_dims, dtype=mu.dtype)
                step[d] = shift
                up = model.decode(mu + step, transform_batch=batch)
                difference = up - model.decode(mu - step, transform_batch=batch)
                total[:, d] += difference.sum(axis=0, dtype=np.float64)
    probed = sum(rows.size for _, rows in groups)
    return pd.DataFrame(
        total / (2 * shift * probed),
        index=pd.Index(model.genes, name="gene"),
        columns=dimension_names(n_dims),
    )


def _decoded_as(model: MelVAE, adata: ad.AnnData) -> list[tuple[str | None, np.ndarray]]:
    """(batch to decode as, rows of the cells of that batch): all cells as None for a model
    without a batch covariate, else each known batch's cells."""
    if model.batch_key is None:
        return [(None, np.arange(adata.n_obs))]
    if model.batch_key not in adata.obs:
        raise InputError(
            f"the cells have no obs column {model.batch_key!r}, the batch the model decodes by",
            where="decoder_response(adata=...)",
            fix=f"add obs[{model.batch_key!r}] to the reference cells",
        )
    names = adata.obs[model.batch_key].astype(str).to_numpy()
    groups = [(b, np.flatnonzero(names == b)) for b in model.batch_names if (names == b).any()]
    if not groups:
        raise InputError(
            "none of the cells comes from a batch the model was trained on",
            where="decoder_response(adata=...)",
            fix="probe the decoder with reference cells of the model's own batches",
        )
    return groups


def latent_correlation(
    latent: ArrayLike, expression: ArrayLike | sparse.spmatrix, genes: Sequence[str]
) -> pd.DataFrame:
    """Genes × dimensions Pearson correlation between each latent dimension and each gene's
    expression across cells (NaN for a gene or dimension that is constant).

    `expression` is cells × genes (dense or sparse; it is not densified), in `genes` order.
    """
    z = np.asarray(latent, dtype=np.float64)
    if z.ndim != 2:
        raise InputError(
            f"latent must be cells × dimensions, got shape {z.shape}",
            where="latent_correlation",
            fix="pass the output of MelVAE.encode",
        )
    x = expression.tocsr() if sparse.issparse(expression) else np.asarray(expression)
    if x.ndim != 2 or x.shape[0] != z.shape[0] or x.shape[1] != len(genes):
        raise InputError(
            f"expression has shape {x.shape}, expected ({z.shape[0]} cells, {len(genes)} genes)",
            where="latent_correlation",
            fix="pass one expression row per latent row, with columns in the order of `genes`",
        )
    n = z.shape[0]
    z_centred = z - z.mean(axis=0)
    x_mean = np.asarray(x.mean(axis=0, dtype=np.float64)).ravel()
    x_sq = x.multiply(x) if sparse.issparse(x) else np.square(x, dtype=np.float64)
    x_var = np.asarray(x_sq.mean(axis=0, dtype=np.float64)).ravel() - x_mean**2
    # sum_i (x_i - mean_x)(z_i - mean_z) = sum_i x_i (z_i - mean_z), since z is centred.
    covariance = np.asarray(x.T @ z_centred, dtype=np.float64) / n
    z_sd = z_centred.std(axis=0)
    x_sd = np.sqrt(np.clip(x_var, 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = covariance / np.outer(x_sd, z_sd)
    r[~np.isfinite(r)] = np.nan
    return pd.DataFrame(
        np.clip(r, -1, 1),
        index=pd.Index(list(map(str, genes)), name="gene"),
        columns=dimension_names(z.shape[1]),
    )


def top_genes(table: pd.DataFrame, *, n: int = 50) -> dict[str, dict[str, list[str]]]:
    """Per dimension, the `n` genes with the largest positive ("up") and most negative ("down")
    values of a genes × dimensions table (from `decoder_response` or `latent_correlation`).

    Only genes with a value of that sign are listed, so a list can be shorter than `n`; NaN
    values are ignored.
    """
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}", where="top_genes", fix="pass n >= 1")
    result = {}
    for dimension in table.columns:
        values = table[dimension].dropna()
        up = values[values > 0].sort_values(ascending=False, kind="stable")
        down = values[values < 0].sort_values(ascending=True, kind="stable")
        result[str(dimension)] = {
            "up": list(map(str, up.index[:n])),
            "down": list(map(str, down.index[:n])),
        }
    return result


def dimension_ends(latent: ArrayLike, labels: ArrayLike, *, quantile: float = 0.1) -> pd.DataFrame:
    """Cell-type composition at both ends of every latent dimension.

    Rows are (dimension, end) with end "low" (the `quantile` share of labelled cells with the
    smallest values) and "high" (the largest); columns are cell types; each row holds fractions
    that sum to 1. Cells without a label are left out. Compare a row with the overall
    composition to see which types a dimension separates.
    """
    z = np.asarray(latent, dtype=np.float64)
    names, present = clean_labels(labels)
    if z.ndim != 2 or z.shape[0] != names.size:
        raise InputError(
            f"latent has shape {z.shape} but {names.size} labels were given",
            where="dimension_ends",
            fix="pass a cells × dimensions latent and one label per cell, in the same order",
        )
    if not 0 < quantile <= 0.5:
        raise InputError(
            f"quantile must be in (0, 0.5], got {quantile}",
            where="dimension_ends(quantile=...)",
            fix="pass the share of cells per end, e.g. 0.1",
        )
    z, names = z[present], names[present]
    if names.size == 0:
        raise InputError(
            "no cell has a label",
            where="dimension_ends(labels=...)",
            fix="pass a label column with cell types",
        )
    classes = sorted(set(names))
    n_end = max(1, round(quantile * names.size))
    rows = {}
    for d, dimension in enumerate(dimension_names(z.shape[1])):
        order = np.argsort(z[:, d], kind="stable")
        for end, cells in zip(ENDS, (order[:n_end], order[-n_end:]), strict=True):
            counts = pd.Series(names[cells]).value_counts()
            rows[(dimension, end)] = counts.reindex(classes, fill_value=0) / n_end
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["dimension", "end"])
    table.columns.name = "cell_type"
    return table
