"""Patients as well as cell types: does a batch-aware champion mix patients better than the
standard corrections, without losing cell-type structure?

The protocol of issue 15 on the real melanoma T cells (`../shared/data`, 550 cells of 19
patients, `obs["sample"]` the patient, `obs["cell_type"]` the authors' clusters). For each seed
and each of two outer splits:
- `cells`: 20 % of the cells held out (stratified by cell type), every patient on both sides;
- `patients`: 4 of the 19 patients held out whole (cells of patients no model has seen);
encode the outer training part and the held-out part with
- the champion of a study (`melvae.tune`, the default study file) on the outer training part
  without a batch key, and the champion of the same study with `batch_key="sample"`,
- PCA (10 components), PCA after ComBat and Harmony on PCA (10 components), fitted on the same
  study's training split and preprocessing; ComBat and Harmony are transductive, so they are run
  once on the outer training and held-out cells together (PCA fitted on training cells only),
and score on the held-out cells: silhouette and k-means ARI of the cell types, k-NN accuracy and
macro F1 of a k-NN fitted on the outer training part, and the batch metrics of
`melvae.metrics` (batch ASW, iLISI, graph connectivity, batch_score: their mean). Prints mean ±
sd over seeds, methods side by side.

    python bench/batch_effects.py --seeds 0 1 2 --jobs 2 --out /tmp/batch-effects  # everything
    python bench/batch_effects.py --methods pca combat harmony champion          # no batch model
    python bench/batch_effects.py --table-only --out /tmp/batch-effects          # print saved

Each (split, seed, method) result is saved as JSON under --out, so methods can be added later
and the table printed from what is saved. Every study runs with one worker, so its trials, and
so its champion, are the same for the same seed; `--jobs` runs independent (split, seed,
method) jobs as that many processes side by side (one thread each).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
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

import melvae
from melvae import metrics
from melvae.data.datasets import Dataset
from melvae.evaluate import batch_correction
from melvae.study.baselines import BatchCorrectedEmbedding, PCAEmbedding
from melvae.study.config import load_study_config
from melvae.study.runner import prepare_data
from melvae.study.scoring import Embedding

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SUBSET = SHARED / "sadefeldman2018_gse120575_tcells_subset.h5ad"
MIN_CLASS_CELLS = 5
HELD_PATIENTS = 4
COLUMNS = (
    "silhouette",
    "knn_accuracy",
    "knn_macro_f1",
    "kmeans_ari",
    "batch_asw",
    "ilisi",
    "graph_connectivity",
    "batch_score",
)
METHODS = {
    "champion": "champion, no batch",
    "champion-batch": "champion, batch_key=sample",
    "pca": "PCA, 10 components",
    "combat": "ComBat + PCA 10",
    "harmony": "Harmony on PCA 10",
}


def load(path: Path = SUBSET) -> ad.AnnData:
    """The T cells with `cell_type` and `sample` (patient); cell types under 5 cells dropped."""
    adata = ad.read_h5ad(path)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs["sample"] = adata.obs["sample"].astype(str)
    counts = adata.obs["cell_type"].value_counts()
    keep = adata.obs["cell_type"].isin(counts.index[counts >= MIN_CLASS_CELLS])
    adata = adata[keep.to_numpy()].copy()
    adata.obs = adata.obs[["cell_type", "sample"]]
    return adata


def outer_split(adata: ad.AnnData, split: str, seed: int) -> tuple[ad.AnnData, ad.AnnData]:
    """(outer training part, held-out part): 20 % of cells, or 4 whole patients."""
    if split == "cells":
        _, held_idx = train_test_split(
            np.arange(adata.n_obs),
            test_size=0.2,
            stratify=adata.obs["cell_type"].to_numpy(),
            random_state=seed,
        )
        held = np.isin(np.arange(adata.n_obs), held_idx)
    else:
        patients = np.sort(adata.obs["sample"].unique())
        out = np.random.default_rng(seed).permutation(patients)[:HELD_PATIENTS]
        held = adata.obs["sample"].isin(out).to_numpy()
    return adata[~held].copy(), adata[held].copy()


def held_out_scores(model: Embedding, train: ad.AnnData, held: ad.AnnData) -> dict[str, float]:
    """Cell-type and batch metrics on the held-out cells (k-NN fitted on the training part)."""
    z_train, z_held = model.encode(train), model.encode(held)
    y_train, y_held = train.obs["cell_type"].to_numpy(), held.obs["cell_type"].to_numpy()
    return {
        "silhouette": metrics.silhouette(z_held, y_held),
        "knn_accuracy": metrics.knn_accuracy(z_train, y_train, z_held, y_held),
        "knn_macro_f1": metrics.knn_macro_f1(z_train, y_train, z_held, y_held),
        "kmeans_ari": metrics.kmeans_ari(z_held, y_held),
        **batch_correction(z_held, y_held, held.obs["sample"].to_numpy()),
    }


def champion(
    train: ad.AnnData, batch_key: str | None, *, n_trials: int, epochs: int | None, tmp: str
) -> tuple[Embedding, dict[str, object]]:
    """The champion of the default study on the outer training part, and what the study did."""
    cwd = Path.cwd()
    os.chdir(tmp)  # nothing the study writes lands in the checkout
    try:
        result = melvae.tune(
            train,
            n_trials=n_trials,
            epochs=epochs,
            storage=f"sqlite:///{tmp}/optuna.db",
            tracking_uri=f"sqlite:///{tmp}/mlflow.db",
            label_key="cell_type",
            batch_key=batch_key,
            name="tcells-batch" if batch_key else "tcells",
            workers=1,  # deterministic trials for a seed: the champion is reproducible
            threads=1,
            progress=False,
        )
    finally:
        os.chdir(cwd)
    info = {
        "study_seconds": result.seconds,
        "n_trials": n_trials,
        "trials": len(result.study.trials),
        "champion_params": result.champion_trial.params,
        # Every completed trial: its adversary weight, what the adversary reads, the label
        # classifier's weight and the objective values (val_loss first).
        "trials_values": [
            [
                t.params.get("batch_adversary_weight", 0.0),
                t.params.get("batch_adversary_conditioning", "none"),
                t.params.get("label_classifier_weight", 0.0),
                *t.values,
            ]
            for t in result.study.trials
            if t.values is not None
        ],
    }
    return result.champion, info


def baseline(method: str, train: ad.AnnData, held: ad.AnnData) -> Embedding:
    """PCA, ComBat + PCA or Harmony on the default study's training split and preprocessing."""
    dataset = Dataset("tcells", train, "cell_type", "melanoma T cells, outer training part")
    data = prepare_data(load_study_config(), dataset=dataset)
    if method == "pca":
        return PCAEmbedding(data.preprocessor, data.train, 10)
    cells = ad.concat([train, held])
    training = cells.obs_names.isin(data.train.obs_names)
    correction = {"combat": "combat-pca", "harmony": "harmony"}[method]
    return BatchCorrectedEmbedding(data.preprocessor, cells, training, "sample", 10, correction)


