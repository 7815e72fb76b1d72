"""RAISE building blocks (Lv, Li et al. 2025, arXiv 2504.07282): per-cluster set sampling, the policy, PPO.

* `sampling`: padded cluster layout, Gumbel-top-b sampling, Plackett-Luce log-probabilities, top-b.
* `policy`: the fused 39-number state, the acquisition MLP (actor) and the critic.
* `ppo`: GAE, the per-cluster clipped surrogate and the value loss, on rlax.
* `agnostic`: RAISE around a user's own ``learner_step`` / ``val_loss_fn`` (any JAX model):
  `train_raise_policy`, `static_features_from`, `cluster_layout` (``n_clusters`` optional).
"""

from jraise.select.rl.agnostic import (
    PolicyBundle,
    RaiseConfig,
    RaiseProgress,
    cluster_layout,
    make_raise_episode,
    make_raise_step,
    static_features_from,
    train_raise_policy,
)
from jraise.select.rl.policy import (
    AVAILABILITY,
    DIFFICULTY,
    SEMANTIC,
    STAGE,
    STAGE_DIM,
    STAGE_KINDS,
    AcquisitionMLP,
    Critic,
    PolicyConfig,
    critic_summary,
    fused_state,
    score_pool,
    stage_features,
)
from jraise.select.rl.ppo import clip_fraction, gae, ppo_loss, value_loss
from jraise.select.rl.sampling import (
    ClusterLayout,
    gumbel_top_b,
    pl_first_pick_entropy,
    plackett_luce_logp,
    top_b,
)

__all__ = [
    "AVAILABILITY",
    "DIFFICULTY",
    "SEMANTIC",
    "STAGE",
    "STAGE_DIM",
    "STAGE_KINDS",
    "AcquisitionMLP",
    "ClusterLayout",
    "Critic",
    "PolicyBundle",
    "PolicyConfig",
    "RaiseConfig",
    "RaiseProgress",
    "clip_fraction",
    "cluster_layout",
    "critic_summary",
    "fused_state",
    "gae",
    "gumbel_top_b",
    "make_raise_episode",
    "make_raise_step",
    "pl_first_pick_entropy",
    "plackett_luce_logp",
    "ppo_loss",
    "score_pool",
    "stage_features",
    "static_features_from",
    "top_b",
    "train_raise_policy",
    "value_loss",
]
