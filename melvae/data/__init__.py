"""Reading, fetching and validating single-cell datasets."""
