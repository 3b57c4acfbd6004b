"""One registry of every public transformation and optimizer with its reference.

Each case builds an optcompose transformation and a reference: an Optax transformation
with the same meaning (``optax``), or, where Optax has none, a NumPy step function
(``numpy_step``: (w, g, t) -> w_new, float64). The parity tests cross every case with every
problem; ``covers`` names the public builders a case exercises, and the completeness test
fails when a public name has no case.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optcompose as oc
from numerics import F64_RTOL, standard_promotion
from optcompose.wrappers.lookahead import slow_weights_in_state

LR = 1e-2


def lr_schedule(count):
  """A schedule passed to both libraries (a warmup then a cosine decay). Ours, not Optax's:
  Optax's computes in float32 even under x64, and rounds differently inside and outside
  ``jit``, which the float64 comparisons would see (tests/test_schedules.py compares the two
  schedules)."""
  return oc.warmup_cosine_decay_schedule(0.0, 3e-2, 20, 200, 1e-3)(count)


def wd_schedule(count):
  # A float exponent: `x ** concrete_int` makes eager JAX compile a kernel per exponent value.
  return 1e-2 * 0.99 ** jnp.asarray(count, jnp.float32)


def _no_bias(params):
  """Decay matrices only (a mask as a callable of the params)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


class Case(NamedTuple):
  name: str
  ours: Callable[[], object]
  covers: tuple
  optax: Optional[Callable[[], object]] = None
  numpy_step: Optional[Callable] = None  # (w, g, t) -> w_new on float64 numpy leaves
  same_state: bool = True  # the state has Optax's leaves (False: another decomposition)
  with_value: bool = False  # update needs value=loss (plateau control)
  bf16_like_optax: bool = True  # Optax's bfloat16 run is a valid reference
  f32_like_optax: bool = True  # Optax's float32 run is a valid reference, step by step
  slow_eager_ref: bool = False  # Optax's version runs lax.cond: use its jitted run as reference
  eager: bool = True  # also compared with Optax eagerly (op by op), on both problems
  # Tolerances (tests/numerics.py): float64 trajectories, relative to the leaf's magnitude;
  # float32 and 16-bit (bfloat16, float16) steps from identical inputs, in epsilons at the
  # leaf's magnitude.
  f64_rtol: float = F64_RTOL
  f32_ulps: float = 8
  half_ulps: float = 4


# 16-bit steps whose inputs to a momentum trace (decay b = 0.9) are rounded differently from
# Optax's (our clipping scales by min(1, c / norm), Optax divides by the norm; LARS's trust
# ratio): each step's input differs by up to about 1.5 ulps, and the two traces carry the
# difference on for about 1 / (1 - b) = 10 steps, with their own roundings added, so their
# updates drift several ulps apart. Float16, 50 steps: within the former 4 ulps on AMD EPYC;
# 4.8 (clip) and 7.3 (LARS) on an AVX-512 Xeon. 16 is a margin of about twice the largest
# measured, not a proven bound.
MOMENTUM_HALF_ULPS = 16


def _sgd_np(lr):
  return lambda w, g, t: w - lr * g


def _soft(x, thr):
  return np.sign(x) * np.maximum(np.abs(x) - thr, 0.0)


def _prox_np(lr_fn, l1, l2):
  def step(w, g, t):
    lr = lr_fn(t)
    return _soft(w - lr * g, lr * l1) / (1 + lr * l2)

  return step


def _lr_at(t):
  return float(lr_schedule(np.int32(t)))


