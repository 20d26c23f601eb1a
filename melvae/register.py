"""MLflow Model Registry: log a trained MelVAE, register it, promote a champion, load it back."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anndata as ad
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from melvae.errors import InputError
from melvae.model import MelVAE
from melvae.track import use_backend

log = logging.getLogger(__name__)

CHAMPION = "champion"
_PACKAGE_DIR = Path(__file__).resolve().parent
_PINNED = ("torch", "numpy", "pandas", "scipy", "scikit-learn", "anndata", "mlflow")


class MelVAEPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc flavour: a DataFrame of cells × genes (raw units, named columns) → latent means."""

    def load_context(self, context: Any) -> None:
        self.model = MelVAE.load(Path(context.artifacts["melvae"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        cells = ad.AnnData(
            X=model_input.to_numpy(dtype=np.float32),
            obs=pd.DataFrame(index=model_input.index.astype(str)),
            var=pd.DataFrame(index=model_input.columns.astype(str)),
        )
        latent = self.model.encode(cells)
        return pd.DataFrame(
            latent,
            index=model_input.index,
            columns=[f"z{i}" for i in range(latent.shape[1])],
        )


def model_name(dataset_key: str) -> str:
    """Registered-model name: one lineage of versions per dataset."""
    return f"melvae-{dataset_key}"


def pinned_requirements() -> list[str]:
    """Exact versions of what the model needs to load, as installed now (torch without +cpu)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in _PINNED]


def log_model(model: MelVAE, example: ad.AnnData) -> str:
    """Log `model` into the active run with a signature and input example; return its URI."""
    from melvae.preprocess import align_genes

    matrix, _ = align_genes(example[:3], model.genes)
    dense = matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)
    frame = pd.DataFrame(dense.astype(np.float32), columns=model.genes)
    latent = model.encode(
        ad.AnnData(X=dense.astype(np.float32), var=pd.DataFrame(index=model.genes))
    )
    signature = infer_signature(
        frame, pd.DataFrame(latent, columns=[f"z{i}" for i in range(latent.shape[1])])
    )
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "melvae"
        model.save(saved)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=MelVAEPyfunc(),
            artifacts={"melvae": str(saved)},
            code_paths=[str(_PACKAGE_DIR)],
            signature=signature,
            input_example=frame,
            pip_requirements=pinned_requirements(),
        )
    return info.model_uri


@dataclass(frozen=True)
class Registration:
    """What registering the best trial did: the new version and whether it became champion."""

    name: str
    version: str
    promoted: bool
    previous_champion: str | None


def register_and_promote(
    model_uri: str,
    *,
    name: str,
    objective: str,
    objective_value: float,
    direction: str,
    tags: dict[str, str],
) -> Registration:
    """Register `model_uri` under `name`; move the `champion` alias only if it beats the holder."""
    client = mlflow.MlflowClient()
    existing = _version_with_source(client, name, model_uri)
    if existing is None:
        existing = mlflow.register_model(model_uri, name).version
        client.set_model_version_tag(name, existing, "objective", objective)
        client.set_model_version_tag(name, existing, "objective_value", repr(objective_value))
        for key, value in tags.items():
            client.set_model_version_tag(name, existing, key, value)
    current = _champion(client, name)
    better = current is None or _beats(objective_value, current[1], direction)
    if better and (current is None or current[0] != str(existing)):
        client.set_registered_model_alias(name, CHAMPION, existing)
    return Registration(
        name=name,
        version=str(existing),
        promoted=better and (current is None or current[0] != str(existing)),
        previous_champion=None if current is None else current[0],
    )


def _version_with_source(client: mlflow.MlflowClient, name: str, model_uri: str) -> str | None:
    """The version already registered from this logged model, so `promote` is idempotent."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    model_id = model_uri.removeprefix("models:/")
    for item in versions:
        if item.source == model_uri or getattr(item, "model_id", None) == model_id:
            return str(item.version)
    return None


def _champion(client: mlflow.MlflowClient, name: str) -> tuple[str, float] | None:
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(champion.version), float(champion.tags["objective_value"])


def _beats(candidate: float, incumbent: float, direction: str) -> bool:
    return candidate < incumbent if direction == "minimize" else candidate > incumbent


def load_model(uri: str, *, tracking_uri: str | None = None) -> MelVAE:
    """Load a registered or logged melvae model, e.g. `models:/melvae-<key>@champion`.

    Returns the MelVAE itself (not the pyfunc wrapper), ready for `encode` and `embed`.
    """
    use_backend(tracking_uri)
    try:
        wrapped = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as exc:
        raise InputError(
            f"model {uri!r} could not be loaded: {exc}",
            where=f"tracking backend {mlflow.get_tracking_uri()}",
            fix="check the name and alias with `python -m melvae.study best`, or pass "
            "tracking_uri / set MLFLOW_TRACKING_URI to the backend that holds the model",
        ) from None
    python_model = wrapped.unwrap_python_model()
    if not isinstance(python_model, MelVAEPyfunc):
        raise InputError(
            f"model {uri!r} is not a melvae model",
            where=uri,
            fix="load a model registered by `python -m melvae.study run`",
        )
    return python_model.model
