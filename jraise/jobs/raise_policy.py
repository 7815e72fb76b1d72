"""RAISE on files: `jraise select raise` (train a policy) and `jraise train --selector raise`.

POLICY_DIR holds: ``static.npz`` (cached static features, with the pool fingerprint and the
auxiliary model's name: `cached_static_features`), ``clusters.json`` (K-means labels and b per
cluster; ``skipped``: the bad records dropped with ``skip_bad``), ``raise_config.json`` (the
`RaiseConfig` and `PolicyConfig`), ``checkpoints/`` (Orbax: policy weights and Adam state per
episode), ``history.jsonl`` and ``reward_curve.png``. `train_policy_in_dir` writes and resumes the
last four around the pure `jraise.select.rl.trainer.train_policy`; `load_policy` reads the policy
back and `load_selector` makes it a `Selector` over the pool it was trained on.

Fine-tuning with a trained policy runs the deterministic fused episode (top-b per cluster every
step, the stage from the live validation loss) for the requested number of steps, from the base
model, then exports the model; the budget protocol is the step count (equal for every method).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import asdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from jraise import parallel
from jraise.atomic import atomic_write_bytes, atomic_write_text
from jraise.data.pool import InstructionPool, load_pool, skip_lines, with_skipped
from jraise.lock import directory_lock
from jraise.model.fingerprint import model_label
from jraise.select.rl.episode import EpisodeConfig, device_pool, make_episode
from jraise.select.rl.features import (
    SEMANTIC_DIMS,
    cluster_pool,
    start_token_of,
    static_features,
)
from jraise.select.rl.policy import PolicyConfig
from jraise.select.rl.sampling import cluster_layout
from jraise.select.rl.trainer import (
    PolicyBundle,
    RaiseConfig,
    RaiseProgress,
    check_policy_inputs,
    default_policy_config,
    new_policy,
    train_policy,
)


def _checkpointer(out_dir: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(out_dir.resolve() / "checkpoints",
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def _plot(history: list[dict], path: Path) -> None:
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


def train_policy_in_dir(model: nnx.Module, static: jax.Array, layout, pool, val: dict, config: RaiseConfig,
                        out_dir: str | os.PathLike, policy_config: PolicyConfig | None = None, progress: bool = True,
                        echo=None) -> tuple[PolicyBundle, list[dict]]:
    """`train_policy` with its policy directory: writes ``raise_config.json``, resumes from the
    latest checkpoint in ``out_dir``, and after every episode saves a checkpoint (policy weights,
    their Adam state, the episode count and the history), ``history.jsonl`` and
    ``reward_curve.png``. Returns the policy and the whole history."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy_config = policy_config or default_policy_config(config)
    check_policy_inputs(static, layout, config, policy_config)
    atomic_write_text(out / "raise_config.json", json.dumps({"raise": asdict(config), "policy": asdict(policy_config)},
                                                            indent=2) + "\n")
    manager = _checkpointer(out)
    resume = None
    if manager.latest_step() is not None:
        target = _checkpoint_target(new_policy(policy_config, config.seed), config.policy_lr)
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            policy=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, target)),
            meta=ocp.args.JsonRestore()))
        resume = RaiseProgress(restored.policy["params"], restored.policy["opt_state"],
                               list(restored.meta["history"]))

    def save(progress: RaiseProgress) -> None:
        done = len(progress.history)
        manager.save(done, args=ocp.args.Composite(
            policy=ocp.args.StandardSave({"params": progress.params, "opt_state": progress.opt_state}),
            meta=ocp.args.JsonSave({"episodes_done": done, "history": progress.history})))
        manager.wait_until_finished()
        atomic_write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in progress.history))
        _plot(progress.history, out / "reward_curve.png")

    return train_policy(model, static, layout, pool, val, config, policy_config, progress, echo, resume=resume,
                        on_episode=save)


def _checkpoint_target(policy: PolicyBundle, policy_lr: float) -> dict:
    """The structure a checkpoint holds for ``policy``: its parameters and their Adam state."""
    params = {"actor": nnx.split(policy.actor)[1], "critic": nnx.split(policy.critic)[1]}
    return {"params": params, "opt_state": optax.adam(policy_lr).init(params)}


def load_policy(out_dir: str | os.PathLike) -> PolicyBundle:
    """The trained policy of a `train_policy_in_dir` directory (latest checkpoint)."""
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
    target = _checkpoint_target(policy, saved["raise"]["policy_lr"])
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        policy=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, target)),
        meta=ocp.args.JsonRestore()))
    nnx.update(policy.actor, restored.policy["params"]["actor"])
    nnx.update(policy.critic, restored.policy["params"]["critic"])
    return policy


