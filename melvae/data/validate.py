"""Checks between reading and preprocessing: fail early with an error the user can act on."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from melvae.data.backed import DiskMatrix, cells_matrix
from melvae.data.loader import row_chunks
from melvae.errors import InputError

logger = logging.getLogger(__name__)

_ROWS_PER_BLOCK = 2048


def _first_offending(
    x: object, is_bad: Callable[[np.ndarray], np.ndarray]
) -> tuple[int, tuple[int, int, float] | None]:
    """Count entries where ``is_bad`` holds and locate the first one (row, column, value).

    Sparse matrices are checked on their stored values only (implicit zeros are never bad);
    dense ones block by block, so no full-size boolean copy is made; a matrix on disk is read
    in row chunks, each checked as in memory.
    """
    if isinstance(x, DiskMatrix):
        count, first, offset = 0, None, 0
        for chunk in row_chunks(x, chunk_size=x.window_rows()):
            n, found = _first_offending(chunk, is_bad)
            if found is not None and first is None:
                first = (offset + found[0], found[1], found[2])
            count, offset = count + n, offset + chunk.shape[0]
        return count, first
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        bad = is_bad(x.data)
        count = int(np.count_nonzero(bad))
        if not count:
            return 0, None
        k = int(np.argmax(bad))
        row = int(np.searchsorted(x.indptr, k, side="right") - 1)
        return count, (row, int(x.indices[k]), float(x.data[k]))
    x = np.asarray(x)
    count, first = 0, None
    for start in range(0, x.shape[0], _ROWS_PER_BLOCK):
        bad = is_bad(x[start : start + _ROWS_PER_BLOCK])
        n = int(np.count_nonzero(bad))
        if n and first is None:
            i, j = np.argwhere(bad)[0]
            first = (start + int(i), int(j), float(x[start + i, j]))
        count += n
    return count, first


def _location(adata: ad.AnnData, source: str, row: int, col: int) -> str:
    return (
        f"{source}, cell {adata.obs_names[row]!r} (row {row + 1}), "
        f"gene {adata.var_names[col]!r} (column {col + 1})"
    )


def _reject_duplicates(names: pd.Index, kind: str, source: str, *, fix: str) -> None:
    """InputError naming up to five repeated gene or cell names with their counts."""
    duplicated = pd.unique(names[names.duplicated()])
    if len(duplicated):
        counts = pd.Series(names).value_counts()
        examples = ", ".join(f"{name!r} ×{counts[name]}" for name in duplicated[:5])
        raise InputError(
            f"{len(duplicated)} {kind} name(s) occur more than once: {examples}",
            where=f"{source}, {kind} names",
            fix=fix,
        )


def validate_expression(adata: ad.AnnData, *, source: str, require_nonnegative: bool) -> None:
    """Raise InputError if X cannot be trained on: empty, non-numeric, duplicate gene or cell
    names, NaN/inf, or negative values when the likelihood needs non-negative input."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(
            f"the expression matrix has {adata.n_obs} cells and {adata.n_vars} genes",
            where=source,
            fix="Check that the file holds the expression matrix; a CSV needs a header row "
            "naming the genes and one row per cell.",
        )
    matrix = cells_matrix(adata)
    if not (np.issubdtype(matrix.dtype, np.number) or matrix.dtype == bool):
        raise InputError(
            f"the expression matrix has non-numeric type {matrix.dtype}",
            where=source,
            fix="Store numeric expression values in X.",
        )
    _reject_duplicates(
        adata.var_names,
        "gene",
        source,
        fix="Make gene names unique, e.g. sum or drop the repeated genes, or call "
        "adata.var_names_make_unique() and save the file again.",
    )
    _reject_duplicates(
        adata.obs_names,
        "cell",
        source,
        fix="Give every cell a unique name (e.g. prefix barcodes with their sample, or call "
        "adata.obs_names_make_unique()) and save the file again; repeated names would let "
        "one cell's row stand for another's in the splits.",
    )
    count, first = _first_offending(matrix, lambda v: ~np.isfinite(v))
    if first is not None:
        row, col, value = first
        raise InputError(
            f"{count} expression value(s) are NaN or infinite; the first is {value} for cell "
            f"{adata.obs_names[row]!r}, gene {adata.var_names[col]!r}",
            where=_location(adata, source, row, col),
            fix="Replace missing values (with 0 if they mean 'not detected') or remove the "
            "affected cells or genes, then run again.",
        )
    if require_nonnegative:
        count, first = _first_offending(matrix, lambda v: v < 0)
        if first is not None:
            row, col, value = first
            raise InputError(
                f"{count} expression value(s) are negative, but the chosen likelihood needs "
                f"non-negative input; the first is {value} for cell {adata.obs_names[row]!r}, "
                f"gene {adata.var_names[col]!r}",
                where=_location(adata, source, row, col),
                fix="Give non-negative values (counts, TPM or log-normalised expression, e.g. "
                "the .raw matrix instead of scaled or centred data), or choose the gaussian "
                "likelihood, which accepts negative values.",
            )


