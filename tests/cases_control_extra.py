"""Registry cases of the step-control and monitoring wrappers: apply_every, the conditional
wrappers, snapshot / monitor / measure_with_ema, and MultiSteps rejecting micro-steps."""

from __future__ import annotations

import optax

import optcompose as oc
from registry import LR, Case


def _not_every_third(step):
  """Steps 0, 1, 3, 4, 6, ...: both branches of a conditional wrapper are taken."""
  return step % 3 != 2


def _not_every_fourth(step):
  return step % 4 != 3


def _monitored(lib):
  """Adam, then a monitor of the update norm and its moving average (a boolean measurement
  averaged as a float), then a snapshot of the updates, in either library."""
  norm = oc.tree.global_norm if lib is oc else optax.tree.norm
  return lib.chain(
    lib.adam(LR),
    lib.monitor({"norm": norm, "large_ema": lib.measure_with_ema(lambda u: norm(u) > 5e-3, 0.9)}),
    lib.snapshot("updates", lambda u: u),
  )


CASES = [
  Case(
    "apply_every_after_sgd",
    lambda: oc.chain(oc.sgd(LR, 0.9), oc.apply_every(3)),
    ("apply_every",),
    optax=lambda: optax.chain(optax.sgd(LR, 0.9), optax.apply_every(3)),
  ),
  Case(
    "apply_every_after_adam",
    lambda: oc.chain(oc.adam(LR), oc.apply_every(3)),
    ("apply_every",),
    optax=lambda: optax.chain(optax.adam(LR), optax.apply_every(3)),
  ),
  Case(
    "conditionally_transform_adam",
    lambda: oc.chain(
      oc.conditionally_transform(oc.scale_by_adam(), _not_every_third),
      oc.scale_by_learning_rate(LR),
    ),
    ("conditionally_transform",),
    optax=lambda: optax.chain(
      optax.conditionally_transform(optax.scale_by_adam(), _not_every_third),
      optax.scale_by_learning_rate(LR),
    ),
    slow_eager_ref=True,
  ),  # Optax's lax.cond compiles both branches at every eager call
  Case(
    "conditionally_mask_adam",
    lambda: oc.conditionally_mask(oc.adam(LR), _not_every_fourth),
    ("conditionally_mask",),
    optax=lambda: optax.conditionally_mask(optax.adam(LR), _not_every_fourth),
    slow_eager_ref=True,
  ),
  # Optax's monitor starts with an empty dict of measurements (ours: zeros of their
  # layout); after one update (what the state test compares) the layouts agree.
  Case(
    "monitor_snapshot_adam",
    lambda: _monitored(oc),
    ("monitor", "measure_with_ema", "snapshot"),
    optax=lambda: _monitored(optax),
  ),
  Case(
    "multi_steps_skip_not_finite",
    lambda: oc.MultiSteps(
      oc.adam(LR), 3, should_skip_update_fn=oc.skip_not_finite
    ).gradient_transformation(),
    ("multi_steps",),
    optax=lambda: optax.MultiSteps(
      optax.adam(LR), 3, should_skip_update_fn=optax.skip_not_finite
    ).gradient_transformation(),
    slow_eager_ref=True,
  ),
]
