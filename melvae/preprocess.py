"""Gene filtering, highly-variable-gene selection, transforms and the train/val/test split.

Every statistic (gene list, min/max, std) is fitted on the training cells only and stored in a
`Preprocessor` that travels with the model, so validation, test and new data never influence it.
Sparse input stays sparse: transforms act on the stored non-zeros only, and every per-gene
statistic is accumulated over row chunks of bounded size, so fitting on a million cells needs no
dense copy and no whole-matrix temporary beyond the input itself.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from melvae.data.backed import DiskMatrix, cells_matrix
from melvae.data.loader import row_chunks
from melvae.errors import InputError

logger = logging.getLogger(__name__)

Transform = Literal["minmax", "log1p", "counts"]
TRANSFORMS: tuple[str, ...] = ("minmax", "log1p", "counts")
Matrix = np.ndarray | sp.csr_matrix | DiskMatrix


@dataclass(frozen=True)
class PreprocessConfig:
    """How to preprocess: gene selection, transform, and split fractions.

    `minmax` scales each gene to [0, 1] (the original study, for a Bernoulli decoder); `log1p`
    applies log(1 + x), optionally divided by the per-gene training std (`scale`, no centring so
    values stay >= 0); `counts` leaves raw counts untouched for the negative-binomial decoder.
    """

    n_top_genes: int | None = 2000
    transform: Transform = "minmax"
    scale: bool = False
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        where = "PreprocessConfig"
        if self.transform not in TRANSFORMS:
            raise InputError(
                f"unknown transform {self.transform!r}",
                where=where,
                fix=f"use one of {', '.join(TRANSFORMS)}",
            )
        if self.scale and self.transform != "log1p":
            raise InputError(
                f"scale=True only applies to the log1p transform, not {self.transform!r}",
                where=where,
                fix="set transform='log1p' or scale=False",
            )
        if self.n_top_genes is not None and self.n_top_genes < 1:
            raise InputError(
                f"n_top_genes must be a positive number of genes, got {self.n_top_genes}",
                where=where,
                fix="give a positive integer, or None to keep all genes",
            )
        _check_fractions(self.val_fraction, self.test_fraction, where=where)


def _check_fractions(val_fraction: float, test_fraction: float, *, where: str) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InputError(
            f"split fractions must be in [0, 1) and leave training cells "
            f"(val={val_fraction}, test={test_fraction})",
            where=where,
            fix="use e.g. val_fraction=0.15, test_fraction=0.15",
        )


def split_cells(
    adata: ad.AnnData,
    label_key: str | None,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Split cell positions into sorted "train", "val" and "test" index arrays.

    Stratified by `obs[label_key]` when given (missing labels form their own stratum): cells are
    ordered so that every class is spread evenly through the order, then the first cells go to
    validation, the next to test and the rest to training. Totals match the fractions exactly,
    classes are represented in proportion, and a class with a single cell stays in training
    (whenever val + test < 0.5). Deterministic for a seed.
    """
    _check_fractions(val_fraction, test_fraction, where="split_cells")
    n = adata.n_obs
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if n - n_val - n_test < 1:
        raise InputError(
            f"{n} cells are too few to split into train/val/test",
            where="split_cells",
            fix="use more cells or smaller val/test fractions",
        )
    if label_key is None:
        strata = np.zeros(n, dtype=np.int64)
    else:
        if label_key not in adata.obs:
            raise InputError(
                f"label column {label_key!r} not found in obs",
                where=f"obs columns: {', '.join(map(str, adata.obs.columns)) or '(none)'}",
                fix="pass an existing obs column as label_key, or None for an unstratified split",
            )
        labels = adata.obs[label_key].astype(object).where(adata.obs[label_key].notna(), "\0na")
        strata = pd.factorize(labels.to_numpy())[0]
    rng = np.random.default_rng(seed)
    tiebreak = rng.random(n)
    rank = np.empty(n)
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        members = members[rng.permutation(members.size)]
        rank[members] = (np.arange(members.size) + 0.5) / members.size
    order = np.lexsort((tiebreak, rank))
    return {
        "train": np.sort(order[n_val + n_test :]),
        "val": np.sort(order[:n_val]),
        "test": np.sort(order[n_val : n_val + n_test]),
    }


