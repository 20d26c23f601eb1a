"""Validation: each problem is an InputError saying what, where and what to do."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from melvae.data.read import read_csv_table
from melvae.data.validate import validate_expression, validate_labels
from melvae.errors import InputError


def _adata(x, genes=("CD3E", "MS4A1", "PMEL"), labels=None) -> ad.AnnData:
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(np.shape(x)[0])])
    if labels is not None:
        obs["label"] = labels
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=list(genes)))


GOOD = np.array([[0, 1.5, 0], [2, 0, 0], [0, 0, 3.25], [1, 1, 1]], dtype=np.float32)


@pytest.mark.parametrize("as_sparse", [False, True])
def test_clean_non_negative_matrix_passes(as_sparse):
    x = sp.csr_matrix(GOOD) if as_sparse else GOOD
    validate_expression(_adata(x), source="ok.h5ad", require_nonnegative=True)


@pytest.mark.parametrize(
    ("make", "bad"), [(lambda x: x, np.nan), (sp.csr_matrix, np.inf), (sp.csc_matrix, np.nan)]
)
def test_nan_or_inf_names_the_first_cell_and_gene(make, bad):
    x = GOOD.copy()
    x[2, 1] = bad
    x[3, 0] = bad
    with pytest.raises(InputError) as err:
        validate_expression(_adata(make(x)), source="cells.csv", require_nonnegative=False)
    assert "2 expression value(s) are NaN or infinite" in err.value.what
    assert err.value.where == "cells.csv, cell 'cell2' (row 3), gene 'MS4A1' (column 2)"
    assert "Replace missing values" in err.value.fix


@pytest.mark.parametrize("as_sparse", [False, True])
def test_negative_values_rejected_only_when_the_likelihood_needs_non_negative(as_sparse):
    x = GOOD.copy()
    x[1, 2] = -0.5
    adata = _adata(sp.csr_matrix(x) if as_sparse else x)
    validate_expression(adata, source="scaled.h5ad", require_nonnegative=False)
    with pytest.raises(InputError) as err:
        validate_expression(adata, source="scaled.h5ad", require_nonnegative=True)
    assert "1 expression value(s) are negative" in err.value.what and "-0.5" in err.value.what
    assert "cell 'cell1'" in err.value.where and "gene 'PMEL'" in err.value.where
    assert "gaussian" in err.value.fix


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicate_gene_names_are_listed():
    adata = _adata(np.ones((2, 4), np.float32), genes=["CD3E", "PMEL", "CD3E", "MARCH1"])
    with pytest.raises(InputError) as err:
        validate_expression(adata, source="x.h5ad", require_nonnegative=True)
    assert "'CD3E' ×2" in err.value.what and "'PMEL'" not in err.value.what
    assert "unique" in err.value.fix


@pytest.mark.parametrize("shape", [(0, 3), (3, 0)])
def test_empty_matrix_is_rejected(shape):
    adata = _adata(np.zeros(shape, np.float32), genes=[f"G{i}" for i in range(shape[1])])
    with pytest.raises(InputError, match=f"{shape[0]} cells and {shape[1]} genes") as err:
        validate_expression(adata, source="empty.csv", require_nonnegative=True)
    assert err.value.where == "empty.csv"


def test_header_only_csv_reads_and_fails_validation_as_empty(tmp_path):
    (tmp_path / "header.csv").write_text(",CD3E,PMEL,label\n")
    adata = read_csv_table(tmp_path / "header.csv")
    assert adata.shape == (0, 2)
    with pytest.raises(InputError, match="0 cells and 2 genes"):
        validate_expression(adata, source=str(tmp_path / "header.csv"), require_nonnegative=True)


def test_nan_in_a_csv_is_located_in_the_file(tmp_path):
    (tmp_path / "gaps.csv").write_text(",CD3E,PMEL,label\nc1,1,2,T\nc2,,0,B\n")
    path = tmp_path / "gaps.csv"
    with pytest.raises(InputError) as err:
        validate_expression(read_csv_table(path), source=str(path), require_nonnegative=True)
    assert err.value.where == f"{path}, cell 'c2' (row 2), gene 'CD3E' (column 1)"


def test_labels_with_two_classes_are_used_and_missing_ones_tolerated():
    adata = _adata(GOOD, labels=["T", "B", None, "T"])
    assert validate_labels(adata, "label", source="x") == "label"


@pytest.mark.parametrize("key", [None, "cell_type"])
def test_absent_label_column_skips_label_metrics_with_a_warning(caplog, key):
    with caplog.at_level(logging.WARNING):
        assert validate_labels(_adata(GOOD, labels=list("TBTB")), key, source="x.h5ad") is None
    assert "label metrics will be skipped" in caplog.text


@pytest.mark.parametrize("labels", [["T", "T", None, "T"], [None, "", None, " "]])
def test_fewer_than_two_label_classes_is_an_input_error(labels):
    with pytest.raises(InputError) as err:
        validate_labels(_adata(GOOD, labels=labels), "label", source="x.csv")
    assert "at least 2 cell types" in err.value.what
    assert err.value.where == "x.csv, obs column 'label'"
    assert "without label metrics" in err.value.fix
