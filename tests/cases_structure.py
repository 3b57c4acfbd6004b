"""Registry cases of the structural wrappers (optcompose/wrappers/structure.py): named_chain,
freeze, selective_transform, flatten, and partition with a label no leaf has.

The masks here are callables (they must fit both problems and the property kit's trees):
they freeze the one-dimensional leaves, the biases of the MLP (and the quadratic's vector).
Optax's ``freeze`` takes a callable mask as ours does; its ``selective_transform`` maps over
the mask itself (a callable would freeze everything), so that case's reference is the
partition Optax's ``selective_transform`` builds, with the same labels. tests/test_structure.py
compares with Optax's ``selective_transform`` itself (a static mask, on the MLP) and covers
``multi_transform`` (Optax's former name of ``partition``: a plain function, not a
registered builder). Case names with "adam" skip the float16 comparison (tests/test_parity.py):
Optax's float16 second moment is 0 / 0 = NaN for a gradient frozen at zero.
"""

from __future__ import annotations

import jax
import optax

import optcompose as oc
from registry import LR, Case


def biases(params):
  """True on the one-dimensional leaves (frozen)."""
  return jax.tree.map(lambda p: p.ndim == 1, params)


def freeze_labels(params):
  """The labels Optax's ``selective_transform`` gives ``partition`` for ``biases``."""
  return jax.tree.map(lambda m: "freeze" if m else "train", biases(params))


def frozen_bias_labels():
  return oc.labels_from_paths([(r"bias|\['b'\]", "frozen")], "train")


CASES = [
  Case(
    "named_chain",
    lambda: oc.named_chain(("adam", oc.scale_by_adam()), ("lr", oc.scale_by_learning_rate(LR))),
    ("named_chain",),
    optax=lambda: optax.named_chain(
      ("adam", optax.scale_by_adam()), ("lr", optax.scale_by_learning_rate(LR))
    ),
  ),
  Case(
    "freeze_biases_adam",
    lambda: oc.chain(oc.freeze(biases), oc.adam(LR)),
    ("freeze",),
    optax=lambda: optax.chain(optax.freeze(biases), optax.adam(LR)),
  ),
  Case(
    "selective_transform_adam",
    lambda: oc.selective_transform(oc.adam(LR), freeze_mask=biases),
    ("selective_transform",),
    optax=lambda: optax.partition(
      {"train": optax.adam(LR), "freeze": optax.set_to_zero()}, param_labels=freeze_labels
    ),
  ),
  Case(
    "flatten_adam",
    lambda: oc.flatten(oc.adam(LR)),
    ("flatten",),
    optax=lambda: optax.flatten(optax.adam(LR)),
  ),
  # "unused" labels no leaf: its Adam sees one MaskedNode and keeps a count, as Optax's.
  Case(
    "partition_unused_label",
    lambda: oc.partition(
      {"train": oc.adamw(LR), "frozen": oc.set_to_zero(), "unused": oc.adam(LR)},
      frozen_bias_labels(),
    ),
    ("partition",),
    optax=lambda: optax.partition(
      {"train": optax.adamw(LR), "frozen": optax.set_to_zero(), "unused": optax.adam(LR)},
      frozen_bias_labels(),
    ),
  ),
]
