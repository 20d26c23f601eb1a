"""Named datasets: first load downloads and parses, later loads come from the cache."""

from __future__ import annotations

import gzip
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from melvae.data.datasets import load_dataset, load_with_fallback
from melvae.errors import DownloadError, InputError

GSE72056_FILE = "GSE72056_melanoma_single_cell_revised_v2.txt.gz"
GSE72056_TEXT = (
    "Cell\tc1\tc2\tc3\n"
    "tumor\t79\t79\t80\n"
    "malignant(1=no,2=yes,0=unresolved)\t2\t1\t1\n"
    "non-malignant cell type (1=T,2=B,3=Macro.,4=Endo.,5=CAF;6=NK)\t0\t1\t2\n"
    "CD3E\t0\t5.5\t0\n"
    "MS4A1\t0\t0\t7.25\n"
    "PMEL\t9.5\t0\t0\n"
)


@pytest.fixture
def gse72056_server(http_server):
    (http_server.root / GSE72056_FILE).write_bytes(gzip.compress(GSE72056_TEXT.encode()))
    return http_server


def _same(a: ad.AnnData, b: ad.AnnData) -> None:
    pd.testing.assert_frame_equal(a.to_df(), b.to_df())
    pd.testing.assert_frame_equal(a.obs, b.obs)


def test_gse72056_downloads_parses_and_caches(gse72056_server, tmp_path):
    first = load_dataset("gse72056", base_url=gse72056_server.url, data_dir=tmp_path)

    assert first.label_key == "cell_type" and "Tirosh" in first.description
    assert list(first.adata.obs["cell_type"]) == ["Mal", "T.cell", "B.cell"]
    assert (tmp_path / "gse72056" / "gse72056.h5ad").is_file()
    assert (tmp_path / "gse72056" / f"{GSE72056_FILE}.sha256").is_file()  # trust on first use
    assert gse72056_server.requests == [f"/{GSE72056_FILE}"]

    gse72056_server.stop()
    _same(
        load_dataset("gse72056", base_url=gse72056_server.url, data_dir=tmp_path).adata, first.adata
    )


