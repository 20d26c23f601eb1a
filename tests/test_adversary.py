"""The adversarial batch classifier (issue 15): gradients reversed into the encoder, weight 0 the
model of before bit for bit, loss values still the negative ELBO, refused without batches, and on
the real melanoma T cells a latent space that mixes patients measurably better."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import anndata as ad
import mlflow
import numpy as np
import optuna
import pytest
import torch
from torch.nn import functional as F

import melvae
from melvae import metrics, track
from melvae.adversary import BatchAdversary, adversary_metrics
from melvae.errors import InputError
from melvae.model import MelVAE
from melvae.module import VAEModule
from melvae.preprocess import PreprocessConfig
from melvae.study.__main__ import main
from melvae.study.config import load_study_config
from melvae.train import TrainConfig
from tests.test_study import _offline, _quick_config

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"  # as conftest's shared_data
SUBSET = "sadefeldman2018_gse120575_tcells_subset"
# Measured on the test's 17 patients (500 genes, 64 hidden, 5 latent, 30 epochs): training
# cells' iLISI 0.331 / 0.356 without the adversary and 0.402 / 0.429 with weight 20 (seeds 0 /
# 1); the test asks the mean to gain 0.02, under a third of the 0.07 measured.
ADVERSARY_EPOCHS, ADVERSARY_WEIGHT, ILISI_MARGIN = 30, 20.0, 0.02
UNSEEN = ["Pre_P6", "Pre_P35"]  # two patients (7 and 10 cells) the models never see


@pytest.fixture(scope="module")
def patients() -> ad.AnnData:
    path = SHARED_DATA / f"{SUBSET}.h5ad"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return ad.read_h5ad(path)


def test_the_encoder_gets_minus_the_gradient_the_classifier_descends():
    torch.manual_seed(0)
    adversary = BatchAdversary(latent_dim=4, n_batches=3, weight=2.5)
    mu = torch.randn(16, 4, requires_grad=True)
    batch = torch.randint(0, 3, (16,))
    adversary.loss(mu, batch).backward()
    reversed_mu, reversed_weights = (
        mu.grad.clone(),
        [p.grad.clone() for p in adversary.parameters()],
    )
    mu.grad = None
    adversary.zero_grad()
    (2.5 * F.cross_entropy(adversary.classifier(mu), batch)).backward()
    assert mu.grad.abs().sum() > 0
    # The classifier descends its cross-entropy; the latent (so the encoder) ascends it.
    torch.testing.assert_close(reversed_mu, -mu.grad)
    for reversed_grad, p in zip(reversed_weights, adversary.parameters(), strict=True):
        torch.testing.assert_close(reversed_grad, p.grad)


def _module(weight: float | None, n_batches: int = 3) -> VAEModule:
    torch.manual_seed(0)
    extra = {} if weight is None else {"batch_adversary_weight": weight}
    return VAEModule(50, 16, 4, n_batches=n_batches, **extra)


def test_the_adversary_changes_the_encoders_gradients_and_no_loss_value():
    x = torch.rand(32, 50)
    batch = torch.randint(0, 3, (32,))
    plain, adversarial = _module(None), _module(5.0)
    # Drawn last: every weight of the plain module is drawn the same.
    for name, value in plain.state_dict().items():
        assert torch.equal(adversarial.state_dict()[name], value), name
    assert {n for n, _ in adversarial.named_parameters()} - {
        n for n, _ in plain.named_parameters()
    } == {n for n, _ in adversarial.named_parameters() if n.startswith("adversary.")}
    losses = []
    for module in (plain, adversarial):
        parts = module.loss(x, generator=torch.Generator().manual_seed(1), batch=batch)
        parts.total.backward()
        losses.append(parts)
        assert torch.equal(parts.total, parts.recon + parts.kl)
    assert [torch.equal(a, b) for a, b in zip(*losses, strict=True)] == [True] * 3
    assert not torch.equal(plain.mu.weight.grad, adversarial.mu.weight.grad)
    # The decoder never sees the adversary: its gradients are the same.
    torch.testing.assert_close(plain.decoder[0].weight.grad, adversarial.decoder[0].weight.grad)
    assert all(p.grad is not None for p in adversarial.adversary.parameters())


def test_an_adversary_needs_batches():
    with pytest.raises(InputError, match="batch_adversary_weight"):
        _module(1.0, n_batches=0)
    with pytest.raises(InputError, match="batch_adversary_weight"):
        _module(-1.0)
    config = load_study_config()
    assert config.needs_batch_key() == []
    assert "batch_adversary_weight" not in {p.name for p in config.search}
    batched = config.with_batch_key("sample")
    assert "batch_adversary_weight" in {p.name for p in batched.search}
    # The seed trials stay the documented experiments: no adversary.
    assert {t["batch_adversary_weight"] for t in batched.seed_trials} == {0.0}


@pytest.mark.parametrize(
    "name",
    # The adversary, its own learning rate, the within-cell-type MMD (melvae.mmd).
    ["batch_adversary_weight", "batch_adversary_learning_rate_scale", "batch_mmd_weight"],
)
def test_a_study_that_sets_a_batch_term_without_a_batch_key_exits_2(name, tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    study = _quick_config(tmp_path, **{"[model]\n": f"[model]\n{name} = 10.0\n"})
    assert load_study_config(study).needs_batch_key() == [name]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["run", "--study", str(study), "--n-trials", "1", "--quiet"]) == 2
    assert name in err.getvalue() and "no batch key" in err.getvalue()
    assert not (tmp_path / "mlruns").exists()


def _split(cells: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
    """(training, validation) cells of every patient but the `UNSEEN` ones."""
    seen = cells[~cells.obs["sample"].isin(UNSEEN).to_numpy()]
    order = np.random.default_rng(0).permutation(seen.n_obs)
    cut = int(0.8 * seen.n_obs)
    return seen[np.sort(order[:cut])].copy(), seen[np.sort(order[cut:])].copy()


def _fit(cells: ad.AnnData, epochs: int, seed: int = 0, **kw) -> MelVAE:
    train, val = _split(cells)
    return MelVAE.fit(
        train,
        val,
        preprocess=PreprocessConfig(n_top_genes=500),
        train=TrainConfig(
            epochs=epochs, learning_rate=1e-3, early_stopping_patience=epochs, seed=seed
        ),
        batch_key="sample",
        progress=False,
        hidden_dim=64,
        latent_dim=5,
        **kw,
    )


def test_weight_0_is_the_model_without_an_adversary_bit_for_bit(patients):
    before, off = _fit(patients, 2), _fit(patients, 2, batch_adversary_weight=0.0)
    assert off.module.adversary is None
    assert before.history.val_loss == off.history.val_loss
    assert np.array_equal(before.encode(patients), off.encode(patients))


@pytest.mark.slow
def test_the_adversary_mixes_patients_better_on_real_t_cells(patients, tmp_path):
    train, val = _split(patients)
    batches = train.obs["sample"].to_numpy()
    ilisi: dict[str, list[float]] = {"plain": [], "adversarial": []}
    for seed in (0, 1):
        plain = _fit(patients, ADVERSARY_EPOCHS, seed)
        adversarial = _fit(
            patients, ADVERSARY_EPOCHS, seed, batch_adversary_weight=ADVERSARY_WEIGHT
        )
        ilisi["plain"].append(metrics.ilisi(plain.encode(train), batches))
        ilisi["adversarial"].append(metrics.ilisi(adversarial.encode(train), batches))
    assert np.mean(ilisi["adversarial"]) > np.mean(ilisi["plain"]) + ILISI_MARGIN, ilisi
    # The loss logged is still the negative ELBO (recon + KL at full weight).
    history = adversarial.history
    assert history.val_loss[-1] == pytest.approx(history.val_recon[-1] + history.val_kl[-1])
    # Saved with its classifier, reloaded whole, and cells of patients it never saw encode,
    # without any patient column.
    loaded = MelVAE.load(adversarial.save(tmp_path / "model"))
    assert loaded.module.adversary is not None
    new = patients[patients.obs["sample"].isin(UNSEEN).to_numpy()]
    assert not set(UNSEEN) & set(loaded.batch_names)
    latent = loaded.encode(ad.AnnData(new.X, var=new.var))
    assert latent.shape == (17, 5) and np.isfinite(latent).all()
    np.testing.assert_allclose(latent, adversarial.encode(new), rtol=1e-5, atol=1e-6)
    logged = adversary_metrics(loaded, loaded.encode(val), val.obs["sample"].to_numpy())
    assert set(logged) == {"val_adversary_loss", "val_adversary_accuracy"}
    assert 0 <= logged["val_adversary_accuracy"] <= 1


@pytest.mark.slow
def test_a_study_with_an_adversary_resumes_and_registers(tmp_path, monkeypatch, patients):
    _offline(monkeypatch, tmp_path)
    study = _quick_config(
        tmp_path,
        **{
            "n_top_genes = 2000": "n_top_genes = 500",
            "[model]\n": "[model]\nbatch_adversary_weight = 30.0\n",
        },
    )
    argv = ["--study", str(study), "--data", str(SHARED_DATA / f"{SUBSET}.h5ad")]
    argv += ["--batch-key", "sample", "--epochs", "2", "--quiet"]
    assert main(["run", *argv, "--n-trials", "2"]) == 0
    assert main(["run", *argv, "--n-trials", "1"]) == 0
    trials = optuna.load_study(
        study_name=f"melanoma-vae-{SUBSET}", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db"
    ).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    # The seed trials take the fixed weight of [model]: every trial had an adversary.
    assert {t.params["batch_adversary_weight"] for t in trials} == {30.0}
    for trial in trials:
        assert 0 <= trial.user_attrs["val_adversary_accuracy"] <= 1
    track.use_backend()
    version = mlflow.MlflowClient().get_model_version_by_alias(f"melvae-{SUBSET}", "champion")
    assert version.tags["selection_rule"].startswith("highest integration_score")
    champion = melvae.load_model(f"models:/melvae-{SUBSET}@champion")
    assert champion.module.adversary is not None
    assert np.isfinite(champion.encode(ad.AnnData(patients.X[:20], var=patients.var))).all()
