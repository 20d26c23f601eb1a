"""One epoch of the original configuration: melvae vs a naive loop and the matrix-product floor.

The original study's setting: GSE115978-sized data (2,761 cells × 17,994 genes, ~25 % non-zero,
values in [0, 1]), split 70/15/15, hidden 256, latent 5, batch 32, Adam lr 1e-3, Bernoulli loss.
These are timed side by side in this one process, alternating, best of `--repeats`:

- melvae: `train_vae` on the CSR training split; an epoch includes its validation pass (the
  targets are judged on that); its training pass alone is timed with a 1-cell validation set;
- naive: a re-implementation of the original notebook's loop on a dense tensor (default Adam,
  `loss.item()` every batch), same cells, same batches;
- floor: only the five matrix products every batch-32 step must do (encoder and decoder
  forward, decoder weight and hidden gradients, encoder weight gradient), same number of steps,
  twice: laid out the plain way (`nn.Linear`'s), and as `melvae.layers` arranges them (the lower
  of the two is the honest floor);
- floor + Adam: the arranged products followed by a fused Adam step on the weights they make
  gradients for, in one loop: the least any Adam-trained step does (no activations, losses or
  autograd), which shows how far the targets are within reach on this machine.

Wall and process-CPU seconds are both printed: on a machine shared with other jobs the CPU time
is the steadier measure of the work done (with 1 thread it is exactly that; with 2, idle spinning
of torch's thread pool counts too).

    python bench/epoch_speed.py [--epochs 3] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sparse_batches import synthetic_tpm
from torch import nn

from melvae.layers import input_gradient, linear_forward, weight_gradient
from melvae.module import VAEModule
from melvae.train import TrainConfig, train_vae

CELLS, GENES, DENSITY, HIDDEN, LATENT, BATCH = 2761, 17994, 0.25, 256, 5, 32


def melvae_epoch(train_x, val_x, epochs: int) -> tuple[float, float]:
    """(wall, CPU) seconds per epoch of melvae's training loop (training + validation pass)."""
    module = VAEModule(GENES, HIDDEN, LATENT)
    config = TrainConfig(
        epochs=epochs, batch_size=BATCH, early_stopping_patience=None, seed=0, device="cpu"
    )
    history = train_vae(module, train_x, val_x, config, progress=False)
    return min(history.epoch_seconds), min(history.epoch_cpu_seconds)


