"""jraise.select: the public face of the selection methods.

Static selectors return a `Selection` (indices best first, scores, method, config, pool
fingerprint); the dynamic selectors (RAISE, SSPL) are a `Selector`, a pair of pure functions
called every step::

    sel = jraise.select.rose(train_features, val_features, ckpt_weights, pool.fingerprint, groups=subtasks)
    sel.indices, sel.scores  # jraise.data.selections.write_selection(sel, pool, path): the files

    selector = jraise.select.raise_selector(actor, static, layout, per_cluster=b)  # or:
    selector = jraise.select.self_paced_selector(n_examples, batch_size, n_buckets=4)
    state = selector.init(key)
    idx, state = selector.select(state, jraise.select.StepInfo(step=t, total_steps=T, val_loss=v, losses=l))

(``raise_policy`` is the older name of `raise_selector`; SSPL needs ``losses``, the current
model's per-example losses [N], at least on the first step.) Baselines (random, full_data,
longest, perplexity, ifd, rds) return a `Selection` too; `self_paced_finetune` runs SSPL end to
end. Nothing here reads or writes files or loads a model from a path: the file-level jobs (what
the CLI runs) are `jraise.jobs`, the file formats `jraise.data`.
"""

from jraise.select.base import Selection, top_fraction
from jraise.select.baselines import full_data, ifd, longest, perplexity, random_selection, rds
from jraise.select.curriculum import dependency_tiers, dt_csft_schedule
from jraise.select.influence import checkpoint_weights, influence_scores, less, rose
from jraise.select.interactions import interaction_matrix
from jraise.select.interventions_agnostic import InterventionConfig, category_names, measure_interactions_fn
from jraise.select.mixture import ee_cpo_plan, realise_subset
from jraise.select.rl.selector import Selector, StepInfo, raise_policy, raise_selector
from jraise.select.self_paced import SelfPacedState, self_paced_batch, self_paced_finetune, self_paced_selector

__all__ = [
    "InterventionConfig",
    "Selection",
    "Selector",
    "SelfPacedState",
    "StepInfo",
    "category_names",
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
    "measure_interactions_fn",
    "perplexity",
    "raise_policy",
    "raise_selector",
    "random_selection",
    "rds",
    "realise_subset",
    "rose",
    "self_paced_batch",
    "self_paced_finetune",
    "self_paced_selector",
    "top_fraction",
]
