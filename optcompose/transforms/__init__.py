"""Primitives, one family per module; each formula is one ``*_leaf`` function.

``optcompose.transforms.<name>`` also answers every name of Optax's ``optax.transforms``
(``chain``, ``masked``, ``clip_by_global_norm``, ``MultiSteps``, ...) with the top level's
object of that name, read when asked, so a name added in any module appears here too; a
``Protocol`` (``ConditionFn``) is Optax's own; one not rebuilt yet raises the AttributeError
that says so. The top level installs that lookup (:func:`optcompose._from_optax.install`)
once it is built: this package imports nothing from the floors above it. Type checkers read
those names from ``__init__.pyi`` (written by tools/gen_stubs.py).
"""