@dataclass
class Preprocessor:
    """Fitted preprocessing state: the model's genes and the per-gene transform statistics."""

    genes: list[str]
    transform: str
    offset: np.ndarray | None = None
    scale: np.ndarray | None = None

    def transform_matrix(self, X: Matrix) -> Matrix:
        """Transform cells x genes already aligned to `genes` (float32; sparse stays sparse).

        minmax output is clipped to [0, 1] because unseen cells can exceed the training range.
        """
        if X.shape[1] != len(self.genes):
            raise InputError(
                f"matrix has {X.shape[1]} genes but the preprocessor expects {len(self.genes)}",
                where="Preprocessor.transform_matrix",
                fix="align the genes first with melvae.preprocess.align_genes",
            )
        if isinstance(X, DiskMatrix):  # applied to each block of rows as it is read
            return X.then(self.transform_matrix)
        if self.transform == "counts":
            return _as_float32(X)
        if self.transform == "log1p":
            if self.scale is None:
                return _map_values(X, lambda v, _: np.log1p(v))
            inv = (1.0 / self.scale).astype(np.float32)
            return _map_values(X, lambda v, cols: np.log1p(v) * inv[cols])
        assert self.offset is not None and self.scale is not None
        offset, scale = self.offset.astype(np.float32), self.scale.astype(np.float32)
        # With offset >= 0 a zero maps to <= 0 and is clipped back to 0, so only the stored
        # non-zeros of a sparse matrix need transforming.
        if sp.issparse(X) and np.any(offset < 0):
            X = X.toarray()
        return _map_values(X, lambda v, cols: np.clip((v - offset[cols]) / scale[cols], 0, 1))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe representation (float64 lists, so values round-trip exactly)."""
        return {
            "genes": list(self.genes),
            "transform": self.transform,
            "offset": None if self.offset is None else self.offset.tolist(),
            "scale": None if self.scale is None else self.scale.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        """Rebuild a Preprocessor written by `to_dict`."""

        def array(v: list[float] | None) -> np.ndarray | None:
            return None if v is None else np.asarray(v, dtype=np.float64)

        return cls(
            genes=list(d["genes"]),
            transform=d["transform"],
            offset=array(d.get("offset")),
            scale=array(d.get("scale")),
        )


_VALUES_PER_CHUNK = 1 << 24  # stored values per chunk in streaming passes (~64 MB of float32)


def _as_float32(X: Matrix) -> Matrix:
    return sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, np.float32)


def _map_values(X: Matrix, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Matrix:
    """Apply `fn(values, column_of_each_value)` elementwise in float32.

    For sparse input only the stored entries are touched, so `fn` must map 0 to 0; they are
    mapped in place in slices of `_VALUES_PER_CHUNK`, so temporaries stay small.
    """
    if sp.issparse(X):
        out = sp.csr_matrix(X, dtype=np.float32, copy=True)
        for start in range(0, out.nnz, _VALUES_PER_CHUNK):
            part = slice(start, start + _VALUES_PER_CHUNK)
            out.data[part] = fn(out.data[part], out.indices[part])
        return out
    dense = np.asarray(X, dtype=np.float32)
    return fn(dense, np.arange(dense.shape[1])[None, :]).astype(np.float32, copy=False)


def fit_preprocessor(train: ad.AnnData, config: PreprocessConfig) -> Preprocessor:
    """Fit the gene list and transform statistics on the training cells only.

    Drops genes that are all-zero in `train`, then (if `config.n_top_genes` is set) keeps exactly
    `n_top_genes` genes with the highest normalised dispersion (see `normalized_dispersion`), in
    their original order.
    """
    where = "training cells given to fit_preprocessor"
    if train.n_obs == 0 or train.n_vars == 0:
        raise InputError(
            f"training data is empty ({train.n_obs} cells x {train.n_vars} genes)",
            where=where,
            fix="pass the training split with at least one cell and gene",
        )
    _require_unique_genes(train, where=where)
    X = cells_matrix(train)
    genes = np.asarray(train.var_names, dtype=object)
    stats = column_stats(X)
    expressed = stats.nonzero > 0
    if not expressed.any():
        raise InputError(
            "every gene is zero in all training cells",
            where=where,
            fix="check that the expression matrix was read correctly (not an empty layer)",
        )
    logger.info("dropping %d genes that are zero in all training cells", int((~expressed).sum()))
    kept = np.flatnonzero(expressed)
    if config.n_top_genes is not None and config.n_top_genes < len(kept):
        dispersion = _normalized_dispersion(*stats.mean_var(ddof=1), n_bins=20)
        kept = kept[_top_genes(dispersion[kept], config.n_top_genes)]
    genes = genes[kept]
    offset = scale = None
    if config.transform == "minmax":
        offset = stats.min[kept]
        scale = _nonzero_or_one(stats.max[kept] - offset)
    elif config.scale:
        log_stats = column_stats(X, log1p=True)
        scale = _nonzero_or_one(np.sqrt(log_stats.mean_var()[1][kept]))
    return Preprocessor(
        genes=[str(g) for g in genes], transform=config.transform, offset=offset, scale=scale
    )


def _top_genes(dispersion: np.ndarray, n_top: int) -> np.ndarray:
    """Positions (sorted) of the `n_top` highest normalised dispersions (NaN ranks last)."""
    dispersion = np.nan_to_num(dispersion, nan=-np.inf)
    return np.sort(np.argsort(-dispersion, kind="stable")[:n_top])


def normalized_dispersion(X: Matrix, *, n_bins: int = 20) -> np.ndarray:
    """Seurat-style normalised dispersion per gene, computed on the values as given.

    Same definition as scanpy's `highly_variable_genes(flavor="seurat")` applied to log1p(X):
    log(variance / mean), z-scored among genes in the same of `n_bins` equal-width bins of
    log1p(mean); a gene alone in its bin gets 1, a gene with zero variance NaN. Plain numpy on
    purpose: scanpy's numba-parallel kernels start an OpenMP runtime whose threads then compete
    with torch's and slowed later training about tenfold on two cores. Working on the values as
    given (not expm1 of them) suits counts, TPM and log-normalised input without overflow.
    """
    return _normalized_dispersion(*column_stats(X).mean_var(ddof=1), n_bins=n_bins)


def _normalized_dispersion(mean: np.ndarray, var: np.ndarray, *, n_bins: int) -> np.ndarray:
    mean = np.where(mean == 0, 1e-12, mean)
    dispersion = var / mean
    with np.errstate(divide="ignore"):
        log_dispersion = pd.Series(np.where(dispersion > 0, np.log(dispersion), np.nan))
    bins = pd.cut(np.log1p(mean), bins=n_bins)
    grouped = log_dispersion.groupby(bins, observed=True)
    avg, dev = grouped.transform("mean"), grouped.transform("std")
    alone = dev.isna().to_numpy()
    normalized = ((log_dispersion - avg) / dev).to_numpy()
    normalized[alone] = 1.0
    normalized[np.isnan(log_dispersion.to_numpy())] = np.nan
    return normalized


@dataclass
class ColumnStats:
    """Per-gene statistics of a matrix in float64: cells, stored non-zeros, sum, sum of squares,
    min and max (implicit zeros of a sparse matrix included)."""

    n: int
    nonzero: np.ndarray
    sum: np.ndarray
    sum_sq: np.ndarray
    min: np.ndarray = field(repr=False)
    max: np.ndarray = field(repr=False)

    def mean_var(self, *, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Per-gene mean and variance (`ddof` as in numpy)."""
        mean = self.sum / self.n
        var = np.maximum(self.sum_sq / self.n - mean**2, 0.0) * (self.n / max(self.n - ddof, 1))
        return mean, var