CASES = [
  # --- primitives, each followed by a learning-rate step -----------------------------
  Case(
    "identity",
    lambda: oc.chain(oc.identity(), oc.scale_by_learning_rate(LR)),
    ("identity", "scale_by_learning_rate"),
    optax=lambda: optax.chain(optax.identity(), optax.scale_by_learning_rate(LR)),
  ),
  Case("scale", lambda: oc.scale(-LR), ("scale",), optax=lambda: optax.scale(-LR)),
  Case(
    "scale_by_schedule",
    lambda: oc.scale_by_schedule(lambda c: -lr_schedule(c)),
    ("scale_by_schedule",),
    optax=lambda: optax.scale_by_schedule(lambda c: -lr_schedule(c)),
  ),
  Case(
    "lr_schedule",
    lambda: oc.scale_by_learning_rate(lr_schedule),
    ("scale_by_learning_rate",),
    optax=lambda: optax.scale_by_learning_rate(lr_schedule),
  ),
  Case(
    "trace",
    lambda: oc.chain(oc.trace(0.9), oc.scale_by_learning_rate(LR)),
    ("trace",),
    optax=lambda: optax.chain(optax.trace(0.9), optax.scale_by_learning_rate(LR)),
  ),
  Case(
    "trace_nesterov",
    lambda: oc.chain(oc.trace(0.9, nesterov=True), oc.scale_by_learning_rate(LR)),
    ("trace",),
    optax=lambda: optax.chain(optax.trace(0.9, nesterov=True), optax.scale_by_learning_rate(LR)),
  ),
  Case(
    "ema",
    lambda: oc.chain(oc.ema(0.9), oc.scale_by_learning_rate(LR)),
    ("ema",),
    optax=lambda: optax.chain(optax.ema(0.9), optax.scale_by_learning_rate(LR)),
  ),
  Case(
    "scale_by_rss",
    lambda: oc.chain(oc.scale_by_rss(), oc.scale_by_learning_rate(LR)),
    ("scale_by_rss",),
    optax=lambda: optax.chain(optax.scale_by_rss(), optax.scale_by_learning_rate(LR)),
  ),
  Case(
    "scale_by_rms",
    lambda: oc.chain(oc.scale_by_rms(), oc.scale_by_learning_rate(LR)),
    ("scale_by_rms",),
    optax=lambda: optax.chain(optax.scale_by_rms(), optax.scale_by_learning_rate(LR)),
  ),
  Case(
    "scale_by_rms_debiased",
    lambda: oc.chain(
      oc.scale_by_rms(0.99, 1e-6, eps_in_sqrt=False, bias_correction=True),
      oc.scale_by_learning_rate(LR),
    ),
    ("scale_by_rms",),
    optax=lambda: optax.chain(
      optax.scale_by_rms(0.99, 1e-6, eps_in_sqrt=False, bias_correction=True),
      optax.scale_by_learning_rate(LR),
    ),
  ),
  Case(
    "scale_by_stddev",
    lambda: oc.chain(oc.scale_by_stddev(), oc.scale_by_learning_rate(LR)),
    ("scale_by_stddev",),
    optax=lambda: optax.chain(optax.scale_by_stddev(), optax.scale_by_learning_rate(LR)),
  ),
  Case(
    "scale_by_adam",
    lambda: oc.chain(oc.scale_by_adam(), oc.scale_by_learning_rate(LR)),
    ("scale_by_adam",),
    optax=lambda: optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(LR)),
  ),
  Case(
    "adam_from_pieces",
    lambda: oc.chain(
      oc.scale_by_second_moment(
        0.999, 1e-8, direction=oc.chain(oc.ema(0.9, debias=False), oc.scale_by_bias_correction(0.9))
      ),
      oc.scale_by_learning_rate(LR),
    ),
    ("ema", "scale_by_bias_correction", "scale_by_second_moment"),
    optax=lambda: optax.adam(LR),
    same_state=False,
  ),
  Case(
    "add_decayed_weights",
    lambda: oc.chain(oc.add_decayed_weights(0.1), oc.scale_by_learning_rate(LR)),
    ("add_decayed_weights",),
    optax=lambda: optax.chain(optax.add_decayed_weights(0.1), optax.scale_by_learning_rate(LR)),
  ),
  Case(
    "add_decayed_weights_scheduled_masked",
    lambda: oc.chain(
      oc.add_decayed_weights(wd_schedule, mask=_no_bias), oc.scale_by_learning_rate(LR)
    ),
    ("add_decayed_weights",),
    optax=lambda: optax.chain(
      optax.add_decayed_weights(wd_schedule, mask=_no_bias), optax.scale_by_learning_rate(LR)
    ),
  ),
  Case(
    "adam_l2",
    lambda: oc.chain(oc.add_l2_penalty(1e-2), oc.adam(LR)),
    ("add_l2_penalty",),
    optax=lambda: optax.chain(optax.add_decayed_weights(1e-2), optax.adam(LR)),
  ),
  Case(
    "prox_l1",
    lambda: oc.chain(oc.scale_by_learning_rate(lr_schedule), oc.prox_l1(0.5, lr_schedule)),
    ("prox_l1",),
    numpy_step=_prox_np(_lr_at, 0.5, 0.0),
  ),
  Case(
    "prox_elastic_net",
    lambda: oc.chain(oc.scale_by_learning_rate(LR), oc.prox_elastic_net(0.3, 0.2, LR)),
    ("prox_elastic_net",),
    numpy_step=_prox_np(lambda t: LR, 0.3, 0.2),
  ),
  Case(
    "reduce_on_plateau",
    lambda: oc.chain(oc.sgd(0.05), oc.reduce_on_plateau(0.5, patience=3, rtol=1e-3)),
    ("reduce_on_plateau",),
    optax=lambda: optax.chain(
      optax.sgd(0.05), optax.contrib.reduce_on_plateau(0.5, patience=3, rtol=1e-3)
    ),
    with_value=True,
    slow_eager_ref=True,
  ),
  Case(
    "clip",
    lambda: oc.chain(oc.clip(0.05), oc.sgd(0.05)),
    ("clip",),
    optax=lambda: optax.chain(optax.clip(0.05), optax.sgd(0.05)),
  ),
  Case(
    "clip_by_global_norm",
    lambda: oc.chain(oc.clip_by_global_norm(0.1), oc.sgd(0.1, 0.9)),
    ("clip_by_global_norm",),
    optax=lambda: optax.chain(optax.clip_by_global_norm(0.1), optax.sgd(0.1, 0.9)),
    same_state=False,
    half_ulps=MOMENTUM_HALF_ULPS,
  ),  # ours keeps the measured norm in the state
  Case(
    "clip_by_block_rms",
    lambda: oc.chain(oc.clip_by_block_rms(0.05), oc.sgd(0.05)),
    ("clip_by_block_rms",),
    optax=lambda: optax.chain(optax.clip_by_block_rms(0.05), optax.sgd(0.05)),
  ),
  Case(
    "adaptive_grad_clip",
    lambda: oc.chain(oc.adaptive_grad_clip(0.05), oc.sgd(0.05, 0.9)),
    ("adaptive_grad_clip",),
    optax=lambda: optax.chain(optax.adaptive_grad_clip(0.05), optax.sgd(0.05, 0.9)),
  ),
  Case(
    "clip_by_leaf_norm",
    lambda: oc.chain(oc.clip_by_leaf_norm(0.1), oc.sgd(0.05)),
    ("clip_by_leaf_norm",),
    numpy_step=lambda w, g, t: (
      w - 0.05 * g * min(1.0, 0.1 / max(float(np.sqrt(np.sum(g * g))), 1e-30))
    ),
  ),
  Case(
    "masked",
    lambda: oc.chain(oc.masked(oc.scale_by_adam(), _no_bias), oc.scale_by_learning_rate(LR)),
    ("masked",),
    optax=lambda: optax.chain(
      optax.masked(optax.scale_by_adam(), _no_bias), optax.scale_by_learning_rate(LR)
    ),
  ),
  Case(
    "partition_frozen",
    lambda: oc.partition(
      {"train": oc.adamw(LR), "frozen": oc.set_to_zero()},
      oc.labels_from_paths([(r"bias|\['b'\]", "frozen")], "train"),
    ),
    ("partition", "set_to_zero"),
    optax=lambda: optax.partition(
      {"train": optax.adamw(LR), "frozen": optax.set_to_zero()},
      oc.labels_from_paths([(r"bias|\['b'\]", "frozen")], "train"),
    ),
  ),
  Case(
    "inject_hyperparams",
    lambda: oc.inject_hyperparams(oc.adamw)(learning_rate=lr_schedule, weight_decay=0.1),
    ("inject_hyperparams",),
    optax=lambda: optax.inject_hyperparams(optax.adamw)(
      learning_rate=lr_schedule, weight_decay=0.1
    ),
    # Optax also keeps a count per schedule, and casts hyperparameters to bfloat16 for
    # bfloat16 params (b2 = 0.999 -> 1.0); ours stay float32 (tests/test_hyperparams.py).
    same_state=False,
    bf16_like_optax=False,
  ),
  Case(
    "multi_steps",
    lambda: oc.multi_steps(oc.adamw(lr_schedule, weight_decay=0.1), 3),
    ("multi_steps",),
    optax=lambda: optax.MultiSteps(
      optax.adamw(lr_schedule, weight_decay=0.1), 3
    ).gradient_transformation(),
    # Optax runs the inner update on every micro-step and selects; ours only on real
    # steps (lax.cond). Optax's skip_state is (), ours too; the shapes differ only there.
    same_state=False,
    slow_eager_ref=True,
  ),
  Case(
    "apply_if_finite",
    lambda: oc.apply_if_finite(oc.adam(LR), 3),
    ("apply_if_finite",),
    optax=lambda: optax.apply_if_finite(optax.adam(LR), 3),
    same_state=False,
    slow_eager_ref=True,
  ),
  Case(
    "ema_params_swa",
    lambda: oc.chain(oc.adam(LR), oc.ema_params(0.99), oc.swa(10, 3)),
    ("ema_params", "swa"),
    optax=lambda: optax.adam(LR),
    same_state=False,
  ),
  Case(
    "lookahead",
    lambda: oc.lookahead_in_state(oc.adam(LR), 5, 0.5, reset_state=True),
    ("lookahead", "lookahead_in_state"),
    optax=lambda: slow_weights_in_state(optax.lookahead(optax.adam(LR), 5, 0.5, True)),
  ),
  Case(
    "sam",
    lambda: oc.sam(oc.sgd(LR), oc.chain(oc.normalize(), oc.sgd(0.05))),
    ("sam", "normalize"),
    optax=lambda: optax.contrib.sam(
      optax.sgd(LR), optax.chain(optax.contrib.normalize(), optax.sgd(0.05))
    ),
  ),
  Case(
    "with_diagnostics",
    lambda: oc.with_diagnostics(oc.adam(LR), learning_rate=LR),
    ("with_diagnostics",),
    optax=lambda: optax.adam(LR),
    same_state=False,
  ),
  # --- optimizers ------------------------------------------------------------------
  Case("sgd", lambda: oc.sgd(LR), ("sgd",), optax=lambda: optax.sgd(LR)),
  Case("sgd_momentum", lambda: oc.sgd(LR, 0.9), ("sgd",), optax=lambda: optax.sgd(LR, 0.9)),
  Case(
    "sgd_nesterov",
    lambda: oc.sgd(lr_schedule, 0.9, nesterov=True),
    ("sgd",),
    optax=lambda: optax.sgd(lr_schedule, 0.9, nesterov=True),
  ),
  Case(
    "sgd_elastic_net",
    lambda: oc.sgd(LR, l1=0.3, l2=0.2),
    ("sgd",),
    numpy_step=_prox_np(lambda t: LR, 0.3, 0.2),
  ),
  Case("adagrad", lambda: oc.adagrad(0.1), ("adagrad",), optax=lambda: optax.adagrad(0.1)),
  Case("rmsprop", lambda: oc.rmsprop(LR), ("rmsprop",), optax=lambda: optax.rmsprop(LR)),
  Case(
    "rmsprop_centered_momentum",
    lambda: oc.rmsprop(LR, centered=True, momentum=0.9, nesterov=True),
    ("rmsprop",),
    optax=lambda: optax.rmsprop(LR, centered=True, momentum=0.9, nesterov=True),
  ),
  Case("adam", lambda: oc.adam(LR), ("adam",), optax=lambda: optax.adam(LR)),
  Case(
    "adam_schedule_eps_root",
    lambda: oc.adam(lr_schedule, 0.8, 0.99, 1e-6, 1e-8),
    ("adam",),
    optax=lambda: optax.adam(lr_schedule, 0.8, 0.99, 1e-6, 1e-8),
  ),
  # bfloat16 first moment: the bias-correction factor is rounded to bfloat16 before it
  # multiplies (ours) or divides (Optax), so the two differ by a bfloat16 rounding of it.
  Case(
    "adam_mu_dtype",
    lambda: oc.adam(LR, mu_dtype=jnp.bfloat16),
    ("adam",),
    optax=lambda: optax.adam(LR, mu_dtype=jnp.bfloat16),
  ),
  Case(
    "sgd_accumulator_dtype",
    lambda: oc.sgd(LR, 0.9, accumulator_dtype=jnp.bfloat16),
    ("sgd",),
    optax=lambda: optax.sgd(LR, 0.9, accumulator_dtype=jnp.bfloat16),
  ),
  Case(
    "adam_nesterov",
    lambda: oc.adam(LR, nesterov=True),
    ("adam",),
    optax=lambda: optax.adam(LR, nesterov=True),
  ),
  Case("nadam", lambda: oc.nadam(LR), ("nadam",), optax=lambda: optax.nadam(LR)),
  Case(
    "adamw",
    lambda: oc.adamw(LR, weight_decay=0.1),
    ("adamw",),
    optax=lambda: optax.adamw(LR, weight_decay=0.1),
  ),
  Case(
    "adamw_masked_scheduled",
    lambda: oc.adamw(lr_schedule, weight_decay=wd_schedule, mask=_no_bias),
    ("adamw",),
    optax=lambda: optax.adamw(lr_schedule, weight_decay=wd_schedule, mask=_no_bias),
  ),
  Case(
    "nadamw",
    lambda: oc.nadamw(LR, weight_decay=0.1),
    ("nadamw",),
    optax=lambda: optax.nadamw(LR, weight_decay=0.1),
  ),
  Case(
    "sign_sgd",
    lambda: oc.sign_sgd(lr_schedule),
    ("sign_sgd", "scale_by_sign"),
    optax=lambda: optax.sign_sgd(lr_schedule),
  ),
  Case(
    "lion",
    lambda: oc.lion(lr_schedule, 0.8, 0.95, weight_decay=0.1, mask=_no_bias),
    ("lion", "scale_by_lion"),
    optax=lambda: optax.lion(lr_schedule, 0.8, 0.95, weight_decay=0.1, mask=_no_bias),
  ),
  Case(
    "signum",
    lambda: oc.signum(LR, 0.8),
    ("signum", "scale_by_sign"),
    optax=lambda: optax.signum(LR, 0.8),
  ),
  Case(
    "optimistic_gradient_descent",
    lambda: oc.optimistic_gradient_descent(LR, 0.5, 1.5),
    ("optimistic_gradient_descent", "scale_by_optimistic_gradient"),
    optax=lambda: optax.optimistic_gradient_descent(LR, 0.5, 1.5),
  ),
  # (alpha + beta) r_t - beta r_{t-1} cancels: Adam's own 1-3 ulp differences from Optax
  # (those of adam_nesterov, from XLA's fusion) are judged at the size of the cancelled
  # result, ~30x smaller on the MLP's one-element bias (46 ulps measured at step 4).
  Case(
    "optimistic_adam_v2",
    lambda: oc.optimistic_adam_v2(LR, alpha=1.0, beta=0.5),
    ("optimistic_adam_v2", "scale_by_optimistic_gradient", "scale_by_adam"),
    optax=lambda: optax.optimistic_adam_v2(LR, alpha=1.0, beta=0.5),
    f32_ulps=128,
  ),
  # --- issue 15, sign family (lion, signum, optimistic) --- (helper: append above this line)
  Case(
    "adabelief",
    lambda: oc.adabelief(LR),
    ("adabelief", "scale_by_belief"),
    optax=lambda: optax.adabelief(LR),
  ),
  # rho_t = rho_inf - 2t b2^t / (1 - b2^t) is ~2000 - 1994 at the first steps: Optax's
  # float32 rounding of b2^t moves it by 0.02-0.04 (rho_6 = 5.955 eagerly, 5.975 jitted;
  # the true one 5.994), and its r_t by up to 1.2%. Ours is exact to float32 rounding, so
  # float32 steps are proved against the exact formula (tests/test_adam_variants.py), not
  # against Optax's; float64 against Optax's as every case.
  Case(
    "radam",
    lambda: oc.radam(lr_schedule, nesterov=True),
    ("radam", "scale_by_radam"),
    optax=lambda: optax.radam(lr_schedule, nesterov=True),
    slow_eager_ref=True,
    f32_like_optax=False,
  ),
  Case(
    "amsgrad",
    lambda: oc.amsgrad(LR, b2=0.99),
    ("amsgrad", "scale_by_amsgrad"),
    optax=lambda: optax.amsgrad(LR, b2=0.99),
  ),
  Case("yogi", lambda: oc.yogi(LR), ("yogi", "scale_by_yogi"), optax=lambda: optax.yogi(LR)),
  Case(
    "adamax", lambda: oc.adamax(LR), ("adamax", "scale_by_adamax"), optax=lambda: optax.adamax(LR)
  ),
  Case(
    "adamaxw",
    lambda: oc.adamaxw(LR, weight_decay=0.1, mask=_no_bias),
    ("adamaxw", "scale_by_adamax"),
    optax=lambda: optax.adamaxw(LR, weight_decay=0.1, mask=_no_bias),
  ),
  Case(
    "adan",
    lambda: oc.adan(LR, weight_decay=0.1),
    ("adan", "scale_by_adan"),
    optax=lambda: optax.adan(LR, weight_decay=0.1),
  ),
  # --- issue 15, Adam variants (adabelief, radam, amsgrad, yogi, adamax, adan) --- (append above)
  # LAMB near its equilibrium on the quadratic: the decayed Adam direction a is ~40x smaller
  # than its terms, and the trust ratio rescales it to ||w|| (float32: 18 ulps measured).
  Case(
    "lamb",
    lambda: oc.lamb(LR, weight_decay=0.1),
    ("lamb", "scale_by_trust_ratio"),
    optax=lambda: optax.lamb(LR, weight_decay=0.1),
    f32_ulps=64,
  ),
  Case(
    "lars",
    lambda: oc.lars(LR, weight_decay=0.1, trust_coefficient=0.1, nesterov=True),
    ("lars", "scale_by_trust_ratio"),
    optax=lambda: optax.lars(LR, weight_decay=0.1, trust_coefficient=0.1, nesterov=True),
    half_ulps=MOMENTUM_HALF_ULPS,
  ),
  Case(
    "fromage",
    lambda: oc.fromage(lr_schedule),
    ("fromage", "scale_by_trust_ratio"),
    optax=lambda: optax.fromage(lr_schedule),
  ),
  Case(
    "scale_by_param_block",
    lambda: oc.chain(
      oc.scale_by_param_block_norm(),
      oc.scale_by_param_block_rms(0.05),
      oc.scale_by_learning_rate(LR),
    ),
    ("scale_by_param_block_norm", "scale_by_param_block_rms"),
    optax=lambda: optax.chain(
      optax.scale_by_param_block_norm(),
      optax.scale_by_param_block_rms(0.05),
      optax.scale_by_learning_rate(LR),
    ),
    # float16: Optax squares the parameters in float16 (1e-3^2 underflows); ours sum the
    # squares in float32 (10 ulps from Optax, 1.3 from float64: tests/test_trust_ratio.py).
    half_ulps=12,
  ),
  # --- issue 15, trust ratio (lamb, lars, fromage, param block norms) --- (append above)
  Case(
    "adadelta",
    lambda: oc.adadelta(1.0, weight_decay=1e-2, weight_decay_mask=_no_bias),
    ("adadelta", "scale_by_adadelta"),
    optax=lambda: optax.adadelta(1.0, weight_decay=1e-2, weight_decay_mask=_no_bias),
  ),
  # Near equilibrium on the quadratic the momentum of O(1) normalised gradients (and the
  # decay) cancels to ~1e-3: their rounding shows magnified (measured 14 ulps).
  Case(
    "novograd",
    lambda: oc.novograd(lr_schedule, weight_decay=1e-2),
    ("novograd", "scale_by_novograd"),
    # 32 on AVX-512; up to 130 under AVX2 at the minimum versions (jax 0.6.2), on the
    # one-element bias of the MLP: a leaf norm of one element is |g|, and the update
    # g / (|g| + eps) + wd * w is a difference of larger terms. The float64 trajectory
    # holds the formula at the usual 1e-10.
    optax=lambda: optax.novograd(lr_schedule, weight_decay=1e-2),
    f32_ulps=256,
  ),
  Case("sm3", lambda: oc.sm3(0.05), ("sm3", "scale_by_sm3"), optax=lambda: optax.sm3(0.05)),
  Case("rprop", lambda: oc.rprop(LR), ("rprop", "scale_by_rprop"), optax=lambda: optax.rprop(LR)),
  Case(
    "polyak_sgd",
    lambda: oc.polyak_sgd(0.5, scaling=0.5),
    ("polyak_sgd", "scale_by_polyak"),
    optax=lambda: optax.polyak_sgd(0.5, scaling=0.5),
    with_value=True,
  ),
  # Our state keeps the key's raw uint32 data (Optax: a typed key), so the shapes differ.
  Case(
    "noisy_sgd",
    lambda: oc.noisy_sgd(LR, key=1),
    ("noisy_sgd", "add_noise"),
    optax=lambda: optax.noisy_sgd(LR, key=1),
    same_state=False,
  ),
  # --- issue 15, classic (adadelta, novograd, sm3, rprop, polyak, noisy_sgd) --- (append above)
]

