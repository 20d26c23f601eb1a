"""One epoch at three shapes: melvae vs a naive loop, the five products, and products + Adam.

The shapes users train: the original study's full-gene configuration (2,761 cells × 17,994
genes, hidden 256, batch 32), the default study's 2,000 highly variable genes (same cells), and
the PBMC fallback (700 cells × 765 genes, hidden 512, batch 64). Cells are split 70/15/15 and
values lie in [0, 1] (Bernoulli loss, latent 5, Adam lr 1e-3). For each shape, timed side by
side in this one process, alternating, best of `--repeats`:

- melvae: `train_vae` on the training split (CSR for the synthetic sparse shapes, dense for
  PBMC-like data, as the study passes them); an epoch includes its validation pass;
- naive: a re-implementation of the original notebook's loop on a dense tensor (default Adam,
  `loss.item()` every batch), same cells, same batch size;
- 5 products: only the five matrix products every step must do (encoder and decoder forward,
  decoder weight and hidden gradients, encoder weight gradient), laid out as `melvae.layers`
  does for that shape;
- bound: those products followed by a fused Adam step over all the model's parameter shapes, in
  one loop: the least any Adam-trained step does (no activations, losses, autograd, validation).

Wall and process-CPU seconds are both printed: on a machine shared with other jobs the CPU time
(exactly the work with 1 thread) is the steadier measure; the ratios use CPU time.

    python bench/epoch_speed.py [--epochs 2] [--repeats 3] [--threads 1] [--shapes 0,1,2]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sparse_batches import synthetic_tpm
from torch import nn

from melvae.layers import MIN_WIDTH, input_gradient, linear_forward, weight_gradient
from melvae.module import VAEModule
from melvae.train import TrainConfig, train_vae

LATENT = 5


@dataclass(frozen=True)
class Shape:
    cells: int
    genes: int
    hidden: int
    batch: int
    density: float
    sparse: bool

    def describe(self) -> str:
        return f"{self.cells:,} x {self.genes:,}, h{self.hidden}, b{self.batch}"


SHAPES = (
    Shape(2761, 17994, 256, 32, 0.25, sparse=True),
    Shape(2761, 2000, 256, 32, 0.25, sparse=True),
    Shape(700, 765, 512, 64, 0.5, sparse=False),
)
Times = tuple[float, float]  # wall, CPU seconds


def melvae_epoch(shape: Shape, train_x, val_x, epochs: int) -> Times:
    """Seconds per epoch of melvae's training loop (training + validation pass)."""
    module = VAEModule(shape.genes, shape.hidden, LATENT)
    config = TrainConfig(
        epochs=epochs, batch_size=shape.batch, early_stopping_patience=None, seed=0, device="cpu"
    )
    history = train_vae(module, train_x, val_x, config, progress=False)
    return min(history.epoch_seconds), min(history.epoch_cpu_seconds)


