"""The README's "jraise in your own JAX training loop" example, run exactly as written there."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def example_code() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## jraise in your own JAX training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_and_each_selector_does_its_job():
    namespace: dict = {}
    exec(compile(example_code(), str(README), "exec"), namespace)
    labels = namespace["labels"]
    # LESS-style selection: 10% of the pool, none from the flipped-label cluster (a quarter of the pool).
    subset = np.asarray(namespace["less_subset"])
    assert len(subset) == round(0.1 * len(labels)) and len(set(subset.tolist())) == len(subset)
    assert np.mean(labels[subset] == 3) < 0.1
    # RAISE: one history entry per episode, finite returns; the deployed selector picks per_cluster rows per cluster.
    history = namespace["history"]
    assert len(history) == 3 and all(np.isfinite(h["return"]) for h in history)
    counts = np.asarray(namespace["sel_state"].counts)
    assert counts.sum() == 8 * 8 and all(counts[labels == c].sum() == 8 * 2 for c in range(4))
    # SSPL: distinct rows every step, 8 steps of 8.
    indices = np.asarray(namespace["indices"])
    assert len(set(indices.tolist())) == 8 and float(namespace["sspl_state"].counts.sum()) == 64.0
