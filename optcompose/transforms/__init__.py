"""Primitive gradient transformations, one module per family."""