def test_environment_sets_mirror_and_cache_folder(gse72056_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MELVAE_GEO_URL", gse72056_server.url)
    monkeypatch.setenv("MELVAE_DATA_DIR", str(tmp_path))
    assert load_dataset("gse72056").adata.n_obs == 3
    assert (tmp_path / "gse72056" / GSE72056_FILE).is_file()


def test_gse115978_reference_and_query_from_geo_layout(http_server, tmp_path, shared_data):
    # The real annotation table (it has GEO's md5) plus a tiny TPM matrix with the same cells.
    annotations = shared_data / "jerby2018_gse115978_cell_annotations.csv.gz"
    (http_server.root / "GSE115978_cell.annotations.csv.gz").write_bytes(annotations.read_bytes())
    cells = pd.read_csv(annotations, usecols=["cells"])["cells"]
    tpm = "\n".join(
        [",".join(['""', *(f'"{c}"' for c in cells)]), f'"CD3E"{",2.5" * len(cells)}', ""]
    )
    (http_server.root / "GSE115978_tpm.csv.gz").write_bytes(gzip.compress(tpm.encode()))

    reference = load_dataset("gse115978_reference", base_url=http_server.url, data_dir=tmp_path)

    assert reference.label_key == "scibet_label" and reference.adata.n_obs == 2761
    assert set(reference.adata.obs["scibet_label"]) == {
        "B.cell",
        "Macrophage",
        "NK",
        "T.CD4",
        "T.CD8",
    }
    assert len(http_server.requests) == 2
    http_server.stop()
    query = load_dataset("gse115978_query", base_url=http_server.url, data_dir=tmp_path)
    assert query.adata.n_obs == 3412
    assert not set(query.adata.obs_names) & set(reference.adata.obs_names)
    again = load_dataset("gse115978_reference", base_url=http_server.url, data_dir=tmp_path)
    _same(again.adata, reference.adata)


def test_annotation_file_with_wrong_md5_is_rejected_and_not_kept(http_server, tmp_path):
    header = '"cells","samples","cell.types","treatment.group","Cohort"\n'
    files = {
        "GSE115978_tpm.csv.gz": '"","c1"\n"CD3E",1\n',
        "GSE115978_cell.annotations.csv.gz": header + '"c1","Mel1","NK","post.treatment","New"\n',
    }
    for name, text in files.items():
        (http_server.root / name).write_bytes(gzip.compress(text.encode()))

    with pytest.raises(DownloadError) as err:
        load_dataset("gse115978_reference", base_url=http_server.url, data_dir=tmp_path)

    assert "066fa72772ae0b2cf065f03aa9c89a05" in str(err.value)
    assert "GSE115978_cell.annotations.csv.gz" in err.value.where
    left = sorted(p.name for p in (tmp_path / "gse115978").iterdir())
    assert left == ["GSE115978_tpm.csv.gz", "GSE115978_tpm.csv.gz.sha256"]


def test_unreachable_geo_falls_back_to_pbmc_and_says_why(unreachable_url, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        dataset, reason = load_with_fallback(
            "gse72056", "pbmc68k_reduced", base_url=unreachable_url, data_dir=tmp_path
        )
    assert dataset.key == "pbmc68k_reduced" and dataset.adata.n_obs == 700
    assert dataset.label_key == "cell_type"
    assert unreachable_url in reason and "'gse72056'" in reason
    assert "FALLING BACK" not in caplog.text  # the study's banner says it, once


def test_without_fallback_the_download_error_propagates(unreachable_url, tmp_path):
    with pytest.raises(DownloadError, match="could not download"):
        load_with_fallback("gse72056", None, base_url=unreachable_url, data_dir=tmp_path)


def test_fallback_unused_when_the_dataset_loads(gse72056_server, tmp_path):
    dataset, reason = load_with_fallback(
        "gse72056", "pbmc68k_reduced", base_url=gse72056_server.url, data_dir=tmp_path
    )
    assert dataset.key == "gse72056" and reason is None


def test_unknown_key_lists_the_known_ones():
    with pytest.raises(InputError) as err:
        load_dataset("gse999")
    assert "'gse999'" in str(err.value)
    assert "gse115978_reference" in err.value.fix and "pbmc68k_reduced" in err.value.fix


def test_paths_load_by_suffix_with_their_label_column(tmp_path):
    frame = pd.DataFrame({"CD3E": [1.0, 0.0], "PMEL": [0.0, 3.0], "label": ["T", "Mal"]})
    frame.index = ["a", "b"]
    frame.to_csv(tmp_path / "cells.csv.gz")
    obs = pd.DataFrame({"cell_type": ["x", "y"]}, index=["a", "b"])
    labelled = ad.AnnData(np.eye(2, dtype=np.float32), obs=obs)
    labelled.write_h5ad(tmp_path / "typed.h5ad")
    ad.AnnData(np.eye(2, dtype=np.float32), obs=pd.DataFrame(index=["a", "b"])).write_h5ad(
        tmp_path / "plain.h5ad"
    )

    csv = load_dataset(str(tmp_path / "cells.csv.gz"))
    assert (csv.key, csv.label_key, csv.adata.shape) == ("cells", "label", (2, 2))
    assert load_dataset(str(tmp_path / "typed.h5ad")).label_key == "cell_type"
    assert load_dataset(str(tmp_path / "plain.h5ad")).label_key is None
    with pytest.raises(InputError, match="file not found"):
        load_dataset(str(tmp_path / "absent.h5ad"))
    (tmp_path / "cells.tsv").write_text("x")
    with pytest.raises(InputError, match="unsupported file type"):
        load_dataset(str(tmp_path / "cells.tsv"))