def column_stats(X: Matrix, *, log1p: bool = False) -> ColumnStats:
    """Per-gene statistics of `X` (of log1p(X) if `log1p`), streamed over row chunks.

    Memory beyond `X` is one chunk of about `_VALUES_PER_CHUNK` stored values, whatever the
    number of cells; a sparse matrix is never densified.
    """
    n_cells, n_genes = X.shape
    per_row = (X.nnz if sp.issparse(X) else X.size) / max(n_cells, 1)
    chunk_size = max(1, int(_VALUES_PER_CHUNK // max(per_row, 1)))
    zeros = np.zeros(n_genes)
    stats = ColumnStats(
        n_cells, zeros.copy(), zeros.copy(), zeros.copy(), zeros + np.inf, -zeros - np.inf
    )
    for chunk in row_chunks(X, chunk_size=chunk_size):
        if sp.issparse(chunk):
            chunk = sp.csr_matrix(chunk, dtype=np.float64)
            if log1p:
                chunk.data = np.log1p(chunk.data)
            cols, values = chunk.indices, chunk.data
            stats.nonzero += np.bincount(cols[values != 0], minlength=n_genes)
            stats.sum += np.bincount(cols, weights=values, minlength=n_genes)
            stats.sum_sq += np.bincount(cols, weights=values * values, minlength=n_genes)
            low, high = chunk.min(axis=0).toarray().ravel(), chunk.max(axis=0).toarray().ravel()
        else:
            chunk = np.asarray(chunk, dtype=np.float64)
            if log1p:
                chunk = np.log1p(chunk)
            stats.nonzero += np.count_nonzero(chunk, axis=0)
            stats.sum += chunk.sum(axis=0)
            stats.sum_sq += np.square(chunk).sum(axis=0)
            low, high = chunk.min(axis=0, initial=np.inf), chunk.max(axis=0, initial=-np.inf)
        np.minimum(stats.min, low, out=stats.min)
        np.maximum(stats.max, high, out=stats.max)
    return stats


def _nonzero_or_one(v: np.ndarray) -> np.ndarray:
    """Per-gene divisor: genes constant in training get 1 so they map to a constant, not NaN."""
    return np.where(v > 0, v, 1.0).astype(np.float64)


def _require_unique_genes(adata: ad.AnnData, *, where: str) -> None:
    if not adata.var_names.is_unique:
        dupes = adata.var_names[adata.var_names.duplicated()].unique()[:5]
        raise InputError(
            f"gene names are not unique (e.g. {', '.join(map(str, dupes))})",
            where=where,
            fix="make var_names unique, e.g. adata.var_names_make_unique()",
        )


def align_genes(
    adata: ad.AnnData, genes: list[str], *, min_overlap: float = 0.5
) -> tuple[Matrix, int]:
    """Return adata's matrix with columns matched to `genes` by name, and how many were missing.

    Missing genes are filled with zeros; sparse input stays sparse, and is returned as is (no
    copy) when its genes already are `genes` in order. If fewer than `min_overlap`
    of `genes` are present the input almost certainly uses other identifiers or another
    organism, so an InputError explains what was found.
    """
    _require_unique_genes(adata, where="input genes (var_names)")
    position = adata.var_names.get_indexer(pd.Index(genes))
    found = position >= 0
    n_found = int(found.sum())
    if not genes or n_found < min_overlap * len(genes) or n_found == 0:
        missing = [g for g, ok in zip(genes, found, strict=True) if not ok][:5]
        raise InputError(
            f"only {n_found} of the model's {len(genes)} genes were found in the input "
            f"(need at least {min_overlap:.0%}); missing e.g. {', '.join(missing)}",
            where=f"input var_names (e.g. {', '.join(map(str, adata.var_names[:5]))})",
            fix="use the same gene identifiers as the training data (gene symbols, same case), "
            "or train a model on these genes",
        )
    X = cells_matrix(adata)
    if np.array_equal(position, np.arange(adata.n_vars)):
        return (X if isinstance(X, DiskMatrix) else _as_float32(X)), 0
    if isinstance(X, DiskMatrix):  # picked from each block of rows as it is read
        return X.then(functools.partial(_pick_genes, position=position), n_cols=len(genes)), (
            len(genes) - n_found
        )
    return _pick_genes(X, position), len(genes) - n_found


def _pick_genes(X: np.ndarray | sp.spmatrix, position: np.ndarray) -> np.ndarray | sp.csr_matrix:
    """Columns `position` of `X` as float32 (sparse stays sparse); -1 gives a column of zeros."""
    found = position >= 0
    if found.all():
        return _as_float32(X[:, position])
    selector = sp.csr_matrix(
        (np.ones(int(found.sum()), dtype=np.float32), (position[found], np.flatnonzero(found))),
        shape=(X.shape[1], len(position)),
    )
    aligned = sp.csr_matrix(X @ selector) if sp.issparse(X) else np.asarray(X @ selector)
    return _as_float32(aligned)
