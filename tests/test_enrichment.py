"""Pathway enrichment: BH, hypergeometric over-representation, the query table, ranked GSEA."""

from __future__ import annotations

from math import comb

import numpy as np
import pandas as pd
import pytest

from melvae.analyze.enrichment import (
    ORA_COLUMNS,
    benjamini_hochberg,
    enrich_table,
    over_representation,
    ranked_enrichment,
)
from melvae.analyze.genesets import GeneSetLibrary, load_library
from melvae.errors import InputError

BACKGROUND = [f"G{i}" for i in range(20)]


@pytest.fixture(scope="module")
def kegg() -> GeneSetLibrary:
    return load_library("kegg")


@pytest.fixture(scope="module")
def kegg_background(kegg) -> list[str]:
    """A model-like background: 3,000 KEGG genes plus 1,000 genes in no KEGG set."""
    genes = sorted({gene for genes in kegg.sets.values() for gene in genes})
    rng = np.random.default_rng(0)
    return [*rng.choice(genes, 3000, replace=False), *(f"NOVEL{i}" for i in range(1000))]


def test_benjamini_hochberg_matches_hand_computed_values():
    # m = 8; p*m/rank = .008 .032 .104 .082 .0672 .08 .0846 .205, then the running minimum
    # from the largest p downwards makes the adjusted values monotone.
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205])
    expected = [0.008, 0.032, 0.0672, 0.0672, 0.0672, 0.08, 0.074 * 8 / 7, 0.205]
    np.testing.assert_allclose(benjamini_hochberg(p), expected)
    # input order is kept, and adjusted values are capped at 1
    np.testing.assert_allclose(benjamini_hochberg(np.array([0.04, 0.01, 0.9])), [0.06, 0.03, 0.9])
    np.testing.assert_allclose(benjamini_hochberg(np.array([0.6, 0.7])), [0.7, 0.7])
    assert benjamini_hochberg(np.array([])).shape == (0,)


def test_over_representation_hand_computed_hypergeometric():
    library = GeneSetLibrary(
        name="toy",
        sets={
            # 5 genes in the background (+ 2 outside it, which must not count)
            "hit": ("G0", "G1", "G2", "G3", "G4", "OUT1", "OUT2"),
            "other": ("G10", "G11", "G12", "G13", "G14", "G15"),
            "small": ("G5", "G6", "G7", "G8", "OUT3"),  # 4 in background < min_size
            "missed": ("G16", "G17", "G18", "G19", "G9"),  # tested, no overlap
        },
    )
    query = ["G2", "G0", "G1", "G5", "NOT_IN_BACKGROUND"]
    result = over_representation(query, library, BACKGROUND)

    assert list(result.columns) == ORA_COLUMNS
    assert list(result["term"]) == ["hit"]  # "small" untested, zero-overlap sets not listed
    row = result.iloc[0]
    assert (row["overlap"], row["set_size"], row["query_size"]) == (3, 5, 4)
    # P(X >= 3) for X ~ Hypergeometric(N=20, K=5, n=4)
    p = (comb(5, 3) * comb(15, 1) + comb(5, 4)) / comb(20, 4)
    assert row["p"] == pytest.approx(p)
    # BH over the 3 tested sets: the other two have p = 1
    assert row["fdr"] == pytest.approx(3 * p)
    assert row["genes"] == "G2,G0,G1"  # query order


def test_over_representation_max_size_excludes_large_sets():
    library = GeneSetLibrary(name="toy", sets={"big": tuple(BACKGROUND[:12])})
    assert over_representation(BACKGROUND[:6], library, BACKGROUND, max_size=11).empty
    assert len(over_representation(BACKGROUND[:6], library, BACKGROUND, max_size=12)) == 1


def test_planted_pathway_ranks_first(kegg, kegg_background):
    term = "Glycolysis / Gluconeogenesis"
    members = [gene for gene in kegg.sets[term] if gene in set(kegg_background)]
    rng = np.random.default_rng(1)
    noise = list(rng.choice(kegg_background, 60, replace=False))
    result = over_representation(members + noise, kegg, kegg_background)
    assert result.iloc[0]["term"] == term
    assert result.iloc[0]["fdr"] < 1e-6
    assert (result["p"].diff().dropna() >= 0).all()


def test_random_query_finds_nothing(kegg, kegg_background):
    rng = np.random.default_rng(2)
    query = list(rng.choice(kegg_background, 150, replace=False))
    result = over_representation(query, kegg, kegg_background)
    assert not result.empty
    assert (result["fdr"] >= 0.05).all()


