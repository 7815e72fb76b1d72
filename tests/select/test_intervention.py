"""Beyond-IID intervention runs as one vmapped program: the sets, the data orders, vmap vs
sequential parity (full and LoRA), the stacked step, per-category evaluation, the end-to-end files."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jraise.data.pool import load_pool
from jraise.jobs.intervention import measure_interactions
from jraise.model import init_model, load_tokenizer, preset_config
from jraise.model.lora import LoRAConfig, add_lora
from jraise.select.intervention import (
    InterventionConfig,
    evaluate_runs,
    interaction_from_runs,
    intervention_sets,
    pool_categories,
    run_orders,
    train_interventions,
)
from jraise.train.loop import evaluate_loss
from jraise.train.step import make_eval_step, param_dtypes, split_trainable

CATEGORIES = ["first", "reverse", "add"]
# 3 categories x 16 pool examples: D0 = 8 per category, Delta = +2 each, R = 4 runs.
CONFIG = InterventionConfig(delta_fraction=0.25, base_fraction=0.5, steps=3, batch_size=4, lr=3e-3,
                            warmup_ratio=0.0, n_buckets=1, eval_batch_size=8, seed=3)


def _max_rel_err(a, b) -> float:
    """Largest per-leaf ||a - b|| / ||b|| over two pytrees of the same structure."""
    errs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape
        errs.append(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))
    return max(errs)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory, make_testbed):
    root = tmp_path_factory.mktemp("intervention")
    paths = make_testbed(n_train=48, n_val_per_category=3, n_test_per_category=1, categories=CATEGORIES)
    tok = load_tokenizer(paths["tokenizer"])
    pool = load_pool(paths["pool"], tok, max_len=128)
    eval_pool = load_pool(paths["val"], tok, max_len=128)
    # One layer: the same code paths as the preset, half the compile time.
    config = preset_config("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, num_hidden_layers=1)
    return root, pool, eval_pool, config


@pytest.fixture(scope="module")
def full_runs(testbed):
    _, pool, _, model_config = testbed
    model = init_model(model_config, seed=0)
    stats = {"vmap": {}, "sequential": {}}
    vmapped = train_interventions(model, pool, CONFIG, "vmap", progress=False, stats=stats["vmap"])
    sequential = train_interventions(model, pool, CONFIG, "sequential", progress=False, stats=stats["sequential"])
    return model, vmapped, sequential, stats


# ----------------------------------------------------------------------------------------------
# Pure: configuration, sets, orders


def test_config_validation():
    for bad in ({"delta_fraction": 0}, {"base_fraction": 0.0}, {"base_fraction": 1.5}, {"steps": 0},
                {"batch_size": 6, "accum": 4}, {"schedule": "step"}, {"metric": "accuracy"},
                {"base_size": 10, "base_fraction": 0.5}, {"base_size": 0}, {"warmup_ratio": 2.0},
                {"self_effect_floor": 0.0}, {"seed": -1}):
        with pytest.raises(ValueError, match="invalid InterventionConfig"):
            InterventionConfig(**bad)
    args = InterventionConfig(steps=40, warmup_ratio=0.05, lr=2e-4).optimizer_args()
    assert args["warmup_steps"] == 2 and args["total_steps"] == 40 and args["schedule"] == "cosine"


def _labels():
    rng = np.random.default_rng(0)
    return [str(c) for c in rng.permutation(["a"] * 30 + ["b"] * 20 + ["c"] * 11)]


def test_intervention_sets_change_only_their_category():
    labels = np.array(_labels(), dtype=object)
    config = InterventionConfig(delta_fraction=0.2, base_fraction=0.5, seed=7)
    base, sets, deltas, names = intervention_sets(labels.tolist(), config)
    assert names == ("a", "b", "c")
    counts = {n: int(np.sum(labels[base] == n)) for n in names}
    assert counts == {"a": 15, "b": 10, "c": 6}  # round(0.5 * count), the pool's mix kept
    np.testing.assert_array_equal(deltas, [3, 2, 1])  # max(1, round(0.2 * n0))
    assert len(sets) == len(names) + 1
    np.testing.assert_array_equal(sets[0], base)
    for s in sets:
        assert len(np.unique(s)) == len(s)  # no duplicates within a run
        assert np.all(np.diff(s) > 0)
    for k, name in enumerate(names):
        added = np.setdiff1d(sets[k + 1], base)
        removed = np.setdiff1d(base, sets[k + 1])
        assert removed.size == 0 and added.size == deltas[k]
        assert np.all(labels[added] == name)  # only category k changes
        assert len(sets[k + 1]) == len(base) + deltas[k]

    again = intervention_sets(labels.tolist(), config)
    np.testing.assert_array_equal(again[0], base)
    for x, y in zip(again[1], sets):
        np.testing.assert_array_equal(x, y)
    other = intervention_sets(labels.tolist(), dataclasses.replace(config, seed=8))
    assert not np.array_equal(other[0], base)


def test_intervention_sets_remove_when_no_extra_examples():
    labels = np.array(_labels(), dtype=object)
    base, sets, deltas, names = intervention_sets(labels.tolist(), InterventionConfig(delta_fraction=0.1))
    assert len(base) == len(labels)  # base_fraction 1.0: D0 is the whole pool
    np.testing.assert_array_equal(deltas, [-3, -2, -1])
    for k, name in enumerate(names):
        removed = np.setdiff1d(base, sets[k + 1])
        assert np.setdiff1d(sets[k + 1], base).size == 0 and removed.size == -deltas[k]
        assert np.all(labels[removed] == name)

    # base_size: proportional allocation, at least one per category.
    base, _, _, _ = intervention_sets(labels.tolist(), InterventionConfig(base_size=12))
    assert len(base) == 12 and {n: int(np.sum(labels[base] == n)) for n in names} == {"a": 6, "b": 4, "c": 2}
    with pytest.raises(ValueError, match="no category"):
        intervention_sets(["a", None, "b"], InterventionConfig())


def test_missing_category_names_the_pool(testbed):
    _, pool, _, _ = testbed
    cats = list(pool.categories)
    cats[5] = None
    broken = dataclasses.replace(pool, categories=tuple(cats))
    with pytest.raises(ValueError, match=re.escape(pool.source) + r".*example index 5 .*no category"):
        pool_categories(broken)
    with pytest.raises(ValueError, match="no category"):
        measure_interactions(None, broken, testbed[2], CONFIG, progress=False)  # fails before the model


def test_run_orders_cycle_each_set():
    sets = [np.arange(10), np.array([3, 7, 11, 20, 21, 22, 40]), np.array([5, 6, 7])]
    orders = run_orders(sets, steps=6, batch_size=4, seed=1)
    assert orders.shape == (3, 6, 4) and orders.dtype == np.int64
    for r, s in enumerate(sets):
        flat = orders[r].reshape(-1)
        assert np.isin(flat, s).all()  # only the run's own examples
        n = len(s)
        for e in range(len(flat) // n):  # every full epoch is a permutation of the set
            assert sorted(flat[e * n:(e + 1) * n].tolist()) == sorted(s.tolist())
        tail = flat[(len(flat) // n) * n:]
        assert len(np.unique(tail)) == len(tail)
    np.testing.assert_array_equal(run_orders(sets, 6, 4, 1), orders)
    assert not np.array_equal(run_orders(sets, 6, 4, 2), orders)
    # Common random numbers: within an epoch the shared examples keep the same relative order.
    first = orders[0].reshape(-1)[:10]
    second = orders[1].reshape(-1)[:7]
    shared = [i for i in first if i in set(second.tolist())]
    assert shared == [i for i in second if i in set(first.tolist())]
    with pytest.raises(ValueError, match="empty"):
        run_orders([np.arange(3), np.array([], np.int64)], 2, 2, 0)


def test_interaction_from_runs_is_gamma_of_the_run_table():
    # Loss (lower is better). Row 0: D0; row k+1: category k changed by deltas[k]; columns: targets.
    perf = np.array([[2.0, 3.0, 4.0],
                     [1.8, 2.9, 4.0],   # +2 of a: a and b improve
                     [2.1, 2.6, 3.9],   # +4 of b
                     [2.0, 3.1, 4.3]])  # -1 of c (a removal): c and b get worse
    deltas = np.array([2, 4, -1])
    gamma = interaction_from_runs(perf, deltas, ["a", "b", "c"])
    effect = -(perf[1:] - perf[0]) / deltas[:, None]  # e[source, target], sign flipped for loss
    assert np.all(np.diag(effect) > 0)
    np.testing.assert_allclose(gamma[1, 0], effect[0, 1] / effect[1, 1])  # gamma[target, source]
    np.testing.assert_allclose(gamma[1, 2], effect[2, 1] / effect[1, 1])
    np.testing.assert_allclose(gamma[0, 1], effect[1, 0] / effect[0, 0])
    np.testing.assert_array_equal(np.diag(gamma), np.ones(3))
    with pytest.raises(ValueError, match="not positive"):  # c's loss rose with "+1 c": own effect < 0
        interaction_from_runs(perf, [2, 4, 1], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(N\+1, N\)"):
        interaction_from_runs(perf[1:], deltas, ["a", "b", "c"])


# ----------------------------------------------------------------------------------------------
# Training: vmap == sequential, the stacked step


def test_vmap_equals_sequential_full_finetuning(full_runs):
    model, vmapped, sequential, stats = full_runs
    _, trainable, _ = split_trainable(model)
    vmapped, sequential, trainable = jax.device_get((vmapped, sequential, trainable))
    for leaf, ref in zip(jax.tree.leaves(vmapped), jax.tree.leaves(trainable)):
        assert leaf.shape == (4, *ref.shape) and leaf.dtype == jnp.float32
    assert _max_rel_err(vmapped, sequential) < 1e-4
    # The runs trained on different data, so they differ from each other and from the start.
    assert _max_rel_err(jax.tree.map(lambda x: x[1], vmapped), jax.tree.map(lambda x: x[0], vmapped)) > 1e-6
    assert _max_rel_err(jax.tree.map(lambda x: x[0], vmapped), trainable) > 1e-4
    np.testing.assert_allclose(stats["vmap"]["train_loss"], stats["sequential"]["train_loss"], rtol=1e-4)
    assert stats["vmap"]["train_loss"].shape == (4, CONFIG.steps)
    # The caller's model is untouched.
    _, after, _ = split_trainable(model)
    assert _max_rel_err(after, trainable) == 0.0


def test_vmap_equals_sequential_lora(testbed, full_runs):
    pool = testbed[1]
    model = add_lora(nnx.clone(full_runs[0]), LoRAConfig(rank=2, alpha=4.0), seed=2)
    vmapped = train_interventions(model, pool, CONFIG, "vmap", progress=False)
    sequential = train_interventions(model, pool, CONFIG, "sequential", progress=False)
    _, trainable, _ = split_trainable(model)
    vmapped, sequential, trainable = jax.device_get((vmapped, sequential, trainable))
    assert set(jax.tree.leaves(jax.tree.map(lambda x: x.shape[0], vmapped))) == {4}
    assert len(jax.tree.leaves(vmapped)) == len(jax.tree.leaves(trainable))  # adapters only
    assert _max_rel_err(vmapped, sequential) < 1e-4
    assert _max_rel_err(jax.tree.map(lambda x: x[0], vmapped), trainable) > 1e-4


def test_stacked_step_with_identical_batches_equals_the_plain_step(testbed, full_runs):
    """R runs on the same set see identical batches at every step (common random numbers); the
    vmapped program must then give R copies of the plain step's result. Same shapes as the
    fixture's runs (buckets are fitted to the pool), so nothing is compiled again."""
    pool, model = testbed[1], full_runs[0]
    _, sets, _, _ = intervention_sets(pool_categories(pool), CONFIG)
    orders = run_orders([sets[2]] * 4, CONFIG.steps, CONFIG.batch_size, CONFIG.seed)
    assert all(np.array_equal(orders[r], orders[0]) for r in range(4))
    stats = {}
    stacked = train_interventions(model, pool, CONFIG, "vmap", progress=False, sets=[sets[2]] * 4, stats=stats)
    single = train_interventions(model, pool, CONFIG, "sequential", progress=False, sets=[sets[2]])
    assert stats["compile_s"] == 0.0
    stacked, single = jax.device_get((stacked, single))
    for r in range(4):
        assert _max_rel_err(jax.tree.map(lambda x, r=r: x[r], stacked), jax.tree.map(lambda x: x[0], single)) < 1e-5


