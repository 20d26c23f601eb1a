"""The analyze report's patient vs cell-type view: variance explained per latent dimension
(hand-computed examples) and the report on a model of the real melanoma T cells."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from melvae.analyze.__main__ import main
from melvae.analyze.report import render_report
from melvae.analyze.variance import WHOLE, covariate_shares, variance_explained
from melvae.errors import InputError
from melvae.model import MelVAE
from melvae.train import TrainConfig


def test_variance_explained_matches_a_hand_computed_anova():
    # Dimension 0: groups a (0, 2) and b (10, 12): means 1 and 11 around 6, between-group sum of
    # squares 4 * 25 = 100 of a total 36 + 16 + 16 + 36 = 104. Dimension 1 is the same within
    # both groups (3, 5): the groups explain none of its variance (4 * 1 = 4).
    latent = np.array([[0.0, 3.0], [2.0, 5.0], [10.0, 3.0], [12.0, 5.0]])
    groups = np.array(["a", "a", "b", "b"])
    np.testing.assert_allclose(variance_explained(latent, groups), [100 / 104, 0.0])
    shares = covariate_shares(latent, {"patient": groups, "other": ["x", "y", "x", "y"]})
    assert list(shares.index) == ["z0", "z1", WHOLE]
    # The whole embedding adds the sums of squares: (100 + 0) / (104 + 4); "other" splits
    # dimension 1 exactly (between 4 of 4) and dimension 0 by 4 of 104.
    np.testing.assert_allclose(shares["patient"], [100 / 104, 0.0, 100 / 108])
    np.testing.assert_allclose(shares["other"], [4 / 104, 1.0, 8 / 108])


def test_a_constant_dimension_explains_nothing_and_missing_groups_are_left_out():
    latent = np.array([[1.0, 0.0], [1.0, 2.0], [1.0, 10.0], [1.0, 12.0], [1.0, 50.0]])
    groups = np.array(["a", "a", "b", "b", None], dtype=object)
    np.testing.assert_allclose(variance_explained(latent, groups), [0.0, 100 / 104])


def test_the_report_leaves_the_section_out_without_a_batch_key():
    common = {
        "title": "t",
        "summary": {},
        "transfer": None,
        "figures": {},
        "top_genes": {},
        "dimension_ends": pd.DataFrame(),
        "enrichment": pd.DataFrame(),
    }
    assert "Patient and cell type" not in render_report(**common)
    shares = covariate_shares(np.array([[0.0], [1.0]]), {"patient": ["a", "b"]})
    assert "Patient and cell type" in render_report(**common, covariates=shares)


def test_variance_explained_refuses_bad_input():
    with pytest.raises(InputError, match="1 group"):
        variance_explained(np.zeros((3, 2)), ["a", "a", "a"])
    with pytest.raises(InputError, match="NaN"):
        variance_explained(np.array([[np.nan], [1.0]]), ["a", "b"])
    with pytest.raises(InputError, match="3 group values"):
        variance_explained(np.zeros((4, 2)), ["a", "b", "a"])


def _tcells_model(shared_data: Path, tmp_path: Path, batch_key: str | None) -> tuple[Path, Path]:
    """A small model of the real T cells saved in a folder, and reference and query cells as
    files (few cells and dimensions: enrichment runs once per dimension)."""
    cells = ad.read_h5ad(shared_data / "sadefeldman2018_gse120575_tcells_subset.h5ad")
    cells.obs = cells.obs[["cell_type", "sample"]].astype(str)
    order = np.random.default_rng(0).permutation(cells.n_obs)
    train, val = cells[np.sort(order[:450])].copy(), cells[np.sort(order[450:])].copy()
    model = MelVAE.fit(
        train,
        val,
        train=TrainConfig(epochs=3),
        label_key="cell_type",
        batch_key=batch_key,
        latent_dim=3,
        progress=False,
    )
    folder = model.save(tmp_path / "model")
    train[:200].write_h5ad(tmp_path / "reference.h5ad")
    val.write_h5ad(tmp_path / "query.h5ad")
    return folder, tmp_path


@pytest.fixture
def tcells_model(shared_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    return _tcells_model(shared_data, tmp_path, None)


@pytest.mark.slow
def test_the_report_says_how_much_is_patient_and_how_much_cell_type(tcells_model, tmp_path):
    folder, files = tcells_model
    out = tmp_path / "out"
    cwd = Path.cwd()
    os.chdir(tmp_path)  # no tracking database here: the local model is analysed, nothing logged
    try:
        args = ["--model", str(folder), "--reference", str(files / "reference.h5ad")]
        args += ["--query", str(files / "query.h5ad")]
        args += ["--label-key", "cell_type", "--genesets", "kegg", "--out", str(out)]
        assert main([*args, "--batch-key", "sample"]) == 0
        shares = pd.read_csv(out / "covariate_shares.tsv", sep="\t", index_col=0)
        assert list(shares.columns) == ["patient", "cell type"]
        assert shares.index[-1] == WHOLE
        assert shares.to_numpy().min() >= 0 and shares.to_numpy().max() <= 1
        assert {"covariate_shares.png", "tsne.png"} <= {p.name for p in out.iterdir()}
        report = (out / "report.html").read_text()
        assert "Patient and cell type in the latent space" in report
        # A column the reference lacks is refused before anything is computed or written.
        assert main([*args[:-1], str(tmp_path / "bad"), "--batch-key", "tumour"]) == 2
        assert not (tmp_path / "bad").exists()
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_a_model_with_a_batch_key_reports_its_patients_unasked(shared_data, tmp_path):
    folder, files = _tcells_model(shared_data, tmp_path, "sample")
    out = tmp_path / "out"
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        args = ["--model", str(folder), "--reference", str(files / "reference.h5ad")]
        args += ["--query", str(files / "query.h5ad"), "--label-key", "cell_type"]
        assert main([*args, "--genesets", "kegg", "--out", str(out)]) == 0
    finally:
        os.chdir(cwd)
    shares = pd.read_csv(out / "covariate_shares.tsv", sep="\t", index_col=0)
    assert list(shares.columns) == ["patient", "cell type"]
    # The decoder was probed with each cell decoded as its own patient.
    genes = pd.read_csv(out / "latent_genes.tsv", sep="\t", index_col=0, header=[0, 1])
    assert np.isfinite(genes.to_numpy()).all()
