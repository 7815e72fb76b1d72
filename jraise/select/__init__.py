"""jraise.select: the public face of the selection methods.

Static selectors return a `Selection` (indices best first, scores, method, config, pool
fingerprint); the dynamic RAISE selector is a pair of pure functions called every step::

    sel = jraise.select.rose(train_features, val_features, ckpt_weights, pool.fingerprint, groups=subtasks)
    sel.indices, sel.scores, sel.to_jsonl(pool, path)

    selector = jraise.select.raise_policy(actor, static, layout, per_cluster=b)
    state = selector.init(key)
    idx, state = selector.select(state, jraise.select.StepInfo(step=t, total_steps=T, val_loss=v))

Baselines (random, full_data, longest, perplexity, ifd, rds) return a `Selection` too; SSPL
(`self_paced_finetune`) is dynamic. File-level jobs (what the CLI runs): `baselines.run_baseline`,
`self_paced.run_self_paced`, `influence_run.run_influence_selection` (LESS/ROSE end to end),
`rl.run` (RAISE), `beyond_iid` (EE-CPO mixture, DT-CSFT curriculum), `intervention` (Gamma).
"""

from jraise.select.base import Selection, top_fraction
from jraise.select.baselines import full_data, ifd, longest, perplexity, random_selection, rds
from jraise.select.curriculum import dependency_tiers, dt_csft_schedule
from jraise.select.influence import checkpoint_weights, influence_scores, less, rose
from jraise.select.interactions import interaction_matrix
from jraise.select.mixture import ee_cpo_plan, realise_subset
from jraise.select.rl.selector import Selector, StepInfo, raise_policy
from jraise.select.self_paced import self_paced_batch, self_paced_finetune

__all__ = [
    "Selection",
    "Selector",
    "StepInfo",
    "checkpoint_weights",
    "dependency_tiers",
    "dt_csft_schedule",
    "ee_cpo_plan",
    "full_data",
    "ifd",
    "influence_scores",
    "interaction_matrix",
    "less",
    "longest",
    "perplexity",
    "raise_policy",
    "random_selection",
    "rds",
    "realise_subset",
    "rose",
    "self_paced_batch",
    "self_paced_finetune",
    "top_fraction",
]