# ----------------------------------------------------------------------------------------------
# Evaluation and the end-to-end measurement


def test_evaluate_runs_equals_evaluating_each_run(testbed, full_runs):
    _, _, eval_pool, _ = testbed
    model, vmapped, _, _ = full_runs
    perf = evaluate_runs(model, vmapped, eval_pool, batch_size=8, n_buckets=1)
    assert perf.shape == (4, 3) and np.all(np.isfinite(perf)) and np.all(perf > 0)
    graphdef, _, frozen = split_trainable(model)
    eval_step = make_eval_step(graphdef, param_dtypes(model))
    names = sorted(CATEGORIES)
    runs = jax.device_get(vmapped)
    for r in range(4):
        run = jax.tree.map(lambda x, r=r: x[r], runs)
        by_category = evaluate_loss(eval_step, run, frozen, eval_pool, batch_size=8, n_buckets=1)["by_category"]
        np.testing.assert_allclose(perf[r], [by_category[n] for n in names], rtol=1e-5)
    # A column order can be asked for; a category the eval pool lacks is an error.
    swapped = evaluate_runs(model, vmapped, eval_pool, names=["reverse", "add"], batch_size=8, n_buckets=1)
    np.testing.assert_allclose(swapped, perf[:, [2, 0]], rtol=1e-6)
    with pytest.raises(ValueError, match="no evaluation examples of categories"):
        evaluate_runs(model, vmapped, eval_pool, names=["upper"], batch_size=8)


