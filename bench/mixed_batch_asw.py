"""What do batch ASW and iLISI say of patients mixed perfectly within cell types?

On the shared T-cell subset (19 patients in obs["sample"], a few cells of each patient per cell
type), take a latent space (PCA of log1p expression, 5 and 20 components) and score it twice:
with the cells' own patients, and with the patients shuffled among the cells of each cell type
(`--shuffles` draws), which mixes them perfectly within cell types by construction while the
latent, and so every cell-type column, stays the same. A metric that rewards mixing must score
the shuffled patients higher.

    python bench/mixed_batch_asw.py
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd
import scipy.sparse as sp
from batch_conditioning import load_cells
from sklearn.decomposition import PCA

from melvae import metrics


def shuffled_within(
    batches: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """`batches` permuted among the cells of each label."""
    out = batches.copy()
    for label in np.unique(labels):
        inside = np.flatnonzero(labels == label)
        out[inside] = rng.permutation(batches[inside])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--components", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--shuffles", type=int, default=3)
    args = parser.parse_args(argv)
    cells = load_cells()
    x = np.log1p(cells.X.toarray() if sp.issparse(cells.X) else np.asarray(cells.X))
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    batches = cells.obs["sample"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    rows = []
    for n in args.components:
        latent = PCA(n, random_state=0).fit_transform(x)
        draws = [("own patients", batches)] + [
            ("shuffled within cell types", shuffled_within(batches, labels, rng))
            for _ in range(args.shuffles)
        ]
        for name, b in draws:
            rows.append(
                {
                    "PCA components": n,
                    "patients": name,
                    "batch_asw": metrics.batch_asw(latent, labels, b),
                    "ilisi": metrics.ilisi(latent, b),
                }
            )
    table = pd.DataFrame(rows).groupby(["PCA components", "patients"], sort=False).mean()
    print(f"means ({args.shuffles} shuffles):")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
