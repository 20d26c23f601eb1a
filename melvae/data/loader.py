"""Minibatch loading: dense torch batches and row chunks cut from a large (sparse) matrix.

Of a large sparse matrix only the rows asked for are ever made dense, so a cells × genes matrix
of any size trains in memory bounded by the batch. scipy's CSR row indexing plus `toarray` is the
fastest way found to cut a batch (~0.5 ms for 32 × 17,994 genes at 25 % non-zero, against ~7 ms
for a numpy scatter and ~50 ms for torch's sparse CSR `to_dense`), so it is used as is. A sparse
matrix small enough dense and not too sparse (`DENSE_LIMIT`, `DENSE_GROWTH`) is made dense once
instead (`densified`): cutting a batch is then a row copy, 0.021 instead of 0.136 ms for 32
cells at 2,000 genes (of a ~4 ms step), 0.13 instead of 0.32 ms at 17,994 genes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from melvae.data.backed import DiskMatrix, block_order

Matrix = np.ndarray | sp.csr_matrix | DiskMatrix
# A sparse matrix of at most this many bytes dense is made dense once (`densified`): the
# original study's 1,933 training cells x 17,994 genes are 139 MB.
DENSE_LIMIT = 256 * 2**20
# ... and only if dense it takes at most this many times its sparse bytes (a matrix of 25 %
# non-zero values takes 2x, one of 0.5 % 100x: kept sparse, as its user chose).
DENSE_GROWTH = 4


def densified(x: Matrix, limit: int = DENSE_LIMIT) -> Matrix:
    """`x` as a dense float32 array if it is sparse and dense takes at most `limit` bytes and at
    most `DENSE_GROWTH` times its sparse bytes, else `x` itself (batches are then cut from it
    row by row)."""
    if not sp.issparse(x):
        return x
    dense_bytes = x.shape[0] * x.shape[1] * 4
    sparse_bytes = x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
    if dense_bytes > limit or dense_bytes > DENSE_GROWTH * sparse_bytes:
        return x
    return x.toarray().astype(np.float32, copy=False)


def dense_rows(x: Matrix, rows: np.ndarray | slice) -> torch.Tensor:
    """The given rows of `x` as a dense float32 CPU tensor (cells × genes)."""
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and isinstance(rows, np.ndarray):
        # A training batch of the dense matrix: `take` copies the rows in one call, 66 against
        # 82 us for indexing and a contiguity check when a product has just emptied the caches.
        return torch.from_numpy(x.take(rows, axis=0))
    picked = x[rows]
    if sp.issparse(picked):
        picked = picked.toarray()
    return torch.from_numpy(np.ascontiguousarray(picked, dtype=np.float32))


def dense(x: Matrix) -> np.ndarray:
    """All of `x` as a dense float32 array (for the bounded sets of cells metrics score); a
    matrix on disk is read a window at a time, so only its picked genes are ever held whole."""
    if not isinstance(x, DiskMatrix):
        return dense_rows(x, slice(None)).numpy()
    windows = row_chunks(x, chunk_size=x.window_rows())
    parts = [dense_rows(part, slice(None)).numpy() for part in windows]
    return np.concatenate(parts) if parts else np.zeros(x.shape, dtype=np.float32)


def row_sums(x: Matrix) -> np.ndarray:
    """Each row's sum (float64), read in row chunks."""
    return np.concatenate(
        [np.asarray(chunk.sum(axis=1), dtype=np.float64).ravel() for chunk in row_chunks(x)]
        or [np.zeros(0)]
    )


def epoch_order(x: Matrix, rng: np.random.Generator) -> np.ndarray:
    """The order a training epoch visits the rows of `x` in: a random permutation, or for a
    matrix on disk a block-shuffled one that reads in long runs (`backed.block_order`)."""
    if isinstance(x, DiskMatrix):
        return block_order(x.shape[0], x.window_rows(), rng)
    return rng.permutation(x.shape[0])


def batches(
    x: Matrix,
    batch_size: int,
    *,
    order: np.ndarray | None = None,
    device: torch.device | None = None,
) -> Iterator[torch.Tensor]:
    """Yield dense float32 batches of `batch_size` rows of `x` (in `order` if given) on `device`.

    For a CUDA device each batch is pinned and copied asynchronously, so the next batch is cut
    on the CPU while the GPU still works on the previous one. Of a matrix on disk a window of
    many batches' rows is read at once (`DiskMatrix.window_rows`), and batches cut from it.
    """
    cuda = device is not None and device.type == "cuda"
    for part, part_order in _windows(x, batch_size, order):
        for start in range(0, part.shape[0], batch_size):
            rows = (
                slice(start, start + batch_size)
                if part_order is None
                else part_order[start : start + batch_size]
            )
            batch = dense_rows(part, rows)
            if cuda:
                batch = batch.pin_memory().to(device, non_blocking=True)
            elif device is not None and device.type != "cpu":
                batch = batch.to(device)
            yield batch


def _windows(
    x: Matrix, batch_size: int, order: np.ndarray | None
) -> Iterator[tuple[np.ndarray | sp.csr_matrix | DiskMatrix, np.ndarray | None]]:
    """(matrix, order of its rows) to cut batches from: `x` and `order` themselves in memory;
    of a matrix on disk, windows of whole batches read in the order's order (order None)."""
    if not isinstance(x, DiskMatrix):
        yield x, order
        return
    window = max(1, x.window_rows() // batch_size) * batch_size
    for start in range(0, x.shape[0], window):
        rows = slice(start, start + window) if order is None else order[start : start + window]
        yield x[rows], None


def coded_batches(
    x: Matrix,
    codes: np.ndarray | None,
    batch_size: int,
    *,
    order: np.ndarray | None = None,
    device: torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """`batches` of `x`, each paired with its cells' batch codes (`codes`: one int per row of
    `x`, as int64 on `device`), or with None where there are no codes (no batch covariate)."""
    cut = batches(x, batch_size, order=order, device=device)
    if codes is None:
        return ((xb, None) for xb in cut)
    picked = codes if order is None else codes[order]
    return zip(
        cut,
        torch.as_tensor(picked, dtype=torch.int64, device=device).split(batch_size),
        strict=True,
    )


def row_chunks(
    x: Matrix, rows: np.ndarray | None = None, chunk_size: int = 65536
) -> Iterator[Matrix]:
    """Yield consecutive chunks of the chosen rows of `x` (all rows if None), as `x`'s own type.

    For streaming statistics over a subset of a large matrix without copying the subset whole.
    """
    n = x.shape[0] if rows is None else len(rows)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        yield x[start:stop] if rows is None else x[rows[start:stop]]
