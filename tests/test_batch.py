"""The batch covariate (issue 15): `[data] batch_key` / `--batch-key` / `tune(batch_key=)`, its
validation, the batches a study's prepared data carry, and the study identity that holds it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from melvae.data.datasets import CATALOGUE
from melvae.data.read import _read_gse115978_obs
from melvae.errors import InputError
from melvae.study.__main__ import main
from melvae.study.config import load_study_config
from melvae.study.runner import prepare_data
from tests.test_bad_input import _assert_clean_failure
from tests.test_study import _offline, _quick_config


def _cells(tmp_path: Path, pbmc, **columns) -> Path:
    """300 real PBMC cells with extra obs columns, as an .h5ad file for `run --data`."""
    cells = pbmc[:300].copy()
    for name, values in columns.items():
        cells.obs[name] = values
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    return path


def _donors(n: int = 300) -> np.ndarray:
    return np.array([f"donor{i % 3}" for i in range(n)], dtype=object)


def test_batch_key_is_read_from_the_study_file_and_absent_by_default(tmp_path):
    assert load_study_config().batch_key is None
    fallback = 'fallback = "pbmc68k_reduced"'
    path = _quick_config(tmp_path, **{fallback: f'{fallback}\nbatch_key = "sample"'})
    assert load_study_config(path).batch_key == "sample"


def test_the_catalogue_knows_the_gse115978_patient_column(shared_data):
    annotations = shared_data / "jerby2018_gse115978_cell_annotations.csv.gz"
    if not annotations.exists():
        pytest.skip(f"{annotations} is absent")
    key = CATALOGUE["gse115978_reference"].batch_key
    assert key == CATALOGUE["gse115978_query"].batch_key == "sample"
    obs = _read_gse115978_obs(annotations)
    # 32 tumour samples (31 patients) in the GEO annotation table, every cell with one.
    assert obs[key].notna().all()
    assert obs[key].nunique() == 32


def test_prepared_data_carry_each_cells_batch_only_with_a_batch_key(tmp_path, monkeypatch, pbmc):
    _offline(monkeypatch, tmp_path)
    path = _cells(tmp_path, pbmc, donor=_donors())
    config = load_study_config()
    without = prepare_data(config, data_path=path)
    assert without.batch_key is None and without.batches("train") is None
    data = prepare_data(dataclasses.replace(config, batch_key="donor"), data_path=path)
    assert data.batch_key == "donor"
    for split in ("train", "val", "test"):
        batches = data.batches(split)
        assert batches.dtype == object and batches.shape == (getattr(data, split).n_obs,)
        expected = getattr(data, split).obs["donor"].astype(str).to_numpy()
        assert (batches == expected).all()
    assert set(data.batches("train")) == {"donor0", "donor1", "donor2"}


BAD_BATCHES = {
    "column absent": ({}, "nope", "the batch column 'nope' is not in the data"),
    "one batch": ({"donor": np.array(["d"] * 300, dtype=object)}, "donor", "has 1 batch ('d')"),
    "missing values": (
        {"donor": np.where(np.arange(300) % 50 == 0, None, _donors()).astype(object)},
        "donor",
        "6 of 300 cells have no batch in 'donor'",
    ),
    "the label column": ({}, "cell_type", "is also the label column"),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_a_bad_batch_key_is_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, pbmc, case):
    _offline(monkeypatch, tmp_path)
    columns, key, expected = BAD_BATCHES[case]
    path = _cells(tmp_path, pbmc, **columns)
    code = main(["run", "--data", str(path), "--batch-key", key, "--n-trials", "1", "--quiet"])
    err = capsys.readouterr().err
    _assert_clean_failure(code, err, tmp_path, expected, "batch_key", "what to do")


def test_a_study_resumed_with_another_batch_key_is_refused(tmp_path, monkeypatch, capsys, pbmc):
    _offline(monkeypatch, tmp_path)
    path = _cells(tmp_path, pbmc, donor=_donors(), phase2=pbmc.obs["phase"][:300].to_numpy())
    assert main(["create", "--data", str(path), "--batch-key", "donor"]) == 0
    assert main(["create", "--data", str(path), "--batch-key", "donor"]) == 0
    capsys.readouterr()
    for other in (["--batch-key", "phase2"], []):
        assert main(["create", "--data", str(path), *other]) == 2
        err = capsys.readouterr().err
        assert 'batch_key: stored "donor"' in err, err
        assert "Traceback" not in err


def test_tune_refuses_prepared_data_of_another_batch_key(tmp_path, monkeypatch, pbmc):
    import melvae

    _offline(monkeypatch, tmp_path)
    data = prepare_data(load_study_config(), data_path=_cells(tmp_path, pbmc, donor=_donors()))
    with pytest.raises(InputError, match="batch_key None, the study 'donor'"):
        melvae.tune(data, batch_key="donor", n_trials=1, epochs=1, progress=False)
