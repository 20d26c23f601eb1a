"""melvae: hyperparameter search and experiment tracking for VAEs on melanoma scRNA-seq.

- `melvae.tune(adata)` runs a study (Optuna trials tracked in MLflow, champion, baselines,
  registry) and returns its results;
- `melvae.MelVAE.fit(train, val, ...)` trains one model;
- `melvae.load_model("models:/melvae-<dataset>@champion")` gives back the registered champion.

Examples
--------
>>> import melvae
>>> sorted(name for name in dir(melvae) if not name.startswith("_"))
['MelVAE', 'TuneResult', 'load_model', 'tune']
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
# Public name -> the module that defines it. Imported lazily: `import melvae` must not pay for
# torch and mlflow until they are needed.
_LAZY = {
    "MelVAE": "melvae.model",
    "load_model": "melvae.register",
    "tune": "melvae.tuning",
    "TuneResult": "melvae.tuning",
}
__all__ = ["MelVAE", "TuneResult", "__version__", "load_model", "tune"]

if TYPE_CHECKING:
    from melvae.model import MelVAE
    from melvae.register import load_model
    from melvae.tuning import TuneResult, tune


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'melvae' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Tab completion lists the lazy names too.
    return sorted({name for name in globals() if name.startswith("__")} | set(__all__))
