"""The Adam family: Adam, Nadam, AdamW and NadamW.

Symbols: g gradient, w parameters, lr learning rate (a number or a schedule), t step count
from 1. ``adamw(..., l1=)`` (keyword-only, ours) appends L1 soft-thresholding after the
learning-rate step (see :mod:`optcompose.transforms.proximal`).
"""

from __future__ import annotations

from typing import Any, Optional

from optcompose.core import (
  DECAY,
  EPS,
  FLAG,
  LEARNING_RATE,
  MASK,
  GradientTransformation,
  ScalarOrSchedule,
  chain,
  public,
  real,
)
from optcompose.optimizers._shared import _proximal
from optcompose.transforms.adaptive import scale_by_adam
from optcompose.transforms.decay import Mask, add_decayed_weights
from optcompose.transforms.scaling import scale_by_learning_rate

_ADAM = dict(
  learning_rate=LEARNING_RATE, b1=DECAY, b2=DECAY, eps=EPS, eps_root=real(0.0, draw=(0.0, 1e-6))
)
_DECOUPLED = dict(weight_decay=real(0.0, draw=(0.0, 0.5)), mask=MASK)


@public("optimizer", optax="adam", nesterov=FLAG, **_ADAM)
def adam(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-8,
  eps_root: ScalarOrSchedule = 0.0,
  mu_dtype: Optional[Any] = None,
  *,
  nesterov: bool = False,
  nu_dtype: Optional[Any] = None,
) -> GradientTransformation:
  """Adam: a step from bias-corrected estimates of the gradient's first two moments.

  Update (t from 1, ``m_0 = v_0 = 0``)::

      m_t = b1 m_{t-1} + (1 - b1) g_t        m_hat = m_t / (1 - b1^t)
      v_t = b2 v_{t-1} + (1 - b2) g_t^2      v_hat = v_t / (1 - b2^t)
      w  <- w - lr m_hat / (sqrt(v_hat + eps_root) + eps)

  ``nesterov=True`` is Nadam (see :func:`nadam`). ``mu_dtype`` / ``nu_dtype`` store the
  moments in a narrower dtype (``nu_dtype`` is ours: Optax has ``mu_dtype`` only).

  Chain: ``scale_by_adam``, ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    b1: the decay of the first moment m, in [0, 1).
    b2: the decay of the second moment v, in [0, 1).
    eps: added after the square root (numerical stability).
    eps_root: added under the square root; 0 (the paper's) unless gradients are taken
      through the optimizer (meta-learning), where it keeps the derivative finite at
      ``v_hat = 0``.
    mu_dtype: dtype of the stored m (e.g. ``jnp.bfloat16`` to halve its memory); ``None``
      keeps the parameters'.
    nesterov: use Nadam's look-ahead first moment (see :func:`nadam`).
    nu_dtype: dtype of the stored v (ours); ``None`` keeps the parameters' (float32 for
      float16 ones). The arithmetic
      runs in the wider of the stored and the gradients' dtypes.

  Returns:
    A :func:`chain` whose state is ``(ScaleByAdamState, EmptyState)`` (the second an
    :class:`~optcompose.InjectHyperparamsState` when ``learning_rate`` is a schedule).

  References:
    Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015; Optax's
    ``optax.adam``.

  Examples:
    At the first step ``m_hat / sqrt(v_hat) = g / |g|``: each weight moves by ``lr``
    against its gradient's sign, whatever the gradient's size.

    >>> import jax.numpy as jnp
    >>> import optcompose as oc
    >>> tx = oc.adam(learning_rate=0.1)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> updates, state = tx.update({"w": jnp.array([0.5, -3.0])}, tx.init(params), params)
    >>> [round(float(u), 4) for u in updates["w"]]
    [-0.1, 0.1]
  """
  return chain(
    scale_by_adam(
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      mu_dtype=mu_dtype,
      nesterov=nesterov,
      nu_dtype=nu_dtype,
    ),
    scale_by_learning_rate(learning_rate),
  )


