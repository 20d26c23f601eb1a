"""Readers: every supported layout becomes cells × genes float32 AnnData with useful obs."""

from __future__ import annotations

import gzip
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from melvae.data.read import (
    read_csv_table,
    read_gse72056,
    read_gse115978,
    read_h5ad,
    read_pbmc68k_reduced,
    scibet_split,
)
from melvae.data.validate import validate_expression, validate_labels
from melvae.errors import InputError

GENES = ["CD3E", "MS4A1", "PMEL", "CD8A"]


def _table(n_cells: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    values = rng.poisson(1.0, size=(n_cells, len(GENES))).astype(float) * 2.5
    frame = pd.DataFrame(values, columns=GENES, index=[f"cell{i}" for i in range(n_cells)])
    frame["label"] = ["T", "B"] * (n_cells // 2)
    return frame


def _write_gz(path, text: str):
    path.write_bytes(gzip.compress(text.encode()))
    return path


# ---------------------------------------------------------------- CSV (original study layout)


@pytest.mark.parametrize("name", ["cells.csv", "cells.csv.gz"])
def test_csv_table_reads_cells_genes_and_labels(tmp_path, name):
    frame = _table()
    frame.to_csv(tmp_path / name)  # leading unnamed index column, like the original files

    adata = read_csv_table(tmp_path / name)

    assert adata.shape == (6, 4) and adata.X.dtype == np.float32
    assert list(adata.var_names) == GENES
    assert list(adata.obs_names) == list(frame.index)
    np.testing.assert_allclose(_dense(adata.X), frame[GENES].to_numpy())
    assert list(adata.obs["label"]) == list(frame["label"])


def test_csv_table_spanning_several_chunks_keeps_row_order(tmp_path):
    frame = _table(n_cells=1202)
    frame.to_csv(tmp_path / "big.csv")
    adata = read_csv_table(tmp_path / "big.csv")
    assert list(adata.obs_names) == list(frame.index)
    np.testing.assert_allclose(_dense(adata.X), frame[GENES].to_numpy())


def test_csv_table_mostly_zero_is_sparse_and_without_label_is_unlabelled(tmp_path):
    frame = pd.DataFrame(np.eye(5), columns=[f"G{i}" for i in range(5)])
    frame.to_csv(tmp_path / "eye.csv")
    adata = read_csv_table(tmp_path / "eye.csv")
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert "label" not in adata.obs


def test_csv_table_non_numeric_value_names_row_and_column(tmp_path):
    frame = _table().astype({"PMEL": object})
    frame.loc["cell2", "PMEL"] = "n/a?"
    frame.to_csv(tmp_path / "bad.csv")
    with pytest.raises(InputError) as err:
        read_csv_table(tmp_path / "bad.csv")
    message = str(err.value)
    assert "'n/a?'" in message and "'cell2'" in message and "'PMEL'" in message
    assert "line 4" in err.value.where and str(tmp_path / "bad.csv") in err.value.where


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_csv_table_keeps_duplicate_gene_names_for_validation_to_report(tmp_path):
    (tmp_path / "dup.csv").write_text(",CD3E,CD3E,PMEL,label\nc1,1,2,3,T\nc2,0,1,0,B\n")
    adata = read_csv_table(tmp_path / "dup.csv")
    assert list(adata.var_names) == ["CD3E", "CD3E", "PMEL"]
    with pytest.raises(InputError, match="'CD3E' ×2"):
        validate_expression(adata, source="dup.csv", require_nonnegative=True)


def test_csv_table_row_with_extra_fields_reports_its_line(tmp_path):
    (tmp_path / "ragged.csv").write_text(",A,B\nc1,1,2\nc2,3,4\nc3,5,6,7\n")
    with pytest.raises(InputError) as err:
        read_csv_table(tmp_path / "ragged.csv")
    assert "line 4" in str(err.value)


def test_csv_without_label_column_trains_but_skips_label_metrics(tmp_path, caplog):
    _table().drop(columns="label").to_csv(tmp_path / "nolabel.csv")
    adata = read_csv_table(tmp_path / "nolabel.csv")
    with caplog.at_level(logging.WARNING):
        assert validate_labels(adata, "label", source="nolabel.csv") is None
    assert "label metrics will be skipped" in caplog.text


TRUNCATED_GZIP = gzip.compress(b",A\n" + "".join(f"c{i},{i}\n" for i in range(2000)).encode())[
    :2000
]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "file not found"),
        ("folder", "not a file"),
        (b"", "file is empty"),
        (TRUNCATED_GZIP, "cannot read"),
        (b"\n\n", "ends at line 1"),
    ],
    ids=["missing", "folder", "empty", "truncated-gzip", "blank"],
)
def test_unreadable_csv_is_an_input_error_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "x.csv.gz"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as err:
        read_csv_table(path)
    assert expected in str(err.value)
    assert str(path) in err.value.where
    assert err.value.fix


