"""Registry cases of the factored family: ``scale_by_factored_rms`` and ``adafactor``.

On the MLP (8-16-1) the default ``min_dim_size_to_factor=128`` factors nothing, so the
default case runs the full second moment; ``min_dim_size_to_factor=2`` factors the (8, 16)
kernel (and the quadratic's (2, 2) leaf, a tie of its two axes), and 1 also the (16, 1)
kernel. Every case's state has Optax's leaves (``FactoredState`` and the members' states).
"""

from __future__ import annotations

import optax

import optcompose as oc
from registry import LR, Case, _no_bias, lr_schedule

CASES = [
  Case(
    "scale_by_factored_rms",
    lambda: oc.chain(
      oc.scale_by_factored_rms(decay_rate=0.6, min_dim_size_to_factor=1),
      oc.scale_by_learning_rate(LR),
    ),
    ("scale_by_factored_rms",),
    optax=lambda: optax.chain(
      optax.scale_by_factored_rms(decay_rate=0.6, min_dim_size_to_factor=1),
      optax.scale_by_learning_rate(LR),
    ),
  ),
  Case("adafactor", lambda: oc.adafactor(LR), ("adafactor",), optax=lambda: optax.adafactor(LR)),
  Case(
    "adafactor_factored",
    lambda: oc.adafactor(LR, min_dim_size_to_factor=2),
    ("adafactor", "scale_by_factored_rms"),
    optax=lambda: optax.adafactor(LR, min_dim_size_to_factor=2),
  ),
  # Unfactored, unclipped and without the parameter scale: elementwise, so it also runs
  # on FlatParams; the momentum and the masked, scheduled-lr weight decay branches.
  Case(
    "adafactor_momentum_decay",
    lambda: oc.adafactor(
      lr_schedule,
      factored=False,
      clipping_threshold=None,
      multiply_by_parameter_scale=False,
      momentum=0.9,
      weight_decay_rate=1e-3,
      weight_decay_mask=_no_bias,
    ),
    ("adafactor",),
    optax=lambda: optax.adafactor(
      lr_schedule,
      factored=False,
      clipping_threshold=None,
      multiply_by_parameter_scale=False,
      momentum=0.9,
      weight_decay_rate=1e-3,
      weight_decay_mask=_no_bias,
    ),
  ),
]
