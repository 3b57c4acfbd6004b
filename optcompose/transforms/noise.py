"""Gradient noise: add annealed Gaussian noise to the updates.

Formula (g: incoming update, t: step count from 1, z: standard normal)::

    sigma_t = sqrt(eta / t^gamma)
    u       = g + sigma_t z

The random stream is Optax's: the state's key is split into (next key, sample key) at each
step, the sample key into one key per leaf (in the tree's flatten order), and each leaf's
noise is ``jax.random.normal(key_leaf, leaf.shape, leaf.dtype)``. It therefore depends on the
leaves: FlatParams (whose leaves are buckets) are refused.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import warnings
from typing import Any, NamedTuple, Optional, cast

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core import (
  GradientTransformation,
  default_float,
  expect_state,
  public,
  real,
  safe_increment,
  zero_count,
)
from optcompose.core.backend import backend_started
from optcompose.masks import reject_layouts


class AddNoiseState(NamedTuple):
  count: jax.Array
  rng_key: jax.Array  # the key's raw data (uint32; e.g. shape (2,) for threefry)


def _typed_key(key: Any) -> jax.Array:
  """``key`` (an int seed, a typed key or a raw uint32 key) as a typed key of shape ()."""
  if isinstance(key, (bool, np.bool_)):
    raise TypeError("add_noise: `key` must be an int seed or a PRNG key, got a bool.")
  if isinstance(key, numbers.Integral):
    return jax.random.key(cast("int | np.integer", key))
  if isinstance(key, (jax.Array, np.ndarray)):
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
      if key.shape != ():
        raise ValueError(f"add_noise: `key` must be a single key, got shape {key.shape}.")
      return cast(jax.Array, key)  # a JAX array: NumPy has no key dtypes
    if jnp.issubdtype(key.dtype, jnp.integer) and key.shape == ():
      return jax.random.key(key)
    if key.dtype == np.uint32 and key.ndim == 1:
      # A raw key of the default implementation. wrap_key_data takes a NumPy array too,
      # though its annotation names jax.Array only.
      return jax.random.wrap_key_data(key)  # pyrefly: ignore[bad-argument-type]
  raise TypeError(
    "add_noise: `key` must be an int seed, a key from jax.random.key, or a raw "
    f"key from jax.random.PRNGKey; got {type(key).__name__}."
  )


_OUT_SHARDING = "out_sharding" in inspect.signature(jax.random.normal).parameters


def noise_leaf(g, key, sigma):
  """``g + sigma z`` with ``z = jax.random.normal(key, g.shape, g.dtype)``, in g's dtype.

  ``sigma`` is rounded to g's dtype first: Optax's sigma is weakly typed (an int32 count
  to a Python power), so its product and sum run in the leaf's dtype (bfloat16 for
  bfloat16 gradients), which this reproduces bit for bit."""
  if _OUT_SHARDING:
    z = jax.random.normal(key, g.shape, g.dtype, out_sharding=jax.typeof(g).sharding)
  else:  # pragma: no cover - older JAX
    z = jax.random.normal(key, g.shape, g.dtype)
  return g + jnp.asarray(sigma).astype(g.dtype) * z


@public(
  "transformation",
  optax="add_noise",
  eta=real(0.0, draw=(0.0, 0.1), schedule=False),
  gamma=real(0.0, draw=(0.0, 1.0), schedule=False),
)
def add_noise(
  eta: float, gamma: float, key: Optional[Any] = None, *, seed: Optional[int] = None
) -> GradientTransformation:
  """Add Gaussian noise of variance ``eta / t^gamma`` to the updates.

  Update (t from 1; z a standard normal draw per element)::

      u = g + sqrt(eta / t^gamma) z

  The noise is Optax's exactly (same key splits per step and per leaf), so a run with the
  same key reproduces Optax's.

  Args:
    eta: the base variance (>= 0, a number).
    gamma: the annealing exponent (>= 0, a number).
    key: the PRNG key: an int seed, a key from ``jax.random.key`` (any implementation) or a
      raw ``jax.random.PRNGKey``; ``None`` means seed 0 (Optax's default; Optax also warns
      that a key will be required).
    seed: deprecated spelling of an int ``key`` (a DeprecationWarning; an error together
      with ``key``), as in Optax.

  Returns:
    A transformation with state :class:`AddNoiseState` (``count``; ``rng_key``, the key's
    raw uint32 data -- Optax keeps a typed key there: raw data is a plain array that
    checkpoints, compares and prints as one); updates keep the gradients' dtype.
    FlatParams are refused (the stream depends on the leaves).

  References:
    Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep Networks",
    arXiv:1511.06807, 2015; Optax's ``optax.add_noise``.
  """
  if seed is not None:
    warnings.warn('add_noise: "seed" is deprecated, use "key".', DeprecationWarning, stacklevel=3)
    if key is not None:
      raise ValueError("add_noise: give only one of `seed` and `key`.")
    key = seed
  given = 0 if key is None else key

  @functools.cache
  def resolved() -> tuple:
    """The key's implementation and raw data (NumPy: the transformation holds no JAX array);
    made from an int seed eagerly even when first asked for inside a trace."""
    with jax.ensure_compile_time_eval():
      typed = _typed_key(given)
      data = jax.random.key_data(typed)
    raw = data if isinstance(data, jax.core.Tracer) else np.asarray(data)
    return jax.random.key_impl(typed), raw

  # An int seed is made a key at the first init where JAX's backends are not up yet (making
  # it starts them: optcompose.core.backend); any other key is checked now.
  if isinstance(given, (bool, np.bool_)):
    _typed_key(given)  # refused
  elif isinstance(given, numbers.Integral) and not -(2**63) <= int(given) < 2**63:
    raise ValueError(f"add_noise: an int `key` must lie in [-2**63, 2**63), got {given}.")
  elif not isinstance(given, numbers.Integral) or backend_started():
    resolved()

  def init(params):
    otree.check_floating(params, "params")
    reject_layouts(params, "add_noise")
    return AddNoiseState(zero_count(), jnp.asarray(resolved()[1]))

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, AddNoiseState, "add_noise")
    reject_layouts(updates, "add_noise")
    count = safe_increment(state.count)
    t = count.astype(default_float())
    sigma = jnp.sqrt(jnp.divide(*otree.promote(eta, jnp.power(*otree.promote(t, gamma)))))
    impl = resolved()[0]
    next_key, sample = jax.random.split(jax.random.wrap_key_data(state.rng_key, impl=impl))
    leaves, treedef = jax.tree.flatten(updates)
    keys = jax.random.split(sample, len(leaves))
    noisy = [noise_leaf(g, keys[i], sigma) for i, g in enumerate(leaves)]
    return treedef.unflatten(noisy), AddNoiseState(count, jax.random.key_data(next_key))

  return GradientTransformation(init, update)


__all__ = ["AddNoiseState"]  # and the builders it registers
