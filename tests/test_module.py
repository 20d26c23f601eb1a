"""The VAE module: shapes, decoder means, and the exact loss conventions of each likelihood."""

from __future__ import annotations

import math

import pytest
import torch

from melvae.errors import InputError
from melvae.likelihoods import LIKELIHOODS
from melvae.module import VAEModule


def _zero_decoder_and_posterior(module: VAEModule) -> None:
    """Make the decoder output 0 and the posterior N(0, I), so the losses have closed forms."""
    with torch.no_grad():
        for layer in (module.decoder[2], module.mu, module.logvar):
            layer.weight.zero_()
            layer.bias.zero_()


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_shapes_and_decoder_means(likelihood: str) -> None:
    torch.manual_seed(0)
    module = VAEModule(n_genes=12, hidden_dim=8, latent_dim=3, likelihood=likelihood)
    x = torch.poisson(torch.full((5, 12), 2.0))
    if likelihood == "bernoulli":
        x = x / x.max()
    mu, logvar = module.encode(x)
    assert mu.shape == logvar.shape == (5, 3)
    mean = module.decode_mean(mu)
    assert mean.shape == (5, 12)
    if likelihood == "bernoulli":
        assert mean.min() >= 0 and mean.max() <= 1
    if likelihood == "negative_binomial":
        assert torch.allclose(mean.sum(dim=1), torch.ones(5))
        assert torch.allclose(module.reconstruct(x).sum(dim=1), x.sum(dim=1))
    parts = module.loss(x, kl_weight=0.5)
    assert torch.isclose(parts.total, parts.recon + 0.5 * parts.kl)
    assert parts.kl >= 0


def test_bernoulli_recon_is_bce_summed_over_genes_and_averaged_over_cells() -> None:
    module = VAEModule(n_genes=7, hidden_dim=4, latent_dim=2)
    _zero_decoder_and_posterior(module)
    x = torch.rand(9, 7)
    parts = module.loss(x)
    # Logits 0 give BCE = log 2 for any target in [0, 1], per gene.
    assert parts.recon.item() == pytest.approx(7 * math.log(2), rel=1e-6)
    assert parts.kl.item() == pytest.approx(0.0, abs=1e-7)


def test_gaussian_recon_is_half_squared_error() -> None:
    module = VAEModule(n_genes=5, hidden_dim=4, latent_dim=2, likelihood="gaussian")
    _zero_decoder_and_posterior(module)
    x = torch.rand(6, 5)
    expected = 0.5 * x.square().sum(dim=1).mean()
    assert module.loss(x).recon.item() == pytest.approx(expected.item(), rel=1e-6)


def test_negative_binomial_recon_matches_torch_distribution() -> None:
    module = VAEModule(n_genes=6, hidden_dim=4, latent_dim=2, likelihood="negative_binomial")
    _zero_decoder_and_posterior(module)
    with torch.no_grad():
        module.log_theta.copy_(torch.linspace(-1.0, 2.0, 6))
    x = torch.poisson(torch.full((4, 6), 3.0))
    x[0, 0] = 0
    mean = x.sum(dim=1, keepdim=True) / 6  # uniform proportions times library size
    theta = module.log_theta.exp()
    reference = torch.distributions.NegativeBinomial(
        total_count=theta, logits=torch.log(mean) - torch.log(theta)
    )
    expected = -reference.log_prob(x).sum(dim=1).mean()
    assert module.loss(x).recon.item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_noise_comes_from_the_given_generator() -> None:
    module = VAEModule(n_genes=5, hidden_dim=4, latent_dim=2)
    x = torch.rand(3, 5)
    first = module.loss(x, generator=torch.Generator().manual_seed(1)).total
    again = module.loss(x, generator=torch.Generator().manual_seed(1)).total
    other = module.loss(x, generator=torch.Generator().manual_seed(2)).total
    assert first == again and first != other


def test_unknown_likelihood_is_an_input_error() -> None:
    with pytest.raises(InputError, match="poisson"):
        VAEModule(n_genes=5, hidden_dim=4, latent_dim=2, likelihood="poisson")  # type: ignore[arg-type]


def test_default_architecture_is_the_original_parameter_for_parameter() -> None:
    module = VAEModule(n_genes=6, hidden_dim=4, latent_dim=2)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == {
        "encoder.0.weight": (4, 6),
        "encoder.0.bias": (4,),
        "mu.weight": (2, 4),
        "mu.bias": (2,),
        "logvar.weight": (2, 4),
        "logvar.bias": (2,),
        "decoder.0.weight": (4, 2),
        "decoder.0.bias": (4,),
        "decoder.2.weight": (6, 4),
        "decoder.2.bias": (6,),
    }


@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_deeper_modules_with_norm_and_dropout_train_and_encode_deterministically(norm) -> None:
    torch.manual_seed(0)
    module = VAEModule(n_genes=10, hidden_dim=8, latent_dim=3, n_layers=3, dropout=0.2, norm=norm)
    linear = [m for m in module.encoder if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 3
    x = torch.rand(16, 10)
    module.train()
    module.loss(x).total.backward()
    module.eval()  # dropout off, batch norm on running statistics: encoding is repeatable
    assert torch.equal(module.encode(x)[0], module.encode(x)[0])
    with pytest.raises(InputError, match="n_layers = 0 is not valid"):
        VAEModule(n_genes=10, hidden_dim=8, latent_dim=3, n_layers=0)


@pytest.mark.parametrize(("name", "kind"), [("gelu", torch.nn.GELU), ("elu", torch.nn.ELU)])
def test_the_hidden_activation_is_a_parameter_kept_by_save_and_load(tmp_path, name, kind):
    import anndata as ad
    import numpy as np

    from melvae.model import MelVAE
    from melvae.preprocess import PreprocessConfig
    from melvae.train import TrainConfig

    module = VAEModule(n_genes=6, hidden_dim=4, latent_dim=2, n_layers=2, activation=name)
    assert sum(isinstance(m, kind) for m in module.modules()) == 4
    assert not any(isinstance(m, torch.nn.ReLU) for m in module.modules())
    cells = ad.AnnData(np.random.default_rng(0).random((40, 6)).astype(np.float32))
    model = MelVAE.fit(
        cells[:30],
        cells[30:],
        preprocess=PreprocessConfig(n_top_genes=None),
        activation=name,
        train=TrainConfig(epochs=1),
        progress=False,
    )
    loaded = MelVAE.load(model.save(tmp_path / "model"))
    assert loaded.hyperparameters["activation"] == name
    assert np.array_equal(loaded.encode(cells), model.encode(cells))
    with pytest.raises(InputError, match="activation = 'tanh' is not valid"):
        VAEModule(n_genes=6, hidden_dim=4, latent_dim=2, activation="tanh")