def validate_labels(
    adata: ad.AnnData, label_key: str | None, *, source: str, required: bool = False
) -> str | None:
    """Return the label column to use, or None (with a warning) when there is none.

    Training works without labels; only the label-based metrics are skipped. A column the user
    named (`required`, e.g. `[data] label_key` of a study file) must exist: a typo would
    otherwise turn a labelled study into a fit-only one.
    """
    if label_key is None:
        logger.warning("%s: no label column given; label metrics will be skipped", source)
        return None
    if required and label_key not in adata.obs:
        raise InputError(
            f"the label column {label_key!r} is not in the data (columns: "
            f"{', '.join(map(str, adata.obs.columns)) or 'none'})",
            where=f"{source}, obs columns; the study file's [data] label_key",
            fix="correct [data] label_key to one of those columns, or remove it to train "
            "without labels",
        )
    if label_key not in adata.obs:
        logger.warning(
            "%s has no obs column %r (columns: %s); training still works but label metrics "
            "will be skipped",
            source,
            label_key,
            ", ".join(map(str, adata.obs.columns)) or "none",
        )
        return None
    labels = adata.obs[label_key]
    present = labels[labels.notna()].astype(str)
    present = present[present.str.strip() != ""]
    classes = pd.unique(present)
    if len(classes) < 2:
        raise InputError(
            f"the label column {label_key!r} has {len(classes)} distinct label(s)"
            f"{' (' + repr(classes[0]) + ')' if len(classes) else ''}; label metrics need at "
            "least 2 cell types",
            where=f"{source}, obs column {label_key!r}",
            fix="Give a label column with at least two cell types, or none to train without "
            "label metrics.",
        )
    if len(present) < len(labels):
        logger.info(
            "%s: %d of %d cells have no %r label and are left out of label metrics",
            source,
            len(labels) - len(present),
            len(labels),
            label_key,
        )
    return label_key


# A value beyond the training range by more than this many training ranges counts as far out;
# the warning fires when at least FAR_FRACTION of the values are.
FAR_RANGES = 1.0
FAR_FRACTION = 0.01


def warn_outside_training_range(
    adata: ad.AnnData,
    genes: list[str],
    *,
    low: np.ndarray,
    high: np.ndarray,
    source: str,
) -> float:
    """Warn when cells lie far outside a model's per-gene training range (wrong units?).

    `low`/`high`: the training minimum and maximum of each of `genes`; genes the cells lack are
    ignored. Returns the fraction of values outside [low, high] (what a min-max model clips).
    """
    columns = adata.var_names.get_indexer(genes)
    present = columns >= 0
    if not present.any() or adata.n_obs == 0:
        return 0.0
    x, picked = cells_matrix(adata), columns[present]
    low, high = np.asarray(low)[present], np.asarray(high)[present]
    span = np.maximum(high - low, np.finfo(np.float64).tiny)
    clipped = far = 0
    for start in range(0, adata.n_obs, _ROWS_PER_BLOCK):
        block = x[start : start + _ROWS_PER_BLOCK][:, picked]
        block = block.toarray() if sp.issparse(block) else np.asarray(block, dtype=np.float64)
        clipped += int(np.count_nonzero((block < low) | (block > high)))
        beyond = np.maximum(low - block, block - high) / span
        far += int(np.count_nonzero(beyond > FAR_RANGES))
    total = adata.n_obs * int(present.sum())
    if far >= FAR_FRACTION * total:
        logger.warning(
            "%s: %.1f%% of the values lie outside the model's training range and are clipped "
            "(%.1f%% by more than the range itself); are they in the units the model was "
            "trained on (e.g. log-normalised, not raw counts)?",
            source,
            100 * clipped / total,
            100 * far / total,
        )
    return clipped / total