@public("optimizer", optax="nadam", **_ADAM)
def nadam(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-8,
  eps_root: ScalarOrSchedule = 0.0,
  mu_dtype: Optional[Any] = None,
  *,
  nesterov: bool = True,
  nu_dtype: Optional[Any] = None,
) -> GradientTransformation:
  """Nadam: Adam with ``m_hat = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)``.

  Update (t from 1; m, v, v_hat as in :func:`adam`)::

      m_hat = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)
      w    <- w - lr m_hat / (sqrt(v_hat + eps_root) + eps)

  Same as ``adam(..., nesterov=True)``; ``nesterov`` is kept, as in Optax, so that
  ``nadam(..., nesterov=False)`` is plain Adam.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    b1: the decay of the first moment m, in [0, 1).
    b2: the decay of the second moment v, in [0, 1).
    eps: added after the square root (numerical stability).
    eps_root: added under the square root (see :func:`adam`); 0 by default.
    mu_dtype: dtype of the stored m; ``None`` keeps the parameters'.
    nesterov: True (the default) for Nadam's first moment; False gives plain Adam.
    nu_dtype: dtype of the stored v (ours); ``None`` keeps the parameters' (float32 for
      float16 ones).

  Returns:
    A :func:`chain` whose state is ``(ScaleByAdamState, EmptyState)``, as :func:`adam`'s.

  References:
    Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016; Optax's
    ``optax.nadam``.
  """
  return adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype)


@public(
  "optimizer", optax="adamw", l1=real(0.0, draw=(1e-4, 0.1), optional=True), **_ADAM, **_DECOUPLED
)
def adamw(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-8,
  eps_root: ScalarOrSchedule = 0.0,
  mu_dtype: Optional[Any] = None,
  weight_decay: ScalarOrSchedule = 1e-4,
  mask: Mask = None,
  *,
  nesterov: bool = False,
  l1: Optional[ScalarOrSchedule] = None,
  l1_mask: Mask = None,
  nu_dtype: Optional[Any] = None,
) -> GradientTransformation:
  """AdamW: Adam with decoupled weight decay.

  Update (m_hat, v_hat as in :func:`adam`)::

      w <- w - lr (m_hat / (sqrt(v_hat + eps_root) + eps) + weight_decay w)

  The decay is multiplied by the learning rate, as in Optax and PyTorch. ``mask`` selects
  the decayed leaves. ``l1`` adds L1 soft-thresholding of the stepped weights
  (``w <- sign(w) max(|w| - lr l1, 0)``, leaves selected by ``l1_mask``): with
  ``weight_decay`` this is an elastic-net AdamW whose small weights become exact zeros.
  Note that the threshold ``lr l1`` competes with Adam's *normalised* step
  ``lr m_hat / sqrt(v_hat)``: a weight stays at zero where ``|m_hat| / sqrt(v_hat) < l1``.
  With minibatch noise that ratio is small for irrelevant weights and they reach exact
  zeros (tests/test_proximal.py recovers a lasso support this way); with noise-free
  full-batch gradients it is about 1 everywhere and no weight settles at zero -- use
  ``sgd(..., l1=...)`` (ISTA) there.

  Chain: ``scale_by_adam``, ``add_decayed_weights(weight_decay, mask)``,
  ``scale_by_learning_rate``, [``prox_elastic_net(l1, 0, lr)``].

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    b1: the decay of the first moment m, in [0, 1).
    b2: the decay of the second moment v, in [0, 1).
    eps: added after the square root (numerical stability).
    eps_root: added under the square root (see :func:`adam`); 0 by default.
    mu_dtype: dtype of the stored m; ``None`` keeps the parameters'.
    weight_decay: lambda >= 0 (a number or a schedule), multiplied by lr.
    mask: the leaves that are decayed (a tree of bools with the parameters' structure or a
      prefix of it, or a callable returning one from the parameters); ``None``: all.
    nesterov: use Nadam's look-ahead first moment (see :func:`nadam`).
    l1: L1 strength of the soft-thresholding step (>= 0, a number or a schedule; ours,
      keyword-only). ``None`` (the default): no such step; a number, even 0, keeps it.
    l1_mask: the leaves ``l1`` applies to (a mask as for ``mask``); ``None``: all.
    nu_dtype: dtype of the stored v (ours); ``None`` keeps the parameters' (float32 for
      float16 ones).

  Returns:
    A :func:`chain` whose state is ``(ScaleByAdamState, EmptyState, EmptyState[,
    EmptyState])``; a member given a schedule has an
    :class:`~optcompose.InjectHyperparamsState` instead.

  References:
    Loshchilov and Hutter, "Decoupled Weight Decay Regularization", ICLR 2019; Parikh and
    Boyd, "Proximal Algorithms", Foundations and Trends in Optimization, 2014 (the ``l1``
    step); Optax's ``optax.adamw``.

  Examples:
    At the first step Adam's direction is the gradient's sign, so a weight ``w`` moves by
    ``-lr (sign(g) + weight_decay w)``; the mask keeps the bias from decaying.

    >>> import jax.numpy as jnp
    >>> import optcompose as oc
    >>> params = {"w": jnp.array([2.0]), "b": jnp.array([2.0])}
    >>> tx = oc.adamw(0.1, weight_decay=0.5, mask={"w": True, "b": False})
    >>> grads = {"w": jnp.array([1.0]), "b": jnp.array([1.0])}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> round(float(updates["w"][0]), 4), round(float(updates["b"][0]), 4)
    (-0.2, -0.1)
  """
  return chain(
    scale_by_adam(
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      mu_dtype=mu_dtype,
      nesterov=nesterov,
      nu_dtype=nu_dtype,
    ),
    add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate),
    *_proximal(learning_rate, l1, None, l1_mask, who="adamw", mask_name="l1_mask"),
  )


