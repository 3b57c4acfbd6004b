"""docs/coming-from-pytorch.md's recipes, run against PyTorch itself in float64.

Each case feeds the same least-squares gradients (each framework's own, from its own
weights) to a PyTorch optimizer and to the recipe the guide gives for it, and compares the
weights after the steps. PyTorch is not a test dependency: these run where it is installed
(``make bench`` installs it into the same environment) and are skipped elsewhere.
"""

from __future__ import annotations

import jax
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
T_ODD = 45  # a one-cycle run whose 0.3 * T (13.5) is not a whole number


@pytest.fixture(autouse=True)
def _torch_in_float64():
  """PyTorch's own scalars (NAdam's momentum product, a scheduler's factors) in float64."""
  before = torch.get_default_dtype()
  torch.set_default_dtype(torch.float64)
  yield
  torch.set_default_dtype(before)


def _torch_run(make_opt, make_sched=None, micro=1, *, scale=1.0, clip=None, steps=STEPS):
  """PyTorch's weights after ``steps`` steps; ``scale`` multiplies the loss (and so the
  gradients), ``clip(params)`` runs between the backward passes and ``opt.step()``."""
  w = torch.tensor(W0, dtype=torch.float64, requires_grad=True)
  opt = make_opt([w])
  sched = make_sched(opt) if make_sched else None
  rows = np.array_split(np.arange(len(B)), micro)
  for _ in range(steps):
    opt.zero_grad()
    for r in rows:
      a, b = torch.tensor(A[r]), torch.tensor(B[r])
      (scale * (0.5 * ((a @ w - b) ** 2).sum() / micro)).backward()
    if clip is not None:
      clip([w])
    opt.step()
    if sched is not None:
      sched.step()
  return w.detach().numpy()


def _our_run(tx, micro=1, *, scale=1.0, steps=STEPS, jit=False):
  with x64():
    p = {"w": jnp.asarray(W0)}
    state = tx.init(p)
    update = jax.jit(tx.update) if jit else tx.update
    rows = np.array_split(np.arange(len(B)), micro)
    for _ in range(steps):
      for r in rows:
        g = {"w": scale * (A[r].T @ (A[r] @ p["w"] - B[r]))}  # MultiSteps applies the mean
        u, state = update(g, state, p)
        p = oc.apply_updates(p, u)
    return np.asarray(p["w"]), state


def _rel(ours, theirs):
  return np.abs(ours - theirs).max() / np.abs(theirs).max()


def _assert_same(ours, theirs):
  np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12 * np.abs(theirs).max())


def _onecycle(start, factors, kind="cosine"):
  return oc.piecewise_interpolate_schedule(kind, start, factors)


# The guide's recipes, as it writes them.


def _f(count):
  """The step count as a float64 number (this suite's promotion rules are strict; a reader's
  default rules promote the int32 count by themselves)."""
  return jnp.asarray(count, jnp.float64)


def _bias_scaled(value, b2=0.999):
  return lambda c: value * jnp.sqrt(1.0 - b2 ** (_f(c) + 1.0))


def _amsgrad(lr, eps=1e-8):
  return oc.inject_hyperparams(oc.amsgrad)(
    learning_rate=_bias_scaled(lr), eps=_bias_scaled(eps), bias_correction_nu=False
  )


def _radam(lr, eps=1e-8, b2=0.999):
  return oc.inject_hyperparams(oc.radam)(
    learning_rate=lr, eps=lambda t: eps / jnp.sqrt(1 - b2 ** (_f(t) + 1))
  )


def _adagrad_exact(lr, eps=1e-10, lr_decay=0.0):
  """Adagrad(lr, lr_decay, eps) exactly: RMSprop's running mean of g^2 is the sum / (t + 1)."""
  return oc.inject_hyperparams(oc.rmsprop)(
    learning_rate=lambda t: lr / (1 + _f(t) * lr_decay) / jnp.sqrt(_f(t) + 1),
    decay=lambda t: _f(t) / (_f(t) + 1),
    eps=lambda t: eps / jnp.sqrt(_f(t) + 1),
    eps_in_sqrt=False,
  )


def _torch_rprop(lr=0.01, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0)):
  inner = oc.scale_by_rprop(lr, *etas, *step_sizes)

  def update(grads, state, params=None, **extra):
    _, state = inner.update(grads, state, params)
    return jax.tree.map(jnp.negative, state.prev_updates), state

  return oc.GradientTransformation(inner.init, update)


