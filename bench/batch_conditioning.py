"""Where should the batch enter the VAE: the decoder only, or the encoder too? And what does an
adversarial batch classifier on the latent (`batch_adversary_weight`) add to the decoder?

On the shared melanoma T-cell subset (19 patients in obs["sample"]), for each seed: hold out
20 % of the cells (stratified by cell type), fit the original experiment 3 (h256, z5, lr 1e-3,
100 epochs, batch 32, early stopping) on the rest (85/15 train/validation) three ways, without a
batch covariate, conditioned in the decoder (`batch_conditioning = "decoder"`) and in both
(`"encoder_decoder"`), and conditioned in the decoder with an adversary of weight 10 or 30
(`melvae.adversary`), or with an adversary that also reads the cell-type label
(`batch_adversary_conditioning = "label"`: the patient removed within cell types) of weight
10, 30 or 100, and score:
- bio conservation on the held-out cells: silhouette and k-means ARI of their labels, k-NN
  accuracy / macro F1 of a k-NN fitted on the training latent;
- batch mixing of all cells' latent (batch ASW within cell types, iLISI, graph connectivity and
  their mean `batch_score`, `melvae.metrics`).
A leave-patients-out row repeats it with four whole patients held out: only a model whose
encoder needs no batch can embed them at all.

    python bench/batch_conditioning.py --seeds 0 1 2
    python bench/batch_conditioning.py --seeds 2 --protocols "held-out patients" --models decoder
    python bench/batch_conditioning.py --models "no batch" decoder "adversary 10" "adversary 30"
    python bench/batch_conditioning.py --models "label adversary 10" "label adversary 30"

Each result is also printed (to stderr) as it comes, one line per seed, protocol and model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from melvae import metrics
from melvae.errors import InputError
from melvae.model import MelVAE
from melvae.preprocess import PreprocessConfig
from melvae.train import TrainConfig

SUBSET = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "sadefeldman2018_gse120575_tcells_subset.h5ad"
)
# Each variant's fitting keywords (none: no batch covariate).
VARIANTS: dict[str, dict[str, object]] = {
    "no batch": {},
    "decoder": {"batch_key": "sample"},
    "encoder_decoder": {"batch_key": "sample", "batch_conditioning": "encoder_decoder"},
    "adversary 10": {"batch_key": "sample", "batch_adversary_weight": 10.0},
    "adversary 30": {"batch_key": "sample", "batch_adversary_weight": 30.0},
    **{
        f"label adversary {weight:g}": {
            "batch_key": "sample",
            "batch_adversary_weight": weight,
            "batch_adversary_conditioning": "label",
        }
        for weight in (10.0, 30.0, 100.0)
    },
    **{
        f"adversary {adv:g} + label head {head:g}": {
            "batch_key": "sample",
            "batch_adversary_weight": adv,
            "label_classifier_weight": head,
        }
        for adv in (10.0, 30.0, 100.0)
        for head in (1.0, 10.0)
    },
    **{
        f"label adversary {adv:g} + label head {head:g}": {
            "batch_key": "sample",
            "batch_adversary_weight": adv,
            "batch_adversary_conditioning": "label",
            "label_classifier_weight": head,
        }
        for adv in (30.0, 100.0)
        for head in (10.0, 30.0)
    },
}
# The adversary's classifier at a multiple of the learning rate (bench/adversary_game.py).
VARIANTS |= {
    f"{name}, classifier rate {scale:g}": {
        **VARIANTS[name],
        "batch_adversary_learning_rate_scale": scale,
    }
    for name in ("adversary 30", "label adversary 30 + label head 10")
    for scale in (10.0, 30.0)
}
# Batches matched within cell types by MMD (melvae/mmd.py), alone and with the label head.
VARIANTS |= {
    f"MMD {weight:g}{head}": {
        "batch_key": "sample",
        "batch_mmd_weight": weight,
        **({"label_classifier_weight": 10.0} if head else {}),
    }
    for weight in (3.0, 10.0, 30.0, 100.0)
    for head in ("", " + label head 10")
}
EXPERIMENT_3 = {"hidden_dim": 256, "latent_dim": 5}
HELD_OUT_PATIENTS = 4


def fit_split(train: ad.AnnData, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted indices of the cells `fit_variant` trains on and of those it validates on."""
    fit, val = train_test_split(
        np.arange(train.n_obs), test_size=0.15, random_state=seed, stratify=train.obs["cell_type"]
    )
    return np.sort(fit), np.sort(val)


