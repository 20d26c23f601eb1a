"""The Optuna study runner: `python -m melvae.study run`."""