def _dampened_sgd(lr, momentum, dampening):
  return oc.chain(
    oc.conditionally_transform(oc.scale(1 - dampening), lambda step: step > 0),
    oc.trace(momentum),
    oc.scale_by_learning_rate(lr),
  )


def _clip_grad_norm(max_norm, norm_type=2.0):
  def clip(updates, params=None):
    norm = oc.tree_utils.tree_norm(updates, ord=norm_type)
    return jax.tree.map(lambda u: u * jnp.minimum(max_norm / (norm + 1e-6), 1.0), updates)

  return oc.stateless(clip)


def _one_cycle(values, ends, anneal="cos"):
  def between(a, b, pct):
    if anneal == "linear":
      return (b - a) * pct + a
    return b + (a - b) / 2 * (jnp.cos(jnp.pi * pct) + 1)

  def schedule(t):
    t = _f(t)
    starts = (0.0, *ends[:-1])
    value = between(values[-2], values[-1], (t - starts[-1]) / (ends[-1] - starts[-1]))
    for i in reversed(range(len(ends) - 1)):
      here = between(values[i], values[i + 1], (t - starts[i]) / (ends[i] - starts[i]))
      value = jnp.where(t <= ends[i], here, value)
    return value

  return schedule


def _triangle(step_size):
  """CyclicLR's triangular wave: 0 at the start of a cycle, 1 at its middle."""
  return lambda t: 1 - jnp.abs(_f(t) / step_size % 2 - 1)


