"""Optimizers: recipes of primitives, one module per family, with Optax's names,
arguments and defaults. No optimizer contains math of its own."""
