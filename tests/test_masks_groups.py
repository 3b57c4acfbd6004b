"""Masks inside groups: a weight-decay mask in a partition group (on FlatParams too), one
path mask shared by every group, and labels_from_paths rules an earlier rule shadows."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import assert_ulps_close, standard_promotion

STEPS = 4


def make_params():
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  return {
    "enc": {"kernel": normal(3, 3), "bias": normal(3)},
    "mid": {"kernel": normal(3, 4), "bias": normal(4)},
    "head": {"kernel": normal(4, 2), "bias": normal(2)},
  }


def grads_at(t):
  """Gradients of step ``t``, the same for every run (a fixed random tree per step)."""
  keys = jax.random.split(jax.random.PRNGKey(t), 6)
  leaves, treedef = jax.tree.flatten(make_params())
  return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def decay(tree):
  """The kernels: a callable mask, written with JAX alone (not optcompose's path helpers)."""
  return jax.tree_util.tree_map_with_path(lambda k, _: "kernel" in jax.tree_util.keystr(k), tree)


STATIC_DECAY = {k: {"kernel": True, "bias": False} for k in ("enc", "mid", "head")}
GROUPS = {"enc": "frozen", "mid": "train", "head": "train"}  # a prefix of the parameters


def buckets(tree):
  """Bucket labels that keep each group's kernels and other leaves apart (so every mask and
  label above has one value per bucket)."""
  return jax.tree_util.tree_map_with_path(
    lambda k, _: f"{k[0].key}/{'kernel' in jax.tree_util.keystr(k)}", tree
  )


def recipes(lib, static):
  """Each recipe for ``lib``; ``static``: the tree STATIC_DECAY where a mask is static
  (Optax refuses a static mask finer than a subtree an outer mask hid: its reference gets
  the callable ``decay``, the same kernels)."""
  kernels = STATIC_DECAY if static else decay
  adamw = lambda rate, wd, mask: lib.adamw(rate, weight_decay=wd, mask=mask)  # noqa: E731
  return {
    "partition, callable decay mask": lib.partition(
      {"frozen": lib.set_to_zero(), "train": adamw(1e-2, 0.1, decay)}, GROUPS
    ),
    "partition, static decay mask": lib.partition(
      {"frozen": lib.set_to_zero(), "train": adamw(1e-2, 0.1, kernels)}, GROUPS
    ),
    "masked adamw with a decay mask": lib.masked(
      adamw(1e-2, 0.1, decay), {"enc": False, "mid": True, "head": True}
    ),
    "partition in partition": lib.partition(
      {
        "frozen": lib.set_to_zero(),
        "train": lib.partition(
          {"mid": adamw(1e-2, 0.1, decay), "head": adamw(1e-3, 0.5, kernels)},
          {"enc": "head", "mid": "mid", "head": "head"},
        ),
      },
      GROUPS,
    ),
  }


@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["flat_optimizer", "flat_params"])
@pytest.mark.parametrize("recipe", recipes(oc, True))
def test_a_mask_inside_a_group_works_on_flat_params_as_on_the_tree(recipe, layout):
  # The inner mask was evaluated on a FlatParams whose other groups' buckets were
  # MaskedNodes, each unflattened to an empty array: a reshape error at init.
  ref = standard_promotion(recipes(optax, False)[recipe])
  ours = recipes(oc, True)[recipe]
  if layout == "flat_optimizer":
    ours, pack = oc.flat_optimizer(ours, labels=buckets), lambda tree: tree
  else:
    pack = lambda tree: oc.flat_params(tree, labels=buckets)  # noqa: E731
  params = make_params()
  s_ours, s_ref = ours.init(pack(params)), ref.init(params)
  update = jax.jit(ours.update)
  for t in range(STEPS):  # both from the reference's parameters and the same gradients
    g = grads_at(t)
    u_ours, s_ours = update(pack(g), s_ours, pack(params))
    u_ref, s_ref = ref.update(g, s_ref, params)
    u_ours = u_ours.unflatten() if layout == "flat_params" else u_ours
    # Frozen (or passed-through) leaves: bit for bit; trained ones: the same arithmetic.
    for a, b in zip(jax.tree.leaves(u_ours["enc"]), jax.tree.leaves(u_ref["enc"])):
      np.testing.assert_array_equal(a, b)
    assert_ulps_close(u_ours, u_ref, 4, what=f"step {t}: ")
    params = optax.apply_updates(params, u_ref)