def test_stacked_evaluation_shrinks_its_batch_to_the_logits_budget(testbed, full_runs, monkeypatch):
    """A real vocabulary (49,152, SmolLM2) with 11 runs at 192 tokens fits the
    default budget in calls of 2 rows; with the budget forced down to one row, the scores are unchanged."""
    from jraise.data.batching import iterate_batches
    from jraise.select import intervention

    assert intervention.eval_rows_per_call(11, 192, 49152, 64) == 2  # 0.83 GB a row
    assert intervention.eval_rows_per_call(11, 192, 64, 64) == 64  # a testbed vocabulary: the batch as asked
    assert intervention.eval_rows_per_call(2, 100, 1000, 64, budget=2 * 4 * 2 * 100 * 1000 * 3) == 3
    _, _, eval_pool, _ = testbed
    model, vmapped, _, _ = full_runs
    whole = evaluate_runs(model, vmapped, eval_pool, batch_size=8, n_buckets=1)
    sizes = []

    def recording(pool, order, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        return iterate_batches(pool, order, batch_size, *args, **kwargs)

    monkeypatch.setattr(intervention, "LOGITS_BUDGET", 1)
    monkeypatch.setattr(intervention, "iterate_batches", recording)
    np.testing.assert_allclose(evaluate_runs(model, vmapped, eval_pool, batch_size=8, n_buckets=1), whole,
                               rtol=1e-5)
    assert sizes == [1]  # the budget, not batch_size, set the rows of each call


def test_vmapped_training_splits_its_runs_to_the_logits_budget(testbed, full_runs, monkeypatch):
    """11 runs with SmolLM2's vocabulary (8 rows of 192 tokens, 0.9 GB of logits a run) train 2
    runs a call under the default budget; forced down to one run a call, the states are those of
    the single vmapped program."""
    from jraise.select import intervention

    assert intervention.train_runs_per_call(11, 8, 192, 49152) == 2
    assert intervention.train_runs_per_call(11, 8, 192, 64) == 11  # a testbed vocabulary: all runs at once
    assert intervention.train_runs_per_call(11, 8, 192, 49152, n_devices=4) == 4  # never below the devices
    assert intervention.train_runs_per_call(11, 1, 10, 10, n_devices=4, budget=3 * 4 * 100 * 6) == 4
    _, pool, _, _ = testbed
    model, vmapped, _, stats = full_runs
    assert stats["vmap"]["runs_per_call"] == 4
    monkeypatch.setattr(intervention, "LOGITS_BUDGET", 1)
    split = {}
    again = train_interventions(model, pool, CONFIG, "vmap", progress=False, stats=split)
    assert split["runs_per_call"] == 1
    assert _max_rel_err(again, vmapped) < 1e-5


def test_measure_interactions_writes_gamma(testbed, full_runs):
    root, pool, eval_pool, _ = testbed
    model = full_runs[0]
    out = root / "measure"
    # A few steps of a random model may not lower every category's own loss: floor e_jj.
    config = dataclasses.replace(CONFIG, self_effect_floor=1e-6)
    result = measure_interactions(model, pool, eval_pool, config, out_dir=out, progress=False)
    gamma = result["gamma"]
    assert gamma.shape == (3, 3) and np.all(np.isfinite(gamma))
    np.testing.assert_array_equal(np.diag(gamma), np.ones(3))
    assert result["names"] == sorted(CATEGORIES) and result["set_sizes"] == [24, 26, 26, 26]
    np.testing.assert_allclose(result["perf"], evaluate_runs(model, full_runs[1], eval_pool, batch_size=8, n_buckets=1),
                               rtol=1e-5)  # same runs as the fixture's (deterministic)
    assert result["timings"]["compile_s"] == 0.0  # the fixture compiled these step shapes already
    for name in ("interactions.json", "gamma.csv", "gamma.json", "gamma_heatmap.png"):
        assert (out / name).is_file()
    doc = json.loads((out / "interactions.json").read_text())
    assert doc["deltas"] == [2, 2, 2] and doc["interventions"] == ["add"] * 3
    assert doc["base_counts"] == [8, 8, 8] and len(doc["perf"]) == 4 and doc["gamma_error"] is None
    assert doc["pool"]["fingerprint"] == pool.fingerprint
    assert all(len(ids) == 2 for ids in doc["changed_ids"].values())
    saved = json.loads((out / "gamma.json").read_text())
    np.testing.assert_allclose(saved["matrix"], gamma)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------
# Several devices (subprocess with fake CPU devices; slow)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 3])
def test_run_axis_sharded_over_devices_matches_sequential(tmp_path, devices):
    """R = 4 runs on 2 devices are sharded (2 runs each); on 3 devices they are replicated."""
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from jraise.data.pool import load_pool
        from jraise.testbed import write_testbed
        from jraise.model import init_model, load_tokenizer, preset_config
        from jraise.select.intervention import InterventionConfig, evaluate_runs, run_mesh, train_interventions
        assert jax.device_count() == {devices}
        paths = write_testbed({str(tmp_path)!r}, n_train=48, n_val_per_category=1, n_test_per_category=1,
                              categories={CATEGORIES!r})
        tok = load_tokenizer(paths["tokenizer"])
        pool = load_pool(paths["pool"], tok, max_len=128)
        config = preset_config("tiny", vocab_size=len(tok), num_hidden_layers=1)
        model = init_model(config, seed=0)
        cfg = InterventionConfig(delta_fraction=0.25, base_fraction=0.5, steps=3, batch_size=4, lr=3e-3,
                                 warmup_ratio=0.0, n_buckets=1, seed=3)
        v = train_interventions(model, pool, cfg, "vmap", progress=False)
        s = train_interventions(model, pool, cfg, "sequential", progress=False)
        pv, ps = evaluate_runs(model, v, pool, n_buckets=1), evaluate_runs(model, s, pool, n_buckets=1)
        print("EVAL_ERR", float(np.max(np.abs(pv - ps) / ps)))
        leaf = jax.tree.leaves(v)[0]
        print("SHARDED", "runs" in str(run_mesh(4)[0].spec))
        print("RUNS_PER_SHARD", leaf.addressable_shards[0].data.shape[0])
        err = max(float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))
                  for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(s)))
        print("ERR", err)
    """)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines()
                 if line.startswith(("SHARDED", "RUNS_PER_SHARD", "ERR", "EVAL_ERR")))
    assert float(lines["ERR"]) < 1e-4 and float(lines["EVAL_ERR"]) < 1e-4
    if devices == 2:
        assert lines["SHARDED"] == "True" and lines["RUNS_PER_SHARD"] == "2"  # two runs per device
    else:
        assert lines["SHARDED"] == "False" and lines["RUNS_PER_SHARD"] == "4"  # replicated


def test_relative_self_effect_floor_config_and_pass_through():
    for bad in (0.0, 1.5, -1.0, True, "0.5"):
        with pytest.raises(ValueError, match="relative_self_effect_floor"):
            InterventionConfig(relative_self_effect_floor=bad)
    config = InterventionConfig(relative_self_effect_floor=0.5)
    assert config.to_dict()["relative_self_effect_floor"] == 0.5
    assert InterventionConfig().relative_self_effect_floor is None
    # Loss table; category c barely improves (own effect 1e-3, the others 0.05 and 0.075).
    perf = np.array([[2.0, 3.0, 4.0],
                     [1.9, 2.9, 3.99],
                     [2.05, 2.7, 3.98],
                     [1.99, 2.98, 3.999]])
    deltas = np.array([2, 4, 1])
    effect = -(perf[1:] - perf[0]) / deltas[:, None]
    own = np.diag(effect)
    floor = 0.5 * np.median(own)
    gamma = interaction_from_runs(perf, deltas, ["a", "b", "c"], relative_self_effect_floor=0.5)
    want = effect.T / np.maximum(own, floor)[:, None]
    np.fill_diagonal(want, 1.0)
    np.testing.assert_allclose(gamma, want, rtol=1e-9)
    assert gamma[2, 0] == pytest.approx(effect[0, 2] / floor)


def test_epoch_budget_gives_each_run_its_own_length_and_schedule(testbed):
    """budget="epochs": run r takes ceil(epochs * |set_r| / batch) updates with its own lr schedule;
    each run equals a fixed-step run of that length on its own set (same orders and keys)."""
    from jraise.select.intervention import intervention_sets, run_steps

    _, pool, _, model_config = testbed
    model = init_model(model_config, seed=0)
    config = dataclasses.replace(CONFIG, budget="epochs", epochs=1)
    _, sets, _, _ = intervention_sets(pool_categories(pool), config)
    lengths = run_steps(sets, config)
    assert lengths == [math.ceil(len(s) / 4) for s in sets] and lengths[0] == 6 and set(lengths[1:]) == {7}
    assert run_steps(sets, CONFIG) == [3] * 4  # the fixed step budget
    stats = {}
    stacked = train_interventions(model, pool, config, "sequential", progress=False, sets=sets, stats=stats)
    assert stats["run_steps"] == lengths and stats["steps"] == 7
    assert np.isnan(stats["train_loss"][0, 6]) and np.isfinite(stats["train_loss"][:, :6]).all()
    # Run 0 (D0, 6 steps) equals a fixed-step run of 6 steps on D0 alone.
    alone = train_interventions(model, pool, dataclasses.replace(CONFIG, steps=6), "sequential", progress=False,
                                sets=[sets[0]])
    run0 = jax.tree.map(lambda x: x[0], stacked)
    assert _max_rel_err(run0, jax.tree.map(lambda x: x[0], alone)) < 1e-5
    with pytest.raises(ValueError, match="mode='sequential'"):
        train_interventions(model, pool, config, "vmap", progress=False, sets=sets)
    # The written design reports each run's own last training loss, not the NaN padding.
    _, _, eval_pool, _ = testbed
    out = testbed[0] / "epoch_budget"
    measure_interactions(model, pool, eval_pool, dataclasses.replace(config, self_effect_floor=1e-6), out,
                         mode="sequential", progress=False)
    written = json.loads((out / "interactions.json").read_text())
    final = [row[np.isfinite(row)][-1] for row in stats["train_loss"]]
    np.testing.assert_allclose(written["final_train_loss"], final, rtol=1e-5)
    assert written["run_steps"] == lengths and written["config"]["budget"] == "epochs"
    with pytest.raises(ValueError, match="budget must be one of"):
        InterventionConfig(budget="tokens")
