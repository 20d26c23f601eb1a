"""`python -m melvae.analyze`: the champion of a real (offline) study, analysed end to end."""

from __future__ import annotations

import json

import anndata as ad
import mlflow
import pandas as pd
import pytest

from melvae.analyze.__main__ import main
from melvae.analyze.pipeline import default_cells
from melvae.data.datasets import file_record, load_dataset
from melvae.register import load_model
from melvae.study.__main__ import main as study_main
from melvae.study.config import load_study_config
from melvae.study.runner import run_study
from tests.test_study import _offline, _quick_config

OUTPUTS = {
    "report.html",
    "transfer.tsv",
    "transfer_metrics.json",
    "latent_genes.tsv",
    "enrichment.tsv",
    "confusion_matrix.png",
    "latent_genes_heatmap.png",
    "enrichment_dotplot.png",
    "tsne.png",
}
KEGG = ["--genesets", "kegg"]  # ships inside blitzgsea: no network needed


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A one-trial default study on the offline PBMC fallback, its model registered."""
    workdir = tmp_path_factory.mktemp("analysis")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _offline(monkeypatch, workdir)
        config = load_study_config(_quick_config(workdir))
        outcome = run_study(config, n_trials=1, epochs_cap=40, progress=False)
        assert outcome.registration is not None
        yield workdir, monkeypatch


def test_analysis_of_the_champion_writes_every_output_and_one_mlflow_run(champion, capsys):
    workdir, _ = champion
    out = workdir / "out"
    assert main([*KEGG, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= OUTPUTS

    metrics = json.loads((out / "transfer_metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1
    assert 0 <= metrics["macro_f1"] <= 1
    assert set(metrics["unassigned_rate_by_label"]) == set(metrics["n_by_label"])
    assert "transfer:" in capsys.readouterr().out

    transfer = pd.read_csv(out / "transfer.tsv", sep="\t", index_col=0)
    assert {"predicted", "confidence"} <= set(transfer.columns)
    assert transfer["confidence"].between(0, 1).all()
    enrichment = pd.read_csv(out / "enrichment.tsv", sep="\t")
    assert {"query", "library", "term", "overlap", "p", "fdr", "genes"} <= set(enrichment.columns)
    assert enrichment["query"].str.match(r"z\d+:(?:up|down)$").any()
    assert enrichment["query"].str.endswith(":markers").any()
    report = (out / "report.html").read_text()
    assert report.count("<img") >= 4
    assert "Cell-type transfer" in report

    client = mlflow.MlflowClient()
    champion_version = client.get_model_version_by_alias("melvae-pbmc68k_reduced", "champion")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.role = 'analysis'")
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["tags.model_uri"] == "models:/melvae-pbmc68k_reduced@champion"
    assert run["tags.model_version"] == str(champion_version.version)
    assert run["tags.trained_by_run"] == champion_version.tags["run_id"]
    logged = {a.path for a in client.list_artifacts(run["run_id"])}
    assert logged >= OUTPUTS


def test_a_query_without_labels_still_gets_predictions(champion, tmp_path):
    cells = load_dataset("pbmc68k_reduced").adata[:80].copy()
    del cells.obs["cell_type"]
    query = tmp_path / "unlabelled.h5ad"
    cells.write_h5ad(query)
    out = tmp_path / "out"
    assert main([*KEGG, "--query", str(query), "--out", str(out)]) == 0
    assert "skipped" in json.loads((out / "transfer_metrics.json").read_text())
    transfer = pd.read_csv(out / "transfer.tsv", sep="\t", index_col=0)
    assert len(transfer) == 80
    assert "confusion_matrix.png" not in {p.name for p in out.iterdir()}


def test_bad_inputs_fail_clearly_and_leave_no_output(champion, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", "models:/melvae-nothing@champion", "--out", str(out)]) == 2
    assert "could not be loaded" in capsys.readouterr().err

    mouse = tmp_path / "mouse.gmt"
    mouse.write_text("Mouse set\tdesc\tCd3e\tCd8a\tGzmb\tNkg7\tMs4a1\n")
    assert main(["--genesets", str(mouse), "--out", str(out)]) == 2
    assert "shares no gene" in capsys.readouterr().err

    cells = load_dataset("pbmc68k_reduced").adata
    few_genes = ad.AnnData(cells[:50, :20].X, obs=cells.obs[:50], var=cells.var[:20])
    query = tmp_path / "few_genes.h5ad"
    few_genes.write_h5ad(query)
    assert main(["--genesets", "kegg", "--query", str(query), "--out", str(out)]) == 2
    assert "genes were found in the input" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_reactome_from_the_shared_gmt(champion, shared_data, tmp_path):
    reactome = shared_data / "genesets" / "reactome_human.gmt"
    out = tmp_path / "out"
    assert main(["--genesets", str(reactome), "kegg", "--out", str(out)]) == 0
    enrichment = pd.read_csv(out / "enrichment.tsv", sep="\t")
    assert set(enrichment["library"]) == {"reactome_human", "KEGG_2021_Human"}


def test_the_split_comes_from_the_models_stored_origin_and_a_model_without_one_is_refused(
    champion, tmp_path, capsys
):
    model = load_model("models:/melvae-pbmc68k_reduced@champion")
    assert model.origin["dataset"] == "pbmc68k_reduced"
    reference, query, key = default_cells(model, "champion")
    assert (reference.n_obs, query.n_obs, key) == (490, 105, "cell_type")

    # An origin naming another split seed gives other cells: the split is read, not rebuilt.
    model.origin = {**model.origin, "split": {**model.origin["split"], "seed": 1}}
    other, _, _ = default_cells(model, "champion")
    assert set(other.obs_names) != set(reference.obs_names)

    for origin, message in (
        (None, "has no stored origin"),
        ({**model.origin, "dataset": "toy"}, "'toy', which is not a dataset melvae can load"),
    ):
        model.origin = origin
        folder = model.save(tmp_path / f"model-{origin is None}")
        out = tmp_path / "out"
        assert main([*KEGG, "--model", str(folder), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "--reference and --query" in err
        assert not out.exists()


def test_a_model_trained_on_a_file_finds_that_file_again_and_refuses_it_changed(
    tmp_path, monkeypatch, capsys
):
    _offline(monkeypatch, tmp_path)
    cells = tmp_path / "my cells.h5ad"
    load_dataset("pbmc68k_reduced").adata[:400].write_h5ad(cells)
    argv = ["run", "--data", str(cells), "--n-trials", "1", "--epochs", "2", "--quiet"]
    assert study_main(argv) == 0
    model_uri = "models:/melvae-my cells@champion"
    model = load_model(model_uri)
    assert model.origin["file"] == file_record(cells)

    # No --reference / --query: the study's own split of the file it was trained on.
    reference, query, key = default_cells(model, model_uri)
    assert key == "cell_type" and reference.n_obs + query.n_obs < 400
    assert set(reference.obs_names).isdisjoint(query.obs_names)
    out = tmp_path / "out"
    assert main([*KEGG, "--model", model_uri, "--out", str(out)]) == 0
    assert len(pd.read_csv(out / "transfer.tsv", sep="\t")) == query.n_obs

    # The same name, other cells: refused, not analysed as if they were the training data.
    load_dataset("pbmc68k_reduced").adata[300:].write_h5ad(cells)
    again = tmp_path / "again"
    assert main([*KEGG, "--model", model_uri, "--out", str(again)]) == 2
    err = capsys.readouterr().err
    assert "has changed since" in err and "--reference and --query" in err
    cells.unlink()
    assert main([*KEGG, "--model", model_uri, "--out", str(again)]) == 2
    assert "is gone" in capsys.readouterr().err
    assert not again.exists()
