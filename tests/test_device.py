"""--device auto|cpu|cuda: resolution, training and inference on the chosen device, models that
load on a CPU-only machine. The CUDA case skips cleanly without a GPU."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from melvae.device import resolve_device
from melvae.errors import InputError
from melvae.model import WEIGHTS_FILE, MelVAE
from melvae.preprocess import PreprocessConfig
from melvae.study.__main__ import main
from melvae.train import TrainConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def _cells(n: int = 120, genes: int = 25, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(2.0, 1.0, genes), size=(n, genes)).astype(np.float32)
    return ad.AnnData(X, var=pd.DataFrame(index=[f"g{i}" for i in range(genes)]))


def _fit(device: str) -> MelVAE:
    cells = _cells()
    return MelVAE.fit(
        cells[:90],
        cells[90:],
        preprocess=PreprocessConfig(n_top_genes=None),
        hidden_dim=8,
        latent_dim=2,
        train=TrainConfig(epochs=2, device=device),
        progress=False,
    )


def test_auto_picks_cuda_exactly_when_a_gpu_is_present() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_unknown_or_unavailable_devices_are_input_errors() -> None:
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(InputError, match="device=tpu"):
        TrainConfig(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_the_cli_rejects_an_unknown_device_with_exit_code_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--device", "tpu"])
    assert info.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_a_cpu_model_encodes_on_cpu_and_reloads_identically(tmp_path) -> None:
    model = _fit("cpu")
    assert model.device.type == "cpu"
    loaded = MelVAE.load(model.save(tmp_path / "m"))
    assert loaded.device.type == "cpu"
    np.testing.assert_array_equal(loaded.encode(_cells()), model.encode(_cells()))


@needs_cuda
def test_a_cuda_model_trains_and_encodes_on_the_gpu_and_loads_on_cpu(tmp_path) -> None:
    model = _fit("cuda")
    assert model.device.type == "cuda"
    latent = model.encode(_cells())
    saved = model.save(tmp_path / "m")
    file = torch.load(saved / WEIGHTS_FILE, weights_only=True)  # no map_location: as written
    assert {t.device.type for t in file.values()} == {"cpu"}
    loaded = MelVAE.load(saved)
    assert loaded.device.type == "cpu"
    np.testing.assert_allclose(loaded.encode(_cells()), latent, rtol=1e-4, atol=1e-5)
    assert model.decode(latent[:3]).shape == (3, 25)