def _cases():
  opt, sched = torch.optim, torch.optim.lr_scheduler
  swa_utils = torch.optim.swa_utils
  pct = int(0.3 * T) - 1  # OneCycleLR's first phase ends at pct_start * total_steps - 1
  lr = _onecycle(0.1 / 25, {pct: 25.0, T - 1: 1 / (25 * 1e4)})
  b1 = _onecycle(0.95, {pct: 0.85 / 0.95, T - 1: 0.95 / 0.85})
  ends = [0.3 * T_ODD - 1, T_ODD - 1]
  tri = _triangle(7)
  return {
    "Adam+OneCycleLR(cycle_momentum)": (
      lambda p: opt.Adam(p, lr=0.1),
      lambda o: sched.OneCycleLR(o, 0.1, total_steps=T),
      oc.inject_hyperparams(oc.adam)(learning_rate=lr, b1=b1),
    ),
    "Adam+OneCycleLR(cycle_momentum), 0.3 * T not whole": (
      lambda p: opt.Adam(p, lr=0.1),
      lambda o: sched.OneCycleLR(o, 0.1, total_steps=T_ODD),
      oc.inject_hyperparams(oc.adam)(
        learning_rate=_one_cycle([0.1 / 25, 0.1, 0.1 / 25 / 1e4], ends),
        b1=_one_cycle([0.95, 0.85, 0.95], ends),
      ),
    ),
    "AMSGrad": (lambda p: opt.Adam(p, lr=0.05, amsgrad=True), None, _amsgrad(0.05)),
    "AdamW(amsgrad)": (
      lambda p: opt.AdamW(p, lr=0.05, weight_decay=0.1, amsgrad=True),
      None,
      oc.chain(_amsgrad(0.05), oc.add_decayed_weights(-0.05 * 0.1)),
    ),
    "RAdam": (lambda p: opt.RAdam(p, lr=0.05), None, _radam(0.05)),
    "Adagrad": (lambda p: opt.Adagrad(p, lr=0.1), None, _adagrad_exact(0.1)),
    "Adagrad(lr_decay)": (
      lambda p: opt.Adagrad(p, lr=0.1, lr_decay=0.05),
      None,
      _adagrad_exact(0.1, lr_decay=0.05),
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
    "SGD(dampening)": (
      lambda p: opt.SGD(p, lr=0.01, momentum=0.9, dampening=0.3),
      None,
      _dampened_sgd(0.01, 0.9, 0.3),
    ),
    "ASGD": (
      lambda p: opt.ASGD(p, lr=0.01, lambd=0.05, alpha=0.75),
      None,
      oc.chain(
        oc.add_decayed_weights(0.05), oc.sgd(lambda t: 0.01 / (1 + 0.05 * 0.01 * _f(t)) ** 0.75)
      ),
    ),
    "Rprop": (
      lambda p: opt.Rprop(p, lr=0.01, etas=(0.4, 1.3), step_sizes=(1e-4, 0.5)),
      None,
      _torch_rprop(0.01, (0.4, 1.3), (1e-4, 0.5)),
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
    "ConstantLR": (
      lambda p: opt.SGD(p, lr=0.02, momentum=0.9),
      lambda o: sched.ConstantLR(o, 0.3, total_iters=7),
      oc.sgd(oc.piecewise_constant_schedule(0.02 * 0.3, {7: 1 / 0.3}), 0.9),
    ),
    "LambdaLR": (
      lambda p: opt.SGD(p, lr=0.02, momentum=0.9),
      lambda o: sched.LambdaLR(o, lambda e: 1 / (1 + 0.1 * e)),
      oc.sgd(lambda t: 0.02 * (1 / (1 + 0.1 * _f(t))), 0.9),
    ),
    "MultiplicativeLR": (
      lambda p: opt.SGD(p, lr=0.02, momentum=0.9),
      lambda o: sched.MultiplicativeLR(o, lambda e: 0.9),
      oc.sgd(oc.exponential_decay(0.02, 1, 0.9), 0.9),
    ),
    "ChainedScheduler(ConstantLR, ExponentialLR)": (
      lambda p: opt.SGD(p, lr=0.02, momentum=0.9),
      lambda o: sched.ChainedScheduler(
        [sched.ConstantLR(o, 0.5, total_iters=4), sched.ExponentialLR(o, 0.95)]
      ),
      oc.sgd(
        oc.multiply_schedules(
          oc.piecewise_constant_schedule(0.5, {4: 1 / 0.5}), oc.exponential_decay(0.02, 1, 0.95)
        ),
        0.9,
      ),
    ),
    "CyclicLR(cycle_momentum)": (
      lambda p: opt.SGD(p, lr=0.01, momentum=0.9),
      lambda o: sched.CyclicLR(o, 0.001, 0.02, step_size_up=7),
      oc.inject_hyperparams(oc.sgd)(
        learning_rate=lambda t: 0.001 + (0.02 - 0.001) * tri(t),
        momentum=lambda t: 0.9 - (0.9 - 0.8) * tri(t),
      ),
    ),
    "SWALR(cos)": (
      lambda p: opt.SGD(p, lr=0.02, momentum=0.9),
      lambda o: swa_utils.SWALR(o, swa_lr=0.005, anneal_epochs=10),
      oc.sgd(oc.cosine_decay_schedule(0.02, 10, alpha=0.005 / 0.02), 0.9),
    ),
    "SWALR(linear)": (
      lambda p: opt.SGD(p, lr=0.02, momentum=0.9),
      lambda o: swa_utils.SWALR(o, swa_lr=0.005, anneal_epochs=10, anneal_strategy="linear"),
      oc.sgd(oc.linear_schedule(0.02, 0.005, 10), 0.9),
    ),
    "accumulation over 3 micro-batches": (
      lambda p: opt.SGD(p, lr=0.01, momentum=0.9),
      None,
      oc.MultiSteps(oc.sgd(0.01, 0.9), 3, accumulator_dtype=None),
    ),
  }


CASES = [
  "Adam+OneCycleLR(cycle_momentum)",
  "Adam+OneCycleLR(cycle_momentum), 0.3 * T not whole",
  "AMSGrad",
  "AdamW(amsgrad)",
  "RAdam",
  "Adagrad",
  "Adagrad(lr_decay)",
  "NAdam(momentum_decay=1e4)",
  "NAdam(decoupled_weight_decay)",
  "RMSprop(alpha default)",
  "SGD(dampening)",
  "ASGD",
  "Rprop",
  "SequentialLR(LinearLR, CosineAnnealingLR)",
  "ConstantLR",
  "LambdaLR",
  "MultiplicativeLR",
  "ChainedScheduler(ConstantLR, ExponentialLR)",
  "CyclicLR(cycle_momentum)",
  "SWALR(cos)",
  "SWALR(linear)",
  "accumulation over 3 micro-batches",
]


@pytest.mark.parametrize("name", CASES)
def test_the_guide_s_recipe_follows_pytorch(name):
  with x64():  # built as a float64 run builds them
    make_opt, make_sched, tx = _cases()[name]
  micro = 3 if "micro" in name else 1
  theirs = _torch_run(make_opt, make_sched, micro)
  ours, _ = _our_run(tx, micro)
  _assert_same(ours, theirs)


def test_every_case_is_run():
  with x64():
    assert sorted(_cases()) == sorted(CASES)


@pytest.mark.parametrize("scale", [1e-4, 1e-8])
@pytest.mark.parametrize("name", ["RAdam", "Adagrad"])
def test_the_eps_recipes_hold_for_small_gradients(name, scale):
  """The exact RAdam and Adagrad forms where PyTorch's eps matters most: gradients of 3e-4 to
  3e-3 (scale 1e-4) and 3e-8 to 3e-7 (scale 1e-8), where the plain forms drift apart."""
  with x64():
    make_opt, _, tx = _cases()[name]
  theirs = _torch_run(make_opt, scale=scale)
  ours, _ = _our_run(tx, scale=scale)
  _assert_same(ours, theirs)


@pytest.mark.parametrize(
  ("scale", "low", "high"),
  # measured (30 steps): 2.7e-12, 2.7e-8, 2.7e-6
  [(1.0, 1e-13, 1e-11), (1e-4, 1e-9, 1e-7), (1e-6, 1e-7, 1e-5)],
)
def test_adagrad_with_eps_zero_is_apart_by_about_1e_10_over_the_gradient(scale, low, high):
  """``adagrad(lr, 0.0, eps=0.0)`` leaves out PyTorch's 1e-10 beside sqrt(G): the gap grows as
  the gradients shrink (the guide's numbers); ``eps=1e-10`` under the root is far worse there."""
  theirs = _torch_run(lambda p: torch.optim.Adagrad(p, lr=0.1), scale=scale)
  with x64():
    ours, _ = _our_run(oc.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0), scale=scale)
    under, _ = _our_run(oc.adagrad(0.1, initial_accumulator_value=0.0, eps=1e-10), scale=scale)
  assert low < _rel(ours, theirs) < high
  if scale < 1:
    assert _rel(under, theirs) > 100 * _rel(ours, theirs)


def test_adagrad_with_eps_zero_steps_zero_where_the_gradients_were_all_zero():
  """eps=0 is no 0/0: a coordinate whose accumulator is still 0 gets a zero step (PyTorch:
  0 / (0 + 1e-10) = 0)."""
  tx = oc.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0)
  state = tx.init(jnp.zeros(2))
  for g in ([0.0, 1.0], [0.0, 0.0]):
    u, state = tx.update(jnp.asarray(g), state)
    assert bool(jnp.all(jnp.isfinite(u))) and float(u[0]) == 0.0