def cached_static_features(cache: str | os.PathLike, model, model_name: str, pool: InstructionPool, start_token: int,
                           dims: int = SEMANTIC_DIMS) -> np.ndarray:
    """`static_features`, read from ``cache`` when it holds this pool's and model's, else computed
    and written there atomically."""
    cache = Path(cache)
    if cache.is_file():
        with np.load(cache) as saved:
            found = (str(saved["pool_fingerprint"]), str(saved["model"]), int(saved["dims"]))
            if found != (pool.fingerprint, model_name, dims):
                raise ValueError(f"{cache}: cached features are for pool {found[0][:12]}..., model {found[1]!r}, "
                                 f"dims {found[2]}, not pool {pool.fingerprint[:12]}..., model {model_name!r}, dims "
                                 f"{dims}; delete the file or use another cache path")
            return saved["static"]
    static = static_features(model, pool, start_token, dims)
    buffer = io.BytesIO()
    np.savez(buffer, static=static, pool_fingerprint=pool.fingerprint, model=model_name, dims=dims)
    atomic_write_bytes(cache, buffer.getvalue())
    return static


def _load(model_dir: Path, pool_file, val_file, max_len: int, skip_bad: bool = False, echo=None, where=None,
          dedupe: bool = False):
    """Tokenizer, model, pool, validation pool and start token. With ``skip_bad`` bad records of
    either file are dropped, and ``echo`` gets one line per file that had some (naming ``where``,
    the file that records them). ``dedupe``: keep only the first of exact copies."""
    from jraise.model import load_model, load_tokenizer
    from jraise.model.hf import check_model_inputs

    tok = load_tokenizer(model_dir)
    max_len = check_model_inputs(model_dir, tok, max_len, echo=echo)
    pool = load_pool(pool_file, tok, max_len=max_len, skip_bad=skip_bad, dedupe=dedupe)
    val_pool = load_pool(val_file, tok, max_len=max_len, skip_bad=skip_bad, dedupe=dedupe)
    if echo is not None:
        for line in skip_lines(pool, val_pool, where=where):
            echo(line)
    model, _ = load_model(model_dir)
    return tok, model, pool, val_pool, start_token_of(tok)


def _val_batch(val_pool) -> dict:
    """The whole validation pool as one fixed batch (what the reward is measured on)."""
    return device_pool(val_pool).rows(jnp.arange(len(val_pool)))


def _lora(model, lora_rank: int, seed: int):
    if lora_rank:
        from jraise.model.lora import LoRAConfig, add_lora

        add_lora(model, LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank), seed=seed)
    return model


def train_raise_policy_job(model_dir, pool_file, val_file, out_dir, config: RaiseConfig, clusters: int = 1,
                           batch_size: int = 16, lora_rank: int = 0, max_len: int = 2048, echo=print,
                           skip_bad: bool = False, dedupe: bool = False) -> Path:
    """Static features -> clusters -> PPO policy training into ``out_dir`` (resumable).

    ``skip_bad``: drop bad records of the pool and the validation file instead of stopping at
    the first (``echo`` says how many; ``clusters.json`` lists them under ``"skipped"``). The
    policy then belongs to the kept pool: `finetune_with_policy` needs ``skip_bad`` (and ``dedupe``:
    keep only the first of exact copies) as given here. ``out_dir``
    is locked for the call (`jraise.lock.directory_lock`): a second process on it stops with an
    error naming the holder."""
    model_dir, out = Path(model_dir), Path(out_dir)
    if batch_size % clusters:
        raise ValueError(f"batch size {batch_size} must be a multiple of the number of clusters {clusters}")
    with directory_lock(out) if parallel.is_writer() else contextlib.nullcontext():
        return _train_policy_locked(model_dir, pool_file, val_file, out, config, clusters, batch_size, lora_rank,
                                    max_len, echo, skip_bad, dedupe)