# Public builders whose reference check needs what the trajectory runner cannot give
# (sharpness_aware needs a gradient function per step): checked in the named test file.
COVERED_ELSEWHERE = {"sharpness_aware": "tests/test_averaging_sam.py"}


# Each family may keep its cases in its own file, tests/cases_<family>.py, defining CASES
# (and optionally COVERED_ELSEWHERE); they join the registry here, in file-name order.
def _family_cases():
  import importlib
  import pathlib

  for path in sorted(pathlib.Path(__file__).parent.glob("cases_*.py")):
    module = importlib.import_module(path.stem)
    CASES.extend(module.CASES)
    COVERED_ELSEWHERE.update(getattr(module, "COVERED_ELSEWHERE", {}))


_family_cases()


# Eager execution runs the same formulas op by op (30 steps of ~30 ms each, which no
# compilation cache saves). Every case's eager run is compared with its own jitted run by the
# invariant checks (tests/test_properties.py); against Optax, eagerly, on both problems run
# these representative optimizers and the cases whose reference behaves otherwise eagerly
# (slow_eager_ref: Optax's lax.cond or its eager rounding).
_EAGER = {
  "sgd_nesterov",
  "adam",
  "adamw",
  "rmsprop_centered_momentum",
  "lion",
  "lamb",
  "adabelief",
  "adagrad",
  "scale_by_rss",
  "trace",
  "ema",
  "add_decayed_weights",
  "masked",
  "clip_by_global_norm",
  "adafactor",
}
CASES = [c._replace(eager=c.name in _EAGER or c.slow_eager_ref) for c in CASES]

