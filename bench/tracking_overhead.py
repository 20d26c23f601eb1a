"""What MLflow tracking costs a trial, measured side by side in one run.

For two configurations — the default study (scanpy's PBMC fallback, 2,000-HVG preprocessing,
the third documented experiment: hidden 256, latent 5, lr 1e-3, batch 32) and the original
study's full-gene configuration (2,761 cells × 17,994 genes at GSE115978's ~25 % density,
synthetic, all genes kept) — one trial is trained twice with the same seed: once bare (fit +
validation metrics, what a trial must do) and once tracked exactly as `Objective` tracks it
(nested run and params, per-epoch metrics, final metrics, the two figures, the trial's model).
Prints each tracking part's seconds and share of the tracked trial's time, the same shares
projected to a trial of `--full-epochs` epochs (per-epoch parts scale, per-trial parts don't),
and the disk each trial adds (artifacts, and the tracking database's growth).

It also times logging the full MLflow model (what registering a trial builds, and what every
trial logged before melvae logged only weights per trial) and prints the shares both ways.

    python bench/tracking_overhead.py [--epochs 10] [--wide-epochs 2] [--full-epochs 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from melvae import track
from melvae.data.datasets import load_dataset
from melvae.model import MelVAE
from melvae.plot import loss_curves, tsne_embedding
from melvae.preprocess import PreprocessConfig, fit_preprocessor, split_cells
from melvae.register import example_cells, log_model, log_trial_model
from melvae.study.objective import PreparedData
from melvae.study.scoring import evaluate_model
from melvae.train import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from sparse_batches import synthetic_tpm

PARAMS = {"hidden_dim": 256, "latent_dim": 5, "learning_rate": 1e-3, "batch_size": 32}
PER_EPOCH = "per-epoch metrics"


def prepared(adata: ad.AnnData, label_key: str, n_top_genes: int | None, key: str) -> PreparedData:
    """The study's split and training-split preprocessing, as `runner.prepare_data` does them."""
    splits = split_cells(adata, label_key, val_fraction=0.15, test_fraction=0.15, seed=0)
    train = adata[splits["train"]].copy()
    config = PreprocessConfig(n_top_genes=n_top_genes, transform="minmax")
    return PreparedData(
        dataset_key=key,
        description=key,
        fallback_reason=None,
        label_key=label_key,
        train=train,
        val=adata[splits["val"]].copy(),
        test=adata[splits["test"]].copy(),
        preprocessor=fit_preprocessor(train, config),
    )


def wide_cells(cells: int, genes: int, density: float) -> ad.AnnData:
    """Synthetic GSE115978-shaped cells with five balanced labels."""
    rng = np.random.default_rng(1)
    return ad.AnnData(
        X=synthetic_tpm(cells, genes, density),
        obs=pd.DataFrame(
            {"cell_type": rng.choice(["B", "T.CD4", "T.CD8", "NK", "Mac"], size=cells)},
            index=[f"cell{i}" for i in range(cells)],
        ),
        var=pd.DataFrame(index=[f"gene{i}" for i in range(genes)]),
    )


def fit(data: PreparedData, epochs: int, on_epoch: Callable | None) -> MelVAE:
    train = TrainConfig(
        epochs=epochs,
        batch_size=PARAMS["batch_size"],
        learning_rate=PARAMS["learning_rate"],
        seed=0,
        early_stopping_patience=None,
    )
    return MelVAE.fit(
        data.train,
        data.val,
        preprocess=data.preprocessor,
        hidden_dim=PARAMS["hidden_dim"],
        latent_dim=PARAMS["latent_dim"],
        train=train,
        label_key=data.label_key,
        on_epoch=on_epoch,
        progress=False,
    )


def bare_trial(data: PreparedData, epochs: int) -> tuple[float, float]:
    """Seconds for what a trial must do without any tracking: (training, evaluation)."""
    started = time.perf_counter()
    model = fit(data, epochs, None)
    trained = time.perf_counter()
    evaluate_model(model, data)
    return trained - started, time.perf_counter() - trained


