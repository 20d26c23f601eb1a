"""Baselines in every study: PCA and the original study's experiments, scored like the champion.

Each `run` scores the three documented experiments trained to the end (no pruning) and PCA with
the champion's latent size and with 10 components, on the same split and preprocessing as the
trials, with the same metric names: validation metrics, the selection score
(`bio_*`), and held-out `test_*` metrics. Each is an MLflow run of its own tagged `baseline`, and
the parent run gets the champion's margin over the best baseline per test metric, so a user sees
at a glance whether the VAE earned its keep. A documented experiment that the study already ran
to completion as a seed trial with the same epoch budget is reloaded from that trial rather than
trained again (the run is tagged `reused_trial`); PCA is fitted on the same bounded, stratified
subsample of training cells as the metrics (`metric_cells`), so it never densifies an atlas.

Data with a batch key (patients, samples) also get two standard batch corrections, so the margin
table says whether the VAE mixes patients better than they do: PCA after ComBat
(`scanpy.pp.combat`) and Harmony (harmonypy) on PCA, with the champion's latent size and 10
components. Both are transductive: they estimate each batch's shift from the cells being
corrected and cannot map a new cell on their own. Each is therefore run once on the study's
(bounded) training, validation and test cells together, as integrations are used in practice;
PCA is fitted on the training cells only (after ComBat, or before Harmony), and the k-NN of the
metrics on the training cells as for every model. So the held-out cells' expression (never their
labels) shapes their own correction, an advantage a VAE that encodes one cell at a time does not
get.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import harmonypy
import numpy as np
import optuna
import pandas as pd
import scanpy as sc
from sklearn.decomposition import PCA

from melvae import track
from melvae.data.loader import dense
from melvae.errors import InputError
from melvae.faultpoint import stop_point
from melvae.preprocess import Preprocessor, align_genes
from melvae.register import load_model
from melvae.study.config import StudyConfig
from melvae.study.objective import EPOCHS_ATTR, SPLITS, PreparedData, fit_with_params
from melvae.study.scoring import Embedding, SplitScores, metric_cells

PCA_SIZES = (10,)  # besides the champion's own latent size
LOWER_IS_BETTER = {"davies_bouldin"}


def _prepared(preprocessor: Preprocessor, adata: ad.AnnData) -> np.ndarray:
    """The cells' preprocessed matrix, dense float64, in the training genes' order."""
    matrix, _ = align_genes(adata, preprocessor.genes)
    x = preprocessor.transform_matrix(matrix)
    return dense(x).astype(np.float64)


class PCAEmbedding:
    """PCA fitted on the preprocessed training cells; encodes and reconstructs like a MelVAE."""

    def __init__(self, preprocessor: Preprocessor, train: ad.AnnData, n_components: int) -> None:
        self.preprocessor = preprocessor
        x = _prepared(preprocessor, train)
        self.pca = PCA(n_components=min(n_components, *x.shape), random_state=0).fit(x)

    def encode(self, adata: ad.AnnData) -> np.ndarray:
        return self.pca.transform(_prepared(self.preprocessor, adata))

    def encode_and_reconstruct(
        self, adata: ad.AnnData
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = _prepared(self.preprocessor, adata)
        latent = self.pca.transform(x)
        return latent, x, self.pca.inverse_transform(latent)


BATCH_CORRECTIONS = ("combat-pca", "harmony")


def _combat(x: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """ComBat-corrected copy of a cells × genes matrix (scanpy.pp.combat)."""
    with warnings.catch_warnings():
        # A gene constant within a batch divides by zero in ComBat's convergence check only.
        warnings.filterwarnings("ignore", "divide by zero", RuntimeWarning)
        warnings.filterwarnings("ignore", "invalid value", RuntimeWarning)
        corrected = sc.pp.combat(ad.AnnData(x, obs={"batch": batches}), "batch", inplace=False)
    if not np.isfinite(corrected).all():
        raise InputError(
            "ComBat produced NaN values",
            where="baseline combat-pca",
            fix="every batch needs at least two cells with varying expression",
        )
    return np.asarray(corrected)


def _harmony(coordinates: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """Harmony-corrected copy of PCA coordinates (harmonypy, fixed seed)."""
    harmony = harmonypy.run_harmony(
        coordinates, pd.DataFrame({"batch": batches}), ["batch"], verbose=False, random_state=0
    )
    return np.asarray(harmony.Z_corr)


class BatchCorrectedEmbedding:
    """PCA after ComBat (`method` "combat-pca") or Harmony on PCA ("harmony"), run once on all
    the cells it will encode (transductive, see the module docstring); PCA is fitted on the
    training cells among them.

    Parameters
    ----------
    preprocessor
        The study's training-split preprocessing.
    cells
        Every cell to correct and encode (training and held-out), each once.
    training
        Mask of `cells` that the PCA is fitted on (the training cells).
    batch_key
        The obs column naming each cell's batch.
    n_components
        PCA components (the latent size).
    method
        One of `BATCH_CORRECTIONS`.
    """

    def __init__(
        self,
        preprocessor: Preprocessor,
        cells: ad.AnnData,
        training: np.ndarray,
        batch_key: str,
        n_components: int,
        method: str,
    ) -> None:
        self.names = cells.obs_names
        x = _prepared(preprocessor, cells)
        batches = cells.obs[batch_key].astype(str).to_numpy()
        pca = PCA(n_components=min(n_components, x.shape[1], int(training.sum())), random_state=0)
        if method == "combat-pca":
            corrected = _combat(x, batches)
            self.latent = pca.fit(corrected[training]).transform(corrected)
        else:
            self.latent = _harmony(pca.fit(x[training]).transform(x), batches)
        self.x, self.pca = x, pca

    def _rows(self, adata: ad.AnnData) -> np.ndarray:
        rows = self.names.get_indexer(adata.obs_names)
        if (rows < 0).any():
            raise InputError(
                f"{int((rows < 0).sum())} of the cells were not among those the batch "
                "correction was run on",
                where="baseline batch correction",
                fix="ComBat and Harmony are transductive: build the baseline with every cell "
                "it is to encode",
            )
        return rows

    def encode(self, adata: ad.AnnData) -> np.ndarray:
        return self.latent[self._rows(adata)]

    def encode_and_reconstruct(
        self, adata: ad.AnnData
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The latent, the uncorrected input and the PCA reconstruction of the latent (which
        lacks the batch shift the correction removed)."""
        rows = self._rows(adata)
        latent = self.latent[rows]
        return latent, self.x[rows], self.pca.inverse_transform(latent)


