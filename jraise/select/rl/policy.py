"""RAISE actor and critic: the fused per-instruction state, the acquisition MLP and the value network.

Stage: ``jraise.select`` (RAISE, Lv, Li et al. 2025, arXiv 2504.07282: state
fusion, acquisition function and RL). Per step t = 1..T, every instruction i gets a fused state of
``STAGE_DIM + S + 1`` numbers (39 with the paper's S = 4 + 32 static features):

    column  0:2    stage         `stage_features` (the same two numbers for every instruction)
    column  2:6    difficulty    len(x), len(y), mean log p(y|x), mean log p(y)   (static, z-scored)
    column  6:38   semantic      32 PCA dims of pooled hidden states               (static, z-scored)
    column  38     availability  log1p(times already selected)

    static [N, S], counts [N], stage [2] --fused_state--> [N, S + 3] --AcquisitionMLP--> scores [N]
    fused [N, S + 3] --critic_summary--> [2 S + 4] --Critic--> value []

The state is never stored per step: it is rebuilt from the static matrix, the selection counts and
the stage, which is what keeps rollouts O(T * B) instead of O(T * N).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import chex
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "AVAILABILITY",
    "DIFFICULTY",
    "SEMANTIC",
    "STAGE",
    "STAGE_DIM",
    "STAGE_KINDS",
    "AcquisitionMLP",
    "Critic",
    "PolicyConfig",
    "critic_summary",
    "fused_state",
    "score_pool",
    "stage_features",
]

STAGE_DIM = 2
STAGE_KINDS = ("progress_and_perf", "progress_pair")
# Column layout of the paper's 39-number state (S = 36: 4 difficulty + 32 semantic).
STAGE = slice(0, 2)
DIFFICULTY = slice(2, 6)
SEMANTIC = slice(6, 38)
AVAILABILITY = 38

_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu}


@dataclass(frozen=True)
class PolicyConfig:
    """Sizes and options of the RAISE policy.

    Attributes:
      state_dim: fused state width, ``2 (stage) + S (static) + 1 (availability)``; 39 in the paper.
      hidden: hidden widths of the acquisition MLP.
      critic_hidden: hidden widths of the critic MLP.
      activation: one of "tanh", "relu", "gelu", "silu" (both networks).
      tau: sampling temperature of the training policy (Plackett-Luce over scores / tau).
      stage: "progress_and_perf" ([t/T, -val_loss]) or "progress_pair" ([(t-1)/T, t/T]).
      output_scale: std of the actor's and critic's last-layer initial weights; small, so that the
        initial policy is near-uniform inside clusters (maximal exploration) and the initial value
        near 0.
    """

    state_dim: int = 39
    hidden: tuple[int, ...] = (64, 64)
    critic_hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    tau: float = 1.0
    stage: str = "progress_and_perf"
    output_scale: float = 0.01

    def __post_init__(self):
        if self.state_dim < STAGE_DIM + 2:
            raise ValueError(f"state_dim must be >= {STAGE_DIM + 2} (stage, >= 1 static, availability), "
                             f"got {self.state_dim}")
        if any(int(h) < 1 for h in (*self.hidden, *self.critic_hidden)):
            raise ValueError(f"hidden widths must be >= 1, got {self.hidden} / {self.critic_hidden}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.stage not in STAGE_KINDS:
            raise ValueError(f"stage must be one of {STAGE_KINDS}, got {self.stage!r}")

    @property
    def static_dim(self) -> int:
        """S, the number of static (difficulty + semantic) features."""
        return self.state_dim - STAGE_DIM - 1

    @property
    def summary_dim(self) -> int:
        """Width of `critic_summary`: stage (2) + weighted mean and std of S static (2 S) + 2."""
        return STAGE_DIM + 2 * self.static_dim + 2


def stage_features(step, total_steps, val_loss=None, kind: str = "progress_and_perf") -> jax.Array:
    """``[2]`` float32 stage features for the decision at step ``t`` (1-based, the update M_{t-1} -> M_t).

    * "progress_and_perf": ``[t / T, -val_loss]``, ``val_loss`` = target validation loss of M_{t-1},
      so the second number is P(M_{t-1}) of the method page.
    * "progress_pair": ``[(t - 1) / T, t / T]`` (``val_loss`` is ignored).

    ``step``, ``total_steps`` and ``val_loss`` may be traced scalars; ``kind`` is static.
    """
    t = jnp.asarray(step, jnp.float32)
    horizon = jnp.asarray(total_steps, jnp.float32)
    if kind == "progress_and_perf":
        if val_loss is None:
            raise ValueError("stage 'progress_and_perf' needs val_loss (the validation loss of M_{t-1})")
        return jnp.stack([t / horizon, -jnp.asarray(val_loss, jnp.float32)])
    if kind == "progress_pair":
        return jnp.stack([(t - 1.0) / horizon, t / horizon])
    raise ValueError(f"stage kind must be one of {STAGE_KINDS}, got {kind!r}")


def fused_state(static: jax.Array, counts: jax.Array, stage: jax.Array) -> jax.Array:
    """``[N, S + 3]`` fused state: ``[stage (2) | static (S) | log1p(counts) (1)]``.

    Args:
      static: ``[N, S]`` z-scored static features (difficulty then semantic; S = 36 in the paper).
      counts: ``[N]`` how many times each instruction was already selected in this episode.
      stage: ``[2]`` `stage_features` of the current step, broadcast to every row.

    Availability is ``log1p(count)``: 0 for never-selected items, and a repeat count that grows
    over an episode does not swamp the z-scored static features.
    """
    chex.assert_rank([static, counts, stage], [2, 1, 1])
    chex.assert_shape(stage, (STAGE_DIM,))
    chex.assert_equal_shape_prefix([static, counts], 1)
    n = static.shape[0]
    return jnp.concatenate([
        jnp.broadcast_to(jnp.asarray(stage, jnp.float32), (n, STAGE_DIM)),
        jnp.asarray(static, jnp.float32),
        jnp.log1p(jnp.asarray(counts, jnp.float32))[:, None],
    ], axis=1)


def critic_summary(state: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Fixed-size ``[2 S + 4]`` summary of a fused pool state ``[N, S + 3]``, O(N) to compute.

    ``[stage (2) | a-weighted mean of static (S) | a-weighted std of static (S) | mean a | frac(a == 0)]``
    with ``a`` the availability column (log1p of the selection count) and only rows where ``mask``
    is True (all rows when None).

    Why availability-weighted: the static features are z-scored over the pool, so their plain pool
    mean and std are 0 and 1 at every step and would tell the critic nothing. Weighted by how often
    items were selected, they describe what the model has been trained on so far in this episode
    (zeros before the first selection). The last two numbers say how much of the pool was used.
    """
    chex.assert_rank(state, 2)
    n = state.shape[0]
    mask = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask, bool)
    chex.assert_shape(mask, (n,))
    m = mask.astype(state.dtype)
    n_real = jnp.maximum(m.sum(), 1.0)
    stage = (state[:, STAGE] * m[:, None]).sum(axis=0) / n_real
    static = state[:, STAGE_DIM:-1]
    avail = state[:, -1] * m
    total = avail.sum()
    w = avail / jnp.where(total > 0, total, 1.0)
    mean = w @ static
    var = w @ jnp.square(static - mean)
    std = jnp.sqrt(var + 1e-12) * (total > 0)  # epsilon: finite gradient at var = 0
    never = ((state[:, -1] == 0) & mask).sum() / n_real
    return jnp.concatenate([stage, mean, std, jnp.stack([total / n_real, never])])