@pytest.mark.parametrize(
  ("scale", "low", "high"),
  # measured (30 steps): 1.2e-9, 1.1e-7, 1.0e-5, 1.0e-3
  [(1.0, 1e-10, 1e-8), (1e-2, 1e-8, 1e-6), (1e-4, 1e-6, 1e-4), (1e-6, 1e-4, 1e-2)],
)
def test_optax_s_radam_is_apart_by_about_eps_over_the_gradient(scale, low, high):
  theirs = _torch_run(lambda p: torch.optim.RAdam(p, lr=0.05), scale=scale)
  with x64():
    ours, _ = _our_run(oc.radam(0.05), scale=scale)
  assert low < _rel(ours, theirs) < high


def test_optax_s_rprop_takes_a_zero_first_step_and_lags_one_step():
  """``rprop`` (Optax's) applies the step it computed at the previous call: zero first, where
  PyTorch moves every weight by ``lr``; the guide's transformation takes it at once."""
  g = {"w": jnp.asarray(A.T @ (A @ W0 - B))}
  u, _ = oc.rprop(0.01).update(g, oc.rprop(0.01).init(g), g)
  assert float(jnp.abs(u["w"]).max()) == 0.0
  u, _ = _torch_rprop(0.01).update(g, _torch_rprop(0.01).init(g), g)
  np.testing.assert_array_equal(u["w"], -0.01 * jnp.sign(g["w"]))
  theirs = _torch_run(lambda p: torch.optim.Rprop(p, lr=0.01), steps=5)
  with x64():
    ours, _ = _our_run(oc.rprop(0.01), steps=5)
  assert _rel(ours, theirs) > 1e-3


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clip_grad_norm_as_pytorch_computes_it(norm_type):
  """The guide's own transformation: PyTorch's 1e-6 beside the norm, and its infinity norm."""
  c = 1.0  # every gradient here has a norm of 3 to 30: each step is clipped
  theirs = _torch_run(
    lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    clip=lambda ps: torch.nn.utils.clip_grad_norm_(ps, c, norm_type=norm_type),
  )
  with x64():
    ours, _ = _our_run(oc.chain(_clip_grad_norm(c, norm_type), oc.sgd(0.01, 0.9)))
  _assert_same(ours, theirs)


