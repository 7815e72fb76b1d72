"""Self-paced learning (SSPL): loss buckets vs numpy quantiles, the open-bucket schedule, uniform
sampling, and the fine-tuning runner (library and CLI)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from jraise.cli import app
from jraise.data.batching import length_buckets
from jraise.data.pool import load_pool
from jraise.model import init_model, load_model, load_tokenizer, preset_config
from jraise.select.rl.features import difficulty_features
from jraise.select.self_paced import (
    open_bucket,
    pace_buckets,
    response_losses,
    self_paced_batch,
    self_paced_finetune,
)
from jraise.train.step import make_eval_step, param_dtypes, split_trainable


@pytest.fixture(scope="module")
def testbed(tmp_path_factory, make_testbed):
    root = tmp_path_factory.mktemp("sspl")
    paths = make_testbed(n_train=32, n_val_per_category=1, n_test_per_category=1, categories=["first", "upper"])
    tok = load_tokenizer(paths["tokenizer"])
    return {"root": root, "paths": paths, "tok": tok, "pool": load_pool(paths["pool"], tok, max_len=128)}


def _numpy_buckets(losses, n):
    """Bucket = how many of the n-1 inner quantiles (inverted CDF) lie strictly below the loss."""
    thresholds = np.quantile(losses, np.arange(1, n) / n, method="inverted_cdf")
    return np.searchsorted(thresholds, losses, side="left")


@pytest.mark.parametrize("n, n_buckets", [(37, 4), (40, 4), (10, 3), (7, 7), (5, 1)])
def test_pace_buckets_match_numpy_quantiles(n, n_buckets):
    losses = np.random.default_rng(n).permutation(n) * 0.1 + 1.0  # distinct
    got = np.asarray(jax.jit(pace_buckets, static_argnames="n_buckets")(jnp.asarray(losses), n_buckets))
    np.testing.assert_array_equal(got, _numpy_buckets(losses, n_buckets))
    sizes = np.bincount(got, minlength=n_buckets)
    assert sizes.max() - sizes.min() <= 1 and got.dtype == np.int32


def test_pace_buckets_break_ties_by_index_and_reject_zero_buckets():
    np.testing.assert_array_equal(np.asarray(pace_buckets(jnp.zeros(6), 3)), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(np.asarray(pace_buckets(jnp.array([3.0, 1.0, 1.0, 2.0]), 2)), [1, 0, 0, 1])
    with pytest.raises(ValueError, match="n_buckets"):
        pace_buckets(jnp.zeros(3), 0)


def test_batches_come_only_from_open_buckets_and_are_distinct():
    n, n_buckets, total, batch = 40, 4, 10, 6
    buckets = np.asarray(pace_buckets(jnp.asarray(np.random.default_rng(0).normal(size=n)), n_buckets))
    key = jax.random.key(3)
    opened = []
    for step in range(1, total + 1):
        k = (step - 1) * n_buckets // total
        assert int(open_bucket(step, total, n_buckets)) == k
        for draw in range(5):
            picks = np.asarray(self_paced_batch(jax.random.fold_in(key, 100 * step + draw), jnp.asarray(buckets),
                                                step, total, n_buckets, batch))
            assert len(set(picks.tolist())) == batch and picks.min() >= 0
            assert buckets[picks].max() <= k
        opened.append(k)
    assert opened == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]  # every bucket opens, in order


def test_too_few_open_examples_pad_with_minus_one():
    buckets = jnp.array([0, 1, 1, 1, 0, 1], jnp.int32)
    picks = np.asarray(self_paced_batch(jax.random.key(0), buckets, 1, 4, 2, 4))
    assert sorted(picks[:2].tolist()) == [0, 4] and picks[2:].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="batch_size"):
        self_paced_batch(jax.random.key(0), buckets, 1, 4, 2, 7)


def test_sampling_is_uniform_over_the_open_examples():
    n, n_buckets, batch, draws = 24, 3, 4, 3000
    buckets = jnp.asarray(np.arange(n) % n_buckets, jnp.int32)  # bucket 0 and 1 open at step 2 of 3 -> 16 open
    keys = jax.random.split(jax.random.key(11), draws)
    picks = np.asarray(jax.vmap(lambda k: self_paced_batch(k, buckets, 2, 3, n_buckets, batch))(keys))
    counts = np.bincount(picks.reshape(-1), minlength=n)
    is_open = np.arange(n) % n_buckets <= 1
    assert counts[~is_open].sum() == 0
    # Each open example is in a batch with probability batch / 16: chi-square against equal counts.
    assert stats.chisquare(counts[is_open]).pvalue > 1e-3
    np.testing.assert_allclose(counts[is_open] / draws, batch / is_open.sum(), atol=0.03)
    # Pairs are uniform too (a subset law, not only marginals): first-two-picks pair counts.
    pair = np.sort(picks[:, :2], axis=1)
    assert len({tuple(p) for p in pair.tolist()}) > 0.9 * (16 * 15 // 2)


def test_response_losses_match_the_feature_pass(testbed):
    pool = testbed["pool"]
    model = init_model(preset_config("tiny", vocab_size=len(testbed["tok"])), seed=1)
    graphdef, trainable, frozen = split_trainable(model)
    losses = response_losses(make_eval_step(graphdef, param_dtypes(model)), trainable, frozen, pool, 8,
                             length_buckets(pool.lengths, 2))
    want = -difficulty_features(model, pool, 1, batch_size=8)[:, 2]
    np.testing.assert_allclose(losses, want, rtol=1e-4)


def test_runner_lowers_the_loss_and_starts_with_the_easiest_bucket(testbed):
    pool = testbed["pool"]
    model = init_model(preset_config("tiny", vocab_size=len(testbed["tok"])), seed=0)

    def pool_losses():
        graphdef, trainable, frozen = split_trainable(model)
        return response_losses(make_eval_step(graphdef, param_dtypes(model)), trainable, frozen, pool, 8,
                               length_buckets(pool.lengths, 2))

    before = pool_losses()
    first_bucket = np.asarray(pace_buckets(jnp.asarray(before), 4)) == 0
    lines = []
    same, indices = self_paced_finetune(model, pool, steps=12, batch_size=4, lr=3e-3, refresh_every=3, n_buckets=4,
                                        seed=0, shape_buckets=2, echo=lines.append)
    after = pool_losses()
    assert same is model and indices.shape == (12, 4) and indices.dtype == np.int64
    assert all(len(set(row)) == 4 for row in indices.tolist()) and indices.min() >= 0 and indices.max() < len(pool)
    assert first_bucket[indices[0]].all()  # step 1: only the easiest quarter under the starting model
    assert after.mean() < before.mean() - 0.1
    refreshes = [line for line in lines if "open buckets" in line]  # before steps 1, 4, 7, 10
    assert [line.split("open buckets ")[1] for line in refreshes] == [f"0..{k} of 4" for k in range(4)]
    with pytest.raises(ValueError, match="batch_size"):
        self_paced_finetune(model, pool, steps=2, batch_size=9, lr=1e-3, n_buckets=4)
    with pytest.raises(ValueError, match="refresh_every"):
        self_paced_finetune(model, pool, steps=2, batch_size=2, lr=1e-3, refresh_every=0)


def test_cli_sspl_writes_the_model_and_the_selections(testbed):
    root, paths = testbed["root"], testbed["paths"]
    runner = CliRunner()
    assert runner.invoke(app, ["init-model", str(root / "m"), "--tokenizer", str(paths["tokenizer"])]).exit_code == 0
    result = runner.invoke(app, ["select", "sspl", "--model", str(root / "m"), "--pool", str(paths["pool"]),
                                 "--out", str(root / "run"), "--steps", "4", "--batch-size", "4", "--lr", "1e-3",
                                 "--refresh-every", "2", "--buckets", "2", "--max-len", "128"])
    assert result.exit_code == 0, result.output
    saved = json.loads((root / "run" / "selections.json").read_text())
    pool = load_pool(paths["pool"], load_tokenizer(root / "m"), max_len=128)  # tokenised as the command did
    assert np.asarray(saved["indices"]).shape == (4, 4) and saved["pool_fingerprint"] == pool.fingerprint
    assert saved["config"]["n_buckets"] == 2
    assert load_model(root / "run" / "final")[1].vocab_size == len(testbed["tok"])
    assert (root / "run" / "final" / "tokenizer_config.json").is_file()


def test_run_self_paced_skip_bad_records_the_skipped_lines(testbed, tmp_path, make_model_dir):
    from jraise.data.formats import RecordError
    from jraise.jobs.self_paced import run_self_paced

    paths = testbed["paths"]
    model = make_model_dir(paths["tokenizer"], seed=0)  # the suite's shared directory: read-only
    lines = paths["pool"].read_text().splitlines()
    empty = {**json.loads(lines[0]), "id": "empty", "output": "  "}
    bad_pool = tmp_path / "bad.jsonl"
    bad_pool.write_text("\n".join(lines[:2] + [json.dumps(empty)] + lines[2:]) + "\n")  # line 3: empty output
    with pytest.raises(RecordError, match="line 3: field 'output'"):
        run_self_paced(model, bad_pool, tmp_path / "run", steps=1, batch_size=4, lr=1e-3, max_len=128)
    echoed = []
    run_self_paced(model, bad_pool, tmp_path / "run", steps=2, batch_size=4, lr=1e-3, refresh_every=2,
                   n_buckets=2, max_len=128, echo=echoed.append, skip_bad=True)
    saved = json.loads((tmp_path / "run" / "selections.json").read_text())
    clean = load_pool(paths["pool"], load_tokenizer(model), max_len=128)
    assert saved["pool_fingerprint"] == clean.fingerprint  # the kept records are the clean pool
    assert saved["skipped"]["count"] == 1
    assert [(p["line"], p["field"], p["reason"]) for p in saved["skipped"]["problems"]] == [
        (3, "output", "empty-response")]
    assert echoed[0] == (f"skipped 1 bad record of {bad_pool} (1 empty-response; "
                         f'see "skipped" in {tmp_path / "run" / "selections.json"})')
