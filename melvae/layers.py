"""`WideLinear`: `nn.Linear` for the gene-facing layers, with its CPU products arranged for speed.

The first encoder layer (genes → hidden) and the last decoder layer (hidden → genes) hold almost
all of the model's weights, and each training step multiplies them by a thin batch (32 cells in the
original study). For such thin batches (up to `THIN_BATCH` cells) and wide layers (`MIN_WIDTH`
genes or more) the layout of a product changes the time a CPU BLAS takes by up to 2× for the same
arithmetic. Measured in isolation with torch's MKL on 2 cores (32 cells × 17,994 genes × hidden
256, ms per product; `bench/epoch_speed.py` times all five inside an epoch):

| product                          | as `nn.Linear` does it | as done here                |
|----------------------------------|------------------------|-----------------------------|
| forward, hidden → genes          | 8.6 (`h @ W.T`)        | 5.6 (`(W @ h.T).T`)         |
| input gradient, genes → hidden   | 4.1 (`g @ W`)          | 3.1 (`(W.T @ g.T).T`)       |
| weight gradient, decoder/encoder | 6.9 / 10.1             | 5.6 / 4.9 (in gene blocks)  |

The weight gradient is written block by block (`GENE_BLOCK` genes at a time) into one tensor;
blocks split no sum, each entry is the same dot product over the batch. Parameters and state dict
are `nn.Linear`'s, and a seed still gives the same result every run. On other devices (CUDA)
the layer is a plain `nn.Linear`: the layouts above were measured for CPU BLAS only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Genes per block of the weight gradient: each block's gradient fits in the L2/L3 caches of a
# desktop or server CPU (2,048 × 256 × 4 bytes = 2 MiB), the size measured fastest above.
GENE_BLOCK = 2048
# Batches of up to this many cells take the arranged products; wider ones (validation, encoding
# in batches of 1,024) are faster the plain way: at 414 cells the decoder's forward took 50 ms
# plain and 66 ms arranged, at 128 cells 24 and 22 ms, at 32 cells 8.4 and 6.6 ms.
THIN_BATCH = 256
# Only layers with a side at least this wide take them: an epoch with 2,000 genes ties the plain
# way (0.151 vs 0.147 s) and one with 765 (the PBMC fallback) is 10 % slower arranged, while at
# 4,000 genes the arranged epoch is 12 % faster and at 17,994 genes 19 %.
MIN_WIDTH = 3000


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x W^T + b (cells × out), computed as (W x^T)^T.

    BLAS walks the wide weight with the thin batch as the short side; the bias is added while the
    result is written back in cells × out order.
    """
    product = torch.mm(weight, x.t())
    out = torch.empty(x.shape[0], weight.shape[0], dtype=product.dtype, device=product.device)
    return torch.add(product.t(), bias, out=out)


def input_gradient(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad W (cells × in), computed as (W^T grad^T)^T."""
    return torch.mm(weight.t(), grad.t()).t()


def weight_gradient(
    grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """grad^T x (out × in), computed in blocks of `GENE_BLOCK` along its wider side, written into
    `out` (a contiguous out × in tensor) if given, else into a new tensor."""
    n_out, n_in = grad.shape[1], x.shape[1]
    result = torch.empty(n_out, n_in, dtype=grad.dtype, device=grad.device) if out is None else out
    if n_out >= n_in:
        for start in range(0, n_out, GENE_BLOCK):
            rows = slice(start, start + GENE_BLOCK)
            torch.mm(grad[:, rows].t(), x, out=result[rows])
    else:
        for start in range(0, n_in, GENE_BLOCK):
            cols = slice(start, start + GENE_BLOCK)
            torch.mm(grad.t(), x[:, cols], out=result[:, cols])
    return result


class _WideLinearFunction(torch.autograd.Function):
    """y = x W^T + b through the three products above (x: cells × in, W: out × in)."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return linear_forward(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return (
            input_gradient(grad, weight) if needs[0] else None,
            weight_gradient(grad, x) if needs[1] else None,
            grad.sum(dim=0) if needs[2] else None,
        )


class WideLinear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) for a layer with a gene-sized side."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not arranged(self, x):
            return F.linear(x, self.weight, self.bias)
        return _WideLinearFunction.apply(x, self.weight, self.bias)


def arranged(layer: nn.Linear, x: torch.Tensor) -> bool:
    """Whether `layer` applied to `x` takes the arranged products: a `wide` layer and a `thin`
    batch."""
    return wide(layer) and thin(x)


def wide(layer: nn.Linear) -> bool:
    """Whether `layer` takes the arranged products for a `thin` batch: a `WideLinear` with a bias
    and a side of `MIN_WIDTH` or more."""
    return (
        isinstance(layer, WideLinear)
        and layer.bias is not None
        and max(layer.in_features, layer.out_features) >= MIN_WIDTH
    )


def thin(x: torch.Tensor) -> bool:
    """Whether the batch `x` is one the arranged products are for: 2-D, at most `THIN_BATCH`
    cells, on the CPU."""
    return x.is_cpu and x.dim() == 2 and x.shape[0] <= THIN_BATCH
