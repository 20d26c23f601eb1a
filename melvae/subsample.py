"""Bounded, stratified subsamples: what t-SNE and the label metrics run on for large data.

Silhouette is quadratic in cells and t-SNE worse, so on a million-cell atlas they run on a
subsample of fixed size in which every cell type keeps its share. Below the bound every cell is
used, so small data sets score exactly as before.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike


def stratified_subsample(labels: ArrayLike, max_cells: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of exactly `max_cells` cells (all cells, in order, when there are at most
    `max_cells`), each label keeping its share; the one subsampler of melvae.

    Shares are rounded by largest remainder, then every label that rounded to no cell gets one
    (taken from the largest share) as long as there are no more labels than `max_cells`.
    Missing labels (NaN/None) form their own stratum. Deterministic for a seed.
    """
    codes = pd.factorize(np.asarray(labels, dtype=object), use_na_sentinel=False)[0]
    n = codes.size
    if n <= max_cells:
        return np.arange(n)
    counts = np.bincount(codes)
    quota, remainder = np.divmod(counts * max_cells, n)
    quota[np.argsort(-remainder, kind="stable")[: max_cells - quota.sum()]] += 1
    if counts.size <= max_cells:
        for empty in np.flatnonzero(quota == 0):
            quota[np.argmax(quota)] -= 1
            quota[empty] = 1
    rng = np.random.default_rng(seed)
    picks = [
        rng.choice(np.flatnonzero(codes == i), size=q, replace=False) for i, q in enumerate(quota)
    ]
    return np.sort(np.concatenate(picks))
