"""melvae.data.loader: batches, and which sparse matrices are made dense once."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from melvae.data.loader import batches, densified


def _csr(density: float) -> sp.csr_matrix:
    rng = np.random.default_rng(0)
    return sp.random(60, 40, density=density, format="csr", dtype=np.float32, rng=rng)


def test_a_small_dense_enough_matrix_is_made_dense_with_the_same_batches() -> None:
    x = _csr(0.25)
    dense = densified(x)
    assert isinstance(dense, np.ndarray) and dense.dtype == np.float32
    np.testing.assert_array_equal(dense, x.toarray())
    order = np.random.default_rng(1).permutation(60)
    for a, b in zip(batches(x, 16, order=order), batches(dense, 16, order=order), strict=True):
        assert torch.equal(a, b)


def test_a_very_sparse_or_too_large_matrix_stays_sparse() -> None:
    assert sp.issparse(densified(_csr(0.005)))  # dense would be ~100x its sparse size
    assert sp.issparse(densified(_csr(0.25), limit=60 * 40 * 4 - 1))
    already = np.ones((3, 2), dtype=np.float32)
    assert densified(already) is already
