"""What would perfectly mixed patients score? Batch ASW and iLISI against their own ceilings.

Issue 15's mixing target asks the batch-aware champion for a higher batch ASW and iLISI than
every baseline while it keeps the champion's cell types. This measures, in each embedding's own
geometry, what those two metrics give when the patients *are* mixed by construction: on the
held-out cells of `bench/batch_effects.py`'s outer splits (the same seeds, PCA 10, ComBat +
PCA 10, Harmony on PCA 10, and any fixed-settings VAE of `bench/batch_conditioning.py`, by
default the decoder-conditioned one), each cell's patient is shuffled `--shuffles` times
- `within types`: among the cells of its cell type (every cell type keeps its cells and its
  patients' shares; each patient is spread over its type at random: the best any method that
  keeps the cell types can do), and
- `all cells`: among all cells (patients spread over everything, cell types ignored),
and the metrics of the real patients are printed beside the means of the shuffled ones.

    python bench/mixing_ceiling.py --seeds 0 1 2
    python bench/mixing_ceiling.py --seeds 0 --methods pca harmony decoder
    python bench/mixing_ceiling.py --methods "label adversary 30 + label head 10"
"""

from __future__ import annotations

import argparse
import logging
import sys

import anndata as ad
import numpy as np
import pandas as pd
from batch_conditioning import VARIANTS, fit_variant
from batch_effects import baseline, load, outer_split

from melvae import metrics

BASELINES = ("pca", "combat", "harmony")


def shuffled_within(
    batches: np.ndarray, groups: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """`batches` permuted at random among the cells of each group (one group: all cells).

    Examples
    --------
    >>> b = np.array(["p", "q", "p", "q"]); g = np.array(["T", "T", "B", "B"])
    >>> s = shuffled_within(b, g, np.random.default_rng(0))
    >>> sorted(s[g == "T"]) == ["p", "q"] and sorted(s[g == "B"]) == ["p", "q"]
    True
    """
    out = batches.copy()
    for group in np.unique(groups):
        cells = np.flatnonzero(groups == group)
        out[cells] = rng.permutation(batches[cells])
    return out


def mixing_scores(z: np.ndarray, types: np.ndarray, batches: np.ndarray) -> dict[str, float]:
    """Batch ASW within cell types and iLISI of latent `z` for these cells' patients."""
    return {"batch_asw": metrics.batch_asw(z, types, batches), "ilisi": metrics.ilisi(z, batches)}


def ceiling_rows(
    z: np.ndarray, types: np.ndarray, batches: np.ndarray, shuffles: int, seed: int
) -> list[dict[str, object]]:
    """The real patients' scores, then the means over `shuffles` shuffles within types and
    over all cells."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = [{"patients": "real", **mixing_scores(z, types, batches)}]
    for name, groups in (("within types", types), ("all cells", np.zeros(len(types)))):
        scores = [
            mixing_scores(z, types, shuffled_within(batches, groups, rng)) for _ in range(shuffles)
        ]
        rows.append({"patients": f"shuffled {name}", **pd.DataFrame(scores).mean().to_dict()})
    return rows


def held_out_latent(method: str, train: ad.AnnData, held: ad.AnnData, seed: int) -> np.ndarray:
    """The held-out cells' embedding by a baseline of `bench/batch_effects.py` or by a VAE of
    `bench/batch_conditioning.py` (a name of its `VARIANTS`)."""
    if method in BASELINES:
        return baseline(method, train, held).encode(held)
    return fit_variant(train, VARIANTS[method], seed).encode(held)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--splits", nargs="+", default=["cells", "patients"])
    parser.add_argument(
        "--methods", nargs="+", choices=[*BASELINES, *VARIANTS], default=[*BASELINES, "decoder"]
    )
    parser.add_argument("--shuffles", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    cells = load()
    rows = []
    for split in args.splits:
        for seed in args.seeds:
            train, held = outer_split(cells, split, seed)
            types, batches = held.obs["cell_type"].to_numpy(), held.obs["sample"].to_numpy()
            for method in args.methods:
                z = held_out_latent(method, train, held, seed)
                for row in ceiling_rows(z, types, batches, args.shuffles, seed):
                    rows.append({"split": split, "method": method, "seed": seed, **row})
                    print(rows[-1], file=sys.stderr, flush=True)
    table = pd.DataFrame(rows).drop(columns="seed")
    means = table.groupby(["split", "method", "patients"], sort=False).mean().unstack("patients")
    print(f"held-out cells' batch ASW and iLISI, means over seeds {args.seeds}:")
    print(means.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
