"""Training the RAISE selection policy with PPO over fused episodes.

    for episode k = 1..K:
        every episode starts from the same LLM weights M_0 and a fresh optimizer state
        rollout  = fused episode (T steps, sampled picks) under the current policy   [one jit]
        values   = critic replayed over the rollout; advantages by GAE (terminal: V_T = 0)
        policy  <- ``ppo_epochs`` Adam steps on  clipped surrogate (per-cluster ratios)
                   + value_coef * value loss - entropy_coef * first-pick entropy       [one jit]
        checkpoint (Orbax): actor+critic weights, their Adam state, the episode count, the
        reward history; the reward curve as JSONL and PNG

Resuming restarts after the last finished episode with the same policy, optimizer state and
keys (episode k's key is ``fold_in(key(seed), k)``), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from jraise.atomic import atomic_write_bytes, atomic_write_text
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


def _checkpointer(out_dir: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(out_dir.resolve() / "checkpoints",
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def _plot(history: list[dict], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.plot([h["episode"] for h in history], [h["return"] for h in history], marker="o")
    ax.set_xlabel("episode")
    ax.set_ylabel("return = val loss(M0) - val loss(MT)")
    ax.set_title("RAISE policy training")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def train_policy(model: nnx.Module, static: jax.Array, layout, pool, val: dict, config: RaiseConfig,
                 out_dir: str | os.PathLike, policy_config: PolicyConfig | None = None, progress: bool = True,
                 echo=None) -> tuple[PolicyBundle, list[dict]]:
    """Trains the policy for ``config.episodes`` episodes (resuming from ``out_dir``); returns the
    policy and the per-episode history (return, val losses, losses). ``model`` is M_0 (LoRA
    adapters attached means LoRA updates); ``pool`` a `DevicePool`, ``val`` a fixed batch dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy_config = policy_config or PolicyConfig(stage=config.stage, tau=config.tau)
    layout.check_budget(config.per_cluster)
    if static.shape[1] != policy_config.static_dim:
        raise ValueError(f"static features have {static.shape[1]} columns, the policy expects {policy_config.static_dim}")
    atomic_write_text(out / "raise_config.json", json.dumps({"raise": asdict(config), "policy": asdict(policy_config)},
                                                            indent=2) + "\n")
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

    manager = _checkpointer(out)
    history: list[dict] = []
    start = 0
    if manager.latest_step() is not None:
        target = {"params": params, "opt_state": opt_state}
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            policy=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, target)),
            meta=ocp.args.JsonRestore()))
        params, opt_state = restored.policy["params"], restored.policy["opt_state"]
        history, start = list(restored.meta["history"]), int(restored.meta["episodes_done"])
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
        manager.save(k + 1, args=ocp.args.Composite(
            policy=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave({"episodes_done": k + 1, "history": history})))
        manager.wait_until_finished()
        atomic_write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        _plot(history, out / "reward_curve.png")
        bar.update(1)
        bar.set_postfix(ret=f"{record['return']:.4f}")
        if echo is not None:
            echo(f"episode {k + 1}: return {record['return']:.4f}")
    bar.close()
    nnx.update(policy.actor, params["actor"])
    nnx.update(policy.critic, params["critic"])
    return policy, history


def load_policy(out_dir: str | os.PathLike) -> PolicyBundle:
    """The trained policy of a `train_policy` directory (latest checkpoint)."""
    out = Path(out_dir)
    config_file = out / "raise_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{out}: not a RAISE policy directory (no raise_config.json)")
    saved = json.loads(config_file.read_text())
    pc = saved["policy"]
    policy_config = PolicyConfig(**{**pc, "hidden": tuple(pc["hidden"]), "critic_hidden": tuple(pc["critic_hidden"])})
    policy = new_policy(policy_config, 0)
    manager = _checkpointer(out)
    if manager.latest_step() is None:
        raise FileNotFoundError(f"{out}: no policy checkpoint")
    params = {"actor": nnx.split(policy.actor)[1], "critic": nnx.split(policy.critic)[1]}
    target = {"params": params, "opt_state": optax.adam(saved["raise"]["policy_lr"]).init(params)}
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        policy=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, target)),
        meta=ocp.args.JsonRestore()))
    nnx.update(policy.actor, restored.policy["params"]["actor"])
    nnx.update(policy.critic, restored.policy["params"]["critic"])
    return policy
