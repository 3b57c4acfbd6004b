"""Sharpness-aware minimisation (SAM): descend with the gradient taken at the worst nearby point.

SAM minimises ``max_{|e| <= rho} L(w + e)``. To first order the maximiser is
``e = rho g / |g|``, so one SAM step costs **two gradient evaluations** on the same batch::

    g     = grad L(w)                        (1st evaluation, by the caller)
    w_adv = w + rho g / (|g| + eps)          (|.|: the global L2 norm over all leaves)
    g_sam = grad L(w_adv)                    (2nd evaluation)
    w    <- w + optimizer_update(g_sam)      (e.g. w - lr g_sam), from w, not from w_adv

Adaptive SAM (ASAM) rescales the neighbourhood by ``T = |w| + eta`` (elementwise)::

    w_adv = w + rho T^2 g / (|T g| + eps)

Two APIs:

* :func:`sharpness_aware` -- one ``update`` call per step. It is a gradient transformation
  that maps ``g`` to ``g_sam`` and takes the second evaluation as a function,
  ``update(g, state, params, grad_fn=lambda p: grad(loss)(p, batch))``; chain any optimizer
  after it: ``chain(sharpness_aware(0.05), sgd(0.1))``. Under ``jit`` both evaluations are
  one compiled step.
* :func:`sam` -- Optax's ``optax.contrib.sam`` (same arguments, state and semantics), which
  wraps an outer optimizer and an "adversarial" optimizer (``chain(normalize(), sgd(rho))``
  is plain SAM). In its default *transparent* mode the caller makes one ``update`` call per
  gradient, ``sync_period`` calls per SAM step: the first ``sync_period - 1`` calls move
  the parameters to the adversarial point, the last moves them back to the cached
  weights plus the outer optimizer's update. In *opaque* mode (``opaque_mode=True``) one
  call does it all with ``grad_fn(params, i)``, like :func:`sharpness_aware`.

References:
  Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware Minimization for Efficiently
  Improving Generalization", ICLR 2021; Kwon, Kim, Park and Choi, "ASAM: Adaptive
  Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks",
  ICML 2021.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  FLAG,
  INNER,
  GradientTransformation,
  apply_updates,
  as_transformation,
  integer,
  needs_params,
  public,
  zero_count,
)
from optcompose.transforms.sharpness import GRAD_FN


class SAMState(NamedTuple):
  """State of :func:`sam` (Optax's field names).

  Attributes:
    steps_since_sync: int32, adversarial calls since the last outer update.
    opt_state: the outer optimizer's state.
    adv_state: the adversarial optimizer's state.
    cache: the outer weights (where the adversarial excursion started); ``None`` in
      opaque mode.
  """

  steps_since_sync: jax.Array
  opt_state: Any
  adv_state: Any
  cache: Any  # None in opaque mode


def _caller(t, who: str) -> Callable:
  """``t.update`` without the SAM-only ``grad_fn`` keyword (the inner optimizers get the
  others)."""
  update = as_transformation(t, who).update

  def call(u, s, p, **extra):
    extra.pop(GRAD_FN, None)
    return update(u, s, p, **extra)

  return call


def _check_grad_fn(grad_fn: Any) -> None:
  """Raise a TypeError naming ``grad_fn`` unless it can be called as ``grad_fn(params, i)``
  (checked on its signature, before it is called; one without a signature, such as a
  builtin, is called as it is)."""
  if not callable(grad_fn):
    raise TypeError(
      f"sam: `grad_fn` must be a function (params, i) -> gradients, got {type(grad_fn).__name__}."
    )
  try:
    signature = inspect.signature(grad_fn)
  except (TypeError, ValueError):
    return
  try:
    signature.bind(None, 0)
  except TypeError as e:
    raise TypeError(
      f"sam: `grad_fn` must take two positional arguments, (params, i) -> "
      f"gradients (opaque mode calls grad_fn(adv_params, i) with i the step in "
      f"the cycle), but its signature is {signature} ({e})."
    ) from None


def _select(cond, if_true, if_false):
  return jax.tree.map(lambda a, b: jnp.where(cond, a, b), if_true, if_false)


def _negate(tree):
  return jax.tree.map(lambda x: -x, tree)


@public(
  "wrapper",
  optax="contrib.sam",
  optimizer=INNER,
  adv_optimizer=INNER,
  sync_period=integer(1, draw=(1, 3)),
  reset_state=FLAG,
)
def sam(
  optimizer: Any,
  adv_optimizer: Any,
  sync_period: int = 2,
  reset_state: bool = True,
  opaque_mode: bool = False,
  batch_axis_name: Optional[str] = None,
) -> GradientTransformation:
  """SAM with Optax's API (``optax.contrib.sam``): an outer and an adversarial optimizer.

  ``sam(sgd(lr), chain(normalize(), sgd(rho)))`` is the SAM of the paper: the adversarial
  optimizer's update, negated, is the ascent step ``+rho g / |g|``. See
  :func:`sharpness_aware` for a one-call transformation with the same arithmetic.

  Transparent mode (default): each call consumes one gradient, taken at the *current*
  params; a cycle is ``sync_period`` calls. With c = ``steps_since_sync``::

      c = 0:                cache <- w                    (the outer weights)
      c < sync_period - 1:  w <- w - adv_update(g)        (ascent, to the adversarial point)
      c = sync_period - 1:  w <- cache + outer_update(g)  (g taken at the adversarial point;
                                                           the outer optimizer sees cache)

  so with ``sync_period=2`` one SAM step is two calls, i.e. the two gradient evaluations.
  Between calls the params are the adversarial weights half of the time: evaluate and
  checkpoint after a full cycle. Opaque mode: one call runs the ``sync_period - 1``
  adversarial steps itself, calling ``grad_fn(adv_params, i)`` for each (pass it as
  ``update(g, state, params, grad_fn=...)``), then the outer update; ``batch_axis_name``
  takes a ``jax.lax.pmean`` of those gradients.

  Differences from Optax: with ``sync_period=1`` Optax's transparent mode applies the
  update to the *previous* call's weights (its cache is refreshed after it is read), so
  the run is not plain ``optimizer``; here it is, as in opaque mode. An infinite value in
  the branch not taken (outer or adversarial) does not turn the result into NaN, and
  :func:`normalize` maps a zero gradient to 0, not NaN. Keyword arguments of ``update``
  (except ``grad_fn``) reach the inner optimizers.

  Args:
    optimizer: the outer optimizer.
    adv_optimizer: the adversarial optimizer (its negated update is the ascent step).
    sync_period: calls per cycle (transparent) or gradient evaluations per step (opaque).
    reset_state: re-initialise the adversarial state after each outer update.
    opaque_mode: run the adversarial steps inside one ``update`` call.
    batch_axis_name: opaque mode only: axis name for ``pmean`` of the inner gradients.

  Returns:
    A transformation that needs ``params``, with state :class:`SAMState` (Optax's fields;
    ``cache`` is ``None`` in opaque mode).

  Raises:
    ValueError: (from ``update``) ``params`` missing; or ``updates``, ``params``,
      ``state.cache`` or ``grad_fn``'s gradients differ in structure or a leaf's shape
      (the message names the path and both shapes; nothing is broadcast); or opaque mode
      without ``grad_fn``. TypeError: (from ``update``, opaque mode) a ``grad_fn`` whose
      signature does not take ``(params, i)``.

  References:
    Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware Minimization for Efficiently
    Improving Generalization", ICLR 2021; Optax's ``optax.contrib.sam``.
  """
  fn = "sam"
  outer, adv = (
    _caller(optimizer, "sam: `optimizer`"),
    _caller(adv_optimizer, "sam: `adv_optimizer`"),
  )

  def init(params):
    return SAMState(
      steps_since_sync=zero_count(),
      opt_state=optimizer.init(params),
      adv_state=adv_optimizer.init(params),
      cache=None if opaque_mode else jax.tree.map(jnp.array, params),  # a copy: donatable
    )

  # As in Optax, both inner optimizers run at every call and one result is kept (a select,
  # cheap under jit next to the gradient evaluation). Selections use jnp.where, not Optax's
  # cond * a + (1 - cond) * b: the same values, without NaN from an infinite unselected branch.
  def transparent_update(updates, state, params=None, **extra):
    needs_params(params, fn)
    otree.check_same_structure(updates, params, "updates", "params")
    otree.check_same_structure(params, state.cache, "params", "state.cache")
    first = state.steps_since_sync == 0
    last = state.steps_since_sync == sync_period - 1
    cache = _select(first, params, state.cache)  # the outer weights of this cycle
    adv_u, adv_state = adv(updates, state.adv_state, params, **extra)
    adv_u = _negate(adv_u)
    out_u, opt_state = outer(updates, state.opt_state, cache, **extra)
    out_u = jax.tree.map(lambda c, p, u: c - p + u, cache, params, out_u)  # back to cache
    new_updates = _select(last, out_u, adv_u)
    after_sync = adv_optimizer.init(params) if reset_state else state.adv_state
    adv_state = _select(last, after_sync, adv_state)
    opt_state = _select(last, opt_state, state.opt_state)
    steps = (state.steps_since_sync + 1) % sync_period
    return new_updates, SAMState(steps, opt_state, adv_state, cache)

  def opaque_update(updates, state, params=None, **extra):
    grad_fn = extra.get(GRAD_FN)
    if grad_fn is None:
      raise ValueError(
        f"{fn}: opaque_mode=True needs `grad_fn=`, a function "
        "(params, i) -> gradients, passed to update."
      )
    _check_grad_fn(grad_fn)
    params = needs_params(params, fn)
    otree.check_same_structure(updates, params, "updates", "params")
    adv_params, g, adv_state = params, updates, state.adv_state
    for i in range(sync_period - 1):
      adv_u, adv_state = adv(g, adv_state, adv_params, **extra)
      adv_params = apply_updates(adv_params, _negate(adv_u))
      g = grad_fn(adv_params, i)
      otree.check_same_structure(g, params, f"grad_fn(params, {i})", "params")
      if batch_axis_name is not None:
        g = jax.lax.pmean(g, axis_name=batch_axis_name)
    if reset_state:
      adv_state = adv_optimizer.init(params)
    new_updates, opt_state = outer(g, state.opt_state, params, **extra)
    return new_updates, SAMState(zero_count(), opt_state, adv_state, None)

  return GradientTransformation(init, opaque_update if opaque_mode else transparent_update)


__all__ = ["SAMState"]  # and the builders it registers
