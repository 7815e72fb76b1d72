"""The training loop: data order, metrics log, checkpoints (Adam moments), kill/resume, LoRA, config guard.

Every run here uses the `tiny` preset, one length bucket and the same optimizer settings where it
can, so the jitted step compiles once for the module (the loop caches steps by model structure).
"""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from jraise.data.batching import epoch_order
from jraise.data.pool import load_pool
from jraise.model import init_model, load_tokenizer, preset_config
from jraise.model.lora import LoRAConfig, add_lora
from jraise.train import (
    TrainConfig,
    adam_moments,
    checkpoint_steps,
    list_checkpoints,
    load_checkpoint,
    restore_model,
    train,
)

# 64 examples, batch 16 (2 micro-batches of 8): 4 steps an epoch, 8 in all; warmup ceil(0.25 * 8) = 2.
CONFIG = TrainConfig(lr=3e-3, schedule="cosine", warmup_ratio=0.25, weight_decay=0.01, epochs=2, batch_size=16,
                     accum=2, max_grad_norm=1.0, seed=1, eval_every=4, save_every=3, n_buckets=1)
TOTAL, WARMUP = 8, 2
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # base weights of a LoRA model


class Recorder:
    """A callback that records the pool indices of every step and can crash at a given step."""

    def __init__(self, crash_at=None):
        self.indices, self.crash_at = {}, crash_at

    def __call__(self, info):
        self.indices[info.step] = info.indices
        if info.step == self.crash_at:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def data(make_testbed):
    paths = make_testbed(n_train=64, n_test_per_category=2)
    tok = load_tokenizer(paths["tokenizer"])
    pool = load_pool(paths["pool"], tok, max_len=128)
    eval_pool = load_pool(paths["test"], tok, max_len=128)
    config = preset_config("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return {"paths": paths, "pool": pool, "eval_pool": eval_pool, "model_config": config}


def _model(data):
    return init_model(data["model_config"], seed=0)


def _params(model, kind=nnx.Param):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, kind)))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    recorder = Recorder()
    result = train(_model(data), data["pool"], CONFIG, run_dir, eval_pool=data["eval_pool"], callback=recorder,
                   tokenizer_dir=data["paths"]["tokenizer"])
    return result, recorder


def test_default_order_metrics_and_schedule(full_run, data):
    result, recorder = full_run
    assert result.completed and result.steps == TOTAL
    # Default order: epoch e visits epoch_order(n, seed, e) in chunks of batch_size.
    for e in range(2):
        order = epoch_order(len(data["pool"]), CONFIG.seed, e)
        for b in range(4):
            np.testing.assert_array_equal(recorder.indices[e * 4 + b + 1], order[b * 16:(b + 1) * 16])
    records = _records(result.metrics_path)
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
    assert [r["epoch"] for r in records] == [0] * 4 + [1] * 4
    for r in records:  # lr of update s (0-based) is the warmup-cosine formula at s
        s = r["step"] - 1
        expected = (CONFIG.lr * s / WARMUP if s < WARMUP
                    else 0.5 * CONFIG.lr * (1 + math.cos(math.pi * (s - WARMUP) / (TOTAL - WARMUP))))
        assert r["lr"] == pytest.approx(expected, rel=1e-5, abs=1e-12)
        assert r["tokens"] > r["response_tokens"] > 0 and math.isfinite(r["loss"]) and r["time"] >= 0
    assert list(result.lr_history) == [r["lr"] for r in records]
    evals = {r["step"]: r["eval"] for r in records if "eval" in r}
    assert sorted(evals) == [4, 8]
    categories = {c for c in data["eval_pool"].categories}
    assert set(evals[8]["by_category"]) == categories
    assert evals[8]["loss"] < evals[4]["loss"] < math.log(data["model_config"].vocab_size)
    assert (result.final_dir / "model.safetensors").is_file() and (result.final_dir / "tokenizer.json").is_file()


def test_checkpoints_hold_weights_adam_moments_and_position(full_run, data):
    result, _ = full_run
    assert checkpoint_steps(result.run_dir) == [3, 4, 6, 8]  # every 3 steps and at each epoch end
    epoch_ends = [c for c in list_checkpoints(result.run_dir) if c["epoch_end"]]
    assert [(c["step"], c["epoch"]) for c in epoch_ends] == [(4, 0), (8, 1)]
    trainable, opt_state, meta = load_checkpoint(result.run_dir, step=4)
    mu, nu = adam_moments(opt_state)
    reference = _params(_model(data))
    for tree in (trainable, mu, nu):
        assert jax.tree.structure(tree) == jax.tree.structure(reference)
        assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference)))
    assert all(float(np.min(v)) >= 0 for v in jax.tree.leaves(nu))
    assert any(float(np.abs(m).max()) > 0 for m in jax.tree.leaves(mu))
    assert meta["step"] == 4 and meta["epoch"] == 0 and (meta["next_epoch"], meta["next_batch"]) == (1, 0)
    assert meta["lr_history"] == list(result.lr_history[:4])
    assert meta["epoch_mean_lr"] == pytest.approx(np.mean(result.lr_history[:4]))
    # The final checkpoint rebuilds the trained model exactly.
    restored = restore_model(result.run_dir, _model(data))
    jax.tree.map(np.testing.assert_array_equal, _params(restored), _params(result.model))


