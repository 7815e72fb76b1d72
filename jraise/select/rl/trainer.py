"""Training the RAISE selection policy with PPO over fused episodes of jraise's LLM step.

    for episode k = 1..K:
        every episode starts from the same LLM weights M_0 and a fresh optimizer state
        rollout  = fused episode (T steps, sampled picks) under the current policy   [one jit]
        values   = critic replayed over the rollout; advantages by GAE (terminal: V_T = 0)
        policy  <- ``ppo_epochs`` Adam steps on  clipped surrogate (per-cluster ratios)
                   + value_coef * value loss - entropy_coef * first-pick entropy       [one jit]
        on_episode(RaiseProgress(policy weights, their Adam state, the history so far))

Episode k's key is ``fold_in(key(seed), k)``, so a run given back the `RaiseProgress` of its
last finished episode (``resume``) continues exactly as an uninterrupted one. No file I/O here:
`jraise.jobs.raise_policy.train_policy_in_dir` checkpoints from ``on_episode`` into a policy
directory and resumes from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

from jraise.select.rl.episode import EpisodeConfig, make_episode, replay
from jraise.select.rl.policy import AcquisitionMLP, Critic, PolicyConfig
from jraise.select.rl.ppo import gae, ppo_loss, value_loss
from jraise.train.step import make_optimizer, param_dtypes, split_trainable


@dataclass(frozen=True)
class RaiseConfig:
    """RAISE hyperparameters (paper: K = 20 episodes; the rest are jraise's documented choices)."""

    episodes: int = 20
    steps: int = 20
    per_cluster: int = 4
    llm_lr: float = 1e-3
    llm_schedule: str = "constant"
    policy_lr: float = 3e-3
    ppo_epochs: int = 4
    clip_eps: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    tau: float = 1.0
    stage: str = "progress_and_perf"
    normalise_advantages: bool = True
    seed: int = 0

    def episode_config(self, stochastic: bool = True) -> EpisodeConfig:
        return EpisodeConfig(steps=self.steps, per_cluster=self.per_cluster, tau=self.tau, stage=self.stage,
                             stochastic=stochastic)


@dataclass
class PolicyBundle:
    """The policy: actor (acquisition MLP) and critic modules, and their config."""

    actor: AcquisitionMLP
    critic: Critic
    config: PolicyConfig


@dataclass(frozen=True)
class RaiseProgress:
    """Where policy training stands after ``len(history)`` episodes: actor and critic parameters
    (``{"actor": nnx.State, "critic": nnx.State}``), their Adam state, the per-episode records.
    Given to ``on_episode`` after each episode; passed back as ``resume`` it continues the run
    exactly (episode k's key depends only on the run's key and k)."""

    params: dict
    opt_state: Any
    history: list[dict] = field(default_factory=list)


def new_policy(config: PolicyConfig, seed: int) -> PolicyBundle:
    return PolicyBundle(AcquisitionMLP(config, rngs=nnx.Rngs(seed)), Critic(config, rngs=nnx.Rngs(seed + 1)), config)


def ppo_update_fn(actor_graphdef, critic_graphdef, opt: optax.GradientTransformation, config: RaiseConfig):
    def loss_fn(params, static, layout, rollout, advantages, returns):
        actor = nnx.merge(actor_graphdef, params["actor"])
        critic = nnx.merge(critic_graphdef, params["critic"])
        logp, entropy, values = replay(actor, critic, static, layout, rollout, config.tau)
        pg = ppo_loss(logp, rollout.logp, advantages, config.clip_eps, entropy, config.entropy_coef)
        vl = value_loss(values, returns)
        return pg + config.value_coef * vl, {"policy_loss": pg, "value_loss": vl, "entropy": entropy.mean()}

    def update(params, opt_state, static, layout, rollout):
        actor = nnx.merge(actor_graphdef, params["actor"])
        critic = nnx.merge(critic_graphdef, params["critic"])
        _, _, values = replay(actor, critic, static, layout, rollout, config.tau)
        values = jax.lax.stop_gradient(values)
        advantages = gae(rollout.rewards, jnp.concatenate([values, jnp.zeros(1)]), config.gamma, config.lam)
        returns = advantages + values
        if config.normalise_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

        def epoch(state, _):
            params, opt_state = state
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, static, layout, rollout,
                                                                            advantages, returns)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), metrics

        (params, opt_state), metrics = jax.lax.scan(epoch, (params, opt_state), None, length=config.ppo_epochs)
        return params, opt_state, jax.tree.map(lambda m: m[-1], metrics)

    return jax.jit(update)