@public("optimizer", optax="nadamw", **_ADAM, **_DECOUPLED)
def nadamw(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-8,
  eps_root: ScalarOrSchedule = 0.0,
  mu_dtype: Optional[Any] = None,
  weight_decay: ScalarOrSchedule = 1e-4,
  mask: Mask = None,
  *,
  nesterov: bool = True,
  l1: Optional[ScalarOrSchedule] = None,
  l1_mask: Mask = None,
  nu_dtype: Optional[Any] = None,
) -> GradientTransformation:
  """NadamW: :func:`adamw` with Nesterov's first moment (see :func:`nadam`).

  Update (t from 1; v_hat as in :func:`adam`)::

      m_hat = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)
      w    <- w - lr (m_hat / (sqrt(v_hat + eps_root) + eps) + weight_decay w)

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    b1: the decay of the first moment m, in [0, 1).
    b2: the decay of the second moment v, in [0, 1).
    eps: added after the square root (numerical stability).
    eps_root: added under the square root (see :func:`adam`); 0 by default.
    mu_dtype: dtype of the stored m; ``None`` keeps the parameters'.
    weight_decay: lambda >= 0 (a number or a schedule), multiplied by lr.
    mask: the leaves that are decayed (as in :func:`adamw`); ``None``: all.
    nesterov: True (the default) for Nadam's first moment; False gives :func:`adamw`.
    l1: L1 strength of the soft-thresholding step after it (as in :func:`adamw`; ours).
    l1_mask: the leaves ``l1`` applies to; ``None``: all.
    nu_dtype: dtype of the stored v (ours); ``None`` keeps the parameters' (float32 for
      float16 ones).

  Returns:
    A :func:`chain` with :func:`adamw`'s state.

  References:
    Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016; Loshchilov and
    Hutter, "Decoupled Weight Decay Regularization", ICLR 2019; Optax's ``optax.nadamw``.
  """
  return adamw(
    learning_rate,
    b1,
    b2,
    eps,
    eps_root,
    mu_dtype,
    weight_decay,
    mask,
    nesterov=nesterov,
    l1=l1,
    l1_mask=l1_mask,
    nu_dtype=nu_dtype,
  )


__all__ = []  # and the builders it registers
