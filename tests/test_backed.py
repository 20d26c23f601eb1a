"""Cells left on disk (anndata's backed mode): the same model as in memory, every read a bounded
window, clear refusals where a file cannot stream, and a study on a file larger than the
memory it may use."""

from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from melvae.data import backed
from melvae.data.backed import cells_matrix, subset
from melvae.data.datasets import load_dataset
from melvae.data.loader import batches, epoch_order, row_sums
from melvae.data.read import read_h5ad
from melvae.errors import InputError
from melvae.model import MelVAE
from melvae.preprocess import Preprocessor, align_genes
from melvae.study.config import load_study_config
from melvae.study.objective import PreparedData
from melvae.study.runner import prepare_data
from melvae.study.scoring import evaluate_model
from melvae.train import TrainConfig
from tests.memory_cap import run_capped

SADE_FELDMAN = "sadefeldman2018_gse120575_tcells_subset.h5ad"


def _counts_file(path: Path, n_cells: int = 900, n_genes: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=0.3, format="csr", dtype=np.float32, rng=rng)
    X.data = np.ceil(X.data * 9)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(rng.choice(["a", "b", "c"], n_cells))},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(X, obs=obs)
    adata.var_names = [f"g{j}" for j in range(n_genes)]
    adata.write_h5ad(path)
    return path


def _fit(data: PreparedData) -> MelVAE:
    return MelVAE.fit(
        data.train,
        data.val,
        preprocess=data.preprocessor,
        hidden_dim=32,
        latent_dim=4,
        train=TrainConfig(epochs=3, batch_size=32, device="cpu"),
        label_key="cell_type",
        progress=False,
    )


def test_a_study_of_a_backed_file_trains_the_model_it_trains_in_memory(shared_data: Path) -> None:
    """On the real melanoma T cells (550 cells, CSR on disk, one window): the same splits,
    genes, transform statistics, losses, latents and final metrics, and not a byte of X read
    into memory by anndata."""
    path, config = shared_data / SADE_FELDMAN, load_study_config()
    prepared = {
        mode: prepare_data(config, data_path=path, backed=mode == "backed")
        for mode in ("memory", "backed")
    }
    memory, disk = prepared["memory"], prepared["backed"]
    assert disk.train.isbacked and not memory.train.isbacked
    assert isinstance(cells_matrix(disk.train), backed.DiskMatrix)
    for split in ("train", "val", "test"):
        assert list(getattr(disk, split).obs_names) == list(getattr(memory, split).obs_names)
    assert disk.preprocessor.genes == memory.preprocessor.genes
    np.testing.assert_array_equal(disk.preprocessor.scale, memory.preprocessor.scale)
    models = {mode: _fit(data) for mode, data in prepared.items()}
    assert models["backed"].history == models["memory"].history
    np.testing.assert_array_equal(
        models["backed"].encode(disk.test), models["memory"].encode(memory.test)
    )
    scores = {mode: evaluate_model(models[mode], data) for mode, data in prepared.items()}
    assert scores["backed"] == scores["memory"]
    assert disk.train.isbacked  # nothing turned the file's AnnData into an in-memory one


def test_batches_cut_from_disk_are_the_rows_asked_for(tmp_path: Path, monkeypatch) -> None:
    """Windows of a few batches, a block-shuffled epoch order: every cell once an epoch, each
    batch the rows the order names, deterministic for a seed."""
    path = _counts_file(tmp_path / "cells.h5ad")
    monkeypatch.setattr(backed, "WINDOW_VALUES", 500)  # ~28 rows a window: many windows
    in_memory, on_disk = read_h5ad(path), read_h5ad(path, backed=True)
    rows = np.arange(0, 900, 3)
    x = cells_matrix(subset(on_disk, rows))
    assert x.window_rows() < 40
    order = epoch_order(x, np.random.default_rng(7))
    assert sorted(order) == list(range(len(rows)))
    assert not np.array_equal(order, np.random.default_rng(7).permutation(len(rows)))
    np.testing.assert_array_equal(order, epoch_order(x, np.random.default_rng(7)))
    cut = np.concatenate([b.numpy() for b in batches(x, 32, order=order)])
    np.testing.assert_array_equal(cut, in_memory.X[rows][order].toarray())
    in_sequence = np.concatenate([b.numpy() for b in batches(x, 50)])
    np.testing.assert_array_equal(in_sequence, in_memory.X[rows].toarray())
    np.testing.assert_allclose(row_sums(x), np.asarray(in_memory.X[rows].sum(axis=1)).ravel())


def test_genes_are_matched_by_name_on_disk_as_in_memory(tmp_path: Path) -> None:
    """A view of a view of a backed file (which anndata refuses) and a gene list reordered with
    genes missing: the same aligned, transformed rows as in memory."""
    path = _counts_file(tmp_path / "cells.h5ad")
    in_memory, on_disk = read_h5ad(path), read_h5ad(path, backed=True)
    with pytest.raises(ValueError, match="view of a view"):
        on_disk[:600][[3, 1]]
    picked = subset(subset(on_disk, slice(0, 600)), np.array([3, 1, 599]))
    assert list(picked.obs_names) == ["cell3", "cell1", "cell599"]
    genes = ["g5", "absent", "g2", *[f"g{j}" for j in range(10, 40)]]
    preprocessor = Preprocessor(genes, "minmax", np.zeros(len(genes)), np.full(len(genes), 9.0))
    (disk, missing), (memory, _) = (align_genes(a, genes) for a in (picked, in_memory))
    assert missing == 1 and disk.shape == (3, len(genes))
    np.testing.assert_array_equal(
        preprocessor.transform_matrix(disk)[:].toarray(),
        preprocessor.transform_matrix(memory)[[3, 1, 599]].toarray(),
    )