def test_no_shared_genes_is_an_identifier_error():
    library = GeneSetLibrary(name="symbols", sets={"T cells": ("CD8A", "CD3E", "GZMB")})
    background = ["ENSG00000153563", "ENSG00000198851"]
    with pytest.raises(InputError) as info:
        over_representation(background, library, background)
    message = str(info.value)
    for needle in ("symbols", "3 genes", "CD8A", "ENSG00000153563", "Ensembl", "species"):
        assert needle in message


def test_enrich_table_concatenates_named_queries(kegg, kegg_background):
    toy = GeneSetLibrary(name="toy", sets={"first": tuple(kegg_background[:10])})
    queries = {"dim3:up": kegg_background[:8], "dim3:down": kegg_background[500:540], "e": []}
    table = enrich_table(queries, [kegg, toy], kegg_background)

    assert list(table.columns) == ["query", *ORA_COLUMNS]
    assert set(table["query"]) == {"dim3:up", "dim3:down"}  # the empty query adds no rows
    for library in (kegg, toy):
        for name, genes in queries.items():
            part = table[(table["query"] == name) & (table["library"] == library.name)]
            alone = over_representation(genes, library, kegg_background)
            pd.testing.assert_frame_equal(
                part.drop(columns="query").reset_index(drop=True), alone, check_dtype=False
            )


def test_ranked_enrichment_finds_both_ends():
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(1000)]
    scores = pd.Series(rng.normal(size=1000), index=genes)
    scores.iloc[:20] += 3.0  # G0..G19 at the top
    scores.iloc[20:40] -= 3.0  # G20..G39 at the bottom
    sets = {"up": tuple(genes[:20]), "down": tuple(genes[20:40])}
    for i in range(6):
        sets[f"random{i}"] = tuple(rng.choice(genes[40:], 20, replace=False))
    library = GeneSetLibrary(name="toy", sets=sets)

    result = ranked_enrichment(scores, library, permutations=200)
    assert list(result.columns) == [
        "library",
        "term",
        "set_size",
        "nes",
        "p",
        "fdr",
        "leading_edge",
    ]
    by_term = result.set_index("term")
    assert set(result["term"][:2]) == {"up", "down"}
    assert by_term.loc["up", "nes"] > 0 > by_term.loc["down", "nes"]
    assert by_term.loc[["up", "down"], "fdr"].max() < 0.01
    up_edge = by_term.loc["up", "leading_edge"].split(",")
    assert set(up_edge) <= set(sets["up"])
    assert up_edge[0] == scores[list(sets["up"])].idxmax()  # most extreme gene first


def test_ranked_enrichment_rejects_missing_scores():
    scores = pd.Series([1.0, np.nan, 0.5], index=["CD8A", "CD3E", "GZMB"])
    library = GeneSetLibrary(name="toy", sets={"t": ("CD8A", "CD3E", "GZMB")})
    with pytest.raises(InputError, match="non-finite"):
        ranked_enrichment(scores, library)


def _toy_ranked() -> tuple[pd.Series, GeneSetLibrary]:
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(600)]
    scores = pd.Series(np.linspace(3, -3, 600) + rng.normal(0, 0.01, 600), index=genes)
    sets = {"top": tuple(genes[:15]), "bottom": tuple(genes[-15:])}
    for i in range(4):
        sets[f"random{i}"] = tuple(rng.choice(genes[20:-20], 15, replace=False))
    return scores, GeneSetLibrary(name="toy", sets=sets)


def test_ranked_enrichment_is_identical_for_a_seed_and_leaves_numpy_alone():
    scores, library = _toy_ranked()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = ranked_enrichment(scores, library, permutations=200, seed=5)
    assert np.array_equal(np.random.get_state()[1], before), "global generator restored"
    again = ranked_enrichment(scores, library, permutations=200, seed=5)
    pd.testing.assert_frame_equal(first, again)
    other = ranked_enrichment(scores, library, permutations=200, seed=6)
    assert not np.allclose(first["p"], other["p"]), "the seed does drive the null"


def test_ranked_leading_edge_includes_the_peak_gene():
    scores, library = _toy_ranked()
    by_term = ranked_enrichment(scores, library, permutations=200).set_index("term")
    # The set is the 15 top-ranked genes: the running sum peaks at the last of them, so the
    # leading edge is the whole set (blitzgsea alone stops one short and drops that gene).
    assert set(by_term.loc["top", "leading_edge"].split(",")) == set(library.sets["top"])
    assert set(by_term.loc["bottom", "leading_edge"].split(",")) == set(library.sets["bottom"])
