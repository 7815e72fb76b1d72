"""RAISE around a user's own learner: the fused episode and PPO for any JAX model and training step.

Stage: ``jraise.select`` (RAISE, its formulation and RL; Lv, Li et
al., "RAISE: Reinforced Adaptive Instruction Selection For Large Language Models", Findings of
EMNLP 2025, arXiv 2504.07282). The user brings two pure, jit-compatible functions of a pytree
state (their model, optimizer state, anything else):

    learner_step(state, indices) -> state      indices: int32 [B] pool rows, -1 = padding to skip
    val_loss_fn(state) -> scalar               the target validation loss, P = -val_loss

and arrays computed with any model:

    difficulty [N, D_d], embeddings [N, E] --static_features_from--> static [N, S]  (S = D_d + dims)
    labels [N] (e.g. K-means over the semantic block)  --cluster_layout-->  ClusterLayout [C, M]

One step t = 1..T of an episode, one jitted function (`make_raise_step`; jraise's own LLM
episode is this step around `episode.llm_learner`):

    stage_t = stage_features(t, T, val_loss(M_{t-1}))
    scores  = actor(fused_state(static, counts, stage_t))                     [N]
    picks   = Gumbel-top-b per cluster on scores / tau                        [C, b] -> indices [B]
    M_t     = learner_step(M_{t-1}, indices)
    R_t     = val_loss(M_{t-1}) - val_loss(M_t)          (= P(M_t) - P(M_{t-1}), P = -val_loss)
    counts += how often each index was picked

An episode (`make_raise_episode`) is a `jax.lax.scan` of that step over t = 1..T from the SAME
user state M_0 every episode (so put a fresh optimizer state in it), and keeps only the O(T x B)
`Rollout`. `train_raise_policy` then runs, per episode k:

    V        = critic values of the replayed states s_0..s_{T-1}, V(s_T) = 0 (terminal)
    A_t      = sum_l (gamma lam)^l delta_{t+l},   delta_t = R_t + gamma V(s_{t+1}) - V(s_t)   (GAE)
    G_t      = A_t + V(s_t)                                                   (value targets)
    A        <- (A - mean A) / (std A + 1e-8)       when ``normalise_advantages``
    r_{t,c}  = exp(log pi_new(picks_{t,c}) - log pi_old(picks_{t,c}))   (Plackett-Luce, per cluster)
    L        = mean_{t,c} -min(r A_t, clip(r, 1 - eps, 1 + eps) A_t)
               + value_coef * 0.5 mean_t (V(s_t) - G_t)^2 - entropy_coef * mean_{t,c} H_first-pick
    ``ppo_epochs`` Adam steps (``policy_lr``) on L over the actor and critic.

One code path: jraise's LLM is just one learner (`episode.llm_learner`), and `make_fused_step`,
`make_episode` and `trainer.train_policy` are `make_raise_step`, `make_raise_episode` and
`train_raise_policy` around it. This module is the public face for any other model: the three
functions (defined in `episode` and `trainer`), `static_features_from`, `cluster_layout`,
`RaiseConfig`, `PolicyBundle`, `RaiseProgress`.

Keys: episode k (0-based) samples with ``fold_in(key, k)`` and step t with ``fold_in(that, t)``,
as in `train_policy` with ``key = jax.random.key(seed)``. No file I/O here: checkpoint from the
``on_episode`` callback, resume by passing back the `RaiseProgress` it got.
"""

from __future__ import annotations

import numpy as np

from jraise.select.rl.episode import LearnerStep, ValLossFn, make_raise_episode, make_raise_step
from jraise.select.rl.features import static_features_from
from jraise.select.rl.sampling import ClusterLayout
from jraise.select.rl.sampling import cluster_layout as padded_cluster_layout
from jraise.select.rl.trainer import (
    CONFIG_FIELDS_READ,
    PolicyBundle,
    RaiseConfig,
    RaiseProgress,
    train_raise_policy,
)

__all__ = [
    "CONFIG_FIELDS_READ",
    "LearnerStep",
    "PolicyBundle",
    "RaiseConfig",
    "RaiseProgress",
    "ValLossFn",
    "cluster_layout",
    "make_raise_episode",
    "make_raise_step",
    "static_features_from",
    "train_raise_policy",
]


def cluster_layout(labels, n_clusters: int | None = None) -> ClusterLayout:
    """The padded `ClusterLayout` (members [C, M], valid [C, M]) of integer labels [N].

    `jraise.select.rl.sampling.cluster_layout` with ``n_clusters`` defaulting to ``max(labels) + 1``.
    A label in [0, C) that no example has gives an all-padding row, which training and the selector
    reject (`ClusterLayout.check_budget`): number clusters 0..C-1 without gaps. Host-side (numpy),
    once: M, the largest cluster's size, is a data-dependent shape.
    """
    labels = np.asarray(labels)
    if n_clusters is None and labels.size and np.issubdtype(labels.dtype, np.integer):
        n_clusters = int(labels.max()) + 1
    return padded_cluster_layout(labels, 1 if n_clusters is None else n_clusters)


