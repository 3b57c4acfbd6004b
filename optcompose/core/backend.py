"""Whether building may touch JAX's runtime.

Evaluating anything eagerly (a schedule at step 0, to check its value) starts JAX's
backends, and ``jax.distributed.initialize`` must come before that: a config module that
builds the optimizer before ``main`` calls it would fail there, where Optax's builders, which
never evaluate, do not. Builders therefore evaluate only once the backends are up; before,
they leave out the checks that need a value (``init`` still checks the values at step 0).
"""

from __future__ import annotations


def backend_started() -> bool:
  """Whether JAX has started its backends (True where this JAX does not tell: evaluate)."""
  try:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return True
