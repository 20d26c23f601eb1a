"""Downstream analysis of a registered model: transfer, latent interpretation, enrichment."""