def default_policy_config(config: RaiseConfig) -> PolicyConfig:
    """The policy `train_policy` trains when given none: jraise's sizes at the config's stage and tau."""
    return PolicyConfig(stage=config.stage, tau=config.tau)


def check_policy_inputs(static: jax.Array, layout, config: RaiseConfig, policy_config: PolicyConfig) -> None:
    """Refuses a cluster with fewer than ``config.per_cluster`` rows and static features of
    another width than the policy's (``policy_config.static_dim``)."""
    layout.check_budget(config.per_cluster)
    if static.shape[1] != policy_config.static_dim:
        raise ValueError(f"static features have {static.shape[1]} columns, the policy expects {policy_config.static_dim}")


def train_policy(model: nnx.Module, static: jax.Array, layout, pool, val: dict, config: RaiseConfig,
                 policy_config: PolicyConfig | None = None, progress: bool = True, echo=None, *,
                 resume: RaiseProgress | None = None,
                 on_episode: Callable[[RaiseProgress], None] | None = None) -> tuple[PolicyBundle, list[dict]]:
    """Trains the policy for ``config.episodes`` episodes; returns the policy and the per-episode
    history (return, val losses, losses). ``model`` is M_0 (LoRA adapters attached means LoRA
    updates); ``pool`` a `DevicePool`, ``val`` a fixed batch dict. ``policy_config`` defaults to
    `default_policy_config`. ``resume``: a `RaiseProgress` from ``on_episode``; training continues
    after its episodes. ``on_episode`` is called with the `RaiseProgress` after every episode,
    before the progress bar and ``echo`` report it."""
    policy_config = policy_config or default_policy_config(config)
    check_policy_inputs(static, layout, config, policy_config)
    graphdef, trainable0, frozen = split_trainable(model)
    tx, _ = make_optimizer(config.llm_lr, total_steps=config.steps, schedule=config.llm_schedule)
    policy = new_policy(policy_config, config.seed)
    actor_graphdef, actor_state = nnx.split(policy.actor)
    critic_graphdef, critic_state = nnx.split(policy.critic)
    params = {"actor": actor_state, "critic": critic_state}
    opt = optax.adam(config.policy_lr)
    opt_state = opt.init(params)
    episode_fn = make_episode(graphdef, tx, param_dtypes(model), actor_graphdef, config.episode_config(True))
    update_fn = ppo_update_fn(actor_graphdef, critic_graphdef, opt, config)

    history: list[dict] = []
    if resume is not None:
        params, opt_state, history = resume.params, resume.opt_state, list(resume.history)
    start = len(history)
    base_key = jax.random.key(config.seed)
    bar = tqdm(total=config.episodes, initial=start, desc="raise", unit="episode", disable=None if progress else True)
    for k in range(start, config.episodes):
        trainable = jax.tree.map(jnp.array, trainable0)
        _, _, rollout, train_losses = episode_fn(params["actor"], trainable, tx.init(trainable), frozen, static, layout,
                                                 pool, val, jax.random.fold_in(base_key, k))
        params, opt_state, metrics = update_fn(params, opt_state, static, layout, rollout)
        record = {"episode": k + 1, "return": float(rollout.rewards.sum()), "val_loss0": float(rollout.val_loss0),
                  "val_loss_final": float(rollout.val_losses[-1]), "train_loss_mean": float(train_losses.mean()),
                  **{m: float(v) for m, v in metrics.items()}}
        history.append(record)
        if on_episode is not None:
            on_episode(RaiseProgress(params, opt_state, list(history)))
        bar.update(1)
        bar.set_postfix(ret=f"{record['return']:.4f}")
        if echo is not None:
            echo(f"episode {k + 1}: return {record['return']:.4f}")
    bar.close()
    nnx.update(policy.actor, params["actor"])
    nnx.update(policy.critic, params["critic"])
    return policy, history
