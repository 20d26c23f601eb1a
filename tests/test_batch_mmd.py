"""The within-cell-type MMD (issue 15, `batch_mmd_weight`): zero where each cell type's batches
match, its gradient pulls a shifted batch back onto its cell type's other batches and leaves
differences between cell types alone, weight 0 is the model of before bit for bit, no loss
value changes, it is refused without labels, and on the real T cells a model trained with it
saves, reloads and encodes patients it never saw without a patient or label column; the
default study does not search it."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from melvae.errors import InputError
from melvae.mmd import within_label_mmd
from melvae.model import MelVAE
from melvae.module import VAEModule
from melvae.study.config import load_study_config
from tests.test_adversary import UNSEEN, _fit, patients  # noqa: F401

MMD = {"batch_mmd_weight": 10.0, "label_key": "cell_type"}


def _two_types(shift: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two cell types far apart, each with cells of batches 0 and 1; batch 1 of type 0 shifted."""
    torch.manual_seed(0)
    labels = torch.tensor([0] * 8 + [1] * 8)
    batch = torch.tensor([0, 1] * 8)
    mu = torch.randn(16, 3) * 0.3 + labels[:, None] * 5.0
    mu[(labels == 0) & (batch == 1)] += shift
    return mu, batch, labels


def test_it_measures_batches_within_cell_types_only():
    matched = within_label_mmd(*_two_types(0.0), 2, 2)
    shifted = within_label_mmd(*_two_types(2.0), 2, 2)
    assert shifted > matched + 0.5
    # Moving a whole cell type (both batches) changes nothing: types may differ.
    mu, batch, labels = _two_types(0.0)
    moved = mu + (labels[:, None] == 1) * 3.0
    torch.testing.assert_close(within_label_mmd(moved, batch, labels, 2, 2), matched)
    # Cells without a known label (code 2) are left out; no type with two batches gives 0.
    unknown = torch.where(labels == 1, 2, labels)
    torch.testing.assert_close(
        within_label_mmd(mu, batch, unknown, 2, 2),
        within_label_mmd(mu[labels == 0], batch[labels == 0], labels[labels == 0], 2, 2),
    )
    assert within_label_mmd(mu, torch.zeros(16, dtype=torch.long), labels, 2, 2).item() == 0.0


def test_its_gradient_pulls_the_shifted_batch_back():
    mu, batch, labels = _two_types(2.0)
    mu.requires_grad_(True)
    within_label_mmd(mu, batch, labels, 2, 2).backward()
    shifted = (labels == 0) & (batch == 1)
    # Descending it moves the shifted cells back (against the +2 shift), on average.
    assert (mu.grad[shifted].mean(0) > 0).all()


def _module(**kw) -> VAEModule:
    torch.manual_seed(0)
    return VAEModule(50, 16, 4, n_batches=3, n_labels=2, **kw)


def test_weight_0_creates_nothing_and_no_loss_value_changes():
    plain, matched = _module(), _module(batch_mmd_weight=5.0)
    assert plain.batch_mmd is None and not plain.reads_labels and matched.reads_labels
    for name, value in plain.state_dict().items():
        assert torch.equal(matched.state_dict()[name], value), name
    x = torch.rand(32, 50)
    codes = torch.stack([torch.randint(0, 3, (32,)), torch.randint(0, 3, (32,))], 1)
    parts = [
        module.loss(x, generator=torch.Generator().manual_seed(1), batch=codes)
        for module in (plain, matched)
    ]
    for part in parts:
        part.total.backward()
    assert all(torch.equal(a, b) for a, b in zip(*parts, strict=True))
    assert not torch.equal(plain.mu.weight.grad, matched.mu.weight.grad)
    torch.testing.assert_close(plain.decoder[0].weight.grad, matched.decoder[0].weight.grad)
    with pytest.raises(InputError, match="batch_mmd_weight"):
        VAEModule(50, 16, 4, n_batches=3, batch_mmd_weight=5.0)


def test_the_default_study_does_not_search_it():
    assert "batch_mmd_weight" not in {
        p.name for p in load_study_config().with_batch_key("sample").search
    }


def test_weight_0_trains_bit_for_bit_as_before(patients):  # noqa: F811
    before = _fit(patients, 2, label_key="cell_type")
    off = _fit(patients, 2, label_key="cell_type", batch_mmd_weight=0.0)
    assert off.module.batch_mmd is None
    assert before.history.val_loss == off.history.val_loss
    assert np.array_equal(before.encode(patients), off.encode(patients))


def test_fit_without_a_label_key_is_refused(patients):  # noqa: F811
    with pytest.raises(InputError, match="batch_mmd_weight"):
        _fit(patients, 1, batch_mmd_weight=10.0)


def test_saved_reloaded_it_encodes_an_unseen_patient_without_labels(patients, tmp_path):  # noqa: F811
    model = _fit(patients, 3, label_classifier_weight=10.0, **MMD)
    history = model.history
    assert history.val_loss[-1] == pytest.approx(history.val_recon[-1] + history.val_kl[-1])
    loaded = MelVAE.load(model.save(tmp_path / "model"))
    assert loaded.module.batch_mmd is not None and loaded.module.batch_mmd.weight == 10.0
    new = patients[patients.obs["sample"].isin(UNSEEN).to_numpy()]
    assert not set(UNSEEN) & set(loaded.batch_names)
    latent = loaded.encode(ad.AnnData(new.X, var=new.var))  # no patient, no label column
    assert latent.shape == (new.n_obs, 5) and np.isfinite(latent).all()
    np.testing.assert_allclose(latent, model.encode(new), rtol=1e-5, atol=1e-6)
