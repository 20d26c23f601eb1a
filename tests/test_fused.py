"""melvae.fused: the hand-written loss and gradients equal the plain module's autograd ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import melvae.layers
import melvae.train
from melvae.fused import (
    loss_sums,
    plan_of,
    softplus_sum,
    softplus_sum_and_sigmoid,
    train_step,
    vae_loss,
)
from melvae.module import VAEModule
from melvae.train import TrainConfig, train_vae

COVERED = [
    pytest.param({}, id="original"),
    pytest.param({"n_layers": 2, "dropout": 0.2}, id="2-layers-dropout"),
    pytest.param({"n_layers": 3, "dropout": 0.1}, id="3-layers-dropout"),
    pytest.param({"n_layers": 2, "norm": "layer", "dropout": 0.1}, id="layer-norm-dropout"),
]


@pytest.fixture(params=[False, True], ids=["plain-products", "arranged-products"])
def layout(request, monkeypatch):
    """Both product layouts of the gene-facing layers (arranged: small layers count as wide)."""
    if request.param:
        monkeypatch.setattr(melvae.layers, "MIN_WIDTH", 4)
        monkeypatch.setattr(melvae.layers, "GENE_BLOCK", 3)


def _module(**architecture) -> VAEModule:
    torch.manual_seed(0)
    return VAEModule(11, 6, 3, **architecture).double()


def _x(cells: int = 7) -> torch.Tensor:
    return torch.rand(cells, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _fused(module: VAEModule):
    """`vae_loss` with `VAEModule.loss`'s signature."""
    return lambda x, kl_weight, generator: vae_loss(
        module, plan_of(module), x, kl_weight, generator
    )


def _loss_and_grads(module: VAEModule, loss, x: torch.Tensor):
    """Loss parts and gradients (weights, then x) of total + 0.3 * recon - 0.2 * kl."""
    torch.manual_seed(5)  # dropout's draws
    total, recon, kl = loss(x, 0.7, generator=torch.Generator().manual_seed(3))
    weights = list(module.parameters())
    grads = torch.autograd.grad(total + 0.3 * recon - 0.2 * kl, [*weights, x])
    return [p.detach() for p in (total, recon, kl)], grads