def _train_policy_locked(model_dir: Path, pool_file, val_file, out: Path, config: RaiseConfig, clusters: int,
                         batch_size: int, lora_rank: int, max_len: int, echo, skip_bad: bool,
                         dedupe: bool = False) -> Path:
    config = RaiseConfig(**{**config.__dict__, "per_cluster": batch_size // clusters})
    _, model, pool, val_pool, start = _load(model_dir, pool_file, val_file, max_len, skip_bad, echo,
                                            where=out / "clusters.json", dedupe=dedupe)
    _lora(model, lora_rank, config.seed)
    static = cached_static_features(out / "static.npz", model, model_label(model_dir), pool, start)
    labels = cluster_pool(static, clusters, config.seed) if clusters > 1 else np.zeros(len(pool), np.int64)
    atomic_write_text(out / "clusters.json", json.dumps(with_skipped(
        {"clusters": clusters, "per_cluster": config.per_cluster, "pool_fingerprint": pool.fingerprint,
         "lora_rank": lora_rank, "labels": labels.tolist()}, pool, val_pool)) + "\n")
    echo(f"raise: pool {len(pool)}, {clusters} cluster(s) of sizes {np.bincount(labels).tolist()}, "
         f"batch {batch_size}, {config.episodes} episodes of {config.steps} steps")
    train_policy_in_dir(model, jnp.asarray(static), cluster_layout(labels, clusters), device_pool(pool),
                        _val_batch(val_pool), config, out, echo=echo)
    return out


def finetune_with_policy(model_dir, pool_file, val_file, policy_dir, out_dir, steps: int, lr: float,
                         max_len: int = 2048, tokenizer_dir=None, sample: bool = False, seed: int = 0,
                         skip_bad: bool = False, echo=print, dedupe: bool = False) -> Path:
    """Fine-tunes the base model for ``steps`` steps on the policy's selections; writes
    ``out_dir/final`` (HF model) and ``out_dir/selections.json`` (indices per step).

    Selections are the paper's deterministic top-b of each cluster by default; ``sample=True``
    draws them from the policy as in training (Gumbel-top-b at its temperature, key ``seed``).
    A policy trained for few episodes is close to uniform, and its top-b then follows tiny score
    differences, re-picking the same extreme records step after step; sampling deploys the
    distribution that was actually trained.

    ``skip_bad``: drop bad records of the pool and the validation file (``echo`` says how many;
    ``selections.json`` lists them under ``"skipped"``) instead of stopping at the first; needed
    to reuse a policy trained with ``skip_bad`` on a file with bad records (the pool fingerprint
    must match the policy's). ``out_dir`` is locked for the call, like a `jraise.train` run."""
    model_dir, policy_dir, out = Path(model_dir), Path(policy_dir), Path(out_dir)
    with directory_lock(out) if parallel.is_writer() else contextlib.nullcontext():
        return _finetune_locked(model_dir, pool_file, val_file, policy_dir, out, steps, lr, max_len, tokenizer_dir,
                                sample, seed, skip_bad, echo, dedupe)


def _finetune_locked(model_dir: Path, pool_file, val_file, policy_dir: Path, out: Path, steps: int, lr: float,
                     max_len: int, tokenizer_dir, sample: bool, seed: int, skip_bad: bool, echo,
                     dedupe: bool = False) -> Path:
    from jraise.train import export_model
    from jraise.train.step import (
        assign_trainable,
        make_optimizer,
        param_dtypes,
        split_trainable,
    )

    meta = json.loads((policy_dir / "clusters.json").read_text())
    _, model, pool, val_pool, start = _load(model_dir, pool_file, val_file, max_len, skip_bad, echo,
                                            where=out / "selections.json", dedupe=dedupe)
    if pool.fingerprint != meta["pool_fingerprint"]:
        raise ValueError(f"{pool_file}: this is not the pool the policy in {policy_dir} was trained on "
                         f"(fingerprint {pool.fingerprint[:12]}..., policy's {meta['pool_fingerprint'][:12]}...)")
    _lora(model, meta.get("lora_rank", 0), 0)
    static = cached_static_features(policy_dir / "static.npz", model, model_label(model_dir), pool, start)
    policy = load_policy(policy_dir)
    layout = cluster_layout(np.asarray(meta["labels"]), meta["clusters"])
    graphdef, trainable, frozen = split_trainable(model)
    tx, _ = make_optimizer(lr, total_steps=steps, schedule="constant")
    actor_graphdef, actor_state = nnx.split(policy.actor)
    episode = make_episode(graphdef, tx, param_dtypes(model), actor_graphdef,
                           EpisodeConfig(steps=steps, per_cluster=meta["per_cluster"], tau=policy.config.tau,
                                         stage=policy.config.stage, stochastic=sample))
    trainable, _, rollout, losses = episode(actor_state, trainable, tx.init(trainable), frozen, jnp.asarray(static),
                                            layout, device_pool(pool), _val_batch(val_pool), jax.random.key(seed))
    assign_trainable(model, trainable)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "selections.json", json.dumps(with_skipped({
        "indices": np.asarray(rollout.indices).tolist(), "val_losses": np.asarray(rollout.val_losses).tolist(),
        "train_losses": np.asarray(losses).tolist(), "val_loss0": float(rollout.val_loss0),
        "deployment": "sample" if sample else "top_b", "seed": seed}, pool, val_pool)) + "\n")
    return export_model(model, out / "final", tokenizer_dir or model_dir)


def load_selector(policy_dir, stochastic: bool = False):
    """The trained policy of ``policy_dir`` as a `Selector` over the pool it was trained on (its
    cached static features and clusters); see `jraise.select.rl.selector`."""
    from jraise.select.rl.selector import raise_policy

    policy_dir = Path(policy_dir)
    meta = json.loads((policy_dir / "clusters.json").read_text())
    with np.load(policy_dir / "static.npz") as saved:
        static = saved["static"]
    policy = load_policy(policy_dir)
    layout = cluster_layout(np.asarray(meta["labels"]), meta["clusters"])
    return raise_policy(policy.actor, static, layout, meta["per_cluster"], stage=policy.config.stage,
                        tau=policy.config.tau, stochastic=stochastic)
