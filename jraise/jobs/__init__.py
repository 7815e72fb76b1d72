"""jraise.jobs: the file-level jobs the CLI and the studies run.

A job loads a model and data from paths, runs the pure methods of `jraise.select` and
`jraise.grads` (arrays, pytrees, callables), and writes its results atomically into files or a
resumable work directory (formats in `jraise.data`):

* `influence`: LESS / ROSE end to end (warmup, feature stores per checkpoint, scores, selection);
* `raise_policy`: RAISE policy training into a policy directory, fine-tuning with a trained
  policy, and reading a policy back (`load_selector`);
* `baselines`, `self_paced`: the baseline selectors and SSPL on files;
* `preference_pairs`: ROSE validation pairs from a model's own answers;
* `embeddings`: derived categories;
* `intervention`: the Beyond-IID measurement of Gamma;
* `beyond_iid`: EE-CPO re-mixing and the DT-CSFT curriculum of category-labelled files.
"""

from jraise.jobs.baselines import run_baseline
from jraise.jobs.beyond_iid import curriculum_job, mixture_job, read_categorised
from jraise.jobs.embeddings import derive_categories
from jraise.jobs.influence import InfluenceRunConfig, feature_store, run_influence_selection
from jraise.jobs.intervention import measure_interactions
from jraise.jobs.preference_pairs import write_model_answer_pairs
from jraise.jobs.raise_policy import (
    cached_static_features,
    finetune_with_policy,
    load_policy,
    load_selector,
    train_policy_in_dir,
    train_raise_policy_job,
)
from jraise.jobs.self_paced import run_self_paced

__all__ = [
    "InfluenceRunConfig",
    "cached_static_features",
    "curriculum_job",
    "derive_categories",
    "feature_store",
    "finetune_with_policy",
    "load_policy",
    "load_selector",
    "measure_interactions",
    "mixture_job",
    "read_categorised",
    "run_baseline",
    "run_influence_selection",
    "run_self_paced",
    "train_policy_in_dir",
    "train_raise_policy_job",
    "write_model_answer_pairs",
]
