"""melvae: hyperparameter search and experiment tracking for VAEs on melanoma scRNA-seq.

`melvae.load_model("models:/melvae-<dataset>@champion")` gives back the registered champion.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["MelVAE", "__version__", "load_model"]

if TYPE_CHECKING:
    from melvae.model import MelVAE
    from melvae.register import load_model


def __getattr__(name: str) -> Any:
    # Lazy: importing melvae must not pay for torch and mlflow until they are needed.
    if name == "MelVAE":
        from melvae.model import MelVAE

        return MelVAE
    if name == "load_model":
        from melvae.register import load_model

        return load_model
    raise AttributeError(f"module 'melvae' has no attribute {name!r}")