def tracked_trial(
    data: PreparedData, epochs: int, experiment_id: str, number: int
) -> tuple[float, dict[str, float], MelVAE]:
    """Seconds for a trial tracked as `Objective` tracks it, and each tracking part's seconds."""
    parts: dict[str, float] = defaultdict(float)

    def timed(part: str, action: Callable[[], object]) -> object:
        started = time.perf_counter()
        result = action()
        parts[part] += time.perf_counter() - started
        return result

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        timed(PER_EPOCH, lambda: track.log_metrics(metrics, step=epoch))

    started = time.perf_counter()
    run = timed("run, params", lambda: track.trial_run(experiment_id, trial_number=number, tags={}))
    timed("run, params", run.__enter__)
    timed("run, params", lambda: track.log_params({**PARAMS, "epochs": epochs}))
    model = fit(data, epochs, on_epoch)
    metrics = evaluate_model(model, data)
    timed("final metrics", lambda: track.log_metrics(metrics))
    timed("figures", lambda: track.log_figure(loss_curves(model.history), "plots/loss.png"))
    timed(
        "figures",
        lambda: track.log_figure(
            tsne_embedding(model.encode(data.val), data.labels("val"), title="t-SNE"),
            "plots/tsne.png",
        ),
    )
    timed("model", lambda: log_trial_model(model, data.val))
    timed("run, params", lambda: run.__exit__(None, None, None))
    return time.perf_counter() - started, dict(parts), model


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(name: str, data: PreparedData, epochs: int, full_epochs: int, root: Path) -> None:
    uri = track.use_backend(f"sqlite:///{root / name / 'mlflow.db'}")
    experiment_id = track.ensure_experiment(name, uri)
    artifacts = root / name / "artifacts"
    database = root / name / "mlflow.db"
    tracked_trial(data, 1, experiment_id, 0)  # warm-up: imports, schema, first-touch pages
    training, evaluation = bare_trial(data, epochs)
    artifacts_before, database_before = folder_bytes(artifacts), database.stat().st_size
    tracked, parts, model = tracked_trial(data, epochs, experiment_id, 1)
    artifact_bytes = folder_bytes(artifacts) - artifacts_before
    database_bytes = database.stat().st_size - database_before
    artifacts_before = folder_bytes(artifacts)
    started = time.perf_counter()
    with track.top_level_run(experiment_id, run_name="full-model", tags={}):
        log_model(model, example_cells(model, data.val))
    full_model = time.perf_counter() - started
    full_model_bytes = folder_bytes(artifacts) - artifacts_before

    def shares(trial_parts: dict[str, float], trial_epochs: int) -> dict[str, float]:
        """Each part's share of a trial of `trial_epochs`: bare time plus all tracking parts."""
        scaled = {
            part: s * (trial_epochs / epochs if part == PER_EPOCH else 1.0)
            for part, s in trial_parts.items()
        }
        trial = training * trial_epochs / epochs + evaluation + sum(scaled.values())
        return {part: s / trial for part, s in scaled.items()} | {
            "all tracking": sum(scaled.values()) / trial
        }

    before = parts | {"model": full_model}
    rows = [(part, parts[part]) for part in sorted(parts, key=parts.get, reverse=True)]
    now, now_full = shares(parts, epochs), shares(parts, full_epochs)
    then, then_full = shares(before, epochs), shares(before, full_epochs)
    print(
        f"\n== {name}: {len(data.preprocessor.genes)} genes, {data.train.n_obs} training cells, "
        f"hidden {PARAMS['hidden_dim']}, latent {PARAMS['latent_dim']}, "
        f"batch {PARAMS['batch_size']}\n"
        f"bare trial ({epochs} epochs): training {training:.2f} s + evaluation "
        f"{evaluation:.2f} s; the same trial tracked: {tracked:.2f} s"
    )
    print(f"{'tracking part':38s}{'seconds':>9s}{f'@{epochs} ep':>9s}{f'@{full_epochs} ep':>9s}")
    for part, seconds in rows:
        print(f"{part:38s}{seconds:9.3f}{now[part]:9.1%}{now_full[part]:9.1%}")
    total = sum(parts.values())
    print(f"{'all tracking (trial logs weights)':38s}{total:9.3f}", end="")
    print(f"{now['all tracking']:9.1%}{now_full['all tracking']:9.1%}")
    print(f"{'full MLflow model instead':38s}{full_model:9.3f}", end="")
    print(f"{then['model']:9.1%}{then_full['model']:9.1%}")
    print(f"{'all tracking (trial logs full model)':38s}{sum(before.values()):9.3f}", end="")
    print(f"{then['all tracking']:9.1%}{then_full['all tracking']:9.1%}")
    print(
        f"disk per trial: {artifact_bytes / 2**20:.1f} MiB artifacts "
        f"(+{database_bytes / 2**20:.2f} MiB tracking database); "
        f"the full MLflow model adds {full_model_bytes / 2**20:.1f} MiB (once, at promotion)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs trained, default study")
    parser.add_argument("--wide-epochs", type=int, default=2, help="epochs trained, 17,994 genes")
    parser.add_argument("--full-epochs", type=int, default=100, help="epochs of a real trial")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pbmc = load_dataset("pbmc68k_reduced")
    default = prepared(pbmc.adata, pbmc.label_key, 2000, "default-study")
    wide = prepared(wide_cells(2761, 17994, 0.25), "cell_type", None, "17994-genes")
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        measure("default-study", default, args.epochs, args.full_epochs, Path(tmp))
        measure("17994-genes", wide, args.wide_epochs, args.full_epochs, Path(tmp))


if __name__ == "__main__":
    main()
