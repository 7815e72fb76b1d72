"""RAISE around a user's own learner: the fused episode and PPO for any JAX model and training step.

Stage: ``jraise.select`` (RAISE, "Formulation" and "RL" in ``shared/methods/raise.md``; Lv, Li et
al., "RAISE: Reinforced Adaptive Instruction Selection For Large Language Models", Findings of
EMNLP 2025, arXiv 2504.07282). The user brings two pure, jit-compatible functions of a pytree
state (their model, optimizer state, anything else):

    learner_step(state, indices) -> state      indices: int32 [B] pool rows, -1 = padding to skip
    val_loss_fn(state) -> scalar               the target validation loss, P = -val_loss

and arrays computed with any model:

    difficulty [N, D_d], embeddings [N, E] --static_features_from--> static [N, S]  (S = D_d + dims)
    labels [N] (e.g. K-means over the semantic block)  --cluster_layout-->  ClusterLayout [C, M]

One step t = 1..T of an episode, one jitted function (`make_raise_step`), exactly as the LLM
episode of `jraise.select.rl.episode`:

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

Shared with the LLM path (the same functions, not copies): `stage_features`, `fused_state`,
`choose_batch` (scoring + Gumbel-top-b / top-b + Plackett-Luce log-probability), `add_selections`,
`Rollout`, `replay`, the whole PPO update (`trainer.ppo_update_fn`: GAE, `ppo_loss`, `value_loss`,
Adam epochs), `RaiseConfig`, `PolicyBundle`, `RaiseProgress`, `AcquisitionMLP` / `Critic`, `sampling.cluster_layout`,
`clustering.pca` / `zscore`. Parallel code: the step and episode bodies here (they call the user's
functions where `episode.make_fused_step` calls jraise's LLM update and validation loss) and the
episode loop of `train_raise_policy` (the loop of `trainer.train_policy`, around jraise's LLM episode).

Keys: episode k (0-based) samples with ``fold_in(key, k)`` and step t with ``fold_in(that, t)``,
as in `train_policy` with ``key = jax.random.key(seed)``. No file I/O here: checkpoint from the
``on_episode`` callback, resume by passing back the `RaiseProgress` it got.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jraise.select.rl.episode import EpisodeConfig, Rollout
from jraise.select.rl.features import static_features_from  # noqa: F401 (exported here)
from jraise.select.rl.policy import STAGE_DIM, AcquisitionMLP, Critic, PolicyConfig, stage_features
from jraise.select.rl.sampling import ClusterLayout
from jraise.select.rl.sampling import cluster_layout as _padded_layout
from jraise.select.rl.selector import add_selections, choose_batch
from jraise.select.rl.trainer import PolicyBundle, RaiseConfig, RaiseProgress, ppo_update_fn

__all__ = [
    "PolicyBundle",
    "RaiseConfig",
    "RaiseProgress",
    "cluster_layout",
    "make_raise_episode",
    "make_raise_step",
    "static_features_from",
    "train_raise_policy",
]

LearnerStep = Callable[[Any, jax.Array], Any]
ValLossFn = Callable[[Any], jax.Array]

# fold_in data of the fresh policy's initialisation key; episodes use 0, 1, 2, ... so they never meet it.
_INIT_FOLD = 2**31 - 1

# The `RaiseConfig` fields this module reads; llm_lr, llm_schedule (the learner is the user's) and
# seed (``key`` replaces it) are not read.
CONFIG_FIELDS_READ = ("episodes", "steps", "per_cluster", "policy_lr", "ppo_epochs", "clip_eps", "gamma", "lam",
                      "entropy_coef", "value_coef", "tau", "stage", "normalise_advantages")


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
    return _padded_layout(labels, 1 if n_clusters is None else n_clusters)


def make_raise_step(learner_step: LearnerStep, val_loss_fn: ValLossFn, actor_graphdef, config: EpisodeConfig,
                    learner_has_aux: bool = False):
    """``step(actor_state, carry, t, key, static, layout) -> (carry, outputs)``, pure; jit or scan it.

    carry = (learner state, counts [N] float32, validation loss of M_{t-1} [] float32); outputs:
    picked [C, b], indices [B] int32, logp [C], reward [], val_loss [], stage [2], and train_loss []
    when ``learner_has_aux`` (then ``learner_step`` returns ``(state, loss)``). ``t`` is 1-based;
    the sampling key is ``fold_in(key, t)``. See the module docstring for the equations.
    """

    def step(actor_state, carry, t, key, static, layout: ClusterLayout):
        state, counts, val_before = carry
        actor = nnx.merge(actor_graphdef, actor_state)
        stage = stage_features(t, config.steps, val_before, config.stage)
        picked, logp, indices = choose_batch(actor, static, counts, stage, layout, jax.random.fold_in(key, t),
                                             config.per_cluster, config.tau, config.stochastic)
        if learner_has_aux:
            state, train_loss = learner_step(state, indices)
        else:
            state, train_loss = learner_step(state, indices), None
        val_after = jnp.asarray(val_loss_fn(state), jnp.float32)
        counts = add_selections(counts, indices)
        outputs = {"picked": picked, "indices": indices, "logp": logp, "reward": val_before - val_after,
                   "val_loss": val_after, "stage": stage}
        if learner_has_aux:
            outputs["train_loss"] = jnp.asarray(train_loss, jnp.float32)
        return (state, counts, val_after), outputs

    return step


def make_raise_episode(learner_step: LearnerStep, val_loss_fn: ValLossFn, actor_graphdef, config: EpisodeConfig,
                       learner_has_aux: bool = False):
    """A jitted ``episode(actor_state, learner_state, static, layout, key) -> (learner_state,
    Rollout, train_losses)``: `make_raise_step` scanned over t = 1..T from ``learner_state`` (M_0).

    ``train_losses`` is [T] float32 when ``learner_has_aux``, else None. ``static`` [N, S] float32,
    ``layout`` a `ClusterLayout` over the same N rows; ``config.stochastic`` False takes top-b.
    """
    step = make_raise_step(learner_step, val_loss_fn, actor_graphdef, config, learner_has_aux)

    def episode(actor_state, learner_state, static, layout, key):
        val0 = jnp.asarray(val_loss_fn(learner_state), jnp.float32)
        counts = jnp.zeros((static.shape[0],), jnp.float32)

        def body(carry, t):
            return step(actor_state, carry, t, key, static, layout)

        (learner_state, _, _), out = jax.lax.scan(body, (learner_state, counts, val0),
                                                  jnp.arange(1, config.steps + 1))
        rollout = Rollout(out["picked"], out["indices"], out["logp"], out["reward"], out["val_loss"], out["stage"],
                          val0)
        return learner_state, rollout, out.get("train_loss")

    return jax.jit(episode)


def _fresh_policy(config: PolicyConfig, key: jax.Array) -> PolicyBundle:
    actor_key, critic_key = jax.random.split(jax.random.fold_in(key, _INIT_FOLD))
    return PolicyBundle(AcquisitionMLP(config, rngs=nnx.Rngs(actor_key)), Critic(config, rngs=nnx.Rngs(critic_key)),
                        config)


def _check_inputs(static: jax.Array, layout: ClusterLayout, config: RaiseConfig, policy_config: PolicyConfig) -> None:
    if static.ndim != 2:
        raise ValueError(f"static features must be [N, S], got shape {static.shape}")
    if static.shape[1] != policy_config.static_dim:
        raise ValueError(f"static features have {static.shape[1]} columns, the policy expects "
                         f"{policy_config.static_dim} (state_dim {policy_config.state_dim} = {STAGE_DIM} + S + 1)")
    top = int(np.asarray(layout.members).max())
    if top >= static.shape[0]:
        raise ValueError(f"the cluster layout names pool row {top}, but static features have {static.shape[0]} rows")
    if config.steps < 1:
        raise ValueError(f"steps must be >= 1, got {config.steps}")
    if (policy_config.stage, policy_config.tau) != (config.stage, config.tau):
        raise ValueError(f"policy config (stage {policy_config.stage!r}, tau {policy_config.tau}) differs from the "
                         f"RAISE config (stage {config.stage!r}, tau {config.tau}); the deployed selector would "
                         f"not see the states the policy was trained on")
    layout.check_budget(config.per_cluster)


def train_raise_policy(learner_step: LearnerStep, val_loss_fn: ValLossFn, learner_state, static, layout: ClusterLayout,
                       config: RaiseConfig, key: jax.Array, *, policy_config: PolicyConfig | None = None,
                       policy: PolicyBundle | None = None, learner_has_aux: bool = False,
                       resume: RaiseProgress | None = None,
                       on_episode: Callable[[RaiseProgress], None] | None = None) -> tuple[PolicyBundle, list[dict]]:
    """Trains the RAISE selection policy with PPO around the user's learner; returns (policy, history).

    Args:
      learner_step: ``(state, indices) -> state`` (or ``-> (state, loss)`` with ``learner_has_aux``),
        pure and jit-compatible: one update of the user's model on pool rows ``indices``, int32
        [B = C x per_cluster]; -1 entries are padding the step must ignore (none occur when every
        cluster has at least ``per_cluster`` rows, which is checked). Large arrays it reads (a
        token pool, frozen weights) are best kept in ``state`` rather than closed over: a closure
        makes them compile-time constants of the jitted episode.
      val_loss_fn: ``state -> scalar``, pure: the validation loss; the reward is its decrease.
      learner_state: M_0, any pytree; every episode starts from it (include a fresh optimizer state).
      static: [N, S] static features (`static_features_from`), S = ``policy_config.static_dim``.
      layout: `cluster_layout` of the N rows.
      config: `RaiseConfig`; the fields read are `CONFIG_FIELDS_READ` (``llm_lr``,
        ``llm_schedule`` and ``seed`` are not).
      key: PRNG key; episode k (0-based) uses ``fold_in(key, k)``; a fresh policy is initialised
        from ``fold_in(key, 2**31 - 1)``.
      policy_config: the policy's sizes; default ``PolicyConfig(state_dim=S + 3, stage=config.stage,
        tau=config.tau)``. Its stage and tau must equal the config's.
      policy: optional initial `PolicyBundle` (default: a fresh one); it is not modified.
      resume: a `RaiseProgress` from ``on_episode``: training continues after its episodes.
      on_episode: called with the `RaiseProgress` after every episode (checkpoint or log there).

    Returns:
      A `PolicyBundle` (actor, critic, config), as `trainer.train_policy` returns: deploy it with
      ``raise_selector(policy.actor, static, layout, config.per_cluster, stage=policy.config.stage,
      tau=policy.config.tau)``. And the history, one dict per episode: episode (1-based), return
      (sum of rewards = val_loss0 - val_loss_final), mean_reward (return / T), val_loss0,
      val_loss_final, train_loss_mean (only with ``learner_has_aux``), and the last PPO epoch's
      policy_loss, value_loss, entropy.
    """
    static = jnp.asarray(static, jnp.float32)
    if policy is not None:
        if policy_config is not None and policy_config != policy.config:
            raise ValueError("policy_config differs from the given policy's config")
        policy_config = policy.config
    policy_config = policy_config or PolicyConfig(state_dim=static.shape[-1] + STAGE_DIM + 1, stage=config.stage,
                                                  tau=config.tau)
    _check_inputs(static, layout, config, policy_config)
    if policy is None:
        policy = _fresh_policy(policy_config, key)
    actor_graphdef, actor_state = nnx.split(policy.actor)
    critic_graphdef, critic_state = nnx.split(policy.critic)
    opt = optax.adam(config.policy_lr)
    if resume is None:
        params = {"actor": actor_state, "critic": critic_state}
        opt_state, history = opt.init(params), []
    else:
        params, opt_state, history = resume.params, resume.opt_state, list(resume.history)
    episode_fn = make_raise_episode(learner_step, val_loss_fn, actor_graphdef, config.episode_config(True),
                                    learner_has_aux)
    update_fn = ppo_update_fn(actor_graphdef, critic_graphdef, opt, config)
    for k in range(len(history), config.episodes):
        _, rollout, train_losses = episode_fn(params["actor"], learner_state, static, layout,
                                              jax.random.fold_in(key, k))
        params, opt_state, metrics = update_fn(params, opt_state, static, layout, rollout)
        ret = float(rollout.rewards.sum())
        record = {"episode": k + 1, "return": ret, "mean_reward": ret / config.steps,
                  "val_loss0": float(rollout.val_loss0), "val_loss_final": float(rollout.val_losses[-1])}
        if train_losses is not None:
            record["train_loss_mean"] = float(train_losses.mean())
        record.update({m: float(v) for m, v in metrics.items()})
        history.append(record)
        if on_episode is not None:
            on_episode(RaiseProgress(params, opt_state, list(history)))
    trained = PolicyBundle(nnx.merge(actor_graphdef, params["actor"]), nnx.merge(critic_graphdef, params["critic"]),
                           policy_config)
    return trained, history
