"""docs/coming-from-pytorch.md's recipes, run against PyTorch itself in float64.

Each case feeds the same least-squares gradients (each framework's own, from its own
weights) to a PyTorch optimizer and to the recipe the guide gives for it, and compares the
weights after the steps. PyTorch is not a test dependency: these run where it is installed
(``make bench`` installs it into the same environment) and are skipped elsewhere.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import optcompose as oc
from numerics import x64

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(0)
A, B, W0 = RNG.normal(size=(12, 5)), RNG.normal(size=12), RNG.normal(size=5)
STEPS = 30
T = 40  # the one-cycle cases' total steps


@pytest.fixture(autouse=True)
def _torch_in_float64():
  """PyTorch's own scalars (NAdam's momentum product, a scheduler's factors) in float64."""
  before = torch.get_default_dtype()
  torch.set_default_dtype(torch.float64)
  yield
  torch.set_default_dtype(before)


def _torch_run(make_opt, make_sched=None, micro=1):
  w = torch.tensor(W0, dtype=torch.float64, requires_grad=True)
  opt = make_opt([w])
  sched = make_sched(opt) if make_sched else None
  rows = np.array_split(np.arange(len(B)), micro)
  for _ in range(STEPS):
    opt.zero_grad()
    for r in rows:
      a, b = torch.tensor(A[r]), torch.tensor(B[r])
      (0.5 * ((a @ w - b) ** 2).sum() / micro).backward()
    opt.step()
    if sched is not None:
      sched.step()
  return w.detach().numpy()


def _our_run(tx, micro=1):
  with x64():
    p = {"w": jnp.asarray(W0)}
    state = tx.init(p)
    rows = np.array_split(np.arange(len(B)), micro)
    for _ in range(STEPS):
      for r in rows:
        g = {"w": A[r].T @ (A[r] @ p["w"] - B[r])}  # MultiSteps applies the mean
        u, state = tx.update(g, state, p)
        p = oc.apply_updates(p, u)
    return np.asarray(p["w"]), state


def _onecycle(start, factors, kind="cosine"):
  return oc.piecewise_interpolate_schedule(kind, start, factors)


def _bias_scaled(value, b2=0.999):
  return lambda c: value * jnp.sqrt(1.0 - b2 ** (jnp.asarray(c, jnp.float64) + 1.0))


def _cases():
  opt, sched = torch.optim, torch.optim.lr_scheduler
  pct = int(0.3 * T) - 1  # OneCycleLR's first phase ends at pct_start * total_steps - 1
  lr = _onecycle(0.1 / 25, {pct: 25.0, T - 1: 1 / (25 * 1e4)})
  b1 = _onecycle(0.95, {pct: 0.85 / 0.95, T - 1: 0.95 / 0.85})
  return {
    "Adam+OneCycleLR(cycle_momentum)": (
      lambda p: opt.Adam(p, lr=0.1),
      lambda o: sched.OneCycleLR(o, 0.1, total_steps=T),
      oc.inject_hyperparams(oc.adam)(learning_rate=lr, b1=b1),
    ),
    "AMSGrad": (
      lambda p: opt.Adam(p, lr=0.05, amsgrad=True),
      None,
      oc.inject_hyperparams(oc.amsgrad)(
        learning_rate=_bias_scaled(0.05), eps=_bias_scaled(1e-8), bias_correction_nu=False
      ),
    ),
    "NAdam(momentum_decay=1e4)": (
      lambda p: opt.NAdam(p, lr=0.05, momentum_decay=1e4),
      None,
      oc.nadam(0.05),
    ),
    "NAdam(decoupled_weight_decay)": (
      lambda p: opt.NAdam(
        p, lr=0.05, momentum_decay=1e4, weight_decay=0.1, decoupled_weight_decay=True
      ),
      None,
      oc.nadamw(0.05, weight_decay=0.1),
    ),
    "RMSprop(alpha default)": (
      lambda p: opt.RMSprop(p, lr=1e-2),
      None,
      oc.rmsprop(1e-2, decay=0.99, eps=1e-8, eps_in_sqrt=False),
    ),
    "SequentialLR(LinearLR, CosineAnnealingLR)": (
      lambda p: opt.SGD(p, lr=0.05, momentum=0.9),
      lambda o: sched.SequentialLR(
        o,
        [sched.LinearLR(o, 0.1, 1.0, total_iters=5), sched.CosineAnnealingLR(o, 30, 1e-3)],
        milestones=[5],
      ),
      oc.sgd(oc.warmup_cosine_decay_schedule(0.005, 0.05, 5, 35, end_value=1e-3), 0.9),
    ),
    "accumulation over 3 micro-batches": (
      lambda p: opt.SGD(p, lr=0.01, momentum=0.9),
      None,
      oc.MultiSteps(oc.sgd(0.01, 0.9), 3, accumulator_dtype=None),
    ),
  }


