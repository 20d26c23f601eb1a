"""Analysis figures: confusion matrix, latent-gene heatmap, enrichment dot plot, t-SNE panels."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import TwoSlopeNorm, to_rgba

from melvae.analyze import plot
from melvae.analyze.transfer import UNASSIGNED
from melvae.errors import InputError

matplotlib.use("Agg")  # no display in CI; the module itself never picks a backend


def titled_axes(fig) -> dict:
    """Plot panels by title (colour bars have none)."""
    return {ax.get_title(): ax for ax in fig.get_axes() if ax.get_title()}


def tick_texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


def test_confusion_matrix_rows_normalised_with_counts_and_unassigned_column(tmp_path) -> None:
    true = ["A"] * 4 + ["B"] * 3 + ["Neg"] * 2 + [None]
    predicted = ["A", "A", "A", UNASSIGNED, "B", "B", "A", UNASSIGNED, "B", "A"]
    fig = plot.confusion_matrix(true, predicted, classes=["A", "B", "C"])
    [ax] = [a for a in fig.get_axes() if a.get_images()]
    # Rows: reference classes present in the query, then labels the reference lacks.
    assert tick_texts(ax.get_yticklabels()) == ["A (4)", "B (3)", "Neg (2)"]
    assert tick_texts(ax.get_xticklabels()) == ["A", "B", "C", UNASSIGNED]
    fractions = np.asarray(ax.get_images()[0].get_array())
    expected = [[3 / 4, 0, 0, 1 / 4], [1 / 3, 2 / 3, 0, 0], [0, 1 / 2, 0, 1 / 2]]
    np.testing.assert_allclose(fractions, expected)
    written = {(t.get_position(), t.get_text()) for t in ax.texts}
    assert written == {
        ((0, 0), "3"),
        ((3, 0), "1"),
        ((0, 1), "1"),
        ((1, 1), "2"),
        ((1, 2), "1"),
        ((3, 2), "1"),
    }
    fig.savefig(tmp_path / "confusion.png")


def test_confusion_matrix_refuses_predictions_outside_the_classes() -> None:
    with pytest.raises(InputError, match="neither reference classes"):
        plot.confusion_matrix(["A", "B"], ["A", "Z"], classes=["A", "B"])
    with pytest.raises(InputError, match="no query cell has a true label"):
        plot.confusion_matrix([None, None], ["A", "B"], classes=["A", "B"])


def test_latent_gene_heatmap_shows_each_dimensions_strongest_genes(tmp_path) -> None:
    genes = [f"g{i}" for i in range(12)]
    table = pd.DataFrame(0.01, index=genes, columns=["z0", "z1", "z2"])
    table.loc[["g0", "g1", "g2"], "z0"] = [5.0, -4.0, 3.0]
    table.loc[["g3", "g4", "g0"], "z1"] = [-6.0, 2.5, 2.0]  # g0 also moves with z1
    table.loc[["g5", "g6", "g7"], "z2"] = [1.0, 0.9, -0.8]
    fig = plot.latent_gene_heatmap(table, n=3)
    [ax] = [a for a in fig.get_axes() if a.get_images()]
    # Each dimension's top genes by |value|, blocks in dimension order; g0 moves with both
    # z0 and z1, so it appears in both blocks.
    assert tick_texts(ax.get_yticklabels()) == [
        *["g0", "g1", "g2"],
        *["g3", "g4", "g0"],
        *["g5", "g6", "g7"],
    ]
    image = ax.get_images()[0]
    assert image.get_clim() == (-6.0, 6.0)  # centred at zero
    np.testing.assert_allclose(np.asarray(image.get_array())[0], table.loc["g0"])
    fig.savefig(tmp_path / "heatmap.png")
    with pytest.raises(InputError, match="n must be"):
        plot.latent_gene_heatmap(table, n=0)


def enrichment_rows() -> pd.DataFrame:
    rows = [
        # z0:up has many near-identical, extremely significant terms ...
        *[
            ("z0:up", "KEGG", f"ribosome-like {i}", 40, 1e-30 * (i + 1), 1e-28 * (i + 1))
            for i in range(30)
        ],
        # ... z10:up and z2:down have a few, weaker ones; z2:up nothing significant.
        ("z10:up", "Reactome", "TCR signaling", 8, 1e-6, 1e-4),
        ("z10:up", "Reactome", "PD-1 signaling", 4, 1e-5, 1e-3),
        ("z2:down", "KEGG", "Antigen processing and presentation", 12, 1e-8, 1e-6),
        ("z2:up", "KEGG", "Glycolysis", 2, 0.1, 0.4),
        ("z2:up", "Reactome", "TCR signaling", 3, 0.01, 0.2),
    ]
    frame = pd.DataFrame(rows, columns=["query", "library", "term", "overlap", "p", "fdr"])
    return frame.assign(set_size=50, query_size=100, genes="")


def test_enrichment_dotplot_gives_every_query_its_best_terms(tmp_path) -> None:
    fig = plot.enrichment_dotplot(enrichment_rows(), n_terms=6)
    [ax] = titled_axes(fig).values()
    terms = tick_texts(ax.get_yticklabels())
    assert len(terms) == 6
    assert "TCR signaling [Reactome]" in terms
    assert "PD-1 signaling [Reactome]" in terms
    assert "Antigen processing and presentation [KEGG]" in terms
    assert sum(t.startswith("ribosome-like") for t in terms) == 3
    # Queries in dimension order, up before down; z2:up shows its (insignificant) TCR overlap.
    assert tick_texts(ax.get_xticklabels()) == ["z0:up", "z2:up", "z2:down", "z10:up"]
    dots = ax.collections[0]
    edges = dots.get_edgecolors()
    assert len(dots.get_offsets()) == 7  # 6 terms' best rows + the insignificant z2:up overlap
    assert sum(e[3] > 0 for e in edges) == 6  # rings only where FDR < 0.05
    sizes = dots.get_sizes()
    assert sizes.max() == pytest.approx(plot._dot_sizes(40)(40))
    fig.savefig(tmp_path / "dots.png")


def test_enrichment_dotplot_single_library_labels_and_empty_input() -> None:
    one_library = enrichment_rows().query("library == 'KEGG'")
    fig = plot.enrichment_dotplot(one_library, n_terms=2)
    [ax] = titled_axes(fig).values()
    assert tick_texts(ax.get_yticklabels()) == [
        "ribosome-like 0",
        "Antigen processing and presentation",
    ]
    empty = plot.enrichment_dotplot(enrichment_rows().iloc[:0])
    assert "No gene set" in empty.get_axes()[0].texts[0].get_text()
    with pytest.raises(InputError, match="lacks the columns"):
        plot.enrichment_dotplot(enrichment_rows().drop(columns="fdr"))


def test_tsne_panels_share_category_colours_and_map_numbers_continuously(tmp_path) -> None:
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(60, 2))
    true = np.array(["T", "B", "NK"] * 19 + [None] * 3, dtype=object)
    predicted = np.where(np.arange(60) % 5 == 0, UNASSIGNED, true).astype(object)
    predicted[-3:] = UNASSIGNED
    fig = plot.tsne_panels(
        coords,
        colour_by={
            "true label": true,
            "prediction": pd.Categorical(predicted),
            "z0": rng.normal(size=60),
            "confidence": rng.uniform(size=60),
        },
    )
    panels = titled_axes(fig)
    assert list(panels) == ["true label", "prediction", "z0", "confidence"]
    assert len(fig.get_axes()) == 2 * 3 + 2  # 2×3 grid (two empty) plus two colour bars

    def legend_colours(ax) -> dict[str, tuple]:
        legend = ax.get_legend()
        return {
            t.get_text().split(" (")[0]: to_rgba(h.get_color())
            for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)
        }

    true_colours = legend_colours(panels["true label"])
    predicted_colours = legend_colours(panels["prediction"])
    for cell_type in ("T", "B", "NK"):
        assert true_colours[cell_type] == predicted_colours[cell_type]
    assert predicted_colours[UNASSIGNED] == plot.UNASSIGNED_COLOUR
    assert true_colours["(no label)"] == plot.UNLABELLED_COLOUR
    assert tick_texts(panels["true label"].get_legend().get_texts()) == [
        "B (19)",
        "NK (19)",
        "T (19)",
        "(no label) (3)",
    ]
    z0 = panels["z0"].collections[0]
    assert isinstance(z0.norm, TwoSlopeNorm) and z0.norm.vcenter == 0  # signed: diverging
    assert not isinstance(panels["confidence"].collections[0].norm, TwoSlopeNorm)
    fig.savefig(tmp_path / "tsne.png")


def test_tsne_panels_refuse_mismatched_input() -> None:
    with pytest.raises(InputError, match="cells × 2"):
        plot.tsne_panels(np.zeros((5, 3)), colour_by={"x": np.zeros(5)})
    with pytest.raises(InputError, match="has 4 values for 5 cells"):
        plot.tsne_panels(np.zeros((5, 2)), colour_by={"x": np.zeros(4)})
    with pytest.raises(InputError, match="no colouring"):
        plot.tsne_panels(np.zeros((5, 2)), colour_by={})