@pytest.mark.parametrize("scale", [1.0, 1e-2, 1e-4])
def test_clip_by_global_norm_is_apart_by_1e_6_over_the_norm(scale):
  """PyTorch scales a gradient of global norm n > c by c / (n + 1e-6), clip_by_global_norm by
  c / n: one clipped step apart by 1e-6 / n, relative (n = 13 times ``scale`` here)."""
  c = 0.1 * scale  # below the gradient's norm: the step is clipped
  n = scale * np.linalg.norm(A.T @ (A @ W0 - B))
  theirs = _torch_run(
    lambda p: torch.optim.SGD(p, lr=1.0),
    scale=scale,
    clip=lambda ps: torch.nn.utils.clip_grad_norm_(ps, c),
    steps=1,
  )
  with x64():
    ours, _ = _our_run(oc.chain(oc.clip_by_global_norm(c), oc.sgd(1.0)), scale=scale, steps=1)
  gap = _rel(ours - W0, theirs - W0)
  assert abs(gap / (1e-6 / n) - 1) < 1e-3


def test_clipping_goes_inside_multisteps():
  """PyTorch clips the accumulated gradient, once per step: the clip inside MultiSteps.
  Outside, it clips each micro-batch."""
  theirs = _torch_run(
    lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    micro=3,
    clip=lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0),
  )
  with x64():
    inside, _ = _our_run(
      oc.MultiSteps(
        oc.chain(oc.clip_by_global_norm(1.0), oc.sgd(0.01, 0.9)), 3, accumulator_dtype=None
      ),
      micro=3,
      jit=True,
    )
    exact, _ = _our_run(
      oc.MultiSteps(oc.chain(_clip_grad_norm(1.0), oc.sgd(0.01, 0.9)), 3, accumulator_dtype=None),
      micro=3,
      jit=True,
    )
    outside, _ = _our_run(
      oc.chain(
        oc.clip_by_global_norm(1.0), oc.MultiSteps(oc.sgd(0.01, 0.9), 3, accumulator_dtype=None)
      ),
      micro=3,
      jit=True,
    )
  assert _rel(inside, theirs) < 1e-6  # clip_by_global_norm's own 1e-6 / norm
  _assert_same(exact, theirs)
  assert _rel(outside, theirs) > 1e-2


def test_grad_scaler_skips_with_the_schedule_outside_apply_if_finite():
  """GradScaler skips optimizer.step() on a non-finite gradient while the scheduler, stepped
  in the loop, advances: the schedule goes outside apply_if_finite; inside, it is frozen."""
  bad = {3, 4, 10}
  w = torch.tensor(W0, requires_grad=True)
  opt = torch.optim.Adam([w], lr=0.05)
  sched = torch.optim.lr_scheduler.StepLR(opt, 5, 0.5)
  scaler = torch.amp.GradScaler("cpu")
  for k in range(STEPS):
    opt.zero_grad()
    loss = 0.5 * ((torch.tensor(A) @ w - torch.tensor(B)) ** 2).sum()
    scaler.scale(loss * (float("inf") if k in bad else 1.0)).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
  theirs = w.detach().numpy()

  def run(tx):
    p = jnp.asarray(W0)
    state = tx.init(p)
    for k in range(STEPS):
      g = jnp.asarray(A.T @ (A @ np.asarray(p) - B)) * (jnp.inf if k in bad else 1.0)
      u, state = tx.update(g, state, p)
      p = oc.apply_updates(p, u)
    return np.asarray(p)

  with x64():
    schedule = oc.exponential_decay(0.05, 5, 0.5, staircase=True)
    outside = run(
      oc.chain(
        oc.apply_if_finite(oc.scale_by_adam(), max_consecutive_errors=None),
        oc.scale_by_learning_rate(schedule),
      )
    )
    inside = run(oc.apply_if_finite(oc.adam(schedule), max_consecutive_errors=None))
  _assert_same(outside, theirs)
  assert _rel(inside, theirs) > 1e-3