KERNELS = oc.mask_from_paths(include="kernel")
LABELS = {
  "callable labels": oc.labels_from_paths([(r"enc", "g0"), (r"mid", "g1")], default="g2"),
  "prefix labels": {"enc": "g0", "mid": "g1", "head": "g2"},
}


def layerwise(lib, labels, mask):
  """Layer-wise learning rates, one decay mask for every group (the training recipe)."""
  return lib.partition(
    {f"g{i}": lib.adamw(1e-3 * 2**i, weight_decay=0.1, mask=mask) for i in range(3)}, labels
  )


@pytest.mark.parametrize("flat", [False, True], ids=["tree", "flat_optimizer"])
@pytest.mark.parametrize("labels", LABELS)
def test_one_path_mask_serves_every_group_and_a_typo_is_still_refused(labels, flat):
  # Group g0 (an embedding, no kernel) saw only its own leaves and refused the shared
  # `include="kernel"` as a typo.
  params = make_params()
  params["enc"] = {"embedding": params["enc"]["kernel"]}
  wrap = (lambda tx: oc.flat_optimizer(tx, labels=buckets)) if flat else (lambda tx: tx)
  ours = wrap(layerwise(oc, LABELS[labels], KERNELS))
  ref = standard_promotion(layerwise(optax, LABELS[labels], decay))
  s_ours, s_ref = ours.init(params), ref.init(params)
  for t in range(STEPS):
    g = {**grads_at(t), "enc": {"embedding": grads_at(t)["enc"]["kernel"]}}
    u_ours, s_ours = jax.jit(ours.update)(g, s_ours, params)
    u_ref, s_ref = ref.update(g, s_ref, params)
    assert_ulps_close(u_ours, u_ref, 4, what=f"step {t}: ")
    params = optax.apply_updates(params, u_ref)
  # A pattern found in no leaf of the whole model is still a typo, named with its paths.
  typo = wrap(layerwise(oc, LABELS[labels], oc.mask_from_paths(include="kernl")))
  with pytest.raises(ValueError, match=r"`include` 'kernl' matches no leaf path.*\['head'\]"):
    typo.init(params)


def test_a_path_mask_on_a_subset_without_masked_nodes_says_how_to_write_it():
  """A tree given alone (an nnx.Optimizer's wrt= subset) shows nothing of the rest of the
  model: the pattern is refused there, with how to write a mask for that part."""
  subset = {"embed": {"embedding": jnp.ones((4, 2))}}
  with pytest.raises(ValueError, match=r"searched in: \['embed'\]\['embedding'\]\. .*exclude="):
    oc.adamw(1e-3, mask=KERNELS).init(subset)
  assert oc.mask_from_paths(exclude=r"embedding")(subset) == {"embed": {"embedding": False}}


BLOCKS = {name: {"w": jnp.ones(2)} for name in ("block_0", "block_1", "block_10", "head")}


def test_a_rule_an_earlier_rule_shadows_everywhere_is_refused():
  # `block` takes every path `block_1` matches: block_1 silently kept `body`'s label.
  pattern = r"block_1\b|block_1'"
  labels = oc.labels_from_paths([(r"block", "body"), (pattern, "top")], "head")
  message = f"`rules[1]` ({pattern!r}, 'top') never assigns its label: every path it matches "
  message += "is taken by an earlier rule, e.g. ['block_1']['w'] by `rules[0]` ('block', 'body')"
  with pytest.raises(ValueError, match=re.escape(message)):
    labels(BLOCKS)
  with pytest.raises(ValueError, match=r"`rules\[1\]`.*never assigns"):
    oc.partition({"body": oc.sgd(0.1), "top": oc.sgd(1.0), "head": oc.sgd(0.1)}, labels).init(
      BLOCKS
    )


