"""Readers that turn the supported file layouts into AnnData (cells × genes, float32).

Large text matrices are read in chunks straight into a sparse matrix, so a 240 MB GEO file
never exists in memory as a dense float64 table.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import importlib.util
import io
import logging
import re
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from pandas.api.types import is_numeric_dtype
from tqdm.auto import tqdm

from melvae.errors import InputError

logger = logging.getLogger(__name__)

SCIBET_IMMUNE = ("B.cell", "Macrophage", "NK", "T.CD4", "T.CD8")
SCIBET_NEGATIVE = ("Mal", "CAF", "Endo.")
SCIBET_REFERENCE_FRACTION = 0.7

_GSE72056_MALIGNANT = {0: "unresolved", 1: "no", 2: "yes"}
_GSE72056_TYPES = {1: "T.cell", 2: "B.cell", 3: "Macrophage", 4: "Endo.", 5: "CAF", 6: "NK"}
_GSE115978_COLUMNS = {
    "cells": "cell_id",
    "samples": "sample",
    "cell.types": "cell_type",
    "treatment.group": "treatment_group",
    "Cohort": "cohort",
}
_GSE115978_OPTIONAL = {"no.of.genes": "n_genes", "no.of.reads": "n_reads"}
_ROWS_PER_CHUNK = 500


# ---------------------------------------------------------------- file access


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"file not found: {path}",
            where=str(path),
            fix="Check the path (relative paths start from the current folder).",
        )
    if not path.is_file():
        raise InputError(
            f"not a file: {path}", where=str(path), fix="Give the path of a file, not a folder."
        )
    if path.stat().st_size == 0:
        raise InputError(
            f"file is empty: {path}",
            where=str(path),
            fix="The file has 0 bytes, probably from an interrupted copy or export; "
            "create it again.",
        )
    return path


class _CountingReader(io.RawIOBase):
    """Reports bytes read from the underlying (possibly compressed) file to a progress bar."""

    def __init__(self, raw: IO[bytes], bar: tqdm) -> None:
        self._raw = raw
        self._bar = bar

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        n = self._raw.readinto(buffer)
        self._bar.update(n)
        return n


@contextlib.contextmanager
def _open_text_table(path: Path, *, progress: bool = True) -> Iterator[IO[bytes]]:
    """Open a plain or gzip-compressed text table with a byte progress bar.

    Decoding and parsing errors inside the block become InputError naming the file.
    """
    with (
        open(path, "rb") as raw,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"reading {path.name}",
            disable=None if progress else True,
        ) as bar,
    ):
        buffered = io.BufferedReader(_CountingReader(raw, bar), buffer_size=1 << 20)
        is_gzip = buffered.peek(2)[:2] == b"\x1f\x8b"
        stream = gzip.GzipFile(fileobj=buffered, mode="rb") if is_gzip else buffered
        try:
            yield stream
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
            raise InputError(
                f"cannot read {path.name}: {err}",
                where=str(path),
                fix="The file is damaged, truncated or not a text table; download or export "
                "it again.",
            ) from err


def _read_lines(stream: IO[bytes], n: int, *, sep: str, path: Path) -> list[list[str]]:
    """Parse the first ``n`` lines (header rows) of a table."""
    rows = []
    for i in range(n):
        line = stream.readline()
        if not line.strip():
            raise InputError(
                f"{path.name} ends at line {i + 1}, before the table starts",
                where=str(path),
                fix="The file is empty or truncated; export or download it again.",
            )
        text = line.decode("utf-8-sig").rstrip("\r\n")
        rows.append(next(csv.reader([text], delimiter=sep)))
    return rows


def _chunks(
    stream: IO[bytes], *, sep: str, lines_before: int, path: Path
) -> Iterator[pd.DataFrame]:
    """Data rows after the header, in chunks; column 0 (cell or gene ids) becomes the index."""
    try:
        reader = pd.read_csv(
            stream, sep=sep, header=None, index_col=0, chunksize=_ROWS_PER_CHUNK, low_memory=False
        )
        for chunk in reader:
            chunk.index = chunk.index.astype(str)
            yield chunk
    except pd.errors.EmptyDataError:
        return
    except pd.errors.ParserError as err:
        # pandas counts lines from where it started reading, after the header lines.
        message = re.sub(
            r"line (\d+)", lambda m: f"line {int(m.group(1)) + lines_before}", str(err)
        )
        raise InputError(
            f"malformed table in {path.name}: {message}",
            where=str(path),
            fix="Every row must have the same number of fields as the header; check for stray "
            "separators or quotes on that line.",
        ) from err


def _column_names(header: list[str], n_columns: int, *, path: Path) -> list[str]:
    """Names of the data columns: the header minus its index-column field, if it has one."""
    if n_columns == len(header) - 1:
        return header[1:]
    if n_columns == len(header):  # R write.table style: no field for the row names
        return header
    raise InputError(
        f"the header of {path.name} has {len(header)} fields but the rows have {n_columns + 1}",
        where=f"{path}, line 1",
        fix="Make the header name every column; the first column must hold the row ids.",
    )


def _float32_block(
    block: pd.DataFrame,
    *,
    names: list[str] | np.ndarray,
    path: Path,
    first_line: int,
    row_kind: str,
    col_kind: str,
) -> np.ndarray:
    """Values of a parsed chunk as float32; a non-numeric entry is reported by row and column."""
    hits = []
    for j in np.flatnonzero(~block.dtypes.map(is_numeric_dtype).to_numpy()):
        column = block.iloc[:, j]
        coerced = pd.to_numeric(column, errors="coerce")
        bad = coerced.isna().to_numpy() & column.notna().to_numpy()
        if bad.any():
            hits.append((int(np.argmax(bad)), int(j)))
        else:
            block.isetitem(int(j), coerced)
    if hits:
        i, j = min(hits)
        raise InputError(
            f"non-numeric value {block.iat[i, j]!r} for {row_kind} {block.index[i]!r}, "
            f"{col_kind} {names[j]!r}",
            where=f"{path}, line {first_line + i}, column {names[j]!r}",
            fix="Expression values must be numbers (empty fields count as missing). Correct "
            "that entry, or remove the row or column if it is not expression data.",
        )
    return block.to_numpy(dtype=np.float32)


def _float32_matrix(x: object, *, keep_sparse: bool) -> np.ndarray | sp.csr_matrix:
    """float32 matrix: CSR when the input is sparse (and ``keep_sparse``) or mostly zeros."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
        if keep_sparse or x.nnz <= np.prod(x.shape) / 2:
            return x
        return x.toarray()
    x = np.asarray(x, dtype=np.float32)
    return sp.csr_matrix(x) if np.count_nonzero(x) <= x.size / 2 else x