def _plateau_rates(p, steps_per_epoch, val_losses, how, step_values=None):
  """The rate of every step: PyTorch's ReduceLROnPlateau(factor=0.5, patience=p) stepped
  after each epoch with ``val_losses``, or the guide's ports."""
  lr, rates = 1.0, []
  if how == "torch":
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr)
    s = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=p)
    for v in val_losses:
      rates += [opt.param_groups[0]["lr"]] * steps_per_epoch
      s.step(v)
    return rates
  params = {"w": jnp.zeros(1)}
  if how == "watcher":  # the guide's: beside the optimizer, updated at the end of each epoch
    tx = oc.inject_hyperparams(oc.sgd)(learning_rate=lr)
    plateau = oc.reduce_on_plateau(factor=0.5, patience=p + 1)
    opt_state, watch = tx.init(params), plateau.init(params)
    for v in val_losses:
      for _ in range(steps_per_epoch):
        u, opt_state = tx.update({"w": jnp.ones(1)}, opt_state, params)
        rates.append(-float(u["w"][0]))
      _, watch = plateau.update(params, watch, value=v)
      scale = oc.current_hyperparams(watch)["plateau_scale"]
      opt_state = oc.set_hyperparams(opt_state, learning_rate=lr * scale)
    return rates
  # chained, one evaluation per epoch (its accumulation_size), fed step_values[epoch][step]:
  # by default the last epoch's validation loss at every step
  if step_values is None:
    step_values = [[v] * steps_per_epoch for v in [10.0, *val_losses[:-1]]]
  tx = oc.chain(
    oc.sgd(lr), oc.reduce_on_plateau(factor=0.5, patience=p + 1, accumulation_size=steps_per_epoch)
  )
  opt_state = tx.init(params)
  for epoch in step_values:
    for v in epoch:
      u, opt_state = tx.update({"w": jnp.ones(1)}, opt_state, params, value=v)
      rates.append(-float(u["w"][0]))
  return rates


def _drops(rates):
  return [i for i in range(1, len(rates)) if rates[i] < rates[i - 1]]


@pytest.mark.parametrize("p", [0, 1, 2])
def test_reduce_on_plateau_per_epoch_as_pytorch_steps_it(p):
  """Updated at each epoch's end beside the optimizer, it reduces where PyTorch does. Chained
  with accumulation_size=S (S steps per epoch): S - 1 steps later given the last validation
  loss at every step; one step earlier given each step's training loss (PyTorch the epoch's
  mean of them)."""
  s = 3
  val = [1.0, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7]
  theirs = _plateau_rates(p, s, val, "torch")
  assert min(theirs) < 1.0  # it did reduce
  assert _plateau_rates(p, s, val, "watcher") == theirs
  chained = _plateau_rates(p, s, val, "chained")
  assert _drops(chained) == [i + s - 1 for i in _drops(theirs)]
  train = [[v + 0.01 * (s - k) for k in range(s)] for v in val]  # falling within each epoch
  theirs = _plateau_rates(p, s, [float(np.mean(e)) for e in train], "torch")
  chained = _plateau_rates(p, s, None, "chained", step_values=train)
  later = [i + 1 for i in _drops(chained)]  # the step after each reduction of ours
  assert _drops(theirs) and later[: len(_drops(theirs))] == _drops(theirs)
  assert later[len(_drops(theirs)) :] in ([], [len(theirs)])  # PyTorch's, after its last epoch


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


def _onecycle_torch(total, **kwargs):
  w = torch.zeros(1, requires_grad=True)
  opt = torch.optim.SGD([w], lr=1.0, momentum=0.9)
  s = torch.optim.lr_scheduler.OneCycleLR(opt, 1.0, total_steps=total, **kwargs)
  rates, momenta = [], []
  for _ in range(total):
    rates.append(opt.param_groups[0]["lr"])
    momenta.append(opt.param_groups[0]["momentum"])
    opt.step()
    s.step()
  return np.array(rates), np.array(momenta)


