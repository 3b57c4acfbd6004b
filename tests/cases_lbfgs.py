"""Registry cases of the L-BFGS family (joined to tests/registry.py's CASES).

The trajectory runner passes gradients (and ``value=``) only. ``scale_by_lbfgs`` needs
nothing more, so it is a Case here; the line searches and ``lbfgs`` need ``value_fn`` (and
``grad``) at every step and are compared with Optax in tests/test_lbfgs.py, in the official
loop (``value_and_grad_from_state``).
"""

from __future__ import annotations

import optax

import optcompose as oc
from registry import LR, Case

CASES = [
    # Stochastic minibatch gradients on the MLP (a curvature pair from two batches), a fixed
    # learning rate: the direction only, step by step as Optax computes it.
    Case("scale_by_lbfgs", lambda: oc.chain(oc.scale_by_lbfgs(), oc.scale_by_learning_rate(LR)),
         ("scale_by_lbfgs",),
         optax=lambda: optax.chain(optax.scale_by_lbfgs(), optax.scale_by_learning_rate(LR))),
]

COVERED_ELSEWHERE = {
    "lbfgs": "tests/test_lbfgs.py",
    "scale_by_zoom_linesearch": "tests/test_lbfgs.py",
    "scale_by_backtracking_linesearch": "tests/test_lbfgs.py",
}
