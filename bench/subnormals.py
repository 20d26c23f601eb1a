"""Long training with and without subnormal floats flushed to zero, side by side in one process.

Adam's first moment of a weight whose gradient stays exactly zero (the weights of a dead ReLU
unit) shrinks by 0.9 a step until it is subnormal (below 1.2e-38), where every CPU operation on
it takes a microcode assist. `train_vae` flushes subnormals to zero while it trains
(`melvae.train._subnormals_flushed`); this script trains the same model from the same seed for
`--epochs` epochs with that switched on and off (the block replaced by a no-op), alternating,
and prints the CPU milliseconds per epoch in blocks of `--block` epochs, their ratio, the final
validation losses, and how many of Adam's first moments were subnormal at the end.

Data: the PBMC fallback as the default study prepares it (scanpy's 700 real cells, 765 genes,
split and min-max scaled on the training cells), the searched hidden widths 512 and 256, latent
10, batch 32, learning rate 1e-3, no early stopping, 1 thread.

    python bench/subnormals.py [--epochs 200] [--block 20]
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch

import melvae.train
from melvae.data.datasets import load_dataset
from melvae.module import VAEModule
from melvae.preprocess import PreprocessConfig, fit_preprocessor, split_cells
from melvae.study.baselines import _prepared
from melvae.train import FusedAdam, History, TrainConfig, train_vae

FLUSHED = melvae.train._subnormals_flushed
TINY = torch.finfo(torch.float32).tiny


class CountingAdam(FusedAdam):
    """`FusedAdam` that remembers its last instance, to count its moments afterwards."""

    last: CountingAdam | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        CountingAdam.last = self


def subnormal_moments(optimizer: FusedAdam) -> int:
    """How many of `optimizer`'s first moments are subnormal (non-zero, below the smallest
    normal float32)."""
    return sum(int(((m.abs() < TINY) & (m != 0)).sum()) for m in optimizer.exp_avgs)


def pbmc_splits() -> tuple[np.ndarray, np.ndarray]:
    """The PBMC fallback's training and validation matrices, as the default study makes them."""
    pbmc = load_dataset("pbmc68k_reduced")
    splits = split_cells(pbmc.adata, pbmc.label_key, seed=0)
    train = pbmc.adata[splits["train"]].copy()
    preprocessor = fit_preprocessor(train, PreprocessConfig())
    train_x, val_x = (
        _prepared(preprocessor, cells).astype(np.float32)
        for cells in (train, pbmc.adata[splits["val"]])
    )
    return train_x, val_x


def train(
    flushed: bool, hidden: int, epochs: int, train_x: np.ndarray, val_x: np.ndarray
) -> tuple[History, int]:
    """(History, subnormal first moments at the end) of one run."""
    melvae.train._subnormals_flushed = FLUSHED if flushed else contextlib.nullcontext
    try:
        torch.manual_seed(0)
        module = VAEModule(train_x.shape[1], hidden, 10)
        config = TrainConfig(
            epochs=epochs,
            batch_size=32,
            learning_rate=1e-3,
            early_stopping_patience=None,
            seed=0,
            device="cpu",
        )
        history = train_vae(module, train_x, val_x, config, progress=False)
    finally:
        melvae.train._subnormals_flushed = FLUSHED
    return history, subnormal_moments(CountingAdam.last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--block", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    melvae.train.FusedAdam = CountingAdam
    train_x, val_x = pbmc_splits()
    for hidden in (512, 256):
        runs = {
            flushed: train(flushed, hidden, args.epochs, train_x, val_x)
            for flushed in (False, True)
        }
        print(
            f"\n{train_x.shape[0]} x {train_x.shape[1]} (PBMC training split), h{hidden},"
            f" latent 10, b32, 1 thread, {args.epochs} epochs: CPU ms per epoch, block means"
        )
        print(f"{'epochs':>10s}{'not flushed':>14s}{'flushed':>10s}{'ratio':>8s}")
        cpu = {f: np.asarray(h.epoch_cpu_seconds) * 1e3 for f, (h, _) in runs.items()}
        for start in range(0, args.epochs, args.block):
            part = slice(start, start + args.block)
            off, on = cpu[False][part].mean(), cpu[True][part].mean()
            print(f"{f'{start}-{start + args.block - 1}':>10s}{off:14.1f}{on:10.1f}{on / off:8.2f}")
        off, on = cpu[False].sum() / 1e3, cpu[True].sum() / 1e3
        print(f"{'all (s)':>10s}{off:14.2f}{on:10.2f}{on / off:8.2f}")
        for flushed, (history, count) in runs.items():
            print(
                f"{'flushed' if flushed else 'not flushed':>12s}: last val_loss "
                f"{history.val_loss[-1]:.6f}, best epoch {history.best_epoch}, "
                f"subnormal Adam first moments at the end {count:,}"
            )


if __name__ == "__main__":
    main()
