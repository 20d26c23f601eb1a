"""Named datasets: downloaded on first use, parsed once, then served from the local cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad

from melvae.data.download import atomic_path, cache_dir, fetch, file_digests
from melvae.data.read import (
    read_csv_table,
    read_gse72056,
    read_gse115978,
    read_h5ad,
    read_pbmc68k_reduced,
    scibet_split,
)
from melvae.errors import DownloadError, InputError

logger = logging.getLogger(__name__)

GEO_URL_ENV = "MELVAE_GEO_URL"


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset, the obs column that holds its cell-type labels (if any) and the one
    that names each cell's batch (patient or tumour sample; if known). A study conditions on
    the batch only when it asks for a batch key (`[data] batch_key`)."""

    key: str
    adata: ad.AnnData
    label_key: str | None
    description: str
    batch_key: str | None = None
    # The file it was read from (resolved); None for a named dataset or an in-memory AnnData.
    path: Path | None = None


@dataclass(frozen=True)
class _Remote:
    filename: str
    base_url: str
    md5: str | None = None  # None: the sha256 of the first download is trusted and recorded


_GSE115978_BASE = "https://ftp.ncbi.nlm.nih.gov/geo/series/GSE115nnn/GSE115978/suppl/"
_GSE115978_TPM = _Remote("GSE115978_tpm.csv.gz", _GSE115978_BASE)
_GSE115978_ANNOTATIONS = _Remote(
    "GSE115978_cell.annotations.csv.gz", _GSE115978_BASE, md5="066fa72772ae0b2cf065f03aa9c89a05"
)
_GSE72056 = _Remote(
    "GSE72056_melanoma_single_cell_revised_v2.txt.gz",
    "https://ftp.ncbi.nlm.nih.gov/geo/series/GSE72nnn/GSE72056/suppl/",
)


def _fetch_geo(remote: _Remote, folder: Path, base_url: str | None) -> Path:
    """Download one GEO supplementary file; ``base_url`` is a folder holding it (a mirror)."""
    base = base_url or os.environ.get(GEO_URL_ENV) or remote.base_url
    return fetch(f"{base.rstrip('/')}/{remote.filename}", folder / remote.filename, md5=remote.md5)


def _write_cache(adata: ad.AnnData, path: Path) -> None:
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression="lzf")
    logger.info("cached the parsed dataset at %s", path)


def _load_gse115978(part: str, data_dir: Path, base_url: str | None) -> ad.AnnData:
    folder = data_dir / "gse115978"
    cached = {name: folder / f"{name}.h5ad" for name in ("reference", "query")}
    if cached[part].is_file():
        return read_h5ad(cached[part])
    tpm = _fetch_geo(_GSE115978_TPM, folder, base_url)
    annotations = _fetch_geo(_GSE115978_ANNOTATIONS, folder, base_url)
    parts = dict(zip(cached, scibet_split(read_gse115978(tpm, annotations)), strict=True))
    for name, adata in parts.items():
        _write_cache(adata, cached[name])
    return parts[part]


def _load_gse72056(data_dir: Path, base_url: str | None) -> ad.AnnData:
    cached = data_dir / "gse72056" / "gse72056.h5ad"
    if cached.is_file():
        return read_h5ad(cached)
    adata = read_gse72056(_fetch_geo(_GSE72056, cached.parent, base_url))
    _write_cache(adata, cached)
    return adata


@dataclass(frozen=True)
class _Entry:
    description: str
    label_key: str | None
    load: Callable[[Path, str | None], ad.AnnData]  # (data_dir, base_url) -> AnnData
    batch_key: str | None = None


CATALOGUE: dict[str, _Entry] = {
    "gse115978_reference": _Entry(
        "Jerby-Arnon 2018 melanoma (GEO GSE115978), SciBet reference: 70% of the immune cells "
        "(B.cell, Macrophage, NK, T.CD4, T.CD8), TPM",
        "scibet_label",
        lambda data_dir, base_url: _load_gse115978("reference", data_dir, base_url),
        "sample",
    ),
    "gse115978_query": _Entry(
        "Jerby-Arnon 2018 melanoma (GEO GSE115978), SciBet query: the other 30% of the immune "
        "cells plus malignant, CAF and endothelial cells as Neg.cell, TPM",
        "scibet_label",
        lambda data_dir, base_url: _load_gse115978("query", data_dir, base_url),
        "sample",
    ),
    "gse72056": _Entry(
        "Tirosh 2016 melanoma (GEO GSE72056), all cells, log2(TPM/10+1)",
        "cell_type",
        _load_gse72056,
        "tumor",
    ),
    "pbmc68k_reduced": _Entry(
        "scanpy's 700-cell PBMC example (log-normalised, shipped offline); not melanoma",
        "cell_type",
        lambda data_dir, base_url: read_pbmc68k_reduced(),
    ),
}