@pytest.mark.parametrize(
  "name",
  [
    "Adam+OneCycleLR(cycle_momentum)",
    "AMSGrad",
    "NAdam(momentum_decay=1e4)",
    "NAdam(decoupled_weight_decay)",
    "RMSprop(alpha default)",
    "SequentialLR(LinearLR, CosineAnnealingLR)",
    "accumulation over 3 micro-batches",
  ],
)
def test_the_guide_s_recipe_follows_pytorch(name):
  with x64():  # built as a float64 run builds them
    make_opt, make_sched, tx = _cases()[name]
  micro = 3 if "micro" in name else 1
  theirs = _torch_run(make_opt, make_sched, micro)
  ours, _ = _our_run(tx, micro)
  np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12 * np.abs(theirs).max())


@pytest.mark.parametrize("three_phase", [False, True])
def test_onecycle_learning_rates_follow_pytorch(three_phase):
  """OneCycleLR's rate at every step, from the guide's piecewise_interpolate_schedule."""
  sched = torch.optim.lr_scheduler
  w = torch.zeros(1, requires_grad=True)
  opt = torch.optim.SGD([w], lr=1.0, momentum=0.9)
  kind = "linear" if three_phase else "cosine"
  strategy = "linear" if three_phase else "cos"
  s = sched.OneCycleLR(opt, 1.0, total_steps=T, anneal_strategy=strategy, three_phase=three_phase)
  theirs = []
  for _ in range(T):
    theirs.append(opt.param_groups[0]["lr"])
    opt.step()
    s.step()
  pct = int(0.3 * T) - 1
  if three_phase:  # up, down to the start over as many steps, then to start / final_div
    factors = {pct: 25.0, 2 * pct: 1 / 25, T - 1: 1 / 1e4}
  else:
    factors = {pct: 25.0, T - 1: 1 / (25 * 1e4)}
  with x64():
    ours = _onecycle(1 / 25, factors, kind)
    np.testing.assert_allclose([float(ours(t)) for t in range(T)], theirs, rtol=1e-12, atol=1e-15)


def test_the_default_float32_accumulator_is_what_keeps_float64_runs_apart():
  """The guide's note: MultiSteps' float32 accumulator (Optax's default) is what separates a
  float64 run from PyTorch's by about 1e-8."""
  with x64():
    make_opt, _, _ = _cases()["accumulation over 3 micro-batches"]
    tx = oc.MultiSteps(oc.sgd(0.01, 0.9), 3)
  theirs = _torch_run(make_opt, None, 3)
  ours, state = _our_run(tx, 3)
  assert state.acc_grads["w"].dtype == jnp.float32
  rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
  assert 1e-12 < rel < 1e-6


def test_current_learning_rate_is_the_one_used_where_pytorch_reports_the_next():
  """After n updates ``current_hyperparams`` gives the rate the n-th update used;
  ``get_last_lr()`` after ``scheduler.step()`` gives the one the next step will use."""
  w = torch.zeros(1, requires_grad=True)
  opt = torch.optim.SGD([w], lr=1.0)
  s = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
  tx = oc.sgd(oc.exponential_decay(1.0, 1, 0.5))
  state = tx.init({"w": jnp.zeros(1)})
  for _ in range(3):
    opt.step()
    s.step()
    _, state = tx.update({"w": jnp.ones(1)}, state)
  assert s.get_last_lr()[0] == 0.125
  assert float(oc.current_hyperparams(state)["learning_rate"]) == 0.25
