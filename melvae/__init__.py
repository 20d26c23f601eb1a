"""melvae: hyperparameter search and experiment tracking for VAEs on melanoma scRNA-seq."""

__version__ = "0.1.0"