def test_a_bad_value_in_a_backed_file_is_found_where_it_is(tmp_path: Path) -> None:
    path = _counts_file(tmp_path / "cells.h5ad")
    with h5py.File(path, "r+") as file:
        row, position = 700, int(file["X/indptr"][700])
        file["X/data"][position] = np.nan
        column = int(file["X/indices"][position])
    config = load_study_config()
    with pytest.raises(InputError, match="NaN") as error:
        prepare_data(config, data_path=path, backed=True)
    assert f"'cell{row}'" in str(error.value) and f"'g{column}'" in str(error.value)


def test_files_and_options_that_cannot_stream_are_refused(tmp_path: Path) -> None:
    path = _counts_file(tmp_path / "cells.h5ad")
    by_gene = read_h5ad(path)
    by_gene.X = sp.csc_matrix(by_gene.X)
    by_gene.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(InputError, match="CSR") as error:
        prepare_data(load_study_config(), data_path=tmp_path / "csc.h5ad", backed=True)
    assert "csc.h5ad" in error.value.where
    with pytest.raises(InputError, match="layer"):
        read_h5ad(path, layer="counts", backed=True)
    with pytest.raises(InputError, match="named dataset"):
        load_dataset("pbmc68k_reduced", backed=True)
    by_gene.to_df().to_csv(tmp_path / "cells.csv")
    with pytest.raises(InputError, match=r"not cells\.csv"):
        load_dataset(str(tmp_path / "cells.csv"), backed=True)


def test_prepared_backed_data_reach_a_worker_as_the_same_cells(tmp_path: Path) -> None:
    """Workers get the prepared data in a pickle: backed splits travel as the file and rows."""
    path = _counts_file(tmp_path / "cells.h5ad")
    data = prepare_data(load_study_config(), data_path=path, backed=True)
    copy = pickle.loads(pickle.dumps(data))
    for split in ("train", "val", "test"):
        here, there = getattr(data, split), getattr(copy, split)
        assert there.isbacked and list(there.obs_names) == list(here.obs_names)
        np.testing.assert_array_equal(
            cells_matrix(there)[:].toarray(), cells_matrix(here)[:].toarray()
        )
    assert copy.preprocessor.genes == data.preprocessor.genes


# A child process that caps its own data memory (heap and private writable mappings: what numpy,
# h5py and torch allocate, not the libraries a later import maps) at what it holds after the
# imports plus HEADROOM_MB, then runs a one-trial study (fit, final metrics, baselines, registry,
# then encoding every cell) on a file whose X (8,000 cells x 50,000 genes, dense float32:
# 1.6 GB) is larger than the cap. Measured without a cap, after the same imports: the backed
# study's data memory grew by 0.64 GB, reading the file into memory by 4.5 GB.
_SETUP = """
import anndata as ad, mlflow, scanpy, sklearn.manifold, tomllib
import melvae, melvae.study.baselines, melvae.study.runner
from melvae.data.read import read_h5ad
from melvae.study.config import DEFAULT_STUDY
"""

# The default study with its first documented experiment only: one trial, which the
# experiment-1 baseline reuses, so the file is trained on once.
_STUDY = """
study = tomllib.loads(DEFAULT_STUDY.read_text())
study["seed_trials"] = study["seed_trials"][:1]
result = melvae.tune(
    sys.argv[1], study, n_trials=1, epochs=1, workers=1, backed=True, progress=False
)
assert result.registration is not None and result.comparison is not None, result
assert {"pca-10", "experiment-1"} <= set(result.comparison.index), result.comparison
assert result.champion.encode(ad.read_h5ad(sys.argv[1], backed="r")).shape[0] == 8_000
"""

HEADROOM_MB = 1_200


def _dense_file(path: Path, n_cells: int = 8_000, n_genes: int = 50_000) -> Path:
    """An .h5ad whose X is a dense counts matrix: 1,000 cells of three types drawn once and
    written in a fresh order per 1,000 rows (drawing all 400 M values took 22 s)."""
    rng = np.random.default_rng(0)
    types = rng.integers(0, 3, 1_000)
    block = rng.poisson(rng.gamma(0.3, 2.0, (3, n_genes))[types]).astype(np.float32)
    orders = [rng.permutation(1_000) for _ in range(n_cells // 1_000)]
    labels = np.array(["t", "b", "nk"])[np.concatenate([types[order] for order in orders])]
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=map(str, range(n_cells)))
    ad.AnnData(obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])).write_h5ad(path)
    with h5py.File(path, "r+") as file:
        X = file.create_dataset("X", (n_cells, n_genes), dtype=np.float32)
        X.attrs["encoding-type"], X.attrs["encoding-version"] = "array", "0.2.0"
        for k, order in enumerate(orders):
            X[k * 1_000 : (k + 1) * 1_000] = block[order]
    return path


def _run_limited(work: str, data: Path, cwd: Path) -> subprocess.CompletedProcess:
    return run_capped(
        _SETUP, work, headroom_mb=HEADROOM_MB, limit="RLIMIT_DATA", args=(str(data),), cwd=cwd
    )


@pytest.mark.slow
def test_a_study_streams_a_file_larger_than_its_memory(tmp_path: Path) -> None:
    data = _dense_file(tmp_path / "atlas.h5ad")
    control = _run_limited("read_h5ad(sys.argv[1])", data, tmp_path)
    assert control.returncode != 0 and "MemoryError" in control.stderr, "the cap does not bite"
    run = _run_limited(_STUDY, data, tmp_path)
    assert run.returncode == 0 and "done" in run.stdout, run.stderr[-3000:]
