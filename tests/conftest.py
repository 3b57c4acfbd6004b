"""Suite-wide settings: 8 simulated CPU devices (tests/test_sharding.py shards over them;
every other test runs on the default device as before), strict rank promotion, so
nothing is silently broadcast, and strict dtype promotion, so no two arrays of different
dtypes meet without an explicit cast (Python scalars, weakly typed, still may)."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


# Test files of the API surface that moved between the oldest and the newest supported
# versions (Flax/nnx, Orbax, sharding modes, Optax's signatures): `make test` runs them, with
# the `numerics` tests, in the minimum-versions environment (requirements-min.txt).
# (Node ids, or a prefix of them.)
MIN_VERSIONS = (
  "test_contract.py::test_optax_names",
  "test_checkpoint.py",
  "test_masking.py",
  "test_hyperparams.py",
  "test_sharding.py::test_pure_layouts",
  "test_packaging.py",
  "test_flax_examples.py",
  "test_examples.py",
  "test_flax_step.py",
)


# The longest tests (each runs whole scripts or processes, 10-20 s): scheduled first, so
# that the two workers do not finish on one of them while the other waits.
LONGEST = (
  "test_demo.py",
  "test_dropin_scripts.py",
  "test_determinism.py",
  "test_multihost.py",
  "test_lbfgs.py::test_lbfgs_follows_optax",
)


def pytest_collection_modifyitems(config, items):
  import pytest

  if jax.default_backend() != "cpu":
    skip = pytest.mark.skip(
      reason=f"XLA CPU's program; this run's backend is {jax.default_backend()}"
    )
    for item in items:
      if item.get_closest_marker("xla_cpu_program"):
        item.add_marker(skip)
  for item in items:
    if item.nodeid.removeprefix("tests/").startswith(MIN_VERSIONS):
      item.add_marker(pytest.mark.min_versions)
  items.sort(key=lambda item: not item.nodeid.removeprefix("tests/").startswith(LONGEST))
