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

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

from jraise import parallel
from jraise.select.rl.episode import EpisodeConfig, LearnerStep, ValLossFn, llm_learner, make_raise_episode, replay
from jraise.select.rl.policy import STAGE_DIM, AcquisitionMLP, Critic, PolicyConfig
from jraise.select.rl.sampling import ClusterLayout
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


# fold_in data of the fresh policy's initialisation key; episodes use 0, 1, 2, ... so they never meet it.
_INIT_FOLD = 2**31 - 1

# The `RaiseConfig` fields `train_raise_policy` reads; llm_lr, llm_schedule (the learner is the
# caller's) and seed (``key`` replaces it) are not read.
CONFIG_FIELDS_READ = ("episodes", "steps", "per_cluster", "policy_lr", "ppo_epochs", "clip_eps", "gamma", "lam",
                      "entropy_coef", "value_coef", "tau", "stage", "normalise_advantages")


def fresh_policy(config: PolicyConfig, key: jax.Array) -> PolicyBundle:
    actor_key, critic_key = jax.random.split(jax.random.fold_in(key, _INIT_FOLD))
    return PolicyBundle(AcquisitionMLP(config, rngs=nnx.Rngs(actor_key)), Critic(config, rngs=nnx.Rngs(critic_key)),
                        config)


def check_policy_inputs(static: jax.Array, layout: ClusterLayout, config: RaiseConfig, policy_config: PolicyConfig) -> None:
    """ValueError unless static features are [N, S] with the policy's S, the layout names rows of
    them, T >= 1, the policy's stage and tau are the config's, and every cluster holds at least
    ``config.per_cluster`` rows."""
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
    check_policy_inputs(static, layout, config, policy_config)
    if policy is None:
        policy = fresh_policy(policy_config, key)
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


def train_policy(model: nnx.Module, static: jax.Array, layout, pool, val: dict, config: RaiseConfig,
                 policy_config: PolicyConfig | None = None, progress: bool = True, echo=None, *,
                 resume: RaiseProgress | None = None,
                 on_episode: Callable[[RaiseProgress], None] | None = None) -> tuple[PolicyBundle, list[dict]]:
    """`train_raise_policy` with jraise's LLM as the learner (`episode.llm_learner`): returns the
    policy and the per-episode history (episode, return, val_loss0, val_loss_final,
    train_loss_mean, policy_loss, value_loss, entropy).

    ``model`` is M_0 (LoRA adapters attached means LoRA updates; every episode starts from its
    weights and a fresh ``llm_lr`` optimizer state); ``pool`` a `DevicePool`, ``val`` a fixed
    batch dict. ``policy_config`` defaults to `default_policy_config`; the policy starts from
    `new_policy` (``config.seed``) and episode k samples with ``fold_in(key(config.seed), k)``.
    ``resume``: a `RaiseProgress` from ``on_episode``; training continues after its episodes.
    ``on_episode`` is called with the `RaiseProgress` after every episode, before the progress bar
    and ``echo`` report it. With an active `jraise.parallel` mesh the learner's state is placed on
    it as `episode.make_episode` places it.
    """
    policy_config = policy_config or default_policy_config(config)
    graphdef, trainable, frozen = split_trainable(model)
    tx, _ = make_optimizer(config.llm_lr, total_steps=config.steps, schedule=config.llm_schedule)
    static = jnp.asarray(static, jnp.float32)
    opt_state = tx.init(trainable)
    mesh = parallel.active_mesh()
    if mesh is not None:
        trainable, opt_state, frozen = parallel.shard_params((trainable, opt_state, frozen), mesh)
        static, pool = parallel.shard_examples((static, pool), mesh)
        layout, val = parallel.shard_replicated((layout, val), mesh)
    learner_step, val_loss_fn = llm_learner(graphdef, tx, param_dtypes(model))
    start = 0 if resume is None else len(resume.history)
    bar = tqdm(total=config.episodes, initial=start, desc="raise", unit="episode", disable=None if progress else True)

    def report(done: RaiseProgress) -> None:
        done = RaiseProgress(done.params, done.opt_state, _jraise_records(done.history))
        if on_episode is not None:
            on_episode(done)
        record = done.history[-1]
        bar.update(1)
        bar.set_postfix(ret=f"{record['return']:.4f}")
        if echo is not None:
            echo(f"episode {record['episode']}: return {record['return']:.4f}")

    policy, history = train_raise_policy(learner_step, val_loss_fn, (trainable, opt_state, frozen, pool, val), static,
                                         layout, config, jax.random.key(config.seed), policy_config=policy_config,
                                         policy=new_policy(policy_config, config.seed), learner_has_aux=True,
                                         resume=resume, on_episode=report)
    bar.close()
    return policy, _jraise_records(history)


def _jraise_records(history: list[dict]) -> list[dict]:
    """`train_policy`'s history records: `train_raise_policy`'s without ``mean_reward``."""
    return [{k: v for k, v in h.items() if k != "mean_reward"} for h in history]
