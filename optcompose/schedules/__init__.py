"""Learning-rate schedules: pure, jittable functions of the step count.

A ``Schedule`` maps the int32 step count ``t`` (0 at the first update) to a scalar. Every
hyperparameter of every optcompose transformation accepts one. Names, arguments and
semantics follow Optax where Optax has the same schedule; arguments are validated when the
schedule is built (Optax silently turns some invalid ones into a constant). Step-count
arguments (transition and decay steps, warmup steps, boundaries, cycle lengths) are whole
numbers of at most ``2**31 - 1``, the largest int32 count.

Formulas (``t`` the count, ``clip(x) = min(max(x, 0), 1)``):

=============================  ==========================================================
constant                       v
piecewise constant             v * prod(scale_b for boundaries b <= t)
exponential decay              v * r^((t - begin) / T)   (exponent floored with staircase;
                               v for t <= begin; clipped at end_value)
inverse time decay             v / (1 + r * (t / T))      (t / T floored with staircase)
inverse square root            v0 + (peak - v0) t / W for t < W, then peak * sqrt(W / t)
polynomial                     (v0 - v1) * (1 - clip((t - begin) / T))^p + v1
cosine decay                   v * ((1 - alpha) * (0.5 (1 + cos(pi min(t, T) / T)))^e + alpha)
linear warmup of s             v0 + (s(0) - v0) t / W for t < W, then s(t - W)
warmup + cosine / exp / const  linear warmup to the peak, then the decay, joined at W
cosine warm restarts (SGDR)    cycle i of length T0 * m^i from S_i = T0 (m^i - 1) / (m - 1)
                               and peak v * d^i, cosine to floor
one-cycle (Smith & Topin)      peak/div -> peak over pct_start, then anneal to
                               peak/(div * final_div) (cosine) or via peak/div (linear)
join                           s_0(t) for t < b_1, s_k(t - b_k) for b_k <= t < b_{k+1}
multiply                       s_1(t) * s_2(t) * ...
=============================  ==========================================================

References: Loshchilov and Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts",
ICLR 2017; Smith and Topin, "Super-Convergence", 2018; Vaswani et al., "Attention Is All You
Need", 2017 (inverse square root); Goyal et al., "Accurate, Large Minibatch SGD", 2017 (warmup).
"""

from __future__ import annotations

from optcompose.schedules._checks import Schedule, default_float  # noqa: F401 -- as before
from optcompose.schedules._combine import (
  cosine_onecycle_schedule,
  join_schedules,
  linear_onecycle_schedule,
  linear_warmup,
  multiply_schedules,
  piecewise_interpolate_schedule,
  schedule_from_function,
  warmup_constant_schedule,
  warmup_cosine_decay_schedule,
  warmup_exponential_decay_schedule,
)
from optcompose.schedules._decay import (
  constant_schedule,
  cosine_decay_schedule,
  exponential_decay,
  inverse_sqrt_schedule,
  inverse_time_decay,
  linear_schedule,
  piecewise_constant_schedule,
  polynomial_schedule,
)
from optcompose.schedules._restarts import cosine_warm_restarts_schedule, sgdr_schedule

__all__ = [
  "constant_schedule",
  "piecewise_constant_schedule",
  "exponential_decay",
  "inverse_time_decay",
  "inverse_sqrt_schedule",
  "polynomial_schedule",
  "linear_schedule",
  "cosine_decay_schedule",
  "linear_warmup",
  "warmup_constant_schedule",
  "warmup_cosine_decay_schedule",
  "warmup_exponential_decay_schedule",
  "cosine_warm_restarts_schedule",
  "sgdr_schedule",
  "cosine_onecycle_schedule",
  "linear_onecycle_schedule",
  "piecewise_interpolate_schedule",
  "join_schedules",
  "multiply_schedules",
  "schedule_from_function",
]
