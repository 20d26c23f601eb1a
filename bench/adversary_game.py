"""Is the batch adversary losing its game? Its own accuracy against a fresh classifier's.

At the fixed settings of `bench/batch_conditioning.py` (shared T-cell subset, `sample` as
batch, experiment 3, held-out-cells protocol), for each seed and model: fit, then read the
patient off the frozen latent twice, on the fitting cells and on the validation cells:
- `adversary`: the model's own trained classifier (`melvae.adversary.adversary_metrics`; NaN
  for a model without one);
- `post hoc`: a fresh classifier of the same shape (2 x 32 hidden; reading the label too where
  the adversary does), trained on the fitting cells' frozen posterior means alone.
If the fresh one reads patients far better than the adversary, the latent still holds the
patient and the adversary has lost the game (too slow, too weak), not the encoder won it.
`chance` is the share of the validation cells' most common patient.

    python bench/adversary_game.py --seeds 0 1 2
    python bench/adversary_game.py --models "adversary 30" --seeds 0
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import pandas as pd
import torch
from batch_conditioning import VARIANTS, fit_split, fit_variant, load_cells, splits
from torch.nn import functional as F

from melvae.adversary import BatchAdversary, adversary_metrics, label_codes
from melvae.model import MelVAE

POST_HOC_EPOCHS = 200
DEFAULT_MODELS = ("decoder", "adversary 30", "label adversary 30 + label head 10")


def post_hoc_accuracy(
    model: MelVAE,
    fit: tuple[np.ndarray, np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    reads_labels: bool,
    seed: int,
) -> tuple[float, float]:
    """Accuracy on (fitting, validation) cells of a fresh classifier trained on the fitting
    cells' (latent, batch code, label code) for `POST_HOC_EPOCHS` epochs (Adam, lr 1e-3,
    minibatches of 32)."""
    torch.manual_seed(seed)
    n_labels = len(model.label_names) if reads_labels else 0
    fresh = BatchAdversary(fit[0].shape[1], len(model.batch_names), 1.0, n_labels=n_labels)
    optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    z, b, y = (torch.as_tensor(a) for a in fit)
    order = np.random.default_rng(seed)
    for _ in range(POST_HOC_EPOCHS):
        for cut in np.array_split(order.permutation(len(z)), max(1, len(z) // 32)):
            optimizer.zero_grad()
            logits = fresh.logits(z[cut], y[cut] if reads_labels else None)
            F.cross_entropy(logits, b[cut]).backward()
            optimizer.step()
    with torch.no_grad():
        return tuple(
            (
                fresh.logits(torch.as_tensor(zs), torch.as_tensor(ys) if reads_labels else None)
                .argmax(dim=1)
                .numpy()
                == bs
            ).mean()
            for zs, bs, ys in (fit, val)
        )


def _cells(model: MelVAE, cells) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        model.encode(cells).astype(np.float32),
        model.batch_codes(cells),
        label_codes(cells.obs["cell_type"].to_numpy(), model.label_names),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", choices=list(VARIANTS), default=DEFAULT_MODELS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    cells = load_cells()
    rows = []
    for seed in args.seeds:
        train, _ = splits(cells, seed)["held-out cells"]
        fit_index, val_index = fit_split(train, seed)
        for variant in args.models:
            model = fit_variant(train, VARIANTS[variant], seed)
            fit, val = _cells(model, train[fit_index]), _cells(model, train[val_index])
            adversary = getattr(model.module, "adversary", None)
            reads = adversary is not None and adversary.reads_labels
            row = {"model": variant, "seed": seed, "epochs": len(model.history.val_loss)}
            for name, part, cut in (("fit", fit, fit_index), ("val", val, val_index)):
                labels = train[cut].obs["cell_type"].to_numpy()
                got = adversary_metrics(
                    model, part[0], train[cut].obs["sample"].to_numpy(), labels=labels, prefix=name
                )
                row[f"adversary {name}"] = got.get(f"{name}_adversary_accuracy", np.nan)
            row["post hoc fit"], row["post hoc val"] = post_hoc_accuracy(
                model, fit, val, reads_labels=reads, seed=seed
            )
            row["chance"] = np.bincount(val[1]).max() / len(val[1])
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    table = pd.DataFrame(rows).drop(columns="seed").groupby("model", sort=False).mean()
    print(f"patient accuracy, means over seeds {args.seeds} (held-out-cells protocol):")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
