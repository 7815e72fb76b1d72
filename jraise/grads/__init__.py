"""jraise.grads: per-example gradients, their JL projection, and a pool's gradient features.

The model-agnostic entry points take any JAX model as a params pytree and
``loss_fn(params, example) -> scalar`` (`jraise.grads.agnostic`); full-parameter features of every
linear layer without per-example weight gradients take a tapped loss (`jraise.grads.factored_full`).
Nothing here touches files: the on-disk feature store is `jraise.data.feature_store`, filling it
`jraise.jobs.influence`.
"""

from jraise.grads.agnostic import AdamPreconditioner, adam_preconditioner, gradient_features, per_example_grads
from jraise.grads.factored_full import (
    adafactor_factors, factored_full_features, factored_full_plan, tapped_inputs_and_deltas, tapped_layers,
)
from jraise.grads.projection import ProjectionConfig

__all__ = ["AdamPreconditioner", "ProjectionConfig", "adafactor_factors", "adam_preconditioner",
           "factored_full_features", "factored_full_plan", "gradient_features", "per_example_grads",
           "tapped_inputs_and_deltas", "tapped_layers"]
