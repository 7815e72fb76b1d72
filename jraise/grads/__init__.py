"""jraise.grads: per-example gradients, their JL projection, and a pool's gradient features.

The model-agnostic entry points take any JAX model as a params pytree and
``loss_fn(params, example) -> scalar`` (`jraise.grads.agnostic`). Nothing here touches files: the
on-disk feature store is `jraise.data.feature_store`, filling it `jraise.jobs.influence`.
"""

from jraise.grads.agnostic import AdamPreconditioner, adam_preconditioner, gradient_features, per_example_grads
from jraise.grads.projection import ProjectionConfig

__all__ = ["AdamPreconditioner", "ProjectionConfig", "adam_preconditioner", "gradient_features", "per_example_grads"]
