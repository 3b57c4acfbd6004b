"""Training-loop aids that are not gradient transformations (early stopping)."""