class NotebookVAE(nn.Module):
    """The original notebook's VAE, written the plain way."""

    def __init__(self, genes: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(genes, hidden)
        self.fc_mu = nn.Linear(hidden, LATENT)
        self.fc_logvar = nn.Linear(hidden, LATENT)
        self.fc3 = nn.Linear(LATENT, hidden)
        self.fc4 = nn.Linear(hidden, genes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def naive_epoch(shape: Shape, dense_train: torch.Tensor, epochs: int) -> Times:
    """Seconds per epoch of the notebook loop: BCE + KL, default Adam, `.item()` per batch."""
    model = NotebookVAE(shape.genes, shape.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(epochs):
        started = (time.perf_counter(), time.process_time())
        total = 0.0
        for idx in torch.randperm(dense_train.shape[0]).split(shape.batch):
            x = dense_train[idx]
            recon, mu, logvar = model(x)
            bce = F.binary_cross_entropy(recon, x, reduction="sum")
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss = bce + kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        times.append(_since(started))
    return _best(times)


def products_epoch(shape: Shape, dense_train: torch.Tensor, epochs: int, *, adam: bool) -> Times:
    """The five products of each step, laid out as `melvae.layers.WideLinear` does for this
    shape; with `adam`, followed every step by a fused Adam update of a model's worth of
    parameters (the products' gradients for the two gene-facing weights, fixed ones for the
    rest)."""
    module = VAEModule(shape.genes, shape.hidden, LATENT)
    params = list(module.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    w1, b1 = module.encoder[0].weight, module.encoder[0].bias
    w4, b4 = module.decoder[-1].weight, module.decoder[-1].bias
    arranged = max(shape.genes, shape.hidden) >= MIN_WIDTH
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)
    times = []
    for _ in range(epochs):
        started = (time.perf_counter(), time.process_time())
        with torch.no_grad():
            for x in dense_train.split(shape.batch):
                if arranged:
                    h = linear_forward(x, w1, b1)
                    out = linear_forward(h, w4, b4)
                    w4.grad = weight_gradient(out, h)
                    gh = input_gradient(out, w4)
                    w1.grad = weight_gradient(gh, x)
                else:
                    h = F.linear(x, w1, b1)
                    out = F.linear(h, w4, b4)
                    w4.grad = out.T @ h
                    gh = out @ w4
                    w1.grad = gh.T @ x
                if adam:
                    optimizer.step()
        times.append(_since(started))
    return _best(times)


def _since(started: Times) -> Times:
    return time.perf_counter() - started[0], time.process_time() - started[1]


def _best(times: list[Times]) -> Times:
    """Fastest wall and fastest CPU time (each minimum on its own)."""
    return min(t[0] for t in times), min(t[1] for t in times)


def measure(shape: Shape, epochs: int, repeats: int) -> dict[str, Times]:
    """Best-of-`repeats` epoch times of the four loops at `shape`, alternating."""
    matrix = synthetic_tpm(shape.cells, shape.genes, shape.density)
    n_val = n_test = round(shape.cells * 0.15)
    train_x, val_x = matrix[n_val + n_test :], matrix[:n_val]
    if not shape.sparse:
        train_x, val_x = train_x.toarray(), val_x.toarray()
    dense_train = torch.from_numpy(np.asarray(matrix[n_val + n_test :].toarray()))
    timed = {
        "melvae": lambda: melvae_epoch(shape, train_x, val_x, epochs),
        "naive": lambda: naive_epoch(shape, dense_train, epochs),
        "products": lambda: products_epoch(shape, dense_train, epochs, adam=False),
        "bound": lambda: products_epoch(shape, dense_train, epochs, adam=True),
    }
    melvae_epoch(shape, train_x[:64], val_x[:64], 1)  # warm-up: lazy imports, first-touch pages
    runs: dict[str, list[Times]] = {name: [] for name in timed}
    for _ in range(repeats):
        for name, run in timed.items():
            runs[name].append(run())
    return {name: _best(values) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default="0,1,2", help="which of the three (0-based)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    print(
        f"one epoch (training split, 70 %, + validation pass for melvae); torch "
        f"{torch.__version__}, {args.threads} thread(s), best of {args.repeats} x {args.epochs} "
        f"epochs; load average {os.getloadavg()[0]:.1f} at start"
    )
    print("CPU seconds per epoch (wall in brackets); ratios of CPU seconds")
    header = ("shape", "melvae", "naive", "5 products", "bound", "/naive", "/bound")
    print(
        f"{header[0]:27s}"
        + "".join(f"{h:>17s}" for h in header[1:5])
        + "".join(f"{h:>8s}" for h in header[5:])
    )
    for shape in shapes:
        best = measure(shape, args.epochs, args.repeats)
        cells = "".join(
            f"{f'{best[n][1]:.3f} ({best[n][0]:.3f})':>17s}"
            for n in ("melvae", "naive", "products", "bound")
        )
        ratios = best["melvae"][1] / best["naive"][1], best["melvae"][1] / best["bound"][1]
        print(f"{shape.describe():27s}{cells}{ratios[0]:8.2f}{ratios[1]:8.2f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
