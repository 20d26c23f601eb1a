"""Sparse input stays sparse until a batch is made: what that saves, measured side by side.

A GSE115978-sized matrix (reference: 2,761 cells × 17,994 genes at the density of Smart-seq2
TPM, ~25 % non-zero) is trained for a few epochs twice with the same seed: once from CSR rows
cut per batch (what melvae does), once from a matrix densified up front. Prints input memory,
peak traced memory during training (numpy/scipy allocations; for sparse input this is the
densified evaluation batch, bounded by eval batch size × genes whatever the cell count) and time
per epoch for both, and their ratios.

    python bench/sparse_batches.py [--cells 2761] [--genes 17994] [--density 0.25] [--epochs 3]
                                   [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import scipy.sparse as sp
import torch

from melvae.module import VAEModule
from melvae.train import TrainConfig, train_vae


def synthetic_tpm(cells: int, genes: int, density: float, seed: int = 0) -> sp.csr_matrix:
    """Min–max-scaled, TPM-like sparse matrix (values in [0, 1])."""
    rng = np.random.default_rng(seed)
    matrix = sp.random(cells, genes, density=density, format="csr", dtype=np.float32, rng=rng)
    matrix.data = np.log1p(rng.lognormal(2.0, 1.5, matrix.nnz)).astype(np.float32)
    matrix.data /= matrix.data.max()
    return matrix


def nbytes(x: np.ndarray | sp.csr_matrix) -> int:
    if sp.issparse(x):
        return x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
    return x.nbytes


def run(x_train, x_val, epochs: int) -> tuple[float, int]:
    """Seconds per epoch and peak traced (numpy/scipy) memory for one training run."""
    module = VAEModule(x_train.shape[1], hidden_dim=256, latent_dim=5)
    config = TrainConfig(
        epochs=epochs, batch_size=32, learning_rate=1e-3, seed=0, early_stopping_patience=None
    )
    tracemalloc.start()
    started = time.perf_counter()
    train_vae(module, x_train, x_val, config, progress=False)
    seconds = (time.perf_counter() - started) / epochs
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2761)
    parser.add_argument("--genes", type=int, default=17994)
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    matrix = synthetic_tpm(args.cells, args.genes, args.density)
    n_val = args.cells // 5
    sparse_train, sparse_val = matrix[n_val:], matrix[:n_val]

    dense_train, dense_val = sparse_train.toarray(), sparse_val.toarray()
    run(sparse_train[:64], sparse_val[:64], 1)  # warm-up: torch's lazy imports, first-touch pages
    # Alternate the two and keep each one's best, so neither pays for what ran before it.
    sparse_runs, dense_runs = [], []
    for _ in range(args.repeats):
        sparse_runs.append(run(sparse_train, sparse_val, args.epochs))
        dense_runs.append(run(dense_train, dense_val, args.epochs))
    sparse_seconds, sparse_peak = min(sparse_runs)
    dense_seconds, dense_peak = min(dense_runs)

    rows = [
        (
            "input memory (MiB)",
            nbytes(sparse_train) + nbytes(sparse_val),
            dense_train.nbytes + dense_val.nbytes,
        ),
        ("training peak, traced (MiB)", sparse_peak, dense_peak),
    ]
    print(
        f"{args.cells} cells × {args.genes} genes, {args.density:.0%} non-zero, "
        f"best of {args.repeats} × {args.epochs} epochs, hidden 256, latent 5, batch 32, "
        "torch threads 2"
    )
    print(f"{'':28s}{'sparse rows':>14s}{'dense':>14s}{'dense/sparse':>14s}")
    for name, sparse_value, dense_value in rows:
        print(
            f"{name:28s}{sparse_value / 2**20:14.1f}{dense_value / 2**20:14.1f}"
            f"{dense_value / sparse_value:14.2f}"
        )
    print(
        f"{'seconds per epoch':28s}{sparse_seconds:14.2f}{dense_seconds:14.2f}"
        f"{dense_seconds / sparse_seconds:14.2f}"
    )


if __name__ == "__main__":
    main()