_FILE_SUFFIXES = (".h5ad", ".csv", ".csv.gz")


def _load_file(path: Path, *, backed: bool = False) -> Dataset:
    suffix = next((s for s in _FILE_SUFFIXES if path.name.endswith(s)), None)
    if suffix is None:
        raise InputError(
            f"unsupported file type: {path.name}",
            where=str(path),
            fix=f"Give an .h5ad or .csv(.gz) file, or one of the named datasets: "
            f"{', '.join(CATALOGUE)}.",
        )
    key = path.name[: -len(suffix)]
    if backed and suffix != ".h5ad":
        raise InputError(
            f"backed reading streams an .h5ad file, not {path.name}",
            where=str(path),
            fix="Convert the table to .h5ad (melvae.data.read.read_csv_table, then "
            "write_h5ad) to stream it, or drop backed.",
        )
    if suffix == ".h5ad":
        adata = read_h5ad(path, backed=backed)
        label_key = "cell_type" if "cell_type" in adata.obs else None
    else:
        adata = read_csv_table(path)
        label_key = "label"
    return Dataset(key, adata, label_key, f"file {path}", path=path.resolve())


def file_record(path: Path) -> dict[str, str]:
    """What a model keeps of the file that trained it, to find and check that file again:
    its resolved path and sha256."""
    return {"path": str(path.resolve()), "sha256": file_digests(path)["sha256"]}


def load_recorded_file(record: dict[str, str], *, where: str, fix: str) -> Dataset:
    """Read the file a `file_record` names, refusing one moved, deleted or changed since
    (`where` and `fix` say where the record is and what the caller can do instead)."""
    path = Path(record["path"])
    if not path.is_file():
        raise InputError(f"the file that trained the model, {path}, is gone", where=where, fix=fix)
    if file_digests(path)["sha256"] != record["sha256"]:
        raise InputError(
            f"the file that trained the model, {path}, has changed since (its sha256 differs)",
            where=where,
            fix=fix,
        )
    return _load_file(path)


def load_dataset(
    key: str, *, base_url: str | None = None, data_dir: Path | None = None, backed: bool = False
) -> Dataset:
    """Load a named dataset (downloading it on first use) or an .h5ad/.csv file given by path.

    ``base_url`` (or ``$MELVAE_GEO_URL``) replaces GEO with a folder URL holding the same files;
    ``data_dir`` (default :func:`cache_dir`) is where downloads and parsed copies are kept;
    ``backed`` leaves an .h5ad file's X on disk (`read.read_h5ad`).
    """
    entry = CATALOGUE.get(key)
    if entry is None:
        path = Path(key)
        if path.exists() or key.endswith(_FILE_SUFFIXES) or os.sep in key:
            return _load_file(path, backed=backed)
        raise InputError(
            f"unknown dataset {key!r}",
            where="dataset name",
            fix=f"Use one of {', '.join(CATALOGUE)}, or the path of an .h5ad or .csv file.",
        )
    if backed:
        raise InputError(
            f"backed reading streams an .h5ad file, and {key!r} is a named dataset",
            where="dataset name",
            fix="Give the path of an .h5ad file to stream, or drop backed for a named dataset.",
        )
    adata = entry.load(Path(data_dir) if data_dir is not None else cache_dir(), base_url)
    return Dataset(key, adata, entry.label_key, entry.description, entry.batch_key)


def load_with_fallback(key: str, fallback: str | None, **kw: object) -> tuple[Dataset, str | None]:
    """Load ``key``; if it cannot be downloaded, load ``fallback`` instead and say why.

    Returns (dataset, reason) where reason is None unless the fallback was used. Announcing the
    fallback is the caller's job (the study prints one banner), so it is said once.
    """
    try:
        return load_dataset(key, **kw), None
    except DownloadError as err:
        if fallback is None:
            raise
        reason = f"dataset {key!r} could not be downloaded: {err}"
        return load_dataset(fallback, **kw), reason
