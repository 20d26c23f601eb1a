"""The batch adversary's own learning rate (`batch_adversary_learning_rate_scale`, issue 15):
the optimizer moves its classifier at that multiple of the rate and every other weight at the
rate itself, the default is the model of before bit for bit, and on the real T cells a model
with a faster classifier trains, saves, reloads and encodes patients it never saw (a study
without a batch key refuses it: tests/test_adversary.py)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from melvae.errors import InputError
from melvae.model import MelVAE
from melvae.module import VAEModule
from melvae.train import FusedAdam
from tests.test_adversary import UNSEEN, _fit, patients  # noqa: F401


def _adam_steps(optimizer_of, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    optimizer = optimizer_of(weights)
    for step in range(steps):
        optimizer.zero_grad()
        sum(((w - step) ** 2).sum() * (i + 1) for i, w in enumerate(weights)).backward()
        optimizer.step()
    return [w.detach() for w in weights]


def test_scaled_weights_move_as_adam_at_that_multiple_of_the_rate():
    ours = _adam_steps(lambda w: FusedAdam(w, lr=1e-2, scales={w[1]: 30.0}))
    torch_adam = _adam_steps(
        lambda w: torch.optim.Adam(
            [{"params": [w[0], w[2]]}, {"params": [w[1]], "lr": 0.3}], lr=1e-2
        )
    )
    for a, b in zip(ours, torch_adam, strict=True):
        torch.testing.assert_close(a, b)
    # The scaled weight did move differently from one at the shared rate.
    shared = _adam_steps(lambda w: FusedAdam(w, lr=1e-2))
    assert not torch.allclose(ours[1], shared[1]) and torch.equal(ours[0], shared[0])


def test_only_the_adversary_is_scaled_and_the_default_scales_nothing():
    torch.manual_seed(0)
    plain = VAEModule(50, 16, 4, n_batches=3, batch_adversary_weight=5.0)
    assert plain.learning_rate_scales() == {}
    faster = VAEModule(
        50, 16, 4, n_batches=3, batch_adversary_weight=5.0, batch_adversary_learning_rate_scale=10.0
    )
    scaled = faster.learning_rate_scales()
    assert set(map(id, scaled)) == set(map(id, faster.adversary.parameters()))
    assert set(scaled.values()) == {10.0}
    with pytest.raises(InputError, match="batch_adversary_learning_rate_scale"):
        VAEModule(50, 16, 4, n_batches=3, batch_adversary_learning_rate_scale=0.0)


def test_scale_1_is_the_model_of_before_bit_for_bit(patients):  # noqa: F811
    before = _fit(patients, 2, batch_adversary_weight=10.0)
    same = _fit(patients, 2, batch_adversary_weight=10.0, batch_adversary_learning_rate_scale=1.0)
    assert before.history.val_loss == same.history.val_loss
    assert np.array_equal(before.encode(patients), same.encode(patients))


def test_a_faster_adversary_trains_saves_reloads_and_encodes_unseen_patients(
    patients,  # noqa: F811
    tmp_path,
):
    shared = _fit(patients, 3, batch_adversary_weight=10.0)
    faster = _fit(
        patients, 3, batch_adversary_weight=10.0, batch_adversary_learning_rate_scale=30.0
    )
    assert shared.history.val_loss != faster.history.val_loss
    # Its logged losses are still the negative ELBO.
    history = faster.history
    assert history.val_loss[-1] == pytest.approx(history.val_recon[-1] + history.val_kl[-1])
    loaded = MelVAE.load(faster.save(tmp_path / "model"))
    assert loaded.module.adversary.learning_rate_scale == 30.0
    new = patients[patients.obs["sample"].isin(UNSEEN).to_numpy()]
    latent = loaded.encode(ad.AnnData(new.X, var=new.var))
    assert latent.shape == (new.n_obs, 5) and np.isfinite(latent).all()
    np.testing.assert_allclose(latent, faster.encode(new), rtol=1e-5, atol=1e-6)
