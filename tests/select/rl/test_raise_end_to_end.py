"""RAISE end to end on a tiny testbed: static features, policy training with resume, the
deployment selector, and the learning check (target-category share above random)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jraise.data.pool import load_pool
from jraise.model import init_model, load_tokenizer, preset_config
from jraise.jobs.raise_policy import cached_static_features, load_policy, train_policy_in_dir
from jraise.select.rl.episode import device_pool
from jraise.select.rl.features import cluster_pool, static_features
from jraise.select.rl.sampling import cluster_layout
from jraise.select.rl.selector import StepInfo, raise_policy
from jraise.select.rl.trainer import RaiseConfig

CATS = ["first", "add", "reverse"]
TARGET = "add"  # digits: training on the letter tasks does not help it, so the reward separates them


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_testbed):
    root = tmp_path_factory.mktemp("raise")
    paths = make_testbed(n_train=90, n_val_per_category=8, n_test_per_category=1, categories=CATS)
    tok = load_tokenizer(paths["tokenizer"])
    pool = load_pool(paths["pool"], tok, max_len=128)
    val_all = load_pool(paths["val"], tok, max_len=128)
    model = init_model(preset_config("tiny", vocab_size=len(tok)), seed=0)
    static = static_features(model, pool, tok.eos_token_id)
    vp = device_pool(val_all)
    target = np.array([c == TARGET for c in val_all.categories])
    val = {"input_ids": vp.input_ids[target], "attention_mask": vp.attention_mask[target],
           "loss_mask": vp.loss_mask[target], "example_mask": jnp.ones(int(target.sum()))}
    return root, tok, pool, model, static, val, paths


def test_static_features_layout_cache_and_clusters(setup, tmp_path):
    root, tok, pool, model, static, _, _ = setup
    assert static.shape == (90, 36) and np.all(np.isfinite(static))
    np.testing.assert_allclose(static.mean(0), 0, atol=1e-4)
    lengths_y = np.array([m.sum() for m in pool.loss_masks])
    assert np.corrcoef(static[:, 1], lengths_y)[0, 1] > 0.999  # column 1 is len(y), z-scored
    cache = tmp_path / "static.npz"
    a = cached_static_features(cache, model, "tiny-0", pool, tok.eos_token_id)
    b = cached_static_features(cache, model, "tiny-0", pool, tok.eos_token_id)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="cached features are for"):
        cached_static_features(cache, model, "another-model", pool, tok.eos_token_id)
    labels = cluster_pool(static, 3)
    assert labels.shape == (90,) and set(labels.tolist()) <= {0, 1, 2}


def test_policy_learns_to_prefer_the_target_category_and_resumes(setup):
    root, _, pool, model, static, val, _ = setup
    layout = cluster_layout(np.zeros(len(pool), int), 1)
    config = RaiseConfig(episodes=20, steps=8, per_cluster=8, llm_lr=3e-3, policy_lr=3e-3, entropy_coef=0.0)
    out = root / "policy"
    half = RaiseConfig(**{**config.__dict__, "episodes": 10})
    train_policy_in_dir(model, jnp.asarray(static), layout, device_pool(pool), val, half, out, progress=False)
    policy, history = train_policy_in_dir(model, jnp.asarray(static), layout, device_pool(pool), val, config, out,
                                          progress=False)
    assert [h["episode"] for h in history] == list(range(1, 21))
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert len((out / "history.jsonl").read_text().splitlines()) == 20
    loaded = load_policy(out)
    selector = raise_policy(loaded.actor, static, layout, per_cluster=8)
    select = jax.jit(selector.select)
    state = selector.init(jax.random.key(0))
    picks = []
    for t in range(1, 9):
        idx, state = select(state, StepInfo(step=t, total_steps=8, val_loss=history[-1]["val_loss0"]))
        picks += np.asarray(idx).tolist()
    share = np.mean([pool.categories[i] == TARGET for i in picks])
    random_share = np.mean([c == TARGET for c in pool.categories])
    print(json.dumps({"target_share": share, "random_share": random_share}))
    assert share > random_share + 0.15


def test_raise_files_skip_bad_records_and_reuse_the_policy(setup, tmp_path, make_model_dir):
    """``skip_bad`` through `train_raise_policy_job` (clusters.json) and `finetune_with_policy`
    (selections.json): the kept pool is the clean one, so the policy's fingerprint matches."""
    from jraise.data.formats import RecordError
    from jraise.jobs.raise_policy import finetune_with_policy, train_raise_policy_job

    paths = setup[6]
    model = make_model_dir(paths["tokenizer"], seed=0)  # the suite's shared directory: read-only
    lines = paths["pool"].read_text().splitlines()[:24]
    (tmp_path / "pool.jsonl").write_text("\n".join(lines[:5] + ["{oops"] + lines[5:]) + "\n")  # line 6
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(paths["val"].read_text().splitlines()[:6]) + "\n")
    echoed = []
    train_raise_policy_job(model, tmp_path / "pool.jsonl", val, tmp_path / "policy",
                           RaiseConfig(episodes=1, steps=2), batch_size=4, max_len=128, echo=echoed.append,
                           skip_bad=True)
    meta = json.loads((tmp_path / "policy" / "clusters.json").read_text())
    assert len(meta["labels"]) == 24 and meta["skipped"]["count"] == 1
    assert meta["skipped"]["problems"][0]["line"] == 6 and meta["skipped"]["problems"][0]["reason"] == "malformed-json"
    assert echoed[0].startswith(f"skipped 1 bad record of {tmp_path / 'pool.jsonl'} (1 malformed-json;")
    with pytest.raises(RecordError, match="line 6"):
        finetune_with_policy(model, tmp_path / "pool.jsonl", val, tmp_path / "policy", tmp_path / "run",
                             steps=2, lr=1e-3, max_len=128)
    echoed.clear()
    finetune_with_policy(model, tmp_path / "pool.jsonl", val, tmp_path / "policy", tmp_path / "run",
                         steps=2, lr=1e-3, max_len=128, skip_bad=True, echo=echoed.append)
    saved = json.loads((tmp_path / "run" / "selections.json").read_text())
    assert np.asarray(saved["indices"]).shape == (2, 4) and np.asarray(saved["indices"]).max() < 24
    assert saved["skipped"] == meta["skipped"] and len(echoed) == 1
