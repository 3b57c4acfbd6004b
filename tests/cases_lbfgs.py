"""Registry cases of the L-BFGS family (joined to tests/registry.py's CASES).

The trajectory runner passes gradients (and ``value=``) only. ``scale_by_lbfgs`` needs
nothing more, so it is a Case here; the line searches and ``lbfgs`` need ``value_fn`` (and
``grad``) at every step and are compared with Optax in tests/test_lbfgs.py, in the official
loop (``value_and_grad_from_state``).
"""

from __future__ import annotations

import optax

import optcompose as oc
from registry import Case

# The runner's MLP gradients come from a new minibatch at every step, so each curvature pair
# (dw, du) mixes two batches: <du, dw> is often a cancellation, rho = 1 / <du, dw> is large,
# and the recursion magnifies rounding. With the default memory (10 pairs) and a plain
# learning rate, two correct programs (ours, Optax's) drift apart chaotically: 6e-15 at step
# 5 grows to O(1) by step 100 in float64 (the quadratic stays bitwise equal), and float32
# steps differ by 10^3-10^5 ulps on FlatParams. One pair, the default scaled identity, and the
# direction clipped to norm 0.1 keep the system tame (measured on AVX-512 / AVX2 / SSE4.2:
# float64 trajectory 3e-12 / 3e-13 / 0; float32 MLP steps 3.0 / 1.2 / 0 ulps, FlatParams 6.2
# / 8.1 / 6.5, bfloat16 2.1, float16 1.5). Memories of 3 and 10 pairs are compared with
# Optax in tests/test_lbfgs.py on deterministic objectives. (Not same_state: our
# clip_by_global_norm keeps the norm in its state; test_lbfgs.py compares ScaleByLBFGSState's
# leaves with Optax's.)
CASES = [
  Case(
    "scale_by_lbfgs",
    lambda: oc.chain(
      oc.scale_by_lbfgs(memory_size=1), oc.clip_by_global_norm(0.1), oc.scale_by_learning_rate(0.1)
    ),
    ("scale_by_lbfgs",),
    optax=lambda: optax.chain(
      optax.scale_by_lbfgs(memory_size=1),
      optax.clip_by_global_norm(0.1),
      optax.scale_by_learning_rate(0.1),
    ),
    f32_ulps=32,
    same_state=False,
  )
]

COVERED_ELSEWHERE = {
  "lbfgs": "tests/test_lbfgs.py",
  "scale_by_zoom_linesearch": "tests/test_lbfgs.py",
  "scale_by_backtracking_linesearch": "tests/test_lbfgs.py",
}