def _keep_first_genes(
    x_genes: sp.csr_matrix, genes: list[str], *, path: Path
) -> tuple[sp.csr_matrix, pd.Index]:
    """Drop repeated gene rows (keeping the first), which some published GEO files contain."""
    index = pd.Index(genes)
    duplicated = index.duplicated()
    if duplicated.any():
        examples = ", ".join(sorted(set(index[duplicated]))[:5])
        logger.warning(
            "%s: %d rows repeat a gene symbol (e.g. %s); keeping the first row of each",
            path.name,
            int(duplicated.sum()),
            examples,
        )
        x_genes = x_genes[np.flatnonzero(~duplicated)]
        index = index[~duplicated]
    return x_genes, index


def _read_gene_rows(
    path: Path, *, sep: str, n_meta: int, progress: bool
) -> tuple[sp.csr_matrix, list[str], list[str], list[list[str]]]:
    """Read a genes × cells text matrix. Returns (genes × cells CSR, genes, cells, meta rows)."""
    with _open_text_table(path, progress=progress) as stream:
        header, *meta = _read_lines(stream, 1 + n_meta, sep=sep, path=path)
        blocks, genes = [], []
        cells: list[str] | None = None
        first_line = 2 + n_meta
        for chunk in _chunks(stream, sep=sep, lines_before=1 + n_meta, path=path):
            if cells is None:
                cells = _column_names(header, chunk.shape[1], path=path)
            values = _float32_block(
                chunk,
                names=cells,
                path=path,
                first_line=first_line,
                row_kind="gene",
                col_kind="cell",
            )
            blocks.append(sp.csr_matrix(values))
            genes.extend(chunk.index)
            first_line += len(chunk)
    if cells is None:
        cells = header[1:]
    x = (
        sp.vstack(blocks, format="csr")
        if blocks
        else sp.csr_matrix((0, len(cells)), dtype=np.float32)
    )
    return x, genes, cells, meta


# ---------------------------------------------------------------- public readers