# ---------------------------------------------------------------- h5ad


def _dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def test_h5ad_reads_x_raw_or_layer_as_float32(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    adata = ad.AnnData(x, obs=pd.DataFrame(index=["a", "b", "c"]))
    adata.layers["counts"] = x * 10
    adata.raw = adata.copy()
    adata.X = x / 2
    adata.write_h5ad(tmp_path / "a.h5ad")

    plain = read_h5ad(tmp_path / "a.h5ad")
    assert plain.X.dtype == np.float32 and isinstance(plain.X, np.ndarray)  # mostly non-zero
    np.testing.assert_allclose(plain.X, x / 2)
    np.testing.assert_allclose(_dense(read_h5ad(tmp_path / "a.h5ad", use_raw=True).X), x)
    np.testing.assert_allclose(_dense(read_h5ad(tmp_path / "a.h5ad", layer="counts").X), x * 10)
    with pytest.raises(InputError, match="no layer 'spliced'") as err:
        read_h5ad(tmp_path / "a.h5ad", layer="spliced")
    assert "counts" in str(err.value)


def test_h5ad_mostly_zero_dense_x_becomes_csr_and_missing_raw_is_explained(tmp_path):
    ad.AnnData(np.eye(6)).write_h5ad(tmp_path / "eye.h5ad")
    adata = read_h5ad(tmp_path / "eye.h5ad")
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    with pytest.raises(InputError, match=r"no \.raw matrix"):
        read_h5ad(tmp_path / "eye.h5ad", use_raw=True)


def test_damaged_h5ad_is_an_input_error(tmp_path):
    (tmp_path / "bad.h5ad").write_bytes(b"not an hdf5 file" * 10)
    with pytest.raises(InputError, match=r"cannot read bad\.h5ad") as err:
        read_h5ad(tmp_path / "bad.h5ad")
    assert "write_h5ad" in err.value.fix


def test_pbmc68k_reduced_is_available_offline():
    adata = read_pbmc68k_reduced()
    assert adata.shape == (700, 765)
    assert adata.X.dtype == np.float32 and adata.X.min() >= 0
    assert adata.obs["cell_type"].nunique() == 10


def test_shared_real_h5ad_files_read_and_validate(shared_data):
    paths = sorted(shared_data.glob("*.h5ad"))
    if not paths:
        pytest.skip("no .h5ad files in the shared data folder")
    for path in paths:
        adata = read_h5ad(path)
        assert sp.issparse(adata.X) and adata.X.dtype == np.float32
        assert adata.var_names.is_unique and adata.n_obs > 100
        validate_expression(adata, source=path.name, require_nonnegative=True)
        assert validate_labels(adata, "cell_type", source=path.name) == "cell_type"


# ---------------------------------------------------------------- GEO GSE115978

ANNOTATION_HEADER = (
    '"cells","samples","cell.types","treatment.group","Cohort","no.of.genes","no.of.reads"'
)


def _write_gse115978(folder, cell_types: dict[str, str], genes=GENES, seed=0):
    """Write the GEO layout: genes × cells TPM (R write.csv quoting) and the annotation table."""
    cells = list(cell_types)
    rng = np.random.default_rng(seed)
    tpm = rng.poisson(0.7, size=(len(genes), len(cells))) * 12.5
    lines = [",".join(['""', *(f'"{c}"' for c in cells)])]
    lines += [",".join([f'"{g}"', *map(str, row)]) for g, row in zip(genes, tpm, strict=True)]
    tpm_path = _write_gz(folder / "GSE115978_tpm.csv.gz", "\n".join(lines) + "\n")
    rows = [
        f'"{c}","Mel{i % 3}","{t}","treatment.naive","New",{1000 + i},{50000 + i}'
        for i, (c, t) in enumerate(cell_types.items())
    ]
    annotation_path = _write_gz(
        folder / "GSE115978_cell.annotations.csv.gz", "\n".join([ANNOTATION_HEADER, *rows]) + "\n"
    )
    return tpm_path, annotation_path, tpm


SMALL_TYPES = {
    **{f"cell_{t}_{i}": t for t in ("B.cell", "T.CD8", "NK") for i in range(10)},
    **{f"mal_{i}": "Mal" for i in range(4)},
    "caf_0": "CAF",
    "endo_0": "Endo.",
    "tcell_0": "T.cell",
    "unknown_0": "?",
}


def test_gse115978_reads_genes_by_cells_tpm_with_annotations(tmp_path):
    tpm_path, annotation_path, tpm = _write_gse115978(tmp_path, SMALL_TYPES)

    adata = read_gse115978(tpm_path, annotation_path)

    assert adata.shape == (len(SMALL_TYPES), len(GENES))
    assert list(adata.obs_names) == list(SMALL_TYPES) and list(adata.var_names) == GENES
    assert adata.X.dtype == np.float32
    np.testing.assert_allclose(_dense(adata.X), tpm.T)
    obs = adata.obs
    assert obs.loc["mal_0", "scibet_label"] == "Neg.cell"
    assert obs.loc["caf_0", "scibet_label"] == "Neg.cell"
    assert obs.loc["cell_NK_3", "scibet_label"] == "NK"
    assert pd.isna(obs.loc["tcell_0", "scibet_label"]) and pd.isna(
        obs.loc["unknown_0", "scibet_label"]
    )
    assert obs.loc["tcell_0", "cell_type"] == "T.cell"
    assert {"sample", "treatment_group", "cohort"} <= set(obs.columns)


def test_gse115978_duplicate_gene_rows_keep_the_first_with_a_warning(tmp_path, caplog):
    genes = ["CD3E", "MARCH1", "MARCH1", "PMEL"]
    tpm_path, annotation_path, tpm = _write_gse115978(tmp_path, SMALL_TYPES, genes=genes)
    with caplog.at_level(logging.WARNING):
        adata = read_gse115978(tpm_path, annotation_path)
    assert list(adata.var_names) == ["CD3E", "MARCH1", "PMEL"]
    np.testing.assert_allclose(_dense(adata.X[:, 1]).ravel(), tpm[1])
    assert "1 rows repeat a gene symbol" in caplog.text and "MARCH1" in caplog.text


def test_gse115978_cells_missing_from_annotations_are_an_input_error(tmp_path):
    tpm_path, _, _ = _write_gse115978(tmp_path, SMALL_TYPES)
    other = tmp_path / "other"
    other.mkdir()
    _, annotation_path, _ = _write_gse115978(other, {"cell_B.cell_0": "B.cell"})
    with pytest.raises(InputError, match=r"\d+ of the 38 cells .* are not in") as err:
        read_gse115978(tpm_path, annotation_path)
    assert "GSE115978" in err.value.fix


def test_scibet_split_is_stratified_deterministic_and_drops_unlabelled(tmp_path):
    adata = read_gse115978(*_write_gse115978(tmp_path, SMALL_TYPES)[:2])
    reference, query = scibet_split(adata, seed=0)

    assert reference.obs["scibet_label"].value_counts().to_dict() == {
        "B.cell": 7,
        "NK": 7,
        "T.CD8": 7,
    }
    assert query.obs["scibet_label"].value_counts().to_dict() == {
        "Neg.cell": 6,
        "B.cell": 3,
        "NK": 3,
        "T.CD8": 3,
    }
    assert not set(reference.obs_names) & set(query.obs_names)
    assert "tcell_0" not in query.obs_names and "unknown_0" not in query.obs_names

    shuffled = adata[np.random.default_rng(1).permutation(adata.n_obs)].copy()
    again, _ = scibet_split(shuffled, seed=0)
    assert set(again.obs_names) == set(reference.obs_names)
    assert set(scibet_split(adata, seed=1)[0].obs_names) != set(reference.obs_names)


def test_scibet_split_of_the_real_annotations_matches_the_documented_sizes(tmp_path, shared_data):
    annotations = shared_data / "jerby2018_gse115978_cell_annotations.csv.gz"
    cells = pd.read_csv(annotations, usecols=["cells"])["cells"]
    header = ",".join(['""', *cells])
    tpm_path = _write_gz(tmp_path / "tpm.csv.gz", f'{header}\n"CD3E"{",1" * len(cells)}\n')

    adata = read_gse115978(tpm_path, annotations)
    reference, query = scibet_split(adata, seed=0)

    assert adata.n_obs == 7186
    assert reference.obs["scibet_label"].value_counts().to_dict() == {
        "T.CD8": 1231,
        "T.CD4": 599,
        "B.cell": 573,
        "Macrophage": 294,
        "NK": 64,
    }
    assert reference.n_obs == 2761 and query.n_obs == 3412
    assert (query.obs["scibet_label"] == "Neg.cell").sum() == 2228

    tidy = pd.read_csv(shared_data / "jerby2018_gse115978_labels.csv.gz", index_col="cell_id")
    pd.testing.assert_series_equal(
        adata.obs["scibet_label"].astype(object),
        tidy.loc[adata.obs_names, "scibet_label"].astype(object),
        check_names=False,
        check_index=False,
    )


# ---------------------------------------------------------------- GEO GSE72056


def _write_gse72056(path, genes=("CD3E", "MARCH1", "MARCH1", "PMEL")):
    """Tirosh layout: header, tumour / malignant / type-code rows, then genes × cells."""
    cells = ["c1", "c2", "c3", "c4", "c5"]
    meta = [
        ["tumor", "79", "79", "80", "80", "81"],
        ["malignant(1=no,2=yes,0=unresolved)", "2", "1", "1", "0", "1"],
        ["non-malignant cell type (1=T,2=B,3=Macro.,4=Endo.,5=CAF;6=NK)", "0", "1", "6", "0", "0"],
    ]
    values = np.round(np.random.default_rng(0).exponential(2, (len(genes), 5)), 3)
    values[values < 2] = 0
    rows = [["Cell", *cells], *meta]
    rows += [[g, *map(str, v)] for g, v in zip(genes, values, strict=True)]
    _write_gz(path, "\n".join("\t".join(r) for r in rows) + "\n")
    return values


def test_gse72056_reads_metadata_rows_and_drops_duplicate_genes(tmp_path, caplog):
    path = tmp_path / "GSE72056_melanoma_single_cell_revised_v2.txt.gz"
    values = _write_gse72056(path)
    with caplog.at_level(logging.WARNING):
        adata = read_gse72056(path)

    assert adata.shape == (5, 3) and list(adata.var_names) == ["CD3E", "MARCH1", "PMEL"]
    np.testing.assert_allclose(_dense(adata.X), values[[0, 1, 3]].T, rtol=1e-6)
    assert list(adata.obs["tumor"]) == ["79", "79", "80", "80", "81"]
    assert list(adata.obs["malignant"]) == ["yes", "no", "no", "unresolved", "no"]
    assert list(adata.obs["cell_type"]) == ["Mal", "T.cell", "NK", "unresolved", "unresolved"]
    assert "1 rows repeat a gene symbol" in caplog.text


def test_gse72056_with_another_layout_is_an_input_error(tmp_path):
    path = _write_gz(tmp_path / "x.txt.gz", "Cell\tc1\nCD3E\t1\nPMEL\t2\nCD8A\t0\nMS4A1\t4\n")
    with pytest.raises(InputError, match="does not have the GSE72056 layout") as err:
        read_gse72056(path)
    assert "line 2" in err.value.where
