"""What latent dimensions carry: decoder response, correlation, top genes, dimension ends."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from melvae.analyze.enrichment import enrich_table
from melvae.analyze.genesets import load_library
from melvae.analyze.interpret import (
    decoder_response,
    dimension_ends,
    latent_correlation,
    top_genes,
)
from melvae.errors import InputError
from melvae.model import MelVAE
from melvae.module import VAEModule
from melvae.preprocess import PreprocessConfig, Preprocessor, split_cells
from melvae.train import TrainConfig

SHARED = Path(__file__).parents[2] / "shared" / "data"
GENES = ["UP0", "DOWN1", "FLAT"]


def tiny_model(likelihood: str = "gaussian") -> MelVAE:
    """A 3-gene, 2-dimension model whose decoder is known: gene 0 = 2·z0, gene 1 = −3·z1.

    The hidden layer is the identity shifted by +10, so the ReLU stays linear near the data.
    """
    module = VAEModule(n_genes=3, hidden_dim=2, latent_dim=2, likelihood=likelihood)
    with torch.no_grad():
        first, last = module.decoder[0], module.decoder[2]
        first.weight.copy_(torch.eye(2))
        first.bias.fill_(10.0)
        last.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, -3.0], [0.0, 0.0]]))
        last.bias.copy_(torch.tensor([-20.0, 30.0, 0.0]))
    preprocessor = Preprocessor(GENES, "minmax", offset=np.zeros(3), scale=np.ones(3))
    hyperparameters = {"n_genes": 3, "hidden_dim": 2, "latent_dim": 2, "likelihood": likelihood}
    return MelVAE(module, preprocessor, hyperparameters=hyperparameters)


def tiny_cells(n: int = 40) -> ad.AnnData:
    rng = np.random.default_rng(0)
    return ad.AnnData(rng.uniform(size=(n, 3)).astype(np.float32), var=pd.DataFrame(index=GENES))


def test_decoder_response_recovers_a_known_linear_decoder() -> None:
    response = decoder_response(tiny_model(), tiny_cells(), shift=0.5, batch_size=7)
    assert list(response.index) == GENES
    assert list(response.columns) == ["z0", "z1"]
    expected = [[2.0, 0.0], [0.0, -3.0], [0.0, 0.0]]
    np.testing.assert_allclose(response.to_numpy(), expected, atol=1e-5)


def test_decoder_response_sign_follows_the_gene_through_a_sigmoid() -> None:
    response = decoder_response(tiny_model("bernoulli"), tiny_cells())
    assert response.shape == (3, 2)
    assert response.loc["UP0", "z0"] > 0
    assert response.loc["DOWN1", "z1"] < 0
    assert response.loc["FLAT"].abs().max() < 1e-6
    assert response.loc["UP0", "z1"] == pytest.approx(0, abs=1e-6)


def test_decoder_response_refuses_a_non_positive_shift() -> None:
    with pytest.raises(InputError, match="shift"):
        decoder_response(tiny_model(), tiny_cells(), shift=0)


@pytest.mark.parametrize("to_sparse", [False, True])
def test_latent_correlation_matches_numpy(to_sparse: bool) -> None:
    rng = np.random.default_rng(1)
    latent = rng.normal(size=(60, 3))
    expression = rng.poisson(2.0, size=(60, 5)).astype(np.float32)
    expression[:, 2] += 3 * latent[:, 1]  # one real dependency
    genes = [f"g{i}" for i in range(5)]
    matrix = sp.csr_matrix(expression) if to_sparse else expression
    table = latent_correlation(latent, matrix, genes)
    expected = np.corrcoef(expression.T, latent.T)[:5, 5:]
    np.testing.assert_allclose(table.to_numpy(), expected, atol=1e-6)
    assert list(table.index) == genes
    assert table.loc["g2", "z1"] > 0.5


def test_latent_correlation_is_nan_for_a_constant_gene_and_checks_shapes() -> None:
    latent = np.arange(10, dtype=float).reshape(5, 2) ** 2
    expression = np.column_stack([np.ones(5), np.arange(5.0)])
    table = latent_correlation(latent, expression, ["const", "rising"])
    assert table.loc["const"].isna().all()
    assert (table.loc["rising"] > 0.9).all()
    with pytest.raises(InputError, match="expected"):
        latent_correlation(latent, expression, ["only_one"])


def test_top_genes_lists_each_sign_in_order() -> None:
    table = pd.DataFrame(
        {"z0": [3.0, -1.0, 2.0, -5.0, np.nan], "z1": [0.1, 0.2, 0.3, 0.4, 0.5]},
        index=["a", "b", "c", "d", "e"],
    )
    top = top_genes(table, n=2)
    assert top["z0"] == {"up": ["a", "c"], "down": ["d", "b"]}
    assert top["z1"] == {"up": ["e", "d"], "down": []}


def test_dimension_ends_shows_which_types_sit_at_each_end() -> None:
    labels = np.array(["T"] * 10 + ["B"] * 10 + ["NK"] * 10 + [None] * 5, dtype=object)
    rng = np.random.default_rng(0)
    z0 = np.r_[rng.uniform(-2, -1, 10), rng.uniform(1, 2, 10), rng.uniform(-0.5, 0.5, 10)]
    latent = np.column_stack([np.r_[z0, [-9.0] * 5], rng.normal(size=35)])
    ends = dimension_ends(latent, labels, quantile=0.2)
    assert list(ends.index) == [("z0", "low"), ("z0", "high"), ("z1", "low"), ("z1", "high")]
    assert list(ends.columns) == ["B", "NK", "T"]
    np.testing.assert_allclose(ends.sum(axis=1), 1.0)
    assert ends.loc[("z0", "low"), "T"] == 1.0  # unlabelled cells at -9 are left out
    assert ends.loc[("z0", "high"), "B"] == 1.0


def test_dimension_ends_refuses_bad_input() -> None:
    with pytest.raises(InputError, match="quantile"):
        dimension_ends(np.zeros((4, 2)), ["a", "b", "a", "b"], quantile=0.8)
    with pytest.raises(InputError, match="labels were given"):
        dimension_ends(np.zeros((4, 2)), ["a", "b"])


# --- real data: melanoma tumour-infiltrating T cells (Sade-Feldman 2018) -------------------

# Immune pathways a T-cell latent should recover, named as in the shared Reactome and KEGG
# GMTs. In the top 10 (FDR < 0.05) of some dimension for training seeds 0-2: KEGG "Antigen
# processing and presentation" (every seed, FDR 5e-3 to 2e-11), "Natural killer cell mediated
# cytotoxicity"; Reactome "TCR signaling", "Downstream TCR signaling", "PD-1 signaling",
# "Translocation of ZAP-70 to Immunological synapse". The rest are their close relatives.
IMMUNE_TERMS = {
    "Antigen processing and presentation",
    "Natural killer cell mediated cytotoxicity",
    "T cell receptor signaling pathway",
    "Th1 and Th2 cell differentiation",
    "TCR signaling",
    "Downstream TCR signaling",
    "PD-1 signaling",
    "Translocation of ZAP-70 to Immunological synapse",
    "Phosphorylation of CD3 and TCR zeta chains",
    "Costimulation by the CD28 family",
    "MHC class II antigen presentation",
    "Interferon gamma signaling",
    "Interferon alpha/beta signaling",
}


@pytest.fixture(scope="module")
def melanoma() -> tuple[MelVAE, ad.AnnData]:
    path = SHARED / "sadefeldman2018_gse120575_tcells_subset.h5ad"
    if not path.is_file():
        pytest.skip(f"shared data file {path} is not available")
    cells = ad.read_h5ad(path)
    split = split_cells(cells, "cell_type", val_fraction=0.15, test_fraction=0.0, seed=0)
    model = MelVAE.fit(
        cells[split["train"]],
        cells[split["val"]],
        preprocess=PreprocessConfig(n_top_genes=None),
        hidden_dim=64,
        latent_dim=6,
        train=TrainConfig(epochs=30, batch_size=64, early_stopping_patience=None, seed=0),
        label_key="cell_type",
        progress=False,
    )
    return model, cells


def test_melanoma_dimensions_carry_known_immune_pathways(melanoma) -> None:
    model, cells = melanoma
    libraries = [
        load_library(str(SHARED / "genesets" / "reactome_human.gmt")),
        load_library(str(SHARED / "genesets" / "kegg_2021_human.gmt")),
    ]
    genes = top_genes(decoder_response(model, cells), n=100)
    queries = {f"{dim}:{side}": lists[side] for dim, lists in genes.items() for side in lists}
    table = enrich_table(queries, libraries, model.genes)
    top = table.sort_values(["p", "term"]).groupby("query", sort=False).head(10).query("fdr < 0.05")
    found = top[top["term"].isin(IMMUNE_TERMS)]
    assert not found.empty, top[["query", "term", "fdr"]].to_string()


def test_melanoma_decoder_and_correlation_views_agree(melanoma) -> None:
    model, cells = melanoma
    response = decoder_response(model, cells)
    x, _ = model.reconstruct(cells)
    correlation = latent_correlation(model.encode(cells), x, model.genes)
    agree = []
    for dimension in response.columns:
        lists = top_genes(response[[dimension]], n=20)[dimension]
        agree += list(correlation.loc[lists["up"], dimension] > 0)
        agree += list(correlation.loc[lists["down"], dimension] < 0)
    # The genes the decoder moves up with a dimension are, in the data, mostly genes that rise
    # with it across cells (and the reverse for "down"). Single dimensions can differ, since
    # the correlation also follows other dimensions the cells' types share; pooled over all
    # dimensions the measured agreement is 0.80-0.96 (seeds 0-2).
    assert np.mean(agree) > 0.7