def read_h5ad(
    path: str | Path, *, use_raw: bool = False, layer: str | None = None, backed: bool = False
) -> ad.AnnData:
    """Read an .h5ad file; ``use_raw``/``layer`` pick which matrix becomes X (float32).

    ``backed`` leaves X in the file (anndata's backed mode, read-only): training, encoding and
    scoring then read the cells a window at a time (`melvae.data.backed`), for files larger
    than memory. Only X itself streams; ``use_raw`` and ``layer`` need it read into memory.
    """
    path = _existing_file(path)
    if backed and (use_raw or layer is not None):
        raise InputError(
            "a backed file streams its X only, not its .raw matrix or a layer",
            where=str(path),
            fix="Read the file into memory (drop backed), or write the matrix you want as X.",
        )
    try:
        adata = ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:  # h5py and anndata raise many types for a damaged file
        raise InputError(
            f"cannot read {path.name} as an .h5ad file: {err}",
            where=str(path),
            fix="Check that the file is a complete AnnData .h5ad (e.g. written with "
            "adata.write_h5ad); copy or export it again.",
        ) from err
    if use_raw and layer is not None:
        raise InputError(
            "use_raw and layer are mutually exclusive",
            where=str(path),
            fix="Choose either the .raw matrix or one layer.",
        )
    if use_raw:
        if adata.raw is None:
            raise InputError(
                f"{path.name} has no .raw matrix",
                where=str(path),
                fix="Read X instead (drop use_raw), or store the raw values in adata.raw.",
            )
        adata = adata.raw.to_adata()
    elif layer is not None:
        if layer not in adata.layers:
            raise InputError(
                f"{path.name} has no layer {layer!r} (layers: {list(adata.layers) or 'none'})",
                where=str(path),
                fix="Name one of the existing layers, or leave layer unset to use X.",
            )
        adata.X = adata.layers[layer]
    if backed:  # blocks are read as float32 as they are cut (`backed.DiskMatrix`)
        logger.info("opened %s backed: %d cells × %d genes", path.name, adata.n_obs, adata.n_vars)
        return adata
    try:
        adata.X = _float32_matrix(adata.X, keep_sparse=True)
    except (TypeError, ValueError) as err:
        raise InputError(
            f"the expression matrix of {path.name} is not numeric: {err}",
            where=str(path),
            fix="Store numeric expression values in X (or the chosen layer).",
        ) from err
    logger.info("read %s: %d cells × %d genes", path.name, adata.n_obs, adata.n_vars)
    return adata


def read_csv_table(path: str | Path, *, label_column: str = "label") -> ad.AnnData:
    """Read the original study's CSV: one row per cell, one column per gene, plus a label column.

    The first column holds cell ids; ``label_column`` (if present) becomes ``obs["label"]``.
    Gene names are kept as written so that validation can report duplicates.
    """
    path = _existing_file(path)
    with _open_text_table(path) as stream:
        (header,) = _read_lines(stream, 1, sep=",", path=path)
        blocks, cells, labels = [], [], []
        names: list[str] | None = None
        label_pos: int | None = None
        gene_pos: np.ndarray | None = None
        first_line = 2
        for chunk in _chunks(stream, sep=",", lines_before=1, path=path):
            if names is None:
                names = _column_names(header, chunk.shape[1], path=path)
                label_pos = names.index(label_column) if label_column in names else None
                gene_pos = np.array([j for j in range(len(names)) if j != label_pos], dtype=int)
            if label_pos is not None:
                labels.append(chunk.iloc[:, label_pos])
            values = _float32_block(
                chunk.iloc[:, gene_pos],
                names=[names[j] for j in gene_pos],
                path=path,
                first_line=first_line,
                row_kind="cell",
                col_kind="gene",
            )
            blocks.append(sp.csr_matrix(values))
            cells.extend(chunk.index)
            first_line += len(chunk)
    if names is None:  # header only: no cells
        names = header[1:]
        gene_pos = np.array([j for j, n in enumerate(names) if n != label_column], dtype=int)
    genes = [names[j] for j in gene_pos]
    x = (
        sp.vstack(blocks, format="csr")
        if blocks
        else sp.csr_matrix((0, len(genes)), dtype=np.float32)
    )
    obs = pd.DataFrame(index=pd.Index(cells, dtype=str))
    if labels:
        label = pd.concat(labels)
        obs["label"] = pd.Categorical(label.where(label.isna(), label.astype(str)).to_numpy())
    else:
        logger.info("%s has no %r column; the cells are unlabelled", path.name, label_column)
    var = pd.DataFrame(index=pd.Index(genes, dtype=str))
    adata = ad.AnnData(_float32_matrix(x, keep_sparse=False), obs=obs, var=var)
    logger.info("read %s: %d cells × %d genes", path.name, adata.n_obs, adata.n_vars)
    return adata


