"""Pathway enrichment of gene lists: over-representation (hypergeometric + BH) and ranked GSEA.

Pure functions: gene lists and libraries in, tidy DataFrames out. The background (universe) is
the model's genes, so a pathway can only be "enriched" in genes the model could have picked.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, hypergeom

from melvae.analyze.genesets import GeneSetLibrary
from melvae.errors import InputError

logger = logging.getLogger(__name__)

ORA_COLUMNS = ["library", "term", "overlap", "set_size", "query_size", "p", "fdr", "genes"]
RANKED_COLUMNS = ["library", "term", "set_size", "nes", "p", "fdr", "leading_edge"]


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (FDR), in the input order."""
    p = np.asarray(p, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p-values must be a 1-D array, got shape {p.shape}")
    if p.size == 0:
        return p.copy()
    return false_discovery_control(p, method="bh")


def over_representation(
    genes: Sequence[str],
    library: GeneSetLibrary,
    background: Sequence[str],
    *,
    min_size: int = 5,
    max_size: int = 500,
) -> pd.DataFrame:
    """Hypergeometric over-representation of `genes` in each set of `library`.

    Sets are restricted to `background`; those with fewer than `min_size` or more than `max_size`
    background genes are not tested. BH runs over all tested sets; rows are returned only for
    sets sharing at least one gene with the query, sorted by p. Columns: `ORA_COLUMNS`.
    """
    universe = list(dict.fromkeys(background))
    tested = _tested_sets(library, universe, min_size=min_size, max_size=max_size)
    return _ora(genes, tested, library.name, universe)


def enrich_table(
    queries: Mapping[str, Sequence[str]],
    libraries: Sequence[GeneSetLibrary],
    background: Sequence[str],
    *,
    min_size: int = 5,
    max_size: int = 500,
) -> pd.DataFrame:
    """Over-representation for many named queries (e.g. "dim3:up") against several libraries.

    Returns the `over_representation` rows of every (query, library) pair, with a leading
    `query` column; BH is applied per query and library.
    """
    universe = list(dict.fromkeys(background))
    frames = []
    for library in libraries:
        tested = _tested_sets(library, universe, min_size=min_size, max_size=max_size)
        for query, genes in queries.items():
            frame = _ora(genes, tested, library.name, universe)
            if not frame.empty:
                frames.append(frame.assign(query=query)[["query", *ORA_COLUMNS]])
    if not frames:
        return pd.DataFrame(columns=["query", *ORA_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def ranked_enrichment(
    scores: pd.Series,
    library: GeneSetLibrary,
    *,
    min_size: int = 15,
    max_size: int = 500,
    permutations: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """GSEA-style test of a ranked gene list (gene -> score) with blitzgsea.

    Identical results for a seed (see `_reproducible_blitzgsea`); the leading edge includes
    the gene at the running sum's peak.

    `nes` > 0 means the set sits at the high-score end. Columns: `RANKED_COLUMNS`, sorted by p;
    `leading_edge` lists the leading-edge genes from the extreme end inwards, comma-joined.
    """
    values = pd.to_numeric(scores, errors="coerce")
    bad = values.index[~np.isfinite(values.to_numpy(dtype=float))]
    duplicated = values.index[values.index.duplicated()]
    problems = []
    if len(bad):
        problems.append(f"{len(bad)} missing or non-finite scores (e.g. {list(bad[:3])})")
    if len(duplicated):
        problems.append(f"duplicate genes (e.g. {list(duplicated[:3])})")
    if problems:
        raise InputError(
            f"gene scores for ranked enrichment contain {' and '.join(problems)}",
            where=f"scores for library {library.name}",
            fix="pass one finite score per gene (a pandas Series indexed by unique gene names)",
        )
    tested = _tested_sets(library, list(values.index), min_size=min_size, max_size=max_size)
    if not tested:
        return pd.DataFrame(columns=RANKED_COLUMNS)

    signature = pd.DataFrame({"gene": values.index, "score": values.to_numpy(dtype=float)})
    # Its signature cache is off because the cached null depends on the library's set sizes;
    # errstate undoes its np.seterr.
    with np.errstate(), _reproducible_blitzgsea() as blitzgsea:
        result = blitzgsea.gsea(
            signature,
            {term: list(genes) for term, genes in tested.items()},
            permutations=permutations,
            min_size=min_size,
            max_size=max_size,
            processes=1,
            seed=seed,
            signature_cache=False,
        )
    table = pd.DataFrame(
        {
            "library": library.name,
            "term": result.index.astype(str),
            "set_size": result["geneset_size"].to_numpy(dtype=int),
            "nes": result["nes"].to_numpy(dtype=float),
            "p": result["pval"].to_numpy(dtype=float),
            "fdr": result["fdr"].to_numpy(dtype=float),
            "leading_edge": [
                _order_leading_edge(edge, values, positive=nes > 0)
                for edge, nes in zip(result["leading_edge"], result["nes"], strict=True)
            ],
        }
    )
    return table.sort_values(["p", "term"], ignore_index=True)


@contextlib.contextmanager
def _reproducible_blitzgsea() -> Iterator[Any]:
    """blitzgsea (1.3.x) made reproducible and its leading edge complete, for one call.

    - Its null draws use numpy's global generator, which it seeds once and its worker pool then
      shares out in whatever order the workers take anchors: results changed run to run. Here
      the calibration runs in this process (its single-process path misses an argument, given
      here) and each anchor's draws are seeded from its own seed, so a seed fixes the result.
    - Its leading edge stops one short of the peak (`range(peak)`), dropping the peak gene;
      here it runs up to and including the peak.
    numpy's global generator and blitzgsea's functions are restored afterwards.
    """
    # Imported here: blitzgsea imports matplotlib.pyplot and sets mpmath precision on import.
    import blitzgsea

    originals = {
        name: getattr(blitzgsea, name)
        for name in ("estimate_anchor", "get_peak_size_adv", "get_leading_edge")
    }

    def estimate_anchor(*args: Any, ks_disable: bool = False) -> Any:
        return originals["estimate_anchor"](*args, ks_disable)

    def get_peak_size_adv(abs_signature: Any, number_hits: int, permutations: int, seed: int):
        np.random.seed(int(seed) % 2**32)
        return originals["get_peak_size_adv"](abs_signature, number_hits, permutations, seed)

    def get_leading_edge(running: Any, ranked: Any, gene_set: Any, signature_map: Any) -> str:
        hits = np.array(sorted({signature_map[g] for g in gene_set if g in signature_map}))
        peak, trough = int(np.argmax(running)), int(np.argmin(running))
        edge = hits[hits <= peak] if running[peak] > abs(running[trough]) else hits[hits >= trough]
        return ",".join(ranked.index[edge])

    state = np.random.get_state()
    blitzgsea.estimate_anchor = estimate_anchor
    blitzgsea.get_peak_size_adv = get_peak_size_adv
    blitzgsea.get_leading_edge = get_leading_edge
    try:
        yield blitzgsea
    finally:
        for name, function in originals.items():
            setattr(blitzgsea, name, function)
        np.random.set_state(state)


def _order_leading_edge(edge: str, scores: pd.Series, *, positive: bool) -> str:
    """blitzgsea joins leading-edge genes in set order; list them most extreme first instead."""
    genes = [gene for gene in edge.split(",") if gene]
    ordered = scores[genes].sort_values(ascending=not positive)
    return ",".join(ordered.index)


def _tested_sets(
    library: GeneSetLibrary, universe: Sequence[str], *, min_size: int, max_size: int
) -> dict[str, tuple[str, ...]]:
    """Sets restricted to the universe, kept when their size is within [min_size, max_size].

    A library sharing no gene at all with the universe is an identifier mismatch, not a result.
    """
    members = set(universe)
    library_genes = {gene for genes in library.sets.values() for gene in genes}
    if not library_genes & members:
        raise InputError(
            f"gene-set library {library.name} ({len(library_genes)} genes, e.g. "
            f"{sorted(library_genes)[:3]}) shares no gene with the background "
            f"({len(members)} genes, e.g. {list(universe)[:3]})",
            where=f"enrichment against {library.name}",
            fix="use the same gene identifiers on both sides: the shipped libraries use human "
            "HGNC symbols (e.g. CD8A), so map Ensembl IDs to symbols, and use a library made "
            "for your species (mouse symbols look like Cd8a)",
        )
    tested = {}
    for term, genes in library.sets.items():
        kept = tuple(gene for gene in genes if gene in members)
        if min_size <= len(kept) <= max_size:
            tested[term] = kept
    if not tested:
        logger.warning(
            "no set of %s has %d-%d genes in the background; nothing tested",
            library.name,
            min_size,
            max_size,
        )
    return tested


def _ora(
    genes: Sequence[str],
    tested: Mapping[str, tuple[str, ...]],
    library_name: str,
    universe: Sequence[str],
) -> pd.DataFrame:
    """Hypergeometric test of one query against already-restricted sets."""
    members = set(universe)
    query = [gene for gene in dict.fromkeys(genes) if gene in members]
    dropped = len(set(genes)) - len(query)
    if dropped:
        logger.warning(
            "%d query genes are not in the background and were ignored (%s)",
            dropped,
            library_name,
        )
    if not query or not tested:
        return pd.DataFrame(columns=ORA_COLUMNS)
    rank = {gene: i for i, gene in enumerate(query)}
    terms = list(tested)
    overlaps = [
        sorted((gene for gene in tested[term] if gene in rank), key=rank.__getitem__)
        for term in terms
    ]
    k = np.array([len(hits) for hits in overlaps])
    set_sizes = np.array([len(tested[term]) for term in terms])
    p = hypergeom.sf(k - 1, len(members), set_sizes, len(query))
    table = pd.DataFrame(
        {
            "library": library_name,
            "term": terms,
            "overlap": k,
            "set_size": set_sizes,
            "query_size": len(query),
            "p": p,
            "fdr": benjamini_hochberg(p),
            "genes": [",".join(hits) for hits in overlaps],
        }
    )
    return table[table["overlap"] > 0].sort_values(["p", "term"], ignore_index=True)