def validate_batches(
    adata: ad.AnnData,
    batch_key: str | None,
    *,
    source: str,
    label_key: str | None = None,
    known: str | None = None,
) -> str | None:
    """Return the batch column to condition on (`batch_key`), or None without one.

    A named column must exist, differ from the label column, hold at least two batches and
    name a batch for every cell: a conditioned decoder needs each cell's batch, and guessing
    one for a cell would mix patients, so missing values are refused rather than dropped or
    filled. `known`: the dataset's batch column (the catalogue's), suggested when none is set.
    """
    if batch_key is None:
        if known is not None and known in adata.obs:
            logger.info(
                "%s has a batch column %r (%d batches); set [data] batch_key = %r (run "
                "--batch-key %s) to condition the model on it",
                source,
                known,
                adata.obs[known].nunique(),
                known,
                known,
            )
        return None
    where = f"{source}, obs column {batch_key!r} named by batch_key"
    if batch_key not in adata.obs:
        hint = f" ({known!r} holds this dataset's batches)" if known in adata.obs else ""
        raise InputError(
            f"the batch column {batch_key!r} is not in the data (columns: "
            f"{', '.join(map(str, adata.obs.columns)) or 'none'}){hint}",
            where=where,
            fix="correct batch_key to the column naming each cell's patient or sample, or "
            "remove it to train without a batch covariate",
        )
    if batch_key == label_key:
        raise InputError(
            f"the batch column {batch_key!r} is also the label column",
            where=where,
            fix="give as batch_key the column naming each cell's patient or sample, not its "
            "cell type",
        )
    batches = adata.obs[batch_key]
    text = batches.astype(str).str.strip()
    missing = batches.isna().to_numpy() | (text == "").to_numpy()
    if missing.any():
        examples = ", ".join(repr(name) for name in adata.obs_names[missing][:5])
        raise InputError(
            f"{int(missing.sum())} of {adata.n_obs} cells have no batch in {batch_key!r} "
            f"(e.g. {examples})",
            where=where,
            fix="give every cell its batch (e.g. 'unknown' for cells of an unrecorded sample, "
            "which then form a batch of their own), or remove those cells",
        )
    names = pd.unique(text)
    if len(names) < 2:
        raise InputError(
            f"the batch column {batch_key!r} has {len(names)} batch ({names[0]!r}); "
            "conditioning on it needs at least 2",
            where=where,
            fix="give a column with at least two batches, or remove batch_key",
        )
    return batch_key


def validate_split_batches(batches: dict[str, np.ndarray], *, source: str) -> None:
    """Refuse a split whose validation or test cells belong to a batch without training cells:
    a model conditioned on the batch learns only the batches it trains on.

    `batches`: each split's cells' batch names, keyed "train", "val", "test".
    """
    trained = set(batches["train"])
    for split, names in batches.items():
        unseen = sorted(set(names) - trained)
        if unseen:
            raise InputError(
                f"the {split} split holds cells of {len(unseen)} batch(es) with no cell in the "
                f"training split: {', '.join(map(repr, unseen[:5]))}",
                where=f"{source}, the study's split and its [data] batch_key",
                fix="remove the cells of such small batches, merge them with another batch, or "
                "change [preprocess] seed for another split",
            )
