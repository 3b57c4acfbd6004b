"""Suite-wide settings: 8 simulated CPU devices (tests/test_sharding.py shards over them;
every other test runs on the default device as before), and strict rank promotion, so
nothing is silently broadcast."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
