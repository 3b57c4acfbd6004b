"""Testing tools for optcompose users and for our own suite.

- :mod:`optcompose.testing.invariants` (no extra dependency): checks that any gradient
  transformation should pass -- jit equals eager, the state keeps its layout, updates look like
  the gradients, no recompilation, ``vmap`` over independent problems, unknown keyword
  arguments ignored, finite in gives finite out. :func:`check_invariants` runs them all.
- :mod:`optcompose.testing.strategies` (needs ``hypothesis``): strategies for pytrees,
  extreme gradients and every public transformation's hyperparameters.

Example, testing a transformation of your own (docs/guides/testing.md has the same, run by
our suite)::

    import jax
    import jax.numpy as jnp
    from hypothesis import given, settings, strategies as st
    import optcompose as oc
    from optcompose.testing import check_invariants, strategies as ocst

    def scale_by_sign():
      def init(params):
        return oc.EmptyState()
      def update(updates, state, params=None, **extra):
        return jax.tree.map(jnp.sign, updates), state
      return oc.GradientTransformation(init, update)

    @settings(max_examples=20, deadline=None)
    @given(ocst.pytrees(dtype=jnp.float32).flatmap(
        lambda p: st.tuples(st.just(p), ocst.gradients_like(p))))
    def test_scale_by_sign(params_and_grads):
      params, grads = params_and_grads
      check_invariants(oc.chain(scale_by_sign(), oc.sgd(0.1)), params, grads)
"""

from optcompose.testing.invariants import (
  check_finite,
  check_ignores_unknown_kwargs,
  check_invariants,
  check_jit_matches_eager,
  check_no_recompilation,
  check_state_can_be_donated,
  check_state_keeps_its_layout,
  check_updates_like_grads,
  check_vmap,
  record_steps,
  run_steps,
)

# The public names (what a type checker takes as this package's interface, and ``import *``).
__all__ = [
  "check_finite",
  "check_ignores_unknown_kwargs",
  "check_invariants",
  "check_jit_matches_eager",
  "check_no_recompilation",
  "check_state_can_be_donated",
  "check_state_keeps_its_layout",
  "check_updates_like_grads",
  "check_vmap",
  "record_steps",
  "run_steps",
]


def __getattr__(name):
  # The strategies import hypothesis; load them only when asked for.
  if name == "strategies":
    import importlib

    return importlib.import_module("optcompose.testing.strategies")
  raise AttributeError(f"module 'optcompose.testing' has no attribute {name!r}")
