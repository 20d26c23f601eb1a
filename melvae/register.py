"""MLflow Model Registry: log a trained MelVAE, register it, promote a champion, load it back.

A trial logs only what reloading it needs (`log_trial_model`: the `MelVAE.save` folder and three
example cells, a plain file copy); the full MLflow model — pyfunc from code, signature, input
example, pinned requirements — is built once, when a trial is registered. MLflow's signature
machinery costs tens of seconds per model at 18,000 genes, which every trial used to pay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anndata as ad
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from melvae.errors import InputError
from melvae.faultpoint import stop_point
from melvae.model import MODEL_FILE, MelVAE
from melvae.study.storage import promotion_lock, sqlite_file_missing
from melvae.track import resolve_tracking_uri, use_backend

log = logging.getLogger(__name__)

CHAMPION = "champion"
_PACKAGE_DIR = Path(__file__).resolve().parent
_PINNED = ("torch", "numpy", "pandas", "scipy", "scikit-learn", "anndata", "mlflow")
TRIAL_MODEL_PATH = "melvae"  # a trial's model: runs:/<run id>/melvae
EXAMPLE_FILE = "input_example.json"
_TRIAL_URI_TAG = "trial_model_uri"
COMPLETE_TAG = "melvae_complete"  # written last: a version without it is incomplete


class MelVAEPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc flavour: a DataFrame of cells × genes (raw units, named columns) → latent means.

    Forgives like `MelVAE.embed`: any subset of the model's genes is accepted (every gene is an
    optional column of the signature), missing genes are filled with zeros and counted in a log
    line, genes the model does not know are ignored; too little overlap is refused with a short
    message (HTTP 400 when served).
    """

    def load_context(self, context: Any) -> None:
        self.model = MelVAE.load(Path(context.artifacts["melvae"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        cells = ad.AnnData(
            X=model_input.to_numpy(dtype=np.float32),
            obs=pd.DataFrame(index=model_input.index.astype(str)),
            var=pd.DataFrame(index=model_input.columns.astype(str)),
        )
        try:
            latent = self.model.encode(cells)
        except InputError as exc:
            raise MlflowException(exc.what, error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(
            latent,
            index=model_input.index,
            columns=[f"z{i}" for i in range(latent.shape[1])],
        )


def serving_signature(model: MelVAE, example: pd.DataFrame) -> ModelSignature:
    """Every gene an optional float column (so a request may carry any subset), latent out."""
    latent = model.encode(
        ad.AnnData(X=example.to_numpy(np.float32), var=pd.DataFrame(index=model.genes))
    )
    inputs = Schema([ColSpec("float", gene, required=False) for gene in model.genes])
    outputs = Schema([ColSpec("float", f"z{i}") for i in range(latent.shape[1])])
    return ModelSignature(inputs=inputs, outputs=outputs)


def model_name(dataset_key: str) -> str:
    """Registered-model name: one lineage of versions per dataset."""
    return f"melvae-{dataset_key}"


def pinned_requirements() -> list[str]:
    """Exact versions of what the model needs to load, as installed now (torch without +cpu)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in _PINNED]


def example_cells(model: MelVAE, cells: ad.AnnData, n: int = 3) -> pd.DataFrame:
    """The first `n` cells in the model's genes and raw units: the logged input example."""
    from melvae.data.backed import subset
    from melvae.data.loader import dense
    from melvae.preprocess import align_genes

    matrix, _ = align_genes(subset(cells, slice(0, n)), model.genes)
    return pd.DataFrame(dense(matrix), index=cells.obs_names[:n].astype(str), columns=model.genes)


def log_trial_model(model: MelVAE, example: ad.AnnData) -> str:
    """Log a trial's model cheaply into the active run; return its URI for `load_model`.

    The `MelVAE.save` folder (JSON metadata, weights) plus three example cells, from which
    `register_and_promote` builds the full MLflow model if this trial is ever registered.
    """
    with tempfile.TemporaryDirectory() as tmp:
        saved = model.save(Path(tmp) / TRIAL_MODEL_PATH)
        example_cells(model, example).to_json(saved / EXAMPLE_FILE, orient="split")
        with quiet_mlflow():
            mlflow.log_artifacts(str(saved), artifact_path=TRIAL_MODEL_PATH)
    return f"runs:/{mlflow.active_run().info.run_id}/{TRIAL_MODEL_PATH}"


def log_model(model: MelVAE, example: pd.DataFrame, *, model_id: str | None = None) -> str:
    """Log `model` as a full MLflow pyfunc model from code; return its URI.

    Signature, input example (`example`: cells × the model's genes) and pinned requirements
    included; loading it runs `melvae/served_model.py`, never unpickles. `model_id` fills a
    LoggedModel made with `mlflow.initialize_logged_model` (e.g. to name its source run).
    """
    signature = serving_signature(model, example)
    with tempfile.TemporaryDirectory() as tmp, quiet_mlflow():
        saved = model.save(Path(tmp) / "melvae")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(_PACKAGE_DIR / "served_model.py"),
            artifacts={"melvae": str(saved)},
            code_paths=[str(_PACKAGE_DIR)],
            signature=signature,
            input_example=example,
            pip_requirements=pinned_requirements(),
            model_id=model_id,
        )
    return info.model_uri


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """Within this block only: no "Validating input example" note, no artifact progress bars.

    MLflow prints both for every model it logs or reads back; over a study they drown the trial
    progress. Its warnings still show.
    """
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level, bars = pyfunc_log.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    pyfunc_log.setLevel(logging.WARNING)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        pyfunc_log.setLevel(level)
        if bars is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bars


@dataclass(frozen=True)
class Registration:
    """What registering the best trial did: the new version and whether it became champion.

    `refused` says why the champion was not compared with (it was ranked by another metric).
    """

    name: str
    version: str
    promoted: bool
    previous_champion: str | None
    refused: str | None = None


def is_complete(version: Any) -> bool:
    """Whether a registered version carries every tag melvae writes (the last one a marker).

    An incomplete version (its process killed while tagging it, by an older melvae that wrote
    tags one by one) is never made champion, and one holding the alias is replaced.
    """
    tags = version.tags
    if tags.get(COMPLETE_TAG) != "true":
        return False
    try:
        float(tags["objective_value"])
    except (KeyError, ValueError):
        return False
    return "objective" in tags


def register_and_promote(
    model_uri: str,
    *,
    name: str,
    objective: str,
    objective_value: float,
    direction: str,
    tags: dict[str, str],
) -> Registration:
    """Register `model_uri` under `name`; move the `champion` alias only if it beats the holder.

    The version is created with all its tags in one call (so it is complete or absent); one left
    incomplete by a killed process is completed here. The whole compare-and-move runs under the
    backend's promotion lock, so concurrent promotions leave exactly one champion, the best.
    A champion ranked by another metric is never compared with: the version is registered and
    the alias left where it is (`Registration.refused` says why).
    """
    client = mlflow.MlflowClient()
    version_tags = {
        **tags,
        _TRIAL_URI_TAG: model_uri,
        "objective": objective,
        "objective_value": repr(objective_value),
        COMPLETE_TAG: "true",
    }
    with promotion_lock(mlflow.get_tracking_uri()):
        existing = _version_with_source(client, name, model_uri)
        if existing is None:
            registrable = _registrable(model_uri, source_run_id=tags.get("run_id"))
            existing = str(mlflow.register_model(registrable, name, tags=version_tags).version)
        else:
            _complete(client, name, existing, version_tags)
        stop_point("registered")
        current = _champion(client, name)
        refused = None
        if current is not None and current[2] != objective:
            refused = (
                f"the champion (version {current[0]}) was ranked by {current[2]!r}, this version "
                f"by {objective!r}: they are not compared"
            )
        better = refused is None and (
            current is None or _beats(objective_value, current[1], direction)
        )
        promoted = better and (current is None or current[0] != existing)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, existing)
    return Registration(
        name=name,
        version=existing,
        promoted=promoted,
        previous_champion=None if current is None else current[0],
        refused=refused,
    )


def _complete(client: mlflow.MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    """Write the tags a version lacks (the completeness marker last); a complete version's
    tags are never changed."""
    have = client.get_model_version(name, version).tags
    if have.get(COMPLETE_TAG) == "true":
        return
    for key, value in tags.items():
        if key != COMPLETE_TAG and key not in have:
            client.set_model_version_tag(name, version, key, value)
    client.set_model_version_tag(name, version, COMPLETE_TAG, "true")


def _registrable(model_uri: str, *, source_run_id: str | None) -> str:
    """A full MLflow model for `model_uri`: built from a trial's folder, or `model_uri` itself.

    The full model is a new LoggedModel whose source run is the trial's, so the registry still
    links each version to the run that trained it.
    """
    if not model_uri.endswith(f"/{TRIAL_MODEL_PATH}"):
        return model_uri  # logged whole by an earlier melvae
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(model_uri, tmp)
        model = MelVAE.load(local)
        # Numbers as written (no per-column type guessing: 0.35 s at 765 genes).
        example = pd.read_json(
            local / EXAMPLE_FILE, orient="split", convert_axes=False, dtype=False
        )
    experiment_id = mlflow.get_run(source_run_id).info.experiment_id if source_run_id else None
    logged = mlflow.initialize_logged_model(
        name="model", source_run_id=source_run_id, experiment_id=experiment_id
    )
    return log_model(model, example.astype(np.float32), model_id=logged.model_id)


def _version_with_source(client: mlflow.MlflowClient, name: str, model_uri: str) -> str | None:
    """The version already registered from this trial's model, so `promote` is idempotent."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    model_id = model_uri.removeprefix("models:/")
    for item in versions:
        if (
            item.tags.get(_TRIAL_URI_TAG) == model_uri
            or item.source == model_uri
            or getattr(item, "model_id", None) == model_id
        ):
            return str(item.version)
    return None


def _champion(client: mlflow.MlflowClient, name: str) -> tuple[str, float, str] | None:
    """(version, ranked value, ranked metric) of the complete champion; None if there is none.

    An incomplete version holding the alias does not count: the next promotion replaces it.
    """
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    if not is_complete(champion):
        log.warning(
            "%s version %s holds @%s but is incomplete (its registration was cut short): "
            "it is replaced by the next complete version",
            name,
            champion.version,
            CHAMPION,
        )
        return None
    tags = champion.tags
    return str(champion.version), float(tags["objective_value"]), tags["objective"]


def _beats(candidate: float, incumbent: float, direction: str) -> bool:
    return candidate < incumbent if direction == "minimize" else candidate > incumbent


def load_model(uri: str, *, tracking_uri: str | None = None) -> MelVAE:
    """Load a melvae model: registered (`models:/melvae-<key>@champion`), a trial's URI, or a
    local folder written by `MelVAE.save`.

    Returns the MelVAE itself (not the pyfunc wrapper), ready for `encode` and `embed`. Only the
    model's JSON metadata and its weights are read (`torch.load(weights_only=True)`): no
    unpickling, and none of MLflow's per-column signature parsing, slow for 18,000 genes.
    Only reads: a local SQLite tracking database that does not exist is an error, not created.
    """
    if urllib.parse.urlsplit(uri).scheme in ("", "file"):
        return _load_folder(Path(uri.removeprefix("file://")), uri)
    if sqlite_file_missing(resolve_tracking_uri(tracking_uri)):
        raise InputError(
            f"there is no tracking database at {resolve_tracking_uri(tracking_uri)}, so no "
            f"model {uri!r}",
            where="tracking_uri / MLFLOW_TRACKING_URI (default sqlite:///mlruns/mlflow.db)",
            fix="run from the folder where `python -m melvae.study run` ran, or pass the "
            "tracking URI that holds the model",
        )
    use_backend(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        return _load_folder(_download(uri, tmp), uri)


def _load_folder(local: Path, uri: str) -> MelVAE:
    for folder in (local, local / "artifacts" / "melvae"):
        if (folder / MODEL_FILE).is_file():
            return MelVAE.load(folder)
    raise InputError(
        f"model {uri!r} is not a melvae model (no {MODEL_FILE} in it)",
        where=uri,
        fix="load a model registered by `python -m melvae.study run` or saved by MelVAE.save",
    )


def _download(uri: str, directory: str) -> Path:
    """Fetch a model's files from the tracking backend into `directory`, quietly."""
    try:
        with quiet_mlflow():
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=directory))
    except (MlflowException, OSError) as exc:
        raise InputError(
            f"model {uri!r} could not be loaded: {exc}",
            where=f"tracking backend {mlflow.get_tracking_uri()}",
            fix="check the name and alias with `python -m melvae.study best`, or pass "
            "tracking_uri / set MLFLOW_TRACKING_URI to the backend that holds the model",
        ) from None