@pytest.mark.parametrize("architecture", COVERED)
def test_fused_loss_and_its_gradients_equal_autograds_on_the_plain_module(
    layout, architecture
) -> None:
    module = _module(**architecture)
    assert plan_of(module) is not None
    x = _x().requires_grad_()
    fused, plain = (_loss_and_grads(module, f, x) for f in (_fused(module), module.loss))
    for got, want in zip([*fused[0], *fused[1]], [*plain[0], *plain[1]], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("architecture", COVERED)
def test_the_training_step_sets_the_gradients_of_the_total_loss(layout, architecture) -> None:
    _assert_step_sets_autograds_gradients(_module(**architecture))


@pytest.mark.parametrize("architecture", COVERED)
def test_a_step_writes_its_gradients_over_the_last_steps(layout, architecture) -> None:
    """The Linear layers' gradients land in the tensors the last step left in `.grad`, and
    equal autograd's for the new batch (nothing of the old one left in them)."""
    module = _module(**architecture)
    train_step(module, plan_of(module), _x(5) * 0.5, 0.2, torch.Generator().manual_seed(4))
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    weights = [p for m in linears for p in (m.weight, m.bias)]
    kept = [p.grad for p in weights]
    _assert_step_sets_autograds_gradients(module)
    assert all(p.grad is k for p, k in zip(weights, kept, strict=True))


@pytest.mark.parametrize("architecture", COVERED)
def test_autograd_adds_to_the_gradients_a_step_left(architecture) -> None:
    """The step runs in inference mode, but the `.grad` tensors it leaves are normal ones: a
    backward pass afterwards adds its gradients to them (an inference tensor would refuse)."""
    module = _module(**architecture)
    train_step(module, plan_of(module), _x(5) * 0.5, 0.2, torch.Generator().manual_seed(4))
    left = [p.grad.clone() for p in module.parameters()]
    parts = module.loss(_x(), 0.7, generator=torch.Generator().manual_seed(3))
    added = torch.autograd.grad(parts.total, list(module.parameters()), retain_graph=True)
    parts.total.backward()
    for p, before, extra in zip(module.parameters(), left, added, strict=True):
        assert not p.grad.is_inference()
        torch.testing.assert_close(p.grad, before + extra, rtol=1e-10, atol=1e-12)


def test_a_gradient_that_cannot_be_written_over_is_replaced() -> None:
    """A strided `.grad` (not contiguous) or one inside autograd gets a new tensor."""
    module = _module()
    strided = torch.zeros(11, 6, dtype=torch.float64).t()
    tracked = torch.zeros(11, dtype=torch.float64, requires_grad=True)
    module.encoder[0].weight.grad, module.decoder[-1].bias.grad = strided, tracked
    _assert_step_sets_autograds_gradients(module)
    assert module.encoder[0].weight.grad is not strided and not strided.any()
    assert module.decoder[-1].bias.grad is not tracked and not tracked.any()


def _assert_step_sets_autograds_gradients(module: VAEModule) -> None:
    x = _x()
    torch.manual_seed(5)
    want_parts = module.loss(x, 0.7, generator=torch.Generator().manual_seed(3))
    want = torch.autograd.grad(want_parts.total, list(module.parameters()))
    torch.manual_seed(5)
    sums = train_step(module, plan_of(module), x, 0.7, torch.Generator().manual_seed(3))
    for got, expected in zip(sums, [want_parts.recon, want_parts.kl], strict=True):
        torch.testing.assert_close(got, expected.detach() * len(x), rtol=1e-10, atol=1e-12)
    for p, g in zip(module.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_the_training_step_also_far_out() -> None:
    """Logits up to 38 (a decoder grown large): the loss and gradients stay autograd's."""
    module = _module()
    with torch.no_grad():
        module.decoder[-1].weight.mul_(200)
    x = _x()
    want_parts = module.loss(x, 0.7, generator=torch.Generator().manual_seed(3))
    want = torch.autograd.grad(want_parts.total, list(module.parameters()))
    recon, _ = train_step(module, plan_of(module), x, 0.7, torch.Generator().manual_seed(3))
    torch.testing.assert_close(recon, want_parts.recon.detach() * len(x), rtol=1e-10, atol=1e-12)
    for p, g in zip(module.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("architecture", COVERED)
def test_loss_sums_are_the_loss_parts_summed_over_cells(architecture) -> None:
    module = _module(**architecture)
    x = _x()
    torch.manual_seed(5)
    want = module.loss(x, 0.7, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    sums = loss_sums(module, plan_of(module), x, torch.Generator().manual_seed(3))
    for got, expected in zip(sums, [want.recon, want.kl], strict=True):
        assert not got.requires_grad
        torch.testing.assert_close(got, expected.detach() * len(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cells", [7, 64, 300], ids=["remainder-only", "one-run", "runs-and-rest"])
def test_softplus_sum_is_the_sum_of_softplus_also_far_out(cells) -> None:
    """Logits from -100 to 100: the products of max(p, 1 - p) neither underflow nor lose digits,
    and the sigmoid comes with the sum."""
    logits = torch.linspace(-100, 100, cells * 11, dtype=torch.float64).reshape(cells, 11)
    want = torch.nn.functional.softplus(logits).sum()
    for dtype, rtol, atol in [(torch.float64, 1e-12, 1e-12), (torch.float32, 1e-6, 1e-5)]:
        got, probs = softplus_sum_and_sigmoid(logits.to(dtype))
        torch.testing.assert_close(got, want.to(dtype), rtol=rtol, atol=atol)
        torch.testing.assert_close(probs, torch.sigmoid(logits.to(dtype)), rtol=0, atol=0)
        torch.testing.assert_close(softplus_sum(logits.to(dtype)), got, rtol=0, atol=0)


@pytest.mark.parametrize(
    "architecture",
    [{"norm": "batch"}, {"activation": "gelu"}, {"likelihood": "gaussian"}],
    ids=["batch-norm", "gelu", "gaussian"],
)
def test_other_architectures_take_the_plain_path(architecture) -> None:
    assert plan_of(_module(**architecture)) is None


def test_a_batch_conditioned_module_takes_the_plain_path() -> None:
    module = VAEModule(11, 6, 3, n_batches=2)
    assert plan_of(module) is None  # its batch columns are weights the hand-written loss lacks
    module.decoder_batch = None  # without them: the common architecture again
    assert plan_of(module) is not None
    module.decoder[0] = torch.nn.Linear(3 + 2, 6)  # but a decoder that reads more than z
    assert plan_of(module) is None


def test_training_with_the_fused_step_ends_where_the_plain_path_ends(monkeypatch) -> None:
    """A few epochs of Adam with dropout: the same weights within float rounding, and a seed
    gives exactly the same weights twice."""
    rng = np.random.default_rng(0)
    x = rng.random((60, 11)).astype(np.float32)
    config = TrainConfig(epochs=3, batch_size=16, early_stopping_patience=None, seed=2)

    def trained() -> tuple[VAEModule, melvae.train.History]:
        torch.manual_seed(0)
        module = VAEModule(11, 6, 3, n_layers=2, dropout=0.1, norm="layer")
        history = train_vae(module, x[:45], x[45:], config, progress=False)
        return module, history

    (fused, fused_history), (again, again_history) = trained(), trained()
    monkeypatch.setattr(melvae.train, "plan_of", lambda module: None)
    plain, plain_history = trained()
    assert fused_history == again_history
    for name in melvae.train.METRIC_NAMES[:6]:  # the six losses, each epoch
        want = getattr(plain_history, name)
        np.testing.assert_allclose(getattr(fused_history, name), want, rtol=1e-5, err_msg=name)
    for (name, a), b, c in zip(
        fused.state_dict().items(),
        again.state_dict().values(),
        plain.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5, msg=name)