def _mlp_layers(widths: tuple[int, ...], output_scale: float, rngs: nnx.Rngs) -> nnx.List:
    layers = [nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(widths[:-1])]
    layers.append(nnx.Linear(widths[-2], widths[-1], kernel_init=nnx.initializers.normal(output_scale),
                             rngs=rngs))
    return nnx.List(layers)


class AcquisitionMLP(nnx.Module):
    """F_theta: fused state ``[..., D]`` -> score ``[...]``, each instruction scored on its own row."""

    def __init__(self, config: PolicyConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.activation = _ACTIVATIONS[config.activation]
        self.layers = _mlp_layers((config.state_dim, *config.hidden, 1), config.output_scale, rngs)

    def __call__(self, state: jax.Array) -> jax.Array:
        chex.assert_axis_dimension(state, -1, self.config.state_dim)
        h = jnp.asarray(state, jnp.float32)
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))
        return self.layers[-1](h)[..., 0]


class Critic(nnx.Module):
    """V_phi: fused pool state ``[N, D]`` (with optional row mask ``[N]``) -> value ``[]``.

    The state is summarised by `critic_summary` to ``2 S + 4`` numbers and passed through an MLP.
    Unbatched; vmap over steps or episodes at the call site.
    """

    def __init__(self, config: PolicyConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.activation = _ACTIVATIONS[config.activation]
        self.layers = _mlp_layers((config.summary_dim, *config.critic_hidden, 1), config.output_scale, rngs)

    def __call__(self, state: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        chex.assert_rank(state, 2)
        chex.assert_axis_dimension(state, 1, self.config.state_dim)
        h = critic_summary(jnp.asarray(state, jnp.float32), mask)
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))
        return self.layers[-1](h)[0]


def score_pool(actor: AcquisitionMLP, static: jax.Array, counts: jax.Array, stage: jax.Array) -> jax.Array:
    """``[N]`` acquisition scores of the whole pool at one step (`fused_state` then the actor)."""
    return actor(fused_state(static, counts, stage))