def test_kill_and_resume_matches_uninterrupted_run(full_run, data, tmp_path):
    result, _ = full_run
    # Crash in the step after the first checkpoint (3, mid-epoch): the resume must pick up inside
    # epoch 0, at its last batch, then cross the epoch boundary.
    crashing = Recorder(crash_at=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_model(data), data["pool"], CONFIG, tmp_path, eval_pool=data["eval_pool"], callback=crashing)
    assert checkpoint_steps(tmp_path) == [3]
    resumed = train(_model(data), data["pool"], CONFIG, tmp_path, eval_pool=data["eval_pool"], resume=True)
    assert resumed.completed and resumed.steps == TOTAL
    jax.tree.map(np.testing.assert_array_equal, _params(resumed.model), _params(result.model))
    assert resumed.lr_history == result.lr_history
    records, reference = _records(resumed.metrics_path), _records(result.metrics_path)
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))  # step 4 of the crash is not duplicated
    assert [r["loss"] for r in records] == [r["loss"] for r in reference]
    _, opt_a, _ = load_checkpoint(tmp_path)
    _, opt_b, _ = load_checkpoint(result.run_dir)
    jax.tree.map(np.testing.assert_array_equal, adam_moments(opt_a), adam_moments(opt_b))


def test_explicit_order_is_consumed_exactly_across_a_stop(data, tmp_path):
    rng = np.random.RandomState(7)
    # Two epochs of 60 indices with repeats: 4 steps each, the last one 12 real rows + 4 padding.
    orders = [rng.randint(0, len(data["pool"]), 60), rng.randint(0, len(data["pool"]), 60)]
    config = dataclasses.replace(CONFIG, eval_every=0)
    seen = {}

    def stop_at_6(info):  # a clean stop (as on preemption) inside epoch 1
        seen[info.step] = info.indices
        return info.step == 6

    first = train(_model(data), data["pool"], config, tmp_path, order=orders, callback=stop_at_6, export=False)
    assert not first.completed and first.steps == 6 and checkpoint_steps(tmp_path)[-1] == 6
    recorder = Recorder()
    result = train(_model(data), data["pool"], config, tmp_path, order=orders, callback=recorder, export=False)
    assert result.completed and result.steps == TOTAL and result.final_dir is None
    seen.update(recorder.indices)
    assert sorted(recorder.indices) == [7, 8]
    expected = [o[b * 16:(b + 1) * 16] for o in orders for b in range(4)]
    for step, want in enumerate(expected, start=1):
        np.testing.assert_array_equal(seen[step], want)


def test_changed_config_or_order_refuses_to_resume(full_run, data):
    result, _ = full_run
    changed = dataclasses.replace(CONFIG, lr=1e-3, accum=4)
    with pytest.raises(ValueError, match=r"differs in accum: saved 2, now 4; lr: saved 0.003, now 0.001"):
        train(_model(data), data["pool"], changed, result.run_dir)
    with pytest.raises(FileExistsError, match="holds checkpoints"):
        train(_model(data), data["pool"], CONFIG, result.run_dir, resume=False)
    with pytest.raises(ValueError, match="order_fingerprint"):
        train(_model(data), data["pool"], CONFIG, result.run_dir, order=np.arange(len(data["pool"])))


def test_lora_trains_only_adapters_and_restores(data, tmp_path):
    # Dropout > 0 exercises the per-step reseeding of the adapters' RNG stream inside the step.
    model = add_lora(_model(data), LoRAConfig(rank=4, alpha=8, dropout=0.1))
    base_before = _params(model, BASE)
    config = TrainConfig(lr=1e-2, epochs=1, batch_size=8, max_steps=2, n_buckets=1, seed=2)
    result = train(model, data["pool"], config, tmp_path, export=False)
    jax.tree.map(np.testing.assert_array_equal, _params(model, BASE), base_before)
    lora_b = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(_params(model, nnx.LoRAParam))
              if "lora_b" in jax.tree_util.keystr(p)]
    assert lora_b and all(np.abs(b).max() > 0 for b in lora_b)  # B starts at 0
    trainable, opt_state, meta = load_checkpoint(tmp_path)
    leaf_names = {jax.tree_util.keystr(p).split("'")[-2] for p, _ in jax.tree_util.tree_leaves_with_path(trainable)}
    assert leaf_names == {"lora_a", "lora_b"}
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert jax.tree.structure(adam_moments(opt_state)[0]) == jax.tree.structure(trainable)
    restored = restore_model(tmp_path, _model(data))  # adapters re-attached from the checkpoint's settings
    jax.tree.map(np.testing.assert_array_equal, _params(restored), _params(result.model))
