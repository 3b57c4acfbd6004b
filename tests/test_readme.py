"""The README's Python examples run, and the pieces-built Adam equals oc.adam."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 2
  namespace = {}
  with jax.numpy_rank_promotion("allow"):  # JAX's default, which README readers have
    for block in blocks:
      exec(compile(block, str(README), "exec"), namespace)
    x, y = jnp.ones((4, 3)), jnp.ones((4, 2))
    params, state = namespace["step"](namespace["params"], namespace["state"], x, y)
  import optcompose as oc
  assert params["w"].shape == (3, 2)
  g = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones(2)}
  a, b = namespace["adam"], oc.adam(1e-3)
  ua, _ = a.update(g, a.init(params), params)
  ub, _ = b.update(g, b.init(params), params)
  for u, v in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
    np.testing.assert_allclose(u, v, rtol=1e-6)
  # The safety recipe runs: with a frozen embedding, 4 micro-steps make one real step.
  p = {"embed": jnp.ones(3), "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  tx = namespace["with_frozen"]
  s = tx.init(p)
  for _ in range(4):
    u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
  assert float(jnp.max(jnp.abs(u["embed"]))) == 0.0
  assert float(jnp.max(jnp.abs(u["dense"]["kernel"]))) > 0.0
