"""Draw the learning-rate schedules on one figure and save it as a PNG.

python examples/plot_schedules.py [--out schedules.png]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from optcompose import schedules as S  # noqa: E402

STEPS = 1000
PEAK = 1e-3

CURVES = {
  "constant": S.constant_schedule(PEAK),
  "step decay (x0.1 at 400, 800)": S.piecewise_constant_schedule(PEAK, {400: 0.1, 800: 0.1}),
  "cosine (floor 0.1)": S.cosine_decay_schedule(PEAK, STEPS, alpha=0.1),
  "warmup 100 + cosine": S.warmup_cosine_decay_schedule(0.0, PEAK, 100, STEPS, 1e-5),
  "SGDR (T0=100, T_mult=2, peak x0.7)": S.cosine_warm_restarts_schedule(PEAK, 100, 2, 0.7),
  "one-cycle (cosine)": S.cosine_onecycle_schedule(STEPS, PEAK),
  "inverse sqrt (warmup 100)": S.inverse_sqrt_schedule(PEAK, 100),
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="schedules.png")
  args = parser.parse_args(argv)
  steps = jnp.arange(STEPS + 1, dtype=jnp.int32)
  fig, ax = plt.subplots(figsize=(12, 5.5), dpi=120)
  for label, schedule in CURVES.items():
    values = jnp.broadcast_to(jax.vmap(schedule)(steps), steps.shape)
    ax.plot(steps, values, label=label, linewidth=1.8)
  ax.set_xlabel("step")
  ax.set_ylabel("learning rate")
  ax.set_title("optcompose schedules")
  ax.grid(alpha=0.3)
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
  fig.tight_layout()
  fig.savefig(args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