def score(model: Embedding, data: PreparedData) -> dict[str, float]:
    """Validation metrics, selection score, batch metrics and held-out test_* metrics, as trials
    log them."""
    scores = SplitScores(model, data)
    return scores.final("val") | scores.bio() | scores.batch("val") | scores.test()


@dataclass(frozen=True)
class Baseline:
    """One baseline: a name, what it is, and how to build its embedding."""

    name: str
    params: dict[str, object]


def baselines_for(
    config: StudyConfig, latent_dim: int, *, batch_key: str | None = None
) -> list[Baseline]:
    """PCA with the champion's latent size and 10, then (with a batch key) ComBat + PCA and
    Harmony with the same sizes, then the study's documented experiments."""
    sizes = sorted({latent_dim, *PCA_SIZES})
    pcas = [Baseline(f"pca-{n}", {"method": "pca", "n_components": n}) for n in sizes]
    corrections = [
        Baseline(f"{method}-{n}", {"method": method, "n_components": n})
        for method in (BATCH_CORRECTIONS if batch_key is not None else ())
        for n in sizes
    ]
    experiments = [
        Baseline(f"experiment-{i + 1}", {"method": "vae", **config.fixed_params(), **seed})
        for i, seed in enumerate(config.seed_trials)
    ]
    return pcas + corrections + experiments


