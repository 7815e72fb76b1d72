"""jraise.grads: per-example gradients, their JL projection, and the feature store.

The model-agnostic entry points take any JAX model as a params pytree and
``loss_fn(params, example) -> scalar`` (`jraise.grads.agnostic`).
"""

from jraise.grads.agnostic import AdamPreconditioner, adam_preconditioner, gradient_features, per_example_grads
from jraise.grads.projection import ProjectionConfig

__all__ = ["AdamPreconditioner", "ProjectionConfig", "adam_preconditioner", "gradient_features", "per_example_grads"]