@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_one_cycle_follows_pytorch_where_0_3_t_is_not_whole(anneal, three_phase):
  """The guide's one_cycle: PyTorch's fractional phase ends (12.5 for T = 45)."""
  rates, momenta = _onecycle_torch(T_ODD, anneal_strategy=anneal, three_phase=three_phase)
  if three_phase:
    ends = [0.3 * T_ODD - 1, 0.6 * T_ODD - 2, T_ODD - 1]
    lr = _one_cycle([1 / 25, 1.0, 1 / 25, 1 / 25 / 1e4], ends, anneal)
    momentum = _one_cycle([0.95, 0.85, 0.95, 0.95], ends, anneal)
  else:
    ends = [0.3 * T_ODD - 1, T_ODD - 1]
    lr = _one_cycle([1 / 25, 1.0, 1 / 25 / 1e4], ends, anneal)
    momentum = _one_cycle([0.95, 0.85, 0.95], ends, anneal)
  with x64():
    t = jnp.arange(T_ODD, dtype=jnp.int32)
    np.testing.assert_allclose(lr(t), rates, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(momentum(t), momenta, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("total", "gap"), [(10, 0.64), (40, 0.16)])
def test_linear_onecycle_with_pct_final_0_6_is_6_4_over_t_from_three_phase(total, gap):
  """The guide: linear_onecycle_schedule(T, max_lr, pct_final=0.6) is OneCycleLR's
  three-phase linear schedule a step later, 6.4 / T of max_lr apart at most."""
  rates, _ = _onecycle_torch(total, anneal_strategy="linear", three_phase=True)
  with x64():
    schedule = oc.linear_onecycle_schedule(total, 1.0, pct_final=0.6)
    ours = np.array([float(schedule(t)) for t in range(total)])
  assert abs(np.abs(ours - rates).max() - gap) < 1e-9


def test_porting_onecycle_s_rate_alone_leaves_the_momentum_out():
  """The guide: without cycle_momentum's b1 schedule, 30% apart after the 40 steps (29%
  measured)."""
  with x64():
    make_opt, make_sched, _ = _cases()["Adam+OneCycleLR(cycle_momentum)"]
  theirs = _torch_run(make_opt, make_sched, steps=T)
  pct = int(0.3 * T) - 1
  with x64():
    lr = _onecycle(0.1 / 25, {pct: 25.0, T - 1: 1 / (25 * 1e4)})
    ours, _ = _our_run(oc.adam(lr), steps=T)
  assert 0.25 < _rel(ours, theirs) < 0.35


def test_no_decay_on_biases_and_norms_as_pytorch_s_parameter_groups():
  """AdamW with a group of weight_decay=0 for biases and norm scales: the guide's mask."""
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(16, 4)), rng.normal(size=(16, 3))
  p0 = {
    "dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)},
    "norm": {"scale": 1 + 0.1 * rng.normal(size=3)},
  }
  kernel, bias, scale = (
    torch.tensor(v, requires_grad=True)
    for v in (p0["dense"]["kernel"], p0["dense"]["bias"], p0["norm"]["scale"])
  )
  opt = torch.optim.AdamW(
    [{"params": [kernel], "weight_decay": 0.1}, {"params": [bias, scale], "weight_decay": 0.0}],
    lr=0.01,
  )
  for _ in range(STEPS):
    opt.zero_grad()
    out = (torch.tensor(x) @ kernel + bias) * scale
    (0.5 * ((out - torch.tensor(y)) ** 2).sum()).backward()
    opt.step()

  def loss(p):
    out = (x @ p["dense"]["kernel"] + p["dense"]["bias"][None]) * p["norm"]["scale"][None]
    return 0.5 * jnp.sum((out - y) ** 2)

  with x64():
    tx = oc.adamw(0.01, weight_decay=0.1, mask=oc.mask_from_paths(exclude="bias|scale"))
    p = jax.tree.map(jnp.asarray, p0)
    state = tx.init(p)
    update = jax.jit(lambda p, state: tx.update(jax.grad(loss)(p), state, p))
    for _ in range(STEPS):
      u, state = update(p, state)
      p = oc.apply_updates(p, u)
  for ours, theirs in [
    (p["dense"]["kernel"], kernel),
    (p["dense"]["bias"], bias),
    (p["norm"]["scale"], scale),
  ]:
    _assert_same(np.asarray(ours), theirs.detach().numpy())


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