def build(
    baseline: Baseline,
    config: StudyConfig,
    data: PreparedData,
    *,
    epochs_cap: int | None,
    progress: bool,
) -> Embedding:
    """Fit the baseline on the study's training split."""
    params = dict(baseline.params)
    method = params.pop("method")
    if method == "pca":
        cells, _ = metric_cells(data, "train")
        return PCAEmbedding(data.preprocessor, cells, int(params["n_components"]))
    if method in BATCH_CORRECTIONS:
        splits = [metric_cells(data, split)[0] for split in SPLITS]
        training = np.arange(sum(cells.n_obs for cells in splits)) < splits[0].n_obs
        return BatchCorrectedEmbedding(
            data.preprocessor,
            ad.concat(splits),
            training,
            str(data.batch_key),
            int(params["n_components"]),
            method,
        )
    if epochs_cap is not None:
        params["epochs"] = min(int(params["epochs"]), epochs_cap)
    return fit_with_params(config, data, params, progress=progress)


def run_baselines(
    config: StudyConfig,
    data: PreparedData,
    champion: optuna.trial.FrozenTrial,
    *,
    experiment_id: str,
    tracking_uri: str,
    completed: Sequence[optuna.trial.FrozenTrial] = (),
    epochs_cap: int | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Fit (or reload from `completed` trials), score and log every baseline as a nested run
    tagged `baseline`; name -> metrics."""
    latent_dim = int(champion.params.get("latent_dim", config.architecture["latent_dim"]))
    results = {}
    tags = {"baseline": "true", track.ROLE: track.BASELINE_ROLE, "dataset": data.dataset_key}
    for baseline in baselines_for(config, latent_dim, batch_key=data.batch_key):
        run_name = f"baseline-{baseline.name}"
        with track.nested_run(experiment_id, run_name=run_name, tags=tags):
            track.log_params(baseline.params)
            stop_point("baseline")
            trained = trained_as_trial(baseline, completed, epochs_cap)
            if trained is None:
                model = build(baseline, config, data, epochs_cap=epochs_cap, progress=progress)
            else:
                track.log_tags({"reused_trial": trained.number})
                model = load_model(trained.user_attrs["model_uri"], tracking_uri=tracking_uri)
            results[baseline.name] = score(model, data)
            track.log_metrics(results[baseline.name])
    return results


def trained_as_trial(
    baseline: Baseline, completed: Sequence[optuna.trial.FrozenTrial], epochs_cap: int | None
) -> optuna.trial.FrozenTrial | None:
    """The completed seed trial that trained exactly this documented experiment with the epoch
    budget the baseline would get now, if the study has one."""
    if baseline.params["method"] != "vae":
        return None
    epochs = int(baseline.params["epochs"])
    epochs = epochs if epochs_cap is None else min(epochs, epochs_cap)
    for trial in completed:
        same = all(baseline.params.get(name) == value for name, value in trial.params.items())
        if (
            trial.user_attrs.get("seed_trial")
            and trial.user_attrs.get(EPOCHS_ATTR) == epochs
            and same
        ):
            return trial
    return None


def margins_over_best(
    champion: dict[str, float], baselines: dict[str, dict[str, float]]
) -> dict[str, float]:
    """margin_<metric>: champion minus the best baseline on each test metric, signed so that
    a positive margin means the champion is better (Davies-Bouldin: lower is better)."""
    margins = {}
    for name, value in champion.items():
        others = [scores[name] for scores in baselines.values() if name in scores]
        if not others:
            continue
        lower = name.removeprefix("test_") in LOWER_IS_BETTER
        best = min(others) if lower else max(others)
        margins[f"margin_{name}"] = best - value if lower else value - best
    return margins


def comparison_table(
    champion: dict[str, float], baselines: dict[str, dict[str, float]]
) -> pd.DataFrame:
    """Rows champion, each baseline and the margin; columns the test metrics."""
    rows = {"champion": champion} | baselines
    table = pd.DataFrame.from_dict(rows, orient="index")
    margins = margins_over_best(champion, baselines)
    table.loc["margin (champion - best baseline)"] = {
        name.removeprefix("margin_"): value for name, value in margins.items()
    }
    return table[[c for c in table.columns if c.startswith("test_")]]
