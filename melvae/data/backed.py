"""Cells that stay on disk: an AnnData opened in backed mode trains, encodes and is scored without
its matrix ever being read whole.

`anndata.read_h5ad(path, backed="r")` (or `melvae.data.read.read_h5ad(path, backed=True)`)
keeps X in the file. `cells_matrix` turns such an AnnData, or a view of its rows, into a
`DiskMatrix`: the rows it names, read block by block, with the steps that would have run on an
in-memory matrix (the model's genes picked, its transform) applied to each block as it is read.
Everything downstream cuts rows from it exactly as from a numpy or CSR matrix.

CSR is read straight from the file's `data`/`indices` datasets with `indptr` held in memory
(8 bytes a cell): anndata's own backed indexing read 32 consecutive rows of a 200,000 × 2,000
file in ~4.8 ms and 32 scattered ones in ~7.6 ms, most of it overhead per call. Reads are still
cheapest in long runs, so batches are cut from windows of many rows read at once
(`melvae.data.loader.batches`) and a training epoch visits the cells in a block-shuffled order
(`block_order`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

from melvae.errors import InputError

Matrix = np.ndarray | sp.csr_matrix
Step = Callable[[Matrix], Matrix]
# Stored values of one read window: what a DiskMatrix reads at once when batches are cut from
# it (~64 MB of float32 plus indices), and what the shuffle of a training epoch mixes.
WINDOW_VALUES = 1 << 24
# A training epoch's window is cut into this many blocks of consecutive cells, drawn from
# random places of the split: each minibatch mixes cells of up to this many places.
BLOCKS_PER_WINDOW = 64
# Rows fewer stored values apart than this are read in one call and the rows between dropped:
# one HDF5 read costs about as much as copying this many values (~256 KB).
GAP_VALUES = 1 << 16


class _CSRStore:
    """Rows of a CSR matrix in an HDF5 group (anndata's `csr_matrix` encoding)."""

    def __init__(self, group: h5py.Group) -> None:
        self.data, self.indices = group["data"], group["indices"]
        self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        self.shape = tuple(int(s) for s in group.attrs["shape"])
        self.dtype = self.data.dtype

    def values_per_row(self) -> float:
        return float(self.indptr[-1]) / max(self.shape[0], 1)

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        first, last = int(self.indptr[start]), int(self.indptr[stop])
        return sp.csr_matrix(
            (
                np.asarray(self.data[first:last], dtype=np.float32),
                np.asarray(self.indices[first:last]),
                self.indptr[start : stop + 1] - first,
            ),
            shape=(stop - start, self.shape[1]),
        )


class _DenseStore:
    """Rows of a dense matrix in an HDF5 dataset."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset
        self.shape = tuple(int(s) for s in dataset.shape)
        self.dtype = dataset.dtype

    def values_per_row(self) -> float:
        return float(self.shape[1])

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.dataset[start:stop], dtype=np.float32)


@dataclass(frozen=True)
class DiskMatrix:
    """Some rows of a cells × genes matrix in an HDF5 file, read only where they are indexed.

    Indexing with a slice or an integer array of positions (into `rows`) returns an in-memory
    float32 CSR or numpy matrix of those rows, in that order, after `steps` (each maps a block
    of rows to the same rows, e.g. gene alignment and the transform). Rows within `gap` of each
    other are read as one run.
    """

    store: _CSRStore | _DenseStore
    rows: np.ndarray  # the matrix's rows: their positions in the file
    n_cols: int
    steps: tuple[Step, ...] = ()
    ndim = 2

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.n_cols

    @property
    def size(self) -> int:
        """Cells × genes, as for a dense matrix: an upper bound of the values a read yields."""
        return len(self.rows) * self.n_cols

    @property
    def dtype(self) -> np.dtype:
        """The stored values' type (blocks are read as float32)."""
        return self.store.dtype

    def window_rows(self) -> int:
        """Rows of one read window: `WINDOW_VALUES` stored values, and at most four times as
        many once made dense (a step may densify a block); at least one."""
        stored = WINDOW_VALUES / max(self.store.values_per_row(), 1.0)
        made_dense = 4 * WINDOW_VALUES / max(self.n_cols, 1)
        return max(1, int(min(stored, made_dense)))

    def then(self, step: Step, *, n_cols: int | None = None) -> DiskMatrix:
        """This matrix with `step` applied to every block read (giving `n_cols` columns)."""
        return replace(
            self, steps=(*self.steps, step), n_cols=self.n_cols if n_cols is None else n_cols
        )

    def __getitem__(self, rows: np.ndarray | slice) -> Matrix:
        positions = self.rows[rows]
        wanted, back = np.unique(positions, return_inverse=True)
        block = _read_rows(self.store, wanted)
        for step in self.steps:  # each maps rows to rows: before the reordering copy
            block = step(block)
        return block if np.array_equal(back, np.arange(len(wanted))) else block[back]


def _read_rows(store: _CSRStore | _DenseStore, wanted: np.ndarray) -> Matrix:
    """Rows `wanted` (ascending, unique) of `store`, read in runs: rows fewer than `GAP_VALUES`
    stored values apart are read together and the rows between dropped."""
    if len(wanted) == 0:
        empty = np.zeros((0, store.shape[1]), dtype=np.float32)
        return sp.csr_matrix(empty) if isinstance(store, _CSRStore) else empty
    gap = max(1, int(GAP_VALUES // max(store.values_per_row(), 1.0)))
    breaks = np.flatnonzero(np.diff(wanted) > gap) + 1
    parts = []
    for run in np.split(wanted, breaks):
        start, stop = int(run[0]), int(run[-1]) + 1
        part = store.read(start, stop)
        parts.append(part if stop - start == len(run) else part[run - start])
    if len(parts) == 1:
        return parts[0]
    return sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.concatenate(parts)


def block_order(n: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """A random order of `n` rows that reads well from disk: the rows are cut into blocks of
    consecutive rows (`BLOCKS_PER_WINDOW` blocks a window of `window` rows), the blocks put in
    random order, and the rows of each window of blocks shuffled. A permutation of `n`, as
    random as a full shuffle when `n` fits one window."""
    if n <= window:
        return rng.permutation(n)
    block = max(1, window // BLOCKS_PER_WINDOW)
    starts = rng.permutation(np.arange(0, n, block))
    rows = np.concatenate([np.arange(s, min(s + block, n)) for s in starts])
    windows = (rows[start : start + window] for start in range(0, n, window))
    return np.concatenate([part[rng.permutation(len(part))] for part in windows])


def _file_rows(adata: ad.AnnData) -> tuple[ad.AnnData, np.ndarray, np.ndarray | slice]:
    """(the backed AnnData a view was taken of, the view's rows in it, its columns)."""
    if not adata.is_view:
        return adata, np.arange(adata.n_obs), slice(None)
    # anndata makes no view of a view of backed data; the view's row and column indices into
    # its file-backed parent are how it is taken again (`subset`) or read (`cells_matrix`).
    parent = adata._adata_ref
    return parent, np.arange(parent.n_obs)[adata._oidx], adata._vidx


def subset(adata: ad.AnnData, rows: np.ndarray | slice) -> ad.AnnData:
    """`adata[rows]`, also where `adata` is a view of a backed AnnData (anndata refuses a view
    of such a view): the view's rows are then taken from the file-backed AnnData once."""
    if not (adata.isbacked and adata.is_view):
        return adata[rows]
    parent, positions, columns = _file_rows(adata)
    return parent[positions[rows], columns]


def cells_matrix(adata: ad.AnnData) -> Matrix | DiskMatrix:
    """adata's X: as it is in memory, or for a backed AnnData (or a view of one) a `DiskMatrix`
    of its rows and genes, nothing read yet."""
    if not adata.isbacked:
        return adata.X
    parent, positions, columns = _file_rows(adata)
    element = parent.file["X"]
    if isinstance(element, h5py.Dataset):
        store: _CSRStore | _DenseStore = _DenseStore(element)
    elif element.attrs.get("encoding-type") == "csr_matrix":
        store = _CSRStore(element)
    else:
        raise InputError(
            f"the backed file's X is stored as {element.attrs.get('encoding-type')!r}; "
            "cells can only be streamed from a dense or CSR matrix (a CSC file is read by gene)",
            where=str(parent.filename),
            fix="write the file with X as CSR (adata.X = scipy.sparse.csr_matrix(adata.X); "
            "adata.write_h5ad(...)), or read it into memory (without backed)",
        )
    matrix = DiskMatrix(store, positions, store.shape[1])
    if isinstance(columns, slice) and columns == slice(None):
        return matrix
    picked = np.arange(store.shape[1])[columns]
    return matrix.then(lambda block: block[:, picked], n_cols=len(picked))


def reopenable(adata: ad.AnnData) -> dict[str, Any] | ad.AnnData:
    """What of `adata` a pickle can carry to another process: an in-memory AnnData itself, a
    backed one (or view) as its file name and rows (`reopened` opens it there again)."""
    if not adata.isbacked:
        return adata
    parent, positions, columns = _file_rows(adata)
    return {"backed_file": str(parent.filename), "rows": positions, "columns": columns}


def reopened(state: dict[str, Any] | ad.AnnData, opened: dict[str, ad.AnnData]) -> ad.AnnData:
    """The AnnData `reopenable` described: the file opened backed again (once per file name
    in `opened`, which keeps it) and the same rows."""
    if isinstance(state, ad.AnnData):
        return state
    name = state["backed_file"]
    if name not in opened:
        opened[name] = ad.read_h5ad(name, backed="r")
    return opened[name][state["rows"], state["columns"]]
