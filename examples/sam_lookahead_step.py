"""Training steps with SAM (two gradient evaluations per step) and with Lookahead.

A tiny regression: a 4-32-1 tanh network fitted to y = sin(x . v) on 256 points, trained
full-batch for a few hundred steps. Run: ``python examples/sam_lookahead_step.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np

import optcompose as oc
from optcompose.wrappers.lookahead import LookaheadParams, lookahead
from optcompose.transforms.sharpness import sharpness_aware

rng = np.random.default_rng(0)
x_np = rng.normal(size=(256, 4)).astype(np.float32)
X, Y = jnp.asarray(x_np), jnp.asarray(np.sin(x_np @ [1.0, -0.5, 0.25, 2.0])[:, None], jnp.float32)


def init_params(seed=0):
  r = np.random.default_rng(seed)
  arrays = {
    "w1": r.normal(size=(4, 32)) / 2.0,
    "b1": np.zeros(32),
    "w2": r.normal(size=(32, 1)) / 6.0,
    "b2": np.zeros(1),
  }
  return {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}


@jax.jit
def loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


# --- SAM: the optimizer sees grad L(w + rho g/|g|) instead of g ----------------------------
sam_tx = oc.chain(sharpness_aware(rho=0.05), oc.sgd(0.2, momentum=0.9))


@jax.jit
def sam_step(params, state, x, y):
  grad_fn = lambda p: jax.grad(loss)(p, x, y)  # the same batch for both evaluations
  value, grads = jax.value_and_grad(loss)(params, x, y)  # 1st evaluation, at w
  updates, state = sam_tx.update(grads, state, params, grad_fn=grad_fn)  # 2nd, at w_adv
  return oc.apply_updates(params, updates), state, value


# --- Lookahead: gradients at the fast weights, evaluation with the slow ones ----------------
la_tx = lookahead(oc.adam(1e-2), sync_period=5, slow_step_size=0.5)


@jax.jit
def lookahead_step(params, state, x, y):
  grads = jax.grad(loss)(params.fast, x, y)  # one evaluation, at the fast weights
  updates, state = la_tx.update(grads, state, params)
  return oc.apply_updates(params, updates), state


def main(steps=300, every=50):
  params = init_params()
  state = sam_tx.init(params)
  for t in range(steps + 1):
    params, state, value = sam_step(params, state, X, Y)
    if t % every == 0:
      print(f"SAM       step {t:4d}  loss {float(value):.5f}")

  params = LookaheadParams.init_synced(init_params())
  state = la_tx.init(params)
  for t in range(steps + 1):
    params, state = lookahead_step(params, state, X, Y)
    if t % every == 0:
      print(f"Lookahead step {t:4d}  slow-weights loss {float(loss(params.slow, X, Y)):.5f}")


if __name__ == "__main__":
  main()
