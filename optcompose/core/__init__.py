"""The core floor: the contract (:mod:`.base`), hyperparameters and the one mechanism for
values that live in the state (:mod:`.hyperparams`), and the registry (:mod:`.registry`).
It imports only :mod:`optcompose.tree` (and Optax, whose types it extends)."""

from optcompose.core.base import (
    EmptyState, GradientTransformation, GradientTransformationExtraArgs, OptState, Params,
    PyTree, ScalarOrSchedule, Schedule, StateMismatchError, TransformInitFn, TransformUpdateFn,
    TransformUpdateExtraArgsFn, Updates, apply_updates, as_transformation, chain, cond,
    expect_state, identity, init_empty_state, needs_params, safe_increment, stateless,
    stateless_with_tree_map, with_extra_args_support, zero_count,
)
from optcompose.core.hyperparams import (
    DECAY, DTYPE, EPS, INT32_MAX, EPS_POSITIVE, EPS_ROOT, FLAG, INNER, INNER_PAIR, LABELS, LEARNING_RATE, MASK, MOMENTUM,
    NONNEGATIVE,
    SCHEDULE, Hyper, InjectHyperparamsState, as_hyperparam, check_hyperparameter, check_not_both_zero, checks_done,
    choice, current_hyperparams, default_float, holds_hyperparams, integer, real,
    rebuilt_each_step, set_hyperparams, value_at, with_schedules,
)
from optcompose.core.registry import REGISTRY, public