# float32 per-step tolerances above the default 8 epsilons (measured worst case on AVX-512,
# AVX2 and SSE4.2 in brackets). The ulps are counted at the update's own magnitude, so a
# case whose update is a difference of larger terms shows their rounding magnified:
# - AdamW near its equilibrium on the quadratic, where the Adam direction balances the
#   decay and the update is ~300x smaller than either term (336); NAdamW likewise (45);
# - Nesterov's combination of the moment and the gradient (17), Lookahead's sync step
#   slow - fast (17), the injected hyperparameters' rebuilt chain (15), and soft-thresholding
#   in the NumPy cases (16; those are counted at |w|, as the threshold cancels w).
# float64 (F64_RTOL) stays the proof of every formula.
_F32_ULPS = {
  "adamw": 1024,
  "nadamw": 128,
  "adam_nesterov": 32,
  "nadam": 32,
  "lookahead": 32,
  "inject_hyperparams": 32,
  "prox_l1": 32,
  "prox_elastic_net": 32,
  "sgd_elastic_net": 32,
  # Ours eagerly (op by op) against Optax's jitted run (its lax.cond): 31.7 ulps
  # measured at step 22 on the MLP's one-element bias, an Adam update ~4e-10 from
  # near-cancelled moments (9.2 on another machine; jitted: within 8).
  "conditionally_transform_adam": 64,
  "conditionally_mask_adam": 64,
  # Optax's float32 `mu - 1` (a scheduled lr) cancels: 1.4% off at lr 3e-3, in the decay
  # term `(mu - 1) w`; ours does not (tests/test_trust_ratio.py: against float64). Measured
  # 32.1 ulps at step 1 on the MLP's kernel.
  "fromage": 128,
}
CASES = [c._replace(f32_ulps=_F32_ULPS.get(c.name, c.f32_ulps)) for c in CASES]

# Optax's code relies on implicit dtype promotion, which the suite makes strict
# (tests/conftest.py): the Optax references run under standard promotion, ours under strict.
CASES = [
  c._replace(optax=c.optax and (lambda make=c.optax: standard_promotion(make()))) for c in CASES
]


def covering(cases):
  """The fewest cases (greedily) that together cover every builder ``cases`` cover.

  For the structural matrices (sharding), whose result depends on a builder's state layout
  and not on its hyperparameter values: the other cases differ from one of these only in
  numbers, which the parity tests check one by one.
  """
  left, kept = {n for c in cases for n in c.covers}, []
  for c in sorted(cases, key=lambda c: -len(c.covers)):
    if left & set(c.covers):
      kept.append(c)
      left -= set(c.covers)
  return [c for c in cases if c in kept]  # in the registry's order