def one(
    split: str,
    seed: int,
    method: str,
    *,
    n_trials: int,
    epochs: int | None,
    out: Path,
    data: Path = SUBSET,
) -> dict[str, object]:
    """Score one method on one outer split and seed; save and return the result."""
    train, held = outer_split(load(data), split, seed)
    started = time.perf_counter()
    info: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if method.startswith("champion"):
            batch_key = "sample" if method == "champion-batch" else None
            model, info = champion(train, batch_key, n_trials=n_trials, epochs=epochs, tmp=tmp)
        else:
            model = baseline(method, train, held)
        scores = held_out_scores(model, train, held)
    result = {
        "split": split,
        "seed": seed,
        "method": METHODS[method],
        "cells": [train.n_obs, held.n_obs],
        "held_patients": int(held.obs["sample"].nunique()),
        "seconds": time.perf_counter() - started,
        "scores": scores,
        **info,
    }
    return save_result(result, out, f"{split}-{seed}-{method}")


def print_table(out: Path) -> None:
    """Mean ± sd over seeds of every saved result, methods side by side per split."""
    results = saved_results(out)
    if not results:
        return
    frame = pd.DataFrame(
        [
            {"split": r["split"], "seed": r["seed"], "method": r["method"], **r["scores"]}
            for r in results
        ]
    )
    order = [m for m in METHODS.values() if m in set(frame["method"])]
    for split in ("cells", "patients"):
        block = frame[frame["split"] == split]
        if block.empty:
            continue
        held = "20 % of cells" if split == "cells" else f"{HELD_PATIENTS} whole patients"
        print(f"\n== held out: {held}; mean ± sd over seeds ==")
        rows = []
        for method in order:
            scores = block[block["method"] == method]
            if scores.empty:
                continue
            cells = {
                column: f"{scores[column].mean():.3f} ± {scores[column].std(ddof=1):.3f}"
                if len(scores) > 1
                else f"{scores[column].mean():.3f}"
                for column in COLUMNS
            }
            rows.append({"method": method, "seeds": len(scores), **cells})
        print(pd.DataFrame(rows).set_index("method").to_string())
    seconds = pd.DataFrame(
        [{"split": r["split"], "method": r["method"], "seconds": r["seconds"]} for r in results]
    )
    print("\n== seconds per run (mean) ==")
    print(seconds.groupby(["split", "method"], sort=False)["seconds"].mean().round(1).to_string())


def _one_thread() -> None:
    """Each process: one torch thread, errors only in the log."""
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", nargs="+", default=["cells", "patients"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--n-trials", type=int, default=8, help="trials per study (default 8)")
    parser.add_argument("--epochs", type=int, help="cap epochs (quick looks only)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/melvae-batch-effects"))
    parser.add_argument("--data", type=Path, default=SUBSET, help="the T-cell subset (.h5ad)")
    parser.add_argument("--jobs", type=int, default=2, help="jobs run side by side (default 2)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    _one_thread()
    if not args.table_only:
        jobs = [
            (split, seed, method)
            for split in args.splits
            for seed in args.seeds
            for method in args.methods
        ]
        started = time.perf_counter()
        with concurrent.futures.ProcessPoolExecutor(args.jobs, initializer=_one_thread) as pool:
            running = {
                pool.submit(
                    one,
                    *job,
                    n_trials=args.n_trials,
                    epochs=args.epochs,
                    out=args.out,
                    data=args.data,
                ): job
                for job in jobs
            }
            for done in concurrent.futures.as_completed(running):
                split, seed, method = running[done]
                seconds = done.result()["seconds"]
                print(
                    f"{time.strftime('%H:%M:%S')} {split} seed {seed} {method}: {seconds:.0f} s",
                    flush=True,
                )
        print(f"\n{len(jobs)} jobs, {args.jobs} at a time: {time.perf_counter() - started:.0f} s")
    print_table(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
