"""Does the default study's champion beat PCA and the original experiment 3 on unseen cells?

The protocol of issue 6, as a new user would meet it. For each real labelled set and each seed:
split the cells (stratified) into an outer training part (80 %) and an outer held-out part (20 %)
that the study never sees; run the default study (`studies/default.toml`, its own 70/15/15 split
inside the training part) on the training part; then encode both parts with
- the champion (the study file's selection rule),
- the trial the original rule would have picked (lowest validation loss), from the same study,
- PCA with 10 components and the original experiment 3 (h256, z5, lr 1e-3, 100 epochs), both
  fitted on the study's own training split and preprocessing,
and score on the held-out cells: silhouette and k-means ARI of their labels, k-NN accuracy and
macro F1 of a k-NN fitted on the outer training part. Also measures how noisy the selection score
is. Prints the means over seeds side by side (and per-seed rows).

    python bench/selection.py --seeds 0 1 2 --out /tmp/selection          # both datasets
    python bench/selection.py --datasets pbmc --seeds 0 --n-trials 4 --epochs 10   # a quick look
    python bench/selection.py --table-only --out /tmp/selection          # print saved results

Each (dataset, seed) result is saved as JSON under --out, so datasets can run as parallel
processes and the table be printed from what they saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from saved import save_result, saved_results
from sklearn.model_selection import train_test_split

from melvae import metrics
from melvae.data.read import read_pbmc68k_reduced
from melvae.evaluate import bio_conservation
from melvae.register import load_model
from melvae.study.baselines import PCAEmbedding, baselines_for, build
from melvae.study.config import load_study_config
from melvae.study.objective import PreparedData
from melvae.study.runner import best_complete_trial, prepare_data, run_study
from melvae.study.scoring import Embedding
from melvae.study.selection import SelectionRule, completed_with_model, select_champion

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MIN_CLASS_CELLS = 5
COLUMNS = ("silhouette", "knn_accuracy", "knn_macro_f1", "kmeans_ari")


def load(name: str) -> ad.AnnData:
    """The labelled set with its label in obs['cell_type'], classes under 5 cells dropped."""
    if name == "pbmc":
        adata = read_pbmc68k_reduced()
        adata.obs["cell_type"] = adata.obs["bulk_labels"].astype(str)
    else:
        adata = ad.read_h5ad(SHARED / "sadefeldman2018_gse120575_tcells_subset.h5ad")
        adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    counts = adata.obs["cell_type"].value_counts()
    keep = adata.obs["cell_type"].isin(counts.index[counts >= MIN_CLASS_CELLS])
    adata = adata[keep.to_numpy()].copy()
    adata.obs = adata.obs[["cell_type"]]
    return adata


def outer_scores(model: Embedding, train: ad.AnnData, held: ad.AnnData) -> dict[str, float]:
    """The issue's four columns on the held-out cells (k-NN fitted on the outer training part)."""
    z_train, z_held = model.encode(train), model.encode(held)
    y_train, y_held = train.obs["cell_type"].to_numpy(), held.obs["cell_type"].to_numpy()
    return {
        "silhouette": metrics.silhouette(z_held, y_held),
        "knn_accuracy": metrics.knn_accuracy(z_train, y_train, z_held, y_held),
        "knn_macro_f1": metrics.knn_macro_f1(z_train, y_train, z_held, y_held),
        "kmeans_ari": metrics.kmeans_ari(z_held, y_held),
    }


def score_noise(model: Embedding, data: PreparedData, spread: float) -> dict[str, float]:
    """Noise of the selection score for one fixed model, against the spread between trials.

    bio_score: std over 10 seeds of its cross-validation folds and k-means starts. For
    comparison, a single-split score on the ~100 validation cells (the mean of the same five
    parts, k-NN fitted on the training split): std over 50 bootstrap resamples of those cells.
    """
    z_train, z_val = model.encode(data.train), model.encode(data.val)
    y_train, y_val = data.labels("train"), data.labels("val")
    latent, labels = np.concatenate([z_train, z_val]), np.concatenate([y_train, y_val])
    resampled = [bio_conservation(latent, labels, seed=s)["bio_score"] for s in range(10)]
    rng = np.random.default_rng(0)
    single = []
    for _ in range(50):
        pick = rng.choice(len(y_val), size=len(y_val), replace=True)
        ari, nmi = metrics.kmeans_agreement(z_val[pick], y_val[pick])
        single.append(
            metrics.bio_score(
                silhouette=metrics.silhouette(z_val[pick], y_val[pick]),
                knn_accuracy=metrics.knn_accuracy(z_train, y_train, z_val[pick], y_val[pick]),
                knn_macro_f1=metrics.knn_macro_f1(z_train, y_train, z_val[pick], y_val[pick]),
                ari=ari,
                nmi=nmi,
            )
        )
    return {
        "bio_score_std_resampled": float(np.std(resampled)),
        "val_split_score_std_bootstrap": float(np.std(single)),
        "bio_score_spread_between_trials": spread,
    }


