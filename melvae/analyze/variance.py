"""How much of a latent space is patient and how much is cell type: variance explained.

For each latent dimension, the share of its variance that a grouping of the cells explains is
the R² of a one-way ANOVA of that dimension on the groups (between-group sum of squares over the
total; eta squared): 0 when every group has the same mean, 1 when cells of a group coincide. For
the embedding as a whole the sums of squares are added over dimensions first, so a dimension
weighs by its variance. Patient and cell type are measured separately, each on its own, so the
two shares overlap where patients differ in their cell-type make-up.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from melvae.analyze.interpret import dimension_names
from melvae.errors import InputError
from melvae.metrics import latent_and_groups

WHOLE = "whole embedding"


def _sums_of_squares(latent: ArrayLike, groups: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(between-group, total) sums of squares per dimension, over the cells with a group."""
    x, names, present = latent_and_groups(
        latent, groups, what="group values", where="variance_explained"
    )
    x, names = x[present], names[present]
    if np.unique(names).size < 2:
        raise InputError(
            f"the cells fall into {np.unique(names).size} group(s); 2 or more are needed",
            where="variance_explained",
            fix="pass a column with several patients or cell types",
        )
    codes = np.unique(names, return_inverse=True)[1]
    counts = np.bincount(codes)
    means = np.zeros((counts.size, x.shape[1]))
    np.add.at(means, codes, x)
    means /= counts[:, None]
    centred = x - x.mean(axis=0)
    between = (counts[:, None] * (means - x.mean(axis=0)) ** 2).sum(axis=0)
    return between, (centred**2).sum(axis=0)


def variance_explained(latent: ArrayLike, groups: ArrayLike) -> np.ndarray:
    """R² of a one-way ANOVA of each latent dimension on the groups, in [0, 1] (a constant
    dimension explains nothing: 0). Cells without a group are left out.

    Examples
    --------
    >>> variance_explained([[0.0], [2.0], [10.0], [12.0]], ["a", "a", "b", "b"])
    array([0.96153846])
    """
    return _share(*_sums_of_squares(latent, groups))


def _share(between: np.ndarray, total: np.ndarray) -> np.ndarray:
    return np.divide(between, total, out=np.zeros_like(total), where=total > 0)


def covariate_shares(latent: ArrayLike, covariates: Mapping[str, ArrayLike]) -> pd.DataFrame:
    """Dimensions ("z0", ...) and `WHOLE` × covariates (e.g. patient, cell type): the share of
    variance each covariate explains on its own (`variance_explained`); the whole embedding's
    share adds the sums of squares over dimensions."""
    x = np.asarray(latent, dtype=np.float64)
    columns = {}
    for name, groups in covariates.items():
        between, total = _sums_of_squares(x, groups)
        columns[name] = [
            *_share(between, total),
            *_share(between.sum(keepdims=True), total.sum(keepdims=True)),
        ]
    return pd.DataFrame(columns, index=[*dimension_names(x.shape[1]), WHOLE])