def _scibet_labels(cell_types: pd.Series) -> pd.Categorical:
    """SciBet melanoma label scheme: immune types kept, Mal/CAF/Endo. → Neg.cell, rest missing."""
    values = cell_types.astype(object).to_numpy()
    labels = np.where(
        np.isin(values, SCIBET_IMMUNE),
        values,
        np.where(np.isin(values, SCIBET_NEGATIVE), "Neg.cell", None),
    )
    return pd.Categorical(labels, categories=[*SCIBET_IMMUNE, "Neg.cell"])


def _read_gse115978_obs(path: str | Path) -> pd.DataFrame:
    path = _existing_file(path)
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise InputError(
            f"cannot read {path.name}: {err}",
            where=str(path),
            fix="Download GSE115978_cell.annotations.csv.gz from GEO again.",
        ) from err
    missing = [c for c in _GSE115978_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(
            f"{path.name} lacks the column(s) {missing} of the GSE115978 annotation table",
            where=f"{path}, line 1",
            fix="Give GEO's GSE115978_cell.annotations.csv.gz (columns cells, samples, "
            "cell.types, treatment.group, Cohort, ...).",
        )
    renames = {**_GSE115978_COLUMNS, **_GSE115978_OPTIONAL}
    obs = table[[c for c in renames if c in table.columns]].rename(columns=renames)
    obs = obs.set_index("cell_id")
    repeated = obs.index[obs.index.duplicated()]
    if len(repeated):
        raise InputError(
            f"{path.name} lists {len(repeated)} cell id(s) twice (e.g. {repeated[0]!r})",
            where=str(path),
            fix="Give the unmodified GEO annotation file: each cell must appear once.",
        )
    for column in ("n_genes", "n_reads"):
        if column in obs:
            obs[column] = pd.to_numeric(obs[column], errors="coerce")
    for column in ("sample", "cell_type", "treatment_group", "cohort"):
        obs[column] = pd.Categorical(obs[column])
    obs["scibet_label"] = _scibet_labels(obs["cell_type"])
    obs.index.name = None
    return obs


def read_gse115978(tpm_path: str | Path, annotations_path: str | Path) -> ad.AnnData:
    """Read Jerby-Arnon 2018 (GEO GSE115978): genes × cells TPM CSV plus the cell annotations.

    obs gets ``cell_type``, ``sample``, ``treatment_group``, ``cohort`` and ``scibet_label``.
    """
    obs = _read_gse115978_obs(annotations_path)
    tpm_path = _existing_file(tpm_path)
    x_genes, genes, cells, _ = _read_gene_rows(tpm_path, sep=",", n_meta=0, progress=True)
    x_genes, genes = _keep_first_genes(x_genes, genes, path=tpm_path)
    unknown = pd.Index(cells).difference(obs.index)
    if len(unknown):
        raise InputError(
            f"{len(unknown)} of the {len(cells)} cells in {tpm_path.name} are not in "
            f"{Path(annotations_path).name} (e.g. {unknown[0]!r})",
            where=str(annotations_path),
            fix="Use the annotation file of the same GEO series (GSE115978) as the matrix.",
        )
    adata = ad.AnnData(
        _float32_matrix(x_genes.T, keep_sparse=False),
        obs=obs.loc[cells],
        var=pd.DataFrame(index=genes.astype(str)),
    )
    logger.info("read GSE115978: %d cells × %d genes", adata.n_obs, adata.n_vars)
    return adata


def _subset(adata: ad.AnnData, mask: np.ndarray) -> ad.AnnData:
    part = adata[mask].copy()
    for column in part.obs.columns:
        if isinstance(part.obs[column].dtype, pd.CategoricalDtype):
            part.obs[column] = part.obs[column].cat.remove_unused_categories()
    return part


def scibet_split(adata: ad.AnnData, *, seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    """Split GSE115978 like the SciBet melanoma tutorial sets: (reference, query).

    The reference holds 70% of each immune label (rounded); the query holds the other 30% plus
    all Neg.cell cells. Cells without a SciBet label are dropped. The split depends only on the
    seed and the cell ids, not on their order.
    """
    if "scibet_label" not in adata.obs:
        raise InputError(
            "no obs column 'scibet_label' to split on",
            where="scibet_split",
            fix="Read the data with read_gse115978, which adds the SciBet labels.",
        )
    labels = adata.obs["scibet_label"].astype(object).to_numpy()
    ids = adata.obs_names.to_numpy()
    rng = np.random.default_rng(seed)
    reference = np.zeros(adata.n_obs, dtype=bool)
    for label in SCIBET_IMMUNE:
        members = np.flatnonzero(labels == label)
        members = members[np.argsort(ids[members], kind="stable")]
        n_reference = int(np.floor(SCIBET_REFERENCE_FRACTION * len(members) + 0.5))
        reference[rng.permutation(members)[:n_reference]] = True
    query = pd.notna(labels) & ~reference
    return _subset(adata, reference), _subset(adata, query)


def _codes(row: list[str], *, path: Path, line: int, cells: list[str]) -> np.ndarray:
    try:
        return np.array([int(float(v)) for v in row[1:]])
    except ValueError:
        j = next(i for i, v in enumerate(row[1:]) if not re.fullmatch(r"\s*-?\d+(\.0*)?\s*", v))
        raise InputError(
            f"non-integer code {row[j + 1]!r} for cell {cells[j]!r} in row {row[0]!r}",
            where=f"{path}, line {line}, column {cells[j]!r}",
            fix="Rows 2–4 of the GSE72056 matrix hold integer codes; give the unmodified file.",
        ) from None


def read_gse72056(path: str | Path) -> ad.AnnData:
    """Read Tirosh 2016 (GEO GSE72056): tab-separated genes × cells log2(TPM/10+1) matrix.

    Rows 2–4 hold the tumour id, the malignant flag and the non-malignant cell type code; they
    become obs ``tumor``, ``malignant`` and ``cell_type`` (malignant cells are ``Mal``).
    """
    path = _existing_file(path)
    x_genes, genes, cells, meta = _read_gene_rows(path, sep="\t", n_meta=3, progress=True)
    for line, row, start in zip(
        (2, 3, 4), meta, ("tumor", "malignant", "non-malignant"), strict=True
    ):
        if not row[0].strip().lower().startswith(start) or len(row) != len(cells) + 1:
            raise InputError(
                f"{path.name} does not have the GSE72056 layout: line {line} should start with "
                f"{start!r} and have one value per cell, found {row[0]!r} with "
                f"{len(row) - 1} values for {len(cells)} cells",
                where=f"{path}, line {line}",
                fix="Give GEO's GSE72056_melanoma_single_cell_revised_v2.txt(.gz) unmodified.",
            )
    malignant = _codes(meta[1], path=path, line=3, cells=cells)
    types = _codes(meta[2], path=path, line=4, cells=cells)
    cell_type = np.where(
        malignant == 2, "Mal", [_GSE72056_TYPES.get(t, "unresolved") for t in types]
    )
    obs = pd.DataFrame(
        {
            "tumor": pd.Categorical(meta[0][1:]),
            "malignant": pd.Categorical(
                [_GSE72056_MALIGNANT.get(m, "unresolved") for m in malignant]
            ),
            "cell_type": pd.Categorical(cell_type),
        },
        index=pd.Index(cells, dtype=str),
    )
    x_genes, genes = _keep_first_genes(x_genes, genes, path=path)
    adata = ad.AnnData(
        _float32_matrix(x_genes.T, keep_sparse=False),
        obs=obs,
        var=pd.DataFrame(index=genes.astype(str)),
    )
    logger.info("read GSE72056: %d cells × %d genes", adata.n_obs, adata.n_vars)
    return adata


def read_pbmc68k_reduced() -> ad.AnnData:
    """scanpy's shipped 700-cell PBMC set (log-normalised ``.raw``), offline; ``cell_type`` obs."""
    spec = importlib.util.find_spec("scanpy")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "scanpy is not installed, so pbmc68k_reduced is unavailable",
            where="pbmc68k_reduced",
            fix="pip install scanpy",
        )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "10x_pbmc68k_reduced.h5ad"
    with warnings.catch_warnings():
        # The shipped file was written by an old anndata, which the reader warns about at length.
        warnings.filterwarnings("ignore", "Moving element from .uns", FutureWarning)
        warnings.filterwarnings("ignore", category=ad.OldFormatWarning)
        adata = read_h5ad(path, use_raw=True)
    adata.obs["cell_type"] = adata.obs["bulk_labels"]
    return adata