def test_first_rule_wins_where_a_later_rule_still_labels_a_path():
  ordered = oc.labels_from_paths([(r"block_1'", "top"), (r"block", "body")], "head")
  want = {"block_0": "body", "block_1": "top", "block_10": "body", "head": "head"}
  assert ordered(BLOCKS) == {name: {"w": label} for name, label in want.items()}
  # `block` matches block_1 (taken by rule 0) but labels block_0 and block_10: allowed.
  partly = oc.labels_from_paths([(r"block_1\b|block_1'", "top"), (r"block|head", "body")])
  assert partly(BLOCKS)["block_1"]["w"] == "top" and partly(BLOCKS)["head"]["w"] == "body"
  # A later rule whose every path an earlier rule gives the same label changes nothing.
  same = oc.labels_from_paths([(r"block", "body"), (r"block_1'", "body")], "head")
  assert same(BLOCKS)["block_1"]["w"] == "body"
  # In a group, a rule that wins only other groups' paths is not shadowed: the whole model
  # counts (rule 1, `w`, wins only ['head']['w'], outside the inner partition's group).
  inner = oc.labels_from_paths([(r"block", "x"), (r"w", "y")])
  tx = oc.partition(
    {
      "frozen": oc.set_to_zero(),
      "train": oc.partition({"x": oc.sgd(1.0), "y": oc.sgd(2.0)}, inner),
    },
    {"block_0": "train", "block_1": "train", "block_10": "train", "head": "frozen"},
  )
  updates, _ = tx.update(BLOCKS, tx.init(BLOCKS), BLOCKS)
  np.testing.assert_array_equal(updates["block_1"]["w"], -jnp.ones(2))
  np.testing.assert_array_equal(updates["head"]["w"], jnp.zeros(2))
  # There too, a rule found in no path of the whole model is a typo.
  typo = oc.labels_from_paths([(r"block", "x"), (r"hed", "y")])
  tx = oc.partition(
    {"frozen": oc.set_to_zero(), "train": oc.partition({"x": oc.sgd(1.0), "y": oc.sgd(2.0)}, typo)},
    {"block_0": "train", "block_1": "train", "block_10": "train", "head": "frozen"},
  )
  with pytest.raises(
    ValueError, match=r"`rules\[1\]\[0\]` 'hed' matches no leaf path.*\['head'\]\['w'\]"
  ):
    tx.init(BLOCKS)


def test_diagnostics_zero_mask_inside_a_group_counts_the_group_s_leaves_on_flat_params():
  # Once the group's mask resolved on FlatParams, the hidden buckets still counted as (empty)
  # elements, shifting the mask onto the wrong leaves: zero_fraction 0.0 for 0.5.
  params = make_params()
  params["mid"]["kernel"] = params["mid"]["kernel"].at[0].set(0.0)  # 4 zeros of 12
  params["enc"]["kernel"] = jnp.zeros((3, 3))  # frozen: not measured
  inner = oc.with_diagnostics(oc.sgd(0.1), zero_mask=decay)
  tx = oc.partition({"frozen": oc.set_to_zero(), "train": inner}, GROUPS)
  kernels = [params["mid"]["kernel"], params["head"]["kernel"]]  # the group's kernels
  want = sum(int(np.sum(np.asarray(k) == 0)) for k in kernels) / sum(k.size for k in kernels)
  for run in (tx, oc.flat_optimizer(tx, labels=buckets)):
    _, state = run.update(grads_at(0), run.init(params), params)
    assert oc.diagnostics_dict(state)["zero_fraction"] == pytest.approx(want, rel=1e-6)


def test_a_fallback_or_general_rule_that_wins_nothing_on_this_model_is_allowed():
  # A catch-all last rule, on a model the rules before it cover, and a general recipe whose
  # specific rule happens to cover every path of its general one here, label as the rules
  # say (they were refused as shadowed): only an earlier rule found in the later rule's
  # regex ('block' in 'block_1') makes the order a mistake.
  params = {"embed": jnp.ones(3), "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  fallback = oc.labels_from_paths(
    [("embed", "frozen"), ("kernel", "decay"), ("bias", "no_decay"), (".*", "decay")]
  )
  want = {"embed": "frozen", "dense": {"kernel": "decay", "bias": "no_decay"}}
  assert fallback(params) == want
  sgd = lambda lr: oc.sgd(lr)  # noqa: E731
  oc.partition(
    {"frozen": oc.set_to_zero(), "decay": sgd(0.1), "no_decay": sgd(0.2)}, fallback
  ).init(params)
  general = oc.labels_from_paths([(r"dense.*kernel", "dense"), (r"kernel", "other")], "rest")
  assert general(params)["dense"]["kernel"] == "dense"


def test_a_path_mask_on_another_tree_inside_a_group_is_still_checked():
  # Inside a group the whole model's paths excuse a pattern only for the model's own paths:
  # `flatten` hands its inner transformation one vector (path ''), where 'kernel' decays
  # nothing. It is refused there, as outside a group.
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  decay = oc.flatten(oc.add_decayed_weights(1e-2, mask=oc.mask_from_paths(include="kernel")))
  with pytest.raises(ValueError, match="`include` 'kernel' matches no leaf path"):
    decay.init(params)
  grouped = oc.partition({"a": decay, "b": oc.sgd(0.1)}, {"dense": {"kernel": "a", "bias": "b"}})
  with pytest.raises(ValueError, match="`include` 'kernel' matches no leaf path"):
    grouped.init(params)
