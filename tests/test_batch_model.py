"""The conditional VAE (issue 15): one-hot batch into the decoder's first layer (optionally the
encoder's), the model format that keeps the batches, and cells of patients the model never saw."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from melvae.errors import InputError
from melvae.model import MODEL_FILE, MelVAE
from melvae.module import VAEModule
from melvae.preprocess import PreprocessConfig
from melvae.train import TrainConfig

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"  # as conftest's shared_data
UNSEEN = ["Pre_P6", "Pre_P35"]  # two patients (7 and 10 cells) the models never see


def _module(seed: int, **kw) -> VAEModule:
    torch.manual_seed(seed)
    return VAEModule(50, 16, 4, **kw)


def test_without_batches_the_module_is_the_original_parameter_for_parameter():
    plain = _module(0)
    for conditioning in ("decoder", "encoder_decoder"):
        assert (
            dict(_module(0, batch_conditioning=conditioning).named_parameters()).keys()
            == dict(plain.named_parameters()).keys()
        )
        conditioned = _module(0, n_batches=3, batch_conditioning=conditioning)
        extra = set(dict(conditioned.named_parameters())) - set(dict(plain.named_parameters()))
        expected = {"decoder_batch.weight"} | (
            {"encoder_batch.weight"} if conditioning == "encoder_decoder" else set()
        )
        assert extra == expected
        # The batch columns are drawn last: every other weight is drawn as without batches.
        for name, value in plain.state_dict().items():
            assert torch.equal(conditioned.state_dict()[name], value), name


def test_the_batch_enters_the_first_decoder_layer_as_a_one_hot_input():
    module = _module(1, n_batches=3)
    module.eval()
    z, batch = torch.randn(5, 4), torch.tensor([0, 2, 1, 2, 0])
    first = module.decoder[0]
    concatenated = torch.nn.Linear(4 + 3, 16)
    with torch.no_grad():
        concatenated.weight.copy_(torch.cat([first.weight, module.decoder_batch.weight.T], dim=1))
        concatenated.bias.copy_(first.bias)
        one_hot = torch.nn.functional.one_hot(batch, 3).float()
        expected = module.decoder[1:](concatenated(torch.cat([z, one_hot], dim=1)))
        assert torch.allclose(module.decoded(z, batch), expected, atol=1e-6)
        with pytest.raises(InputError, match="no batch codes were given"):
            module.decoded(z)


@pytest.fixture(scope="module")
def patients() -> ad.AnnData:
    path = SHARED_DATA / "sadefeldman2018_gse120575_tcells_subset.h5ad"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return ad.read_h5ad(path)


def _fit(cells: ad.AnnData, **kw) -> MelVAE:
    seen = cells[~cells.obs["sample"].isin(UNSEEN).to_numpy()]
    order = np.random.default_rng(0).permutation(seen.n_obs)
    cut = int(0.8 * seen.n_obs)
    return MelVAE.fit(
        seen[np.sort(order[:cut])],
        seen[np.sort(order[cut:])],
        preprocess=PreprocessConfig(n_top_genes=500),
        train=TrainConfig(epochs=3),
        label_key="cell_type",
        progress=False,
        hidden_dim=32,
        latent_dim=4,
        **kw,
    )


@pytest.fixture(scope="module")
def conditioned(patients) -> MelVAE:
    return _fit(patients, batch_key="sample")


def test_a_conditional_model_saves_reloads_and_encodes_an_unseen_patient(
    patients, conditioned, tmp_path
):
    assert conditioned.batch_key == "sample"
    assert len(conditioned.batch_names) == 17 and not set(UNSEEN) & set(conditioned.batch_names)
    loaded = MelVAE.load(conditioned.save(tmp_path / "model"))
    meta = json.loads((tmp_path / "model" / MODEL_FILE).read_text())
    assert meta["batch_key"] == "sample" and meta["batch_names"] == conditioned.batch_names
    assert loaded.batch_names == conditioned.batch_names
    new = patients[patients.obs["sample"].isin(UNSEEN).to_numpy()]
    assert new.n_obs == 17
    latent = loaded.encode(new)
    assert latent.shape == (17, 4) and np.isfinite(latent).all()
    np.testing.assert_allclose(latent, conditioned.encode(new), rtol=1e-5, atol=1e-6)
    # Encoding needs no batch at all: the same cells without their patient column.
    bare = ad.AnnData(new.X, var=new.var)
    np.testing.assert_allclose(loaded.encode(bare), latent, rtol=1e-5, atol=1e-6)


def test_decoding_an_unseen_patient_names_it_and_transform_batch_decodes_as_a_known_one(
    patients, conditioned
):
    new = patients[patients.obs["sample"].isin(UNSEEN).to_numpy()]
    with pytest.raises(
        InputError,
        match="17 cell\\(s\\) belong to 2 batch\\(es\\) the model never saw: 'Pre_P6', 'Pre_P35'",
    ):
        conditioned.reconstruct(new)
    with pytest.raises(InputError, match="is not one of the model's batches"):
        conditioned.reconstruct(new, transform_batch="Pre_P6")
    one, two = (conditioned.batch_names[i] for i in (0, 1))
    _, as_one = conditioned.reconstruct(new, transform_batch=one)
    _, as_two = conditioned.reconstruct(new, transform_batch=two)
    assert as_one.shape == (17, 500) and not np.allclose(as_one, as_two)
    latent = conditioned.encode(new)
    np.testing.assert_allclose(
        conditioned.decode(latent, transform_batch=one), as_one, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(InputError, match="name one with transform_batch"):
        conditioned.decode(latent)
    # A seen patient decodes as its own batch: the same as naming that batch.
    seen = patients[(patients.obs["sample"] == one).to_numpy()]
    np.testing.assert_allclose(
        conditioned.reconstruct(seen)[1],
        conditioned.reconstruct(seen, transform_batch=one)[1],
        rtol=1e-5,
        atol=1e-6,
    )


def test_encoder_conditioning_needs_each_cells_known_batch(patients):
    model = _fit(patients, batch_key="sample", batch_conditioning="encoder_decoder")
    seen = patients[(patients.obs["sample"] == model.batch_names[0]).to_numpy()]
    assert model.encode(seen).shape == (seen.n_obs, 4)
    new = patients[patients.obs["sample"].isin(UNSEEN).to_numpy()]
    with pytest.raises(InputError, match="never saw"):
        model.encode(new)


def test_a_model_without_batch_key_saves_none_and_trains_as_before(patients, tmp_path: Path):
    plain = _fit(patients)
    again = _fit(patients, batch_conditioning="encoder_decoder")  # unused without batches
    assert plain.history == again.history
    meta = json.loads((plain.save(tmp_path / "plain") / MODEL_FILE).read_text())
    assert meta["batch_key"] is None and meta["batch_names"] == []
    with pytest.raises(InputError, match="has no batch covariate"):
        plain.reconstruct(patients[:5], transform_batch="Pre_P1")
