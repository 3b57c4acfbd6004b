"""Primitives, one family per module; each formula is one ``*_leaf`` function."""
