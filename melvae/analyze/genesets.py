"""Gene-set libraries: GMT parsing and resolution of named libraries (KEGG, GO BP, Reactome).

KEGG 2021 Human and GO Biological Process 2023 ship inside the `blitzgsea` wheel and are read
from there (offline). Reactome is fetched once from reactome.org into the data cache; with no
published checksum, the first download's sha256 is recorded and later loads are checked against
it (see `melvae.data.download.fetch`).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from melvae.data.download import cache_dir, fetch
from melvae.errors import InputError

logger = logging.getLogger(__name__)

REACTOME_URL = "https://reactome.org/download/current/ReactomePathways.gmt.zip"
REACTOME_URL_ENV = "MELVAE_REACTOME_URL"
REACTOME_MEMBER = "ReactomePathways.gmt"

# spec -> file name inside blitzgsea/data (Enrichr libraries in GMT layout)
_BLITZGSEA_LIBRARIES = {
    "kegg": "KEGG_2021_Human",
    "go_bp": "GO_Biological_Process_2023",
}
LIBRARY_SPECS = (*_BLITZGSEA_LIBRARIES, "reactome")


@dataclass(frozen=True)
class GeneSetLibrary:
    """A named collection of gene sets: term -> genes (order as in the source file)."""

    name: str
    sets: dict[str, tuple[str, ...]]


def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Read a GMT file (name, description, genes... separated by TABS) into term -> genes."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            return _parse_gmt(handle, source=str(path))
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(
            f"cannot read gene-set file: {err}",
            where=str(path),
            fix="give the path of a readable, UTF-8 text GMT file",
        ) from err


def _parse_gmt(lines: Iterable[str], *, source: str) -> dict[str, list[str]]:
    """Parse GMT lines. Splits on tabs only, since set names (e.g. Reactome's) contain spaces."""
    sets: dict[str, list[str]] = {}
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split("\t")]
        name = fields[0]
        genes = list(dict.fromkeys(gene for gene in fields[2:] if gene))
        problem = None
        if len(fields) < 3:
            problem = f"has {len(fields)} tab-separated field(s), a GMT line needs at least 3"
        elif not name:
            problem = "has an empty set name"
        elif not genes:
            problem = f"set {name!r} lists no genes"
        elif name in sets:
            problem = f"repeats the set name {name!r}"
        if problem:
            raise InputError(
                f"malformed GMT line: it {problem}",
                where=f"{source}, line {number}",
                fix="use the GMT layout: name<TAB>description<TAB>gene1<TAB>gene2...",
            )
        sets[name] = genes
    return sets


def load_library(spec: str, *, data_dir: Path | None = None) -> GeneSetLibrary:
    """Load a gene-set library by name ("kegg", "go_bp", "reactome") or from a GMT path.

    `data_dir` is where Reactome is cached (default: `melvae.data.download.cache_dir()`).
    """
    key = spec.strip().lower()
    if key in _BLITZGSEA_LIBRARIES:
        name = _BLITZGSEA_LIBRARIES[key]
        sets = read_gmt(_blitzgsea_data_dir() / name)
    elif key == "reactome":
        name = "Reactome"
        sets = _load_reactome(data_dir if data_dir is not None else cache_dir())
    elif Path(spec).is_file():
        name = Path(spec).stem
        sets = read_gmt(spec)
    else:
        raise InputError(
            f"unknown gene-set library {spec!r} (not a known name, and no such file)",
            where="gene-set library specification",
            fix=f"use one of {', '.join(LIBRARY_SPECS)} or the path of an existing .gmt file",
        )
    logger.info("gene-set library %s: %d sets", name, len(sets))
    return GeneSetLibrary(name=name, sets={term: tuple(genes) for term, genes in sets.items()})


def load_libraries(specs: Sequence[str], *, data_dir: Path | None = None) -> list[GeneSetLibrary]:
    """Load several libraries (see `load_library`), in the given order."""
    return [load_library(spec, data_dir=data_dir) for spec in specs]


def _blitzgsea_data_dir() -> Path:
    """blitzgsea's shipped data folder, found without importing blitzgsea (heavy, global state)."""
    spec = importlib.util.find_spec("blitzgsea")
    if spec is None or spec.origin is None:
        raise InputError(
            "the blitzgsea package, which ships the KEGG and GO gene sets, is not installed",
            where="gene-set library",
            fix="pip install blitzgsea, or give the path of a .gmt file instead",
        )
    return Path(spec.origin).parent / "data"


def _load_reactome(data_dir: Path) -> dict[str, list[str]]:
    """Fetch (or reuse the cached) Reactome zip and parse the GMT inside it."""
    url = os.environ.get(REACTOME_URL_ENV) or REACTOME_URL
    archive = fetch(url, data_dir / "genesets" / "ReactomePathways.gmt.zip")
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [n for n in zipped.namelist() if n.endswith(".gmt")]
            member = REACTOME_MEMBER if REACTOME_MEMBER in members else None
            if member is None and len(members) == 1:
                member = members[0]
            if member is None:
                raise InputError(
                    f"the Reactome archive holds no single {REACTOME_MEMBER} "
                    f"(its .gmt files: {members or 'none'})",
                    where=f"{archive} (from {url})",
                    fix=f"check {REACTOME_URL_ENV} points at Reactome's ReactomePathways.gmt.zip",
                )
            with zipped.open(member) as raw:
                text = io.TextIOWrapper(raw, encoding="utf-8")
                return _parse_gmt(text, source=f"{archive}:{member}")
    except (zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise InputError(
            f"the cached Reactome download is not a readable zip of a GMT file: {err}",
            where=f"{archive} (from {url})",
            fix=f"delete {archive} and its .sha256 file to download it again",
        ) from err
