"""Batching: bucket lengths, static shapes, exact order, padding rows, masks copied from the pool."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jraise.data.batching import (
    bucket_lengths,
    epoch_order,
    iterate_batches,
    make_batch,
    pick_bucket,
    preference_batch,
)
from jraise.data.pool import load_pool, load_preference_pool
from jraise.model.tokenizer import build_char_tokenizer

BUCKETS = (48, 64, 96, 160)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("char_tok"), [string.printable])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pool(tok, tmp_path_factory):
    """11 examples of lengths spread over the buckets (char tokenizer: ~40 template tokens + text)."""
    records = [{"prompt": f"q{i}" + "x" * (9 * i), "response": "y" * (1 + i % 3)} for i in range(11)]
    path = write_jsonl(tmp_path_factory.mktemp("pool") / "d.jsonl", records)
    return load_pool(path, tok, max_len=160)


@pytest.fixture(scope="module")
def pref_pool(tok, tmp_path_factory):
    records = [{"prompt": f"p{i}", "chosen": "good" * (i + 1), "rejected": "no"} for i in range(3)]
    path = write_jsonl(tmp_path_factory.mktemp("pref") / "p.jsonl", records)
    return load_preference_pool(path, tok, max_len=160)


def test_bucket_lengths():
    assert bucket_lengths(512) == (64, 128, 256, 512)
    assert bucket_lengths(1000) == (128, 256, 512, 1000)
    assert bucket_lengths(64) == (32, 64)  # only as many powers of two as fit above min_len
    assert bucket_lengths(512, n_buckets=1) == (512,)
    assert bucket_lengths(100, n_buckets=3, min_len=8) == (32, 64, 100)
    assert bucket_lengths(16) == (16,)
    with pytest.raises(ValueError):
        bucket_lengths(0)


def test_pick_bucket():
    assert pick_bucket(48, BUCKETS) == 48 and pick_bucket(49, BUCKETS) == 64
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        pick_bucket(161, BUCKETS)


def test_make_batch_copies_tokens_and_masks_and_pads_right(pool):
    indices = [5, 0, -1]
    batch = make_batch(pool, indices, 160)
    expected = {
        "input_ids": np.int32,
        "attention_mask": np.int32,
        "loss_mask": np.float32,
        "example_mask": np.float32,
        "index": np.int32,
    }
    assert {k: v.dtype for k, v in batch.items()} == expected
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["loss_mask"].shape == (3, 160)
    assert batch["example_mask"].tolist() == [1, 1, 0] and batch["index"].tolist() == [5, 0, -1]
    for row, i in enumerate(indices[:2]):
        n = pool.lengths[i]
        assert np.array_equal(batch["input_ids"][row, :n], pool.tokens[i])
        assert np.all(batch["input_ids"][row, n:] == pool.pad_id)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (160 - n)
        assert np.array_equal(batch["loss_mask"][row, :n], pool.loss_masks[i].astype(np.float32))
        assert not batch["loss_mask"][row, n:].any()
    assert np.all(batch["input_ids"][2] == pool.pad_id)
    assert not batch["attention_mask"][2].any() and not batch["loss_mask"][2].any()


def test_make_batch_refuses_too_long_examples_and_bad_indices(pool):
    with pytest.raises(ValueError, match="bucket length"):
        make_batch(pool, [10], 48)
    with pytest.raises(IndexError):
        make_batch(pool, [len(pool)], 160)
    with pytest.raises(IndexError):
        make_batch(pool, [-2], 160)


def test_iterate_batches_keeps_order_pads_last_batch_and_uses_smallest_bucket(pool):
    order = [3, 3, 10, 0, 1, 7, 2]  # repeats allowed, nothing reshuffled
    batches = list(iterate_batches(pool, order, batch_size=3, buckets=BUCKETS))
    assert len(batches) == 3
    assert np.concatenate([b["index"] for b in batches]).tolist() == order + [-1, -1]
    assert batches[-1]["example_mask"].tolist() == [1, 0, 0]
    for batch in batches:
        real = batch["index"][batch["index"] >= 0]
        bucket = batch["input_ids"].shape[1]
        assert bucket == min(b for b in BUCKETS if b >= pool.lengths[real].max())
        assert batch["input_ids"].shape == (3, bucket) and batch["example_mask"].shape == (3,)
        for row, i in enumerate(real):
            assert np.array_equal(batch["loss_mask"][row, : pool.lengths[i]], pool.loss_masks[i])


def test_iterate_batches_drop_last_and_errors(pool):
    batches = list(iterate_batches(pool, range(len(pool)), batch_size=4, buckets=BUCKETS, drop_last=True))
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(iterate_batches(pool, [], batch_size=4, buckets=BUCKETS)) == []
    with pytest.raises(IndexError):
        list(iterate_batches(pool, [0, -1], batch_size=2, buckets=BUCKETS))
    with pytest.raises(ValueError, match="largest bucket"):
        list(iterate_batches(pool, [10], batch_size=2, buckets=(48, 64)))


@settings(max_examples=40, deadline=None)
@given(order=st.lists(st.integers(0, 10), max_size=25), batch_size=st.integers(1, 6))
def test_iterate_batches_shapes_are_static_and_order_exact(pool, order, batch_size):
    batches = list(iterate_batches(pool, order, batch_size, BUCKETS))
    assert len(batches) == -(-len(order) // batch_size)
    indices = np.concatenate([b["index"] for b in batches]) if batches else np.zeros(0)
    assert indices[: len(order)].tolist() == order and np.all(indices[len(order) :] == -1)
    for batch in batches:
        assert batch["input_ids"].shape[0] == batch_size and batch["input_ids"].shape[1] in BUCKETS
        assert np.array_equal(batch["example_mask"], (batch["index"] >= 0).astype(np.float32))
        assert np.array_equal(
            batch["attention_mask"].sum(1), np.where(batch["index"] >= 0, pool.lengths[batch["index"]], 0)
        )


def test_epoch_order_is_a_deterministic_permutation():
    first = epoch_order(50, seed=3, epoch=0)
    assert sorted(first.tolist()) == list(range(50))
    assert np.array_equal(first, epoch_order(50, seed=3, epoch=0))
    assert not np.array_equal(first, epoch_order(50, seed=3, epoch=1))
    assert not np.array_equal(first, epoch_order(50, seed=4, epoch=0))
    assert len(epoch_order(0, 0, 0)) == 0


def test_preference_batch_has_both_sides(pref_pool):
    batch = preference_batch(pref_pool, [2, -1], 96)
    for side, tokens, masks in (
        ("chosen", pref_pool.chosen_tokens, pref_pool.chosen_masks),
        ("rejected", pref_pool.rejected_tokens, pref_pool.rejected_masks),
    ):
        assert batch[f"{side}_input_ids"].shape == (2, 96) and batch[f"{side}_input_ids"].dtype == np.int32
        n = len(tokens[2])
        assert np.array_equal(batch[f"{side}_input_ids"][0, :n], tokens[2])
        assert batch[f"{side}_attention_mask"][0].sum() == n
        assert np.array_equal(batch[f"{side}_loss_mask"][0, :n], masks[2].astype(np.float32))
        assert not batch[f"{side}_attention_mask"][1].any()
    assert batch["example_mask"].tolist() == [1, 0] and batch["index"].tolist() == [2, -1]
    # iterate_batches works on preference pools too, bucketed by the longer side
    (only,) = iterate_batches(pref_pool, [0, 2], batch_size=2, buckets=BUCKETS)
    assert only["chosen_input_ids"].shape[1] == pick_bucket(int(pref_pool.lengths[[0, 2]].max()), BUCKETS)


def test_length_buckets_are_optimal_and_cover_every_example():
    import itertools

    from jraise.data.batching import length_buckets

    rng = np.random.default_rng(0)
    for _ in range(60):
        lengths = rng.integers(1, 200, size=rng.integers(1, 25))
        n_buckets, quantum = int(rng.integers(1, 5)), int(rng.integers(1, 20))
        got = length_buckets(lengths, n_buckets, quantum)
        rounded = -(-lengths // quantum) * quantum
        candidates = sorted(set(rounded.tolist()))

        def padded_total(buckets, rounded=rounded):
            return sum(min(b for b in buckets if b >= x) for x in rounded)

        best = min(padded_total(c) for m in range(1, n_buckets + 1) for c in itertools.combinations(candidates, m)
                   if max(c) == max(candidates))
        assert padded_total(got) == best and len(got) <= n_buckets
        assert max(got) >= lengths.max() and all(b % quantum == 0 for b in got)
    assert length_buckets([55, 66, 80, 97, 128] * 10, 4) == (64, 80, 112, 128)
    with pytest.raises(ValueError):
        length_buckets([], 4)
