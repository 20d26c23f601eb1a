"""The file MLflow runs to rebuild a logged melvae pyfunc model (MLflow's models-from-code).

Logging the model as this file instead of a CloudPickled object means loading it executes only
this reviewed code; the weights come from the model's `melvae` artifact via
`torch.load(..., weights_only=True)`. Not imported by melvae itself.
"""

import mlflow

from melvae.register import MelVAEPyfunc

mlflow.models.set_model(MelVAEPyfunc())