def one_seed(
    name: str, seed: int, *, n_trials: int | None, epochs: int | None, out: Path
) -> dict[str, object]:
    """Run the protocol for one dataset and outer seed; save and return its result."""
    adata = load(name)
    labels = adata.obs["cell_type"].to_numpy()
    train_idx, held_idx = train_test_split(
        np.arange(adata.n_obs), test_size=0.2, stratify=labels, random_state=seed
    )
    train, held = adata[np.sort(train_idx)].copy(), adata[np.sort(held_idx)].copy()
    config = dataclasses.replace(load_study_config(), label_key="cell_type")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}-outer-train.h5ad"
        train.write_h5ad(path)
        started = time.perf_counter()
        outcome = run_study(
            config,
            storage=f"sqlite:///{tmp}/optuna.db",
            tracking_uri=f"sqlite:///{tmp}/mlflow.db",
            n_trials=n_trials,
            epochs_cap=epochs,
            data_path=path,
            progress=False,
        )
        seconds = time.perf_counter() - started
        study = outcome.study
        champion = best_complete_trial(study, config)
        trials = completed_with_model(study)
        by_loss = select_champion(trials, SelectionRule(), config.objectives, config.directions)
        uri = f"sqlite:///{tmp}/mlflow.db"
        data = prepare_data(config, data_path=path)
        experiment_3 = next(b for b in baselines_for(config, 10) if b.name == "experiment-3")
        models: dict[str, Embedding] = {
            "champion (bio_within_loss)": load_model(
                champion.user_attrs["model_uri"], tracking_uri=uri
            ),
            "lowest val_loss (old rule)": load_model(
                by_loss.user_attrs["model_uri"], tracking_uri=uri
            ),
            "PCA, 10 components": PCAEmbedding(data.preprocessor, data.train, 10),
            "experiment 3": build(experiment_3, config, data, epochs_cap=epochs, progress=False),
        }
        rows = {method: outer_scores(model, train, held) for method, model in models.items()}
        bios = [t.user_attrs["bio_score"] for t in trials if "bio_score" in t.user_attrs]
        noise = score_noise(models["champion (bio_within_loss)"], data, float(np.ptp(bios)))
    result = {
        "dataset": name,
        "seed": seed,
        "cells": [train.n_obs, held.n_obs],
        "study_seconds": seconds,
        "trials": len(study.trials),
        "champion_params": champion.params,
        "rows": rows,
        "noise": noise,
    }
    return save_result(result, out, f"{name}-{seed}")


def print_table(out: Path) -> None:
    """Means over seeds (and per-seed rows) of every saved result, methods side by side."""
    results = saved_results(out)
    if not results:
        return
    records = [
        {"dataset": r["dataset"], "seed": r["seed"], "method": method, **scores}
        for r in results
        for method, scores in r["rows"].items()
    ]
    frame = pd.DataFrame(records)
    order = list(dict.fromkeys(frame["method"]))
    fmt = {"float_format": lambda v: f"{v:.3f}"}
    print("\n== held-out cells, mean over seeds ==")
    means = frame.groupby(["dataset", "method"], sort=False)[list(COLUMNS)].mean()
    seeds = frame.groupby(["dataset"])["seed"].nunique()
    print(means.to_string(**fmt))
    print(f"seeds per dataset: {seeds.to_dict()}")
    print("\n== champion minus best of (PCA 10, experiment 3), mean over seeds ==")
    for dataset in means.index.get_level_values(0).unique():
        block = means.loc[dataset]
        best = block.loc[["PCA, 10 components", "experiment 3"]].max()
        margin = block.loc["champion (bio_within_loss)"] - best
        print(f"{dataset}: " + ", ".join(f"{c} {margin[c]:+.3f}" for c in COLUMNS))
    print("\n== per seed ==")
    per_seed = frame.set_index(["dataset", "seed", "method"])[list(COLUMNS)]
    per_seed = per_seed.reindex(
        sorted(per_seed.index, key=lambda i: (i[0], i[1], order.index(i[2])))
    )
    print(per_seed.to_string(**fmt))
    print("\n== selection-score noise (fixed champion model) and study cost ==")
    noise = pd.DataFrame(
        [
            {
                "dataset": r["dataset"],
                "seed": r["seed"],
                **r["noise"],
                "study_s": r["study_seconds"],
                "trials": r["trials"],
                "champion latent": r["champion_params"].get("latent_dim"),
            }
            for r in results
        ]
    ).set_index(["dataset", "seed"])
    print(noise.to_string(float_format=lambda v: f"{v:.4f}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["pbmc", "melanoma"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n-trials", type=int, help="default: the study file's (20)")
    parser.add_argument("--epochs", type=int, help="cap epochs (quick looks only)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/melvae-selection"))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if not args.table_only:
        for name in args.datasets:
            for seed in args.seeds:
                print(f"{time.strftime('%H:%M:%S')} {name} seed {seed} ...", flush=True)
                result = one_seed(
                    name, seed, n_trials=args.n_trials, epochs=args.epochs, out=args.out
                )
                print(f"  done in {result['study_seconds']:.0f} s", flush=True)
    print_table(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
