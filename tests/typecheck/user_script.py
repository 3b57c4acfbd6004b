"""A user's training code, annotated with Optax's public types, written against
``import optcompose as optax``: what a type checker must accept as it accepts the same code on
Optax (and the mistakes it must flag, marked with the ignore comment that expects them).

``make lint``'s pyrefly checks this folder ([tool.pyrefly] in pyproject.toml): an ignore
comment that suppresses nothing is an error here, so a builder typed ``Any`` again (the
mistakes would pass unseen) fails the check. pyright and mypy (``--no-implicit-reexport``)
report exactly the marked lines too. Not collected by pytest (no ``test_`` name); it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

import jax
import jax.numpy as jnp

import optcompose as optax
import optcompose.tree_utils as otu
from optcompose import chain, current_hyperparams, set_hyperparams
from optcompose.schedules import warmup_cosine_decay_schedule
from optcompose.testing import check_invariants


def make_schedule(total: int) -> optax.Schedule:
  return warmup_cosine_decay_schedule(0.0, 1e-3, 10, total)


def make_optimizer(lr: optax.ScalarOrSchedule, clip: float = 1.0) -> optax.GradientTransformation:
  return chain(optax.clip_by_global_norm(clip), optax.adamw(lr, weight_decay=1e-4))


def make_extra(lr: float) -> optax.GradientTransformationExtraArgs:
  return optax.chain(optax.sgd(lr), optax.scale_by_learning_rate(1.0))


def make_named(lr: float) -> optax.GradientTransformation:
  # Optax's named_chain(*args): pyright read a written `args: tuple` and refused two pairs.
  return optax.named_chain(("clip", optax.clip(1.0)), ("sgd", optax.sgd(lr)))


class MyState(NamedTuple):
  steps: jax.Array


def my_transform(scale: float) -> optax.GradientTransformation:
  def init_fn(params: optax.Params) -> MyState:
    return MyState(jnp.zeros([], jnp.int32))

  def update_fn(
    updates: optax.Updates, state: MyState, params: Optional[optax.Params] = None
  ) -> tuple[optax.Updates, MyState]:
    return jax.tree.map(lambda g: scale * g, updates), MyState(state.steps + 1)

  return optax.GradientTransformation(init_fn, update_fn)


init_f: optax.TransformInitFn = optax.adam(1e-3).init
update_f: optax.TransformUpdateFn = optax.adam(1e-3).update


def train_step(
  tx: optax.GradientTransformation,
  params: optax.Params,
  opt_state: optax.OptState,
  grads: optax.Updates,
) -> tuple[optax.Params, optax.OptState]:
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def namespaces(grads: optax.Updates) -> list:
  """Optax's namespaces: ``optax.transforms``, ``optax.schedules``, ``optax.tree``, and its
  names outside the optimizer domain that optcompose forwards (losses)."""
  masked = optax.transforms.masked(optax.transforms.clip_by_global_norm(1.0), {"w": True})
  inject = optax.schedules.inject_hyperparams(optax.adam)(learning_rate=1e-3)
  sched: optax.Schedule = optax.schedules.linear_schedule(1.0, 0.0, 10)
  norm: jax.Array = optax.tree.norm(grads)
  loss = optax.softmax_cross_entropy_with_integer_labels(jnp.zeros((2, 3)), jnp.zeros(2, int))
  return [masked, inject, sched, norm, loss, optax.losses.l2_loss, otu.tree_get]


def main() -> None:
  params: optax.Params = {"w": jnp.ones((3,))}
  tx = make_optimizer(make_schedule(100))
  opt_state: optax.OptState = tx.init(params)
  grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
  params, opt_state = train_step(tx, params, opt_state, grads)
  inj = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
  state = set_hyperparams(inj.init(params), learning_rate=1e-4)
  print(current_hyperparams(state)["learning_rate"])
  ms = optax.MultiSteps(optax.adam(1e-3), every_k_schedule=2)
  ms_tx: optax.GradientTransformationExtraArgs = ms.gradient_transformation()
  adam_state: optax.ScaleByAdamState = optax.ScaleByAdamState(
    jnp.zeros([], jnp.int32), params, params
  )
  es: optax.EmptyState = optax.EmptyState()
  ok: bool = isinstance(tx, optax.GradientTransformationExtraArgs)
  check_invariants(optax.chain(my_transform(0.5), optax.sgd(0.1)), params, grads)
  print(
    ms_tx, adam_state, es, ok, namespaces(grads), make_extra(0.1), make_named(0.1), init_f, update_f
  )


if TYPE_CHECKING:  # checked, never run
  from typing import assert_type

  # The builders keep their own types (a registry decorator typed as returning ``Any`` made
  # every one of them ``Any``, and the two mistakes below passed unseen).
  assert_type(optax.adamw(1e-3), optax.GradientTransformation)
  assert_type(optax.transforms.clip_by_global_norm(1.0), optax.GradientTransformation)
  optax.adamw(learning_rat=1e-3)  # pyrefly: ignore[missing-argument, unexpected-keyword]
  optax.sgd(0.1, momentum="high")  # pyrefly: ignore[bad-argument-type]
  optax.adamww(1e-3)  # pyrefly: ignore[missing-attribute]

if __name__ == "__main__":
  main()
