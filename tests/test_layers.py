"""WideLinear: the gene-facing layers compute nn.Linear's maths, gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import melvae.layers
from melvae.layers import WideLinear, weight_gradient
from melvae.module import VAEModule


@pytest.fixture
def small_blocks(monkeypatch):
    """Small layers count as wide, in blocks of 3 genes: a handful of genes already needs several
    blocks and a remainder."""
    monkeypatch.setattr(melvae.layers, "MIN_WIDTH", 4)
    monkeypatch.setattr(melvae.layers, "GENE_BLOCK", 3)


@pytest.mark.parametrize(("n_in", "n_out"), [(11, 4), (4, 11)], ids=["genes-in", "genes-out"])
def test_forward_and_gradients_match_plain_linear(small_blocks, n_in, n_out) -> None:
    torch.manual_seed(0)
    layer = WideLinear(n_in, n_out).double()
    x = torch.rand(5, n_in, dtype=torch.float64, requires_grad=True)
    expected = F.linear(x, layer.weight, layer.bias)
    out = layer(x)
    assert out.shape == (5, n_out) and out.is_contiguous()
    torch.testing.assert_close(out, expected)
    upstream = torch.randn(5, n_out, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, layer.weight, layer.bias), upstream)
    want = torch.autograd.grad(expected, (x, layer.weight, layer.bias), upstream)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert torch.autograd.gradcheck(layer, (x,))


def test_blocked_weight_gradient_equals_the_unblocked_product(small_blocks) -> None:
    torch.manual_seed(1)
    grad, x = torch.randn(8, 10), torch.randn(8, 7)  # 10 outputs: blocks of 3, 3, 3, 1
    torch.testing.assert_close(weight_gradient(grad, x), grad.t() @ x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight_gradient(x, grad), x.t() @ grad, rtol=1e-6, atol=1e-6)


def test_wide_batches_and_narrow_layers_take_the_plain_products(small_blocks, monkeypatch) -> None:
    monkeypatch.setattr(melvae.layers, "THIN_BATCH", 4)
    layer = WideLinear(6, 3)
    thin, wide_batch = layer(torch.rand(4, 6)), layer(torch.rand(5, 6))
    assert thin.grad_fn.name().startswith("_WideLinearFunction")
    assert wide_batch.grad_fn.name() == "AddmmBackward0"
    assert WideLinear(3, 2)(torch.rand(4, 3)).grad_fn.name() == "AddmmBackward0"


def test_input_that_needs_no_gradient_gets_none_and_weights_still_learn(small_blocks) -> None:
    layer = WideLinear(6, 3)
    layer(torch.rand(4, 6)).square().sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None


def test_the_gene_facing_layers_of_the_vae_are_wide_and_the_others_plain() -> None:
    module = VAEModule(n_genes=20, hidden_dim=8, latent_dim=2, n_layers=2)
    wide = [name for name, m in module.named_modules() if isinstance(m, WideLinear)]
    assert wide == ["encoder.0", "decoder.4"]
    plain = torch.nn.Linear(20, 8)
    plain.load_state_dict(module.encoder[0].state_dict())  # nn.Linear's parameters, unchanged
    x = torch.rand(3, 20)
    torch.testing.assert_close(plain(x), module.encoder[0](x))
