"""optcompose: composable, verified gradient transformations for JAX.

``import optcompose as optax`` works for the names below: they follow Optax's names,
argument names and defaults. See ``optcompose._core`` for the contract.
"""

from optcompose import checkpoint, flat, schedules, sharding, testing, tree
from optcompose.flat import FlatParams, flat_params
from optcompose._core import (
    EmptyState, GradientTransformation, OptState, Params, RAW_GRADS, ScalarOrSchedule, Schedule,
    ScheduledState, Updates, apply_updates, chain, identity, init_empty_state, safe_increment,
    with_schedules,
)
from optcompose.aliases import adagrad, adam, adamw, nadam, nadamw, rmsprop, sgd
from optcompose.transforms.clipping import (
    ClipByGlobalNormState, adaptive_grad_clip, clip, clip_by_block_rms, clip_by_global_norm,
    clip_by_leaf_norm,
)
from optcompose.transforms.decay import add_decayed_weights, add_l2_penalty
from optcompose.transforms.momentum import TraceState, trace
from optcompose.transforms.moments import (
    BiasCorrectionState, EmaState, ScaleByAdamState, ScaleByRmsState, ScaleByRmsWithCountState,
    ScaleByRssState, ScaleByRStdDevState, ScaleByRStdDevWithCountState, ScaleBySecondMomentState,
    ema, scale_by_adam, scale_by_bias_correction, scale_by_rms, scale_by_rss, scale_by_second_moment,
    scale_by_stddev,
)
from optcompose.transforms.proximal import prox_elastic_net, prox_l1
from optcompose.transforms.scaling import scale, scale_by_learning_rate, scale_by_schedule
from optcompose.control import (
    ApplyIfFiniteState, MultiSteps, MultiStepsState, all_finite, apply_if_finite, multi_steps,
)
from optcompose.recipe.diagnostics import DiagnosticsState, diagnostics_dict, with_diagnostics
from optcompose.recipe.early_stopping import EarlyStopping, EarlyStoppingState, early_stopping
from optcompose.recipe.averaging import EmaParamsState, SwaState, averaged_params, ema_params, swa
from optcompose.recipe.lookahead import (
    LookaheadParams, LookaheadSlowState, LookaheadState, lookahead, lookahead_in_state,
    slow_params,
)
from optcompose.recipe.plateau import ReduceLROnPlateauState, reduce_on_plateau
from optcompose.recipe.sam import SAMState, normalize, sam, sharpness_aware
from optcompose.wrappers import (
    InjectHyperparamsState, MaskedNode, MaskedState, PartitionState, current_hyperparams,
    inject_hyperparams, labels_from_fn, labels_from_paths, mask_from_paths, masked, partition,
    set_hyperparams, set_to_zero,
)
from optcompose.schedules import (  # reachable from the top level, as in Optax
    constant_schedule, cosine_decay_schedule, cosine_onecycle_schedule,
    cosine_warm_restarts_schedule, exponential_decay, inverse_sqrt_schedule, inverse_time_decay,
    join_schedules, linear_onecycle_schedule, linear_schedule, linear_warmup,
    multiply_schedules, piecewise_constant_schedule, piecewise_interpolate_schedule,
    polynomial_schedule, schedule_from_function, sgdr_schedule, warmup_constant_schedule,
    warmup_cosine_decay_schedule, warmup_exponential_decay_schedule,
)

# The one place the version is written: pyproject.toml reads it (without importing optcompose).
__version__ = "0.1.0"

# Every public transformation and optimizer; the test registry must cover each of them.
TRANSFORMATIONS = (
    "identity", "scale", "scale_by_learning_rate", "scale_by_schedule", "trace", "ema",
    "scale_by_bias_correction", "scale_by_rss", "scale_by_rms", "scale_by_stddev", "scale_by_adam",
    "scale_by_second_moment", "add_decayed_weights", "add_l2_penalty", "prox_l1",
    "prox_elastic_net", "reduce_on_plateau", "clip", "clip_by_global_norm", "clip_by_leaf_norm",
    "clip_by_block_rms", "adaptive_grad_clip", "set_to_zero", "ema_params", "swa",
    "sharpness_aware", "normalize",
)
# Wrappers: take transformations and return one.
WRAPPERS = ("masked", "partition", "inject_hyperparams", "multi_steps", "apply_if_finite",
            "lookahead", "lookahead_in_state", "sam", "with_diagnostics")
OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adam", "nadam", "adamw", "nadamw")
