"""bernoulli_nll (the original study's loss) and sample_and_kl, each with its own backward pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from melvae.losses import bernoulli_nll, sample_and_kl


def test_values_and_gradients_equal_binary_cross_entropy_summed_over_genes() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(6, 40, dtype=torch.float64) * 8).requires_grad_()  # saturating too
    x = torch.rand(6, 40, dtype=torch.float64).requires_grad_()
    x_zeros = torch.where(torch.rand(6, 40) < 0.7, 0.0, x.detach())  # sparse like scRNA-seq
    for data in (x, x_zeros):
        expected = F.binary_cross_entropy_with_logits(logits, data, reduction="none").sum(-1)
        got = bernoulli_nll(logits, data)
        torch.testing.assert_close(got, expected)
        weights = torch.rand(6, dtype=torch.float64)
        wanted = [t for t in (logits, data) if t.requires_grad]
        torch.testing.assert_close(
            torch.autograd.grad(got, wanted, weights),
            torch.autograd.grad(expected, wanted, weights),
        )
    assert torch.autograd.gradcheck(bernoulli_nll, (logits[:2, :5], x[:2, :5]))


def test_large_logits_stay_finite_in_float32() -> None:
    logits = torch.tensor([[-200.0, 0.0, 200.0]], requires_grad=True)
    loss = bernoulli_nll(logits, torch.tensor([[1.0, 0.5, 0.0]]))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss, torch.tensor([200.0 + 0.6931472 + 200.0]))


def test_sample_and_kl_equal_autograds_chain_in_values_and_gradients() -> None:
    torch.manual_seed(0)
    mu = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    logvar = (torch.randn(5, 3, dtype=torch.float64) * 2).requires_grad_()
    eps = torch.randn(5, 3, dtype=torch.float64)
    z, kl = sample_and_kl(mu, logvar, eps)
    expected_z = mu + eps * torch.exp(0.5 * logvar)
    expected_kl = (-0.5 * (1 + logvar - mu.square() - logvar.exp())).sum(dim=-1)
    torch.testing.assert_close((z, kl), (expected_z, expected_kl))
    weights = (torch.rand(5, 3, dtype=torch.float64), torch.rand(5, dtype=torch.float64))
    torch.testing.assert_close(
        torch.autograd.grad((z, kl), (mu, logvar), weights),
        torch.autograd.grad((expected_z, expected_kl), (mu, logvar), weights),
    )
    assert torch.autograd.gradcheck(sample_and_kl, (mu[:2], logvar[:2], eps[:2]))
