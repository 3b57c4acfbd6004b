"""One of the two processes of tests/test_multihost.py (not a test file: pytest does not
collect it; the test imports its data and model to compute the single-process reference).

    python tests/multihost_worker.py PROCESS_ID PORT SHARED_DIR OUT_DIR

Each process owns two CPU devices (the test sets XLA_FLAGS); together they form a 2 x 2 mesh
("data" across the processes, "model" within each). The parameters are split over "model",
AdamW's moments over both axes (ZeRO-1, ``oc.sharding.zero1_state_shardings``), the batch
over "data": no process holds a whole moment. After STEPS steps both processes save the run
with ``save_orbax_checkpoint`` into SHARED_DIR and restore it; one more step is saved over it
in the background (``block=False``). Process 0 writes the gathered results to OUT_DIR as
``.npz`` files, and each process prints ``OK <checks>`` at the end.

Exit status 3 with a line ``UNAVAILABLE: ...``: the processes could not connect (no local
port or no CPU collectives), which the test reports as a skip.
"""

from __future__ import annotations

import os
import sys

import numpy as np

STEPS = 5  # steps before the first checkpoint; one more is saved over it
LEARNING_RATE, WEIGHT_DECAY = 3e-2, 1e-2
SHAPES = {"kernel": (8, 16), "bias": (16,), "out": (16, 4)}


def host_params() -> dict:
  """The initial parameters, the same in every process (float32 NumPy)."""
  rng = np.random.default_rng(7)
  return {k: (rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32) for k, s in SHAPES.items()}


def host_batch(step: int) -> tuple:
  """The global batch of a step (16 examples), the same in every process."""
  rng = np.random.default_rng(100 + step)
  x = rng.normal(size=(16, 8)).astype(np.float32)
  return x, np.cos(x[:, :4] + x[:, 4:]).astype(np.float32)


def loss(params, x, y):
  import jax.numpy as jnp

  h = jnp.tanh(x @ params["kernel"] + params["bias"][None, :])
  return jnp.mean((h @ params["out"] - y) ** 2)


def flat(tree) -> dict:
  """``{keystr path: NumPy array}`` of a tree of host arrays."""
  import jax

  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def main(process_id: int, port: int, shared: str, out: str) -> int:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
      coordinator_address=f"localhost:{port}",
      num_processes=2,
      process_id=process_id,
      initialization_timeout=60,
    )
    jax.devices()  # the CPU client connects its collectives here
  except Exception as e:  # no port or no collectives: reported as a skip by the test
    print(f"UNAVAILABLE: {type(e).__name__}: {e}", flush=True)
    return 3

  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

  import optcompose as oc
  from optcompose import checkpoint as ck

  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
  mesh = Mesh(
    np.array(jax.devices()).reshape(2, 2),
    ("data", "model"),
    axis_types=(AxisType.Auto, AxisType.Auto),
  )
  assert {d.process_index for d in mesh.devices[process_id]} == {process_id}  # a row each
  spec = {"kernel": P(None, "model"), "bias": P("model"), "out": P("model", None)}
  p_shardings = {k: NamedSharding(mesh, s) for k, s in spec.items()}
  batch_sharding = NamedSharding(mesh, P("data", None))

  def global_array(host, sharding):  # each process gives the slices of its own devices
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.asarray(host[index]))

  def count(n):  # a step count, replicated on the four devices
    return global_array(np.int32(n), NamedSharding(mesh, P()))

  tx = oc.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  params = {k: global_array(x, p_shardings[k]) for k, x in host_params().items()}
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
  )
  placement = oc.sharding.zero1_state_shardings(tx, abstract, axis="data")
  state = jax.jit(tx.init, out_shardings=placement)(params)

  def step(params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return oc.apply_updates(params, updates), state

  step = jax.jit(
    step,
    in_shardings=(p_shardings, placement, batch_sharding, batch_sharding),
    out_shardings=(p_shardings, placement),
  )

  def train(params, state, start, stop):
    for i in range(start, stop):
      x, y = host_batch(i)
      params, state = step(
        params, state, global_array(x, batch_sharding), global_array(y, batch_sharding)
      )
    return params, state

  def gathered(tree):  # every array whole, on every process
    return flat(multihost_utils.process_allgather(tree, tiled=True))

  checks = []
  params, state = train(params, state, 0, STEPS)
  moments = [x for x in jax.tree.leaves(state) if x.ndim]
  assert all(not x.is_fully_addressable for x in moments)
  split = [x for x in moments if sum(s.data.size for s in x.addressable_shards) * 4 == x.size * 2]
  assert split, "no moment is split over both mesh axes"  # each device a quarter of it
  checks.append("sharded")
  x, y = host_batch(0)
  value = jax.jit(loss, out_shardings=NamedSharding(mesh, P()))(
    params, global_array(x, batch_sharding), global_array(y, batch_sharding)
  )
  assert not value.is_fully_addressable and np.isfinite(float(value))  # reads on every host
  checks.append("replicated-scalar")

  tree = {"params": params, "opt_state": state, "step": count(STEPS)}
  at_save = gathered(tree)
  if process_id == 0:
    np.savez(os.path.join(out, "step5.npz"), **at_save)

  try:  # a msgpack file holds host arrays only, and says so
    ck.save_checkpoint(os.path.join(out, f"refused{process_id}.msgpack"), tree)
    raise AssertionError("save_checkpoint accepted arrays sharded across processes")
  except ValueError as e:
    assert "sharded across processes" in str(e) and "save_orbax_checkpoint" in str(e), e
  checks.append("msgpack-refused")

  try:  # a path of each host's own (a local disk) is refused on every process, not hung on
    ck.save_orbax_checkpoint(os.path.join(shared, f"local{process_id}"), tree)
    raise AssertionError("save_orbax_checkpoint accepted a different path on each process")
  except ValueError as e:
    assert "the processes give different directories (1 of 2" in str(e), e
  checks.append("paths-differ")

  path = os.path.join(shared, "ckpt")
  assert str(ck.save_orbax_checkpoint(path, tree)) == path
  template = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
  )
  restored = ck.restore_orbax_checkpoint(path, template)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(template)):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)
  assert all(np.array_equal(a, b) for a, b in zip(gathered(restored).values(), at_save.values()))
  checks.append("restored")

  params, state = train(params, state, STEPS, STEPS + 1)  # one more step, saved over it
  tree = {"params": params, "opt_state": state, "step": count(STEPS + 1)}
  at_save = gathered(tree)
  save = ck.save_orbax_checkpoint(path, tree, overwrite=True, block=False)
  params, state = train(params, state, STEPS + 1, STEPS + 3)  # training goes on meanwhile
  assert str(save.wait()) == path
  restored = gathered(ck.restore_orbax_checkpoint(path, template))
  assert all(np.array_equal(a, b) for a, b in zip(restored.values(), at_save.values()))
  checks.append("async-overwrite")
  if process_id == 0:
    np.savez(os.path.join(out, "step6.npz"), **restored)
    with open(os.path.join(out, "listing.txt"), "w") as f:
      f.write("\n".join(sorted(os.listdir(shared))))

  multihost_utils.sync_global_devices("optcompose_multihost_worker_end")
  print("OK", " ".join(checks), flush=True)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]))