def fit_variant(train: ad.AnnData, variant: dict[str, object], seed: int) -> MelVAE:
    fit, val = fit_split(train, seed)
    return MelVAE.fit(
        train[fit],
        train[val],
        preprocess=PreprocessConfig(seed=seed),
        train=TrainConfig(epochs=100, batch_size=32, learning_rate=1e-3, seed=seed),
        label_key="cell_type",
        progress=False,
        **EXPERIMENT_3,
        **variant,
    )


def _scores(model: MelVAE, train: ad.AnnData, held: ad.AnnData, seed: int) -> dict[str, float]:
    z_train, z_held = model.encode(train), model.encode(held)
    y_train = train.obs["cell_type"].to_numpy()
    y_held = held.obs["cell_type"].to_numpy()
    z_all = np.vstack([z_train, z_held])
    y_all = np.concatenate([y_train, y_held])
    b_all = np.concatenate([train.obs["sample"].to_numpy(), held.obs["sample"].to_numpy()])
    batch = {
        "batch_asw": metrics.batch_asw(z_all, y_all, b_all),
        "ilisi": metrics.ilisi(z_all, b_all),
        "graph_connectivity": metrics.graph_connectivity(z_all, y_all),
    }
    return {
        "silhouette": metrics.silhouette(z_held, y_held),
        "knn_accuracy": metrics.knn_accuracy(z_train, y_train, z_held, y_held),
        "knn_macro_f1": metrics.knn_macro_f1(z_train, y_train, z_held, y_held),
        "kmeans_ari": metrics.kmeans_ari(z_held, y_held, seed=seed),
        **batch,
        "batch_score": metrics.batch_score(**batch),
    }


def splits(cells: ad.AnnData, seed: int) -> dict[str, tuple[ad.AnnData, ad.AnnData]]:
    keep, held = train_test_split(
        np.arange(cells.n_obs), test_size=0.2, random_state=seed, stratify=cells.obs["cell_type"]
    )
    patients = np.random.default_rng(seed).choice(
        sorted(cells.obs["sample"].unique()), HELD_OUT_PATIENTS, replace=False
    )
    out = cells.obs["sample"].isin(patients).to_numpy()
    return {
        "held-out cells": (cells[np.sort(keep)], cells[np.sort(held)]),
        "held-out patients": (cells[~out], cells[out]),
    }


def load_cells() -> ad.AnnData:
    """The shared T-cell subset without its cell types of fewer than 5 cells (stratifiable)."""
    cells = ad.read_h5ad(SUBSET)
    counts = cells.obs["cell_type"].astype(str).value_counts()
    return cells[cells.obs["cell_type"].astype(str).map(counts).to_numpy() >= 5].copy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--protocols",
        nargs="+",
        choices=("held-out cells", "held-out patients"),
        default=["held-out cells", "held-out patients"],
    )
    parser.add_argument("--models", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    cells = load_cells()
    rows = []
    for seed in args.seeds:
        for protocol, (train, held) in splits(cells, seed).items():
            if protocol not in args.protocols:
                continue
            for variant in args.models:
                model = fit_variant(train, VARIANTS[variant], seed)
                try:
                    scores = _scores(model, train, held, seed)
                except InputError:  # a conditioned encoder cannot embed unseen patients
                    scores = {}
                rows.append({"protocol": protocol, "model": variant, "seed": seed, **scores})
                print(f"seed {seed}, {protocol}, {variant}: {scores}", file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    means = table.drop(columns="seed").groupby(["protocol", "model"], sort=False).mean()
    print(f"means over seeds {args.seeds} (bio on held-out cells, batch on all cells' latent):")
    print(means.to_string(float_format=lambda v: f"{v:.3f}", na_rep="cannot encode"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