class NotebookVAE(nn.Module):
    """The original notebook's VAE, written the plain way."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(GENES, HIDDEN)
        self.fc_mu = nn.Linear(HIDDEN, LATENT)
        self.fc_logvar = nn.Linear(HIDDEN, LATENT)
        self.fc3 = nn.Linear(LATENT, HIDDEN)
        self.fc4 = nn.Linear(HIDDEN, GENES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def naive_epoch(dense_train: torch.Tensor, epochs: int) -> tuple[float, float]:
    """Seconds per epoch of the notebook loop: BCE + KL, default Adam, `.item()` per batch."""
    model = NotebookVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(epochs):
        started = (time.perf_counter(), time.process_time())
        total = 0.0
        for idx in torch.randperm(dense_train.shape[0]).split(BATCH):
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


def floor_epoch(dense_train: torch.Tensor, epochs: int) -> tuple[float, float]:
    """Seconds per epoch spent in the five matrix products of each step, laid out plainly."""
    w1, w4 = torch.randn(HIDDEN, GENES) * 0.01, torch.randn(GENES, HIDDEN) * 0.01
    times = []
    for _ in range(epochs):
        started = (time.perf_counter(), time.process_time())
        for x in dense_train.split(BATCH):
            h = x @ w1.T  # encoder forward
            out = h @ w4.T  # decoder output forward (stands in for its gradient below)
            _ = out.T @ h  # decoder weight gradient
            gh = out @ w4  # hidden-layer gradient
            _ = x.T @ gh  # encoder weight gradient
        times.append(_since(started))
    return _best(times)


def arranged_floor_epoch(
    dense_train: torch.Tensor, epochs: int, *, adam: bool = False
) -> tuple[float, float]:
    """The same five products, each computed the way `melvae.layers.WideLinear` does it; with
    `adam`, followed every step by the fused Adam update of the two weight matrices they make
    gradients for (all but ~20 k of the model's 9.2 M weights): the least an Adam-trained step
    can do."""
    w1 = torch.nn.Parameter(torch.randn(HIDDEN, GENES) * 0.01)
    w4 = torch.nn.Parameter(torch.randn(GENES, HIDDEN) * 0.01)
    b1, b4 = torch.zeros(HIDDEN), torch.zeros(GENES)
    optimizer = torch.optim.Adam([w1, w4], lr=1e-3, fused=True)
    times = []
    for _ in range(epochs):
        started = (time.perf_counter(), time.process_time())
        with torch.no_grad():
            for x in dense_train.split(BATCH):
                h = linear_forward(x, w1, b1)
                out = linear_forward(h, w4, b4)
                w4.grad = weight_gradient(out, h)
                gh = input_gradient(out, w4)
                w1.grad = weight_gradient(gh, x)
                if adam:
                    optimizer.step()
        times.append(_since(started))
    return _best(times)


def _since(started: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - started[0], time.process_time() - started[1]


def _best(times: list[tuple[float, float]]) -> tuple[float, float]:
    """Fastest wall and fastest CPU time (each minimum on its own)."""
    return min(t[0] for t in times), min(t[1] for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    matrix = synthetic_tpm(CELLS, GENES, DENSITY)
    n_val = n_test = round(CELLS * 0.15)
    train_x, val_x = matrix[n_val + n_test :], matrix[:n_val]
    dense_train = torch.from_numpy(train_x.toarray())

    steps = -(-train_x.shape[0] // BATCH)
    timed = {
        "melvae": lambda: melvae_epoch(train_x, val_x, args.epochs),
        "melvae_train": lambda: melvae_epoch(train_x, val_x[:1], args.epochs),
        "naive": lambda: naive_epoch(dense_train, args.epochs),
        "floor": lambda: floor_epoch(dense_train, args.epochs),
        "arranged": lambda: arranged_floor_epoch(dense_train, args.epochs),
        "adam": lambda: arranged_floor_epoch(dense_train, args.epochs, adam=True),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in timed}
    melvae_epoch(train_x[:64], val_x[:64], 1)  # warm-up: lazy imports, first-touch pages
    for _ in range(args.repeats):
        for name, run in timed.items():
            runs[name].append(run())
    best = {name: _best(values) for name, values in runs.items()}
    print(
        f"one epoch: {train_x.shape[0]} training cells ({steps} steps of {BATCH}) + "
        f"{val_x.shape[0]} validation cells × {GENES} genes, {DENSITY:.0%} non-zero, "
        f"hidden {HIDDEN}, latent {LATENT}; torch {torch.__version__}, {args.threads} threads, "
        f"best of {args.repeats} × {args.epochs} epochs"
    )
    print(f"{'':36s}{'wall s':>8s}{'CPU s':>8s}{'CPU ms/step':>12s}")
    labels = {
        "melvae": "melvae train_vae (incl. validation)",
        "melvae_train": "  its training pass (1-cell val.)",
        "naive": "naive notebook loop",
        "floor": "floor: 5 products, plain layouts",
        "arranged": "floor: 5 products, melvae layouts",
        "adam": "floor (melvae layouts) + fused Adam",
    }
    for name, (wall, cpu) in best.items():
        print(f"{labels[name]:36s}{wall:8.3f}{cpu:8.3f}{cpu / steps * 1e3:12.2f}")
    for other, target in (("naive", 0.5), ("floor", 1.6), ("arranged", 1.6)):
        wall = best["melvae"][0] / best[other][0]
        cpu = best["melvae"][1] / best[other][1]
        print(f"melvae / {other}: wall {wall:.2f}, CPU {cpu:.2f}  (target <= {target})")
    floor_adam, naive, train = best["adam"][0], best["naive"][0], best["melvae_train"][0]
    print(
        f"floor + Adam = {floor_adam / naive:.2f} x naive, the lowest ratio any Adam-trained loop "
        f"reaches here; melvae / (floor + Adam) = {best['melvae'][0] / floor_adam:.2f}, "
        f"its training pass {train / floor_adam:.2f}"
    )


if __name__ == "__main__":
    main()
