"""Combinators: each takes transformations and returns one (masking, injected
hyperparameters, accumulation and skipping, lookahead, SAM, diagnostics)."""
