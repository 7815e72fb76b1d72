"""jraise.select: the public face of the selection methods.

Static selectors return a `Selection` (indices best first, scores, method, config, pool
fingerprint); the dynamic RAISE selector is a pair of pure functions called every step::

    sel = jraise.select.rose(train_features, val_features, ckpt_weights, pool.fingerprint, groups=subtasks)
    sel.indices, sel.scores, sel.to_jsonl(pool, path)

    selector = jraise.select.raise_policy(actor, static, layout, per_cluster=b)
    state = selector.init(key)
    idx, state = selector.select(state, jraise.select.StepInfo(step=t, total_steps=T, val_loss=v))

File-level jobs (what the CLI runs): `influence_run.run_influence_selection` (LESS/ROSE end to end),
`rl.run` (RAISE), `beyond_iid` (EE-CPO mixture, DT-CSFT curriculum), `intervention` (Gamma).
"""

from jraise.select.base import Selection, top_fraction
from jraise.select.curriculum import dependency_tiers, dt_csft_schedule
from jraise.select.influence import checkpoint_weights, influence_scores, less, rose
from jraise.select.interactions import interaction_matrix
from jraise.select.mixture import ee_cpo_plan, realise_subset
from jraise.select.rl.selector import Selector, StepInfo, raise_policy

__all__ = [
    "Selection",
    "Selector",
    "StepInfo",
    "checkpoint_weights",
    "dependency_tiers",
    "dt_csft_schedule",
    "ee_cpo_plan",
    "influence_scores",
    "interaction_matrix",
    "less",
    "raise_policy",
    "realise_subset",
    "rose",
    "top_fraction",
]
